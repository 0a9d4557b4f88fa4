"""Long context at bounded memory: attention reads only the live KV, prefill runs in chunks by
default (equal to one pass), the MoE runs long inputs in token chunks, and compiled graphs do not
multiply with the prompt length."""
import pytest
import torch

from nemotron.attention.reference import kv_bytes_live, kv_bytes_read
from nemotron.model import layers

from ..close import assert_close, assert_equal, max_abs
from .test_model import _scaled, _tiny


@pytest.fixture(scope="module")
def model():
    return _scaled(_tiny(seed=31), seed=31)


def test_chunked_default_prefill_equals_one_pass(model):
    ids = torch.randint(3, 256, (2, 23), generator=torch.Generator().manual_seed(0))
    one = model.generate(ids, max_new_tokens=10, prefill_chunk=1000)
    model.config.prefill_chunk_size = 6                   # the default chunk: 4 chunks, the last partial
    try:
        assert_equal(model.generate(ids, max_new_tokens=10), one, what="default (chunked) prefill")
        assert_equal(model.generate(ids, max_new_tokens=10, mtp_draft_tokens=2), one, what="chunked, MTP")
    finally:
        model.config.prefill_chunk_size = 8192


def test_moe_token_chunks_equal_one_pass(model, monkeypatch):
    ids = torch.randint(3, 256, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        monkeypatch.setattr(layers, "MOE_TOKEN_CHUNK", 7)   # 51 tokens: 8 chunks, the last partial
        got = model(ids)
    assert_close(got, want, atol=1e-6 * max_abs(want), what="MoE in 7-token chunks")


@pytest.mark.parametrize("max_len", [64, 1024])
def test_attention_reads_only_the_live_kv(max_len):
    """The cached attention's KV bytes are those of the live prefix, whatever the buffer's length."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([9, 30])
    kc = torch.randn(2, 2, max_len, 16, generator=g)
    vc = torch.randn(2, 2, max_len, 16, generator=g)
    q = torch.randn(2, 4, 3, 16, generator=g)                                   # [B, NH, T, D]
    _, read = kv_bytes_read(lambda: layers.attend_cache(q, kc, vc, lengths, scale=0.25, kv_scale=None), kc, vc)
    assert read == kv_bytes_live(lengths, 2, 16, torch.float32), read


def test_compiled_graphs_do_not_grow_with_the_prompt_length(model):
    """Without a cache: one graph for the first length, one dynamic graph for the others. With a
    cache: a decode graph besides, and no graph per step."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("eager")
    f = torch.compile(model, backend=cnt)
    with torch.no_grad():
        for t in (5, 9, 13, 21):
            ids = torch.randint(3, 256, (1, t), generator=torch.Generator().manual_seed(t))
            assert_close(f(ids), model(ids), atol=1e-5, what=f"T={t}")
        assert cnt.frame_count == 2, cnt.frame_count
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("eager")
        f = torch.compile(model, backend=cnt)
        for t in (11, 19, 23):
            ids = torch.randint(3, 256, (1, t), generator=torch.Generator().manual_seed(t))
            cache = model.new_cache(1, 40)
            f(ids, cache=cache)
            tok = ids[:, -1:].clone(memory_format=torch.contiguous_format)
            for _ in range(4):
                tok = f(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
        assert cnt.frame_count == 3, cnt.frame_count        # first prefill, decode, dynamic-length prefill
