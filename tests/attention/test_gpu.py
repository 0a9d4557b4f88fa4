"""Decode attention on a GPU (``pytest -m gpu``): the compiled kernel (bf16 / fp16 MMAs, not the
interpreter's fp32) at Super's heads over long live lengths, and CUDA-graph replay at changing lengths
(the grid depends on max_len only; lengths are read on the device)."""
import pytest
import torch

from nemotron.attention import decode_attention
from nemotron.attention import reference as ref
from nemotron.attention.triton import decode as kernels

from ..close import assert_close, max_abs

pytestmark = pytest.mark.gpu
FP8 = torch.float8_e4m3fn


def _super(kv_dtype, *, b=2, t=1, max_len=1 << 17, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, t, 32, 128, device="cuda", generator=g).to(torch.bfloat16)
    kc, vc = (torch.randn(b, 2, max_len, 128, device="cuda", generator=g).to(kv_dtype) for _ in range(2))
    s = dict(k_scale=torch.tensor([0.5], device="cuda"), v_scale=torch.tensor([1.5], device="cuda")) if kv_dtype == FP8 else {}
    return q, kc, vc, s


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("t", [1, 4])
def test_super_heads_long_lengths(kv_dtype, t):
    q, kc, vc, s = _super(kv_dtype, t=t)
    lengths = torch.tensor([kc.shape[2], 70_001], dtype=torch.int32, device="cuda")
    want = ref.decode_attention_reference(q, kc, vc, lengths, **s)
    got = decode_attention(q, kc, vc, lengths, **s)
    # bf16 / fp16 MMA operands (P rounded to them), fp32 accumulation, bf16 output (tests/attention/test_decode.py)
    assert_close(got, want, atol=1.6e-2 * max_abs(want), what=f"{kv_dtype} T={t}")


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
def test_cuda_graph_replay_follows_the_lengths(kv_dtype):
    q, kc, vc, s = _super(kv_dtype, b=1, max_len=1 << 16)
    lengths = torch.tensor([100], dtype=torch.int32, device="cuda")
    decode_attention(q, kc, vc, lengths, **s)                        # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, kc, vc, lengths, **s)
    for n in (1, 17, 4096, 65_536, 1000):
        lengths.fill_(n)
        graph.replay()
        want = kernels.decode_attention(q, kc, vc, lengths, scale=128 ** -0.5, **s)
        assert torch.equal(out, want), n                             # same kernels, same grid: bit for bit
