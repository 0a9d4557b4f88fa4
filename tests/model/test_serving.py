"""Serving-grade generation: per-row positions (left-padded batches), batched speculative decoding,
MTP through the compiler without recompiles, and decode steps without host reads."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nemotron.model import demo_checkpoint, NemotronHForCausalLM
from nemotron.model import generate as gen

from ..close import assert_close, assert_equal, max_abs
from .test_model import _scaled, _tiny


def _batch(prompts, pad=0):
    """Left-padded ``[B, T]`` ids and their attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return _scaled(_tiny(seed=21), seed=21)


def test_padded_forward_equals_each_prompt_alone(model):
    """Logits of a left-padded batch at each row's real positions equal the prompt's own logits:
    the pads reach neither the Mamba states nor the attention. The scan sums its chunks from other
    offsets in the padded row, so agreement is to fp32 rounding, not bitwise."""
    prompts = _prompts([5, 13, 9], seed=0)
    ids, mask = _batch(prompts)
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        for b, p in enumerate(prompts):
            want = model(torch.tensor([p]))
            assert_close(got[b, -len(p):], want[0], atol=1e-5 * max_abs(want), what=f"row {b}")
        # the same through a cache, in chunks that cut through the padding
        cache = model.new_cache(3, 20)
        parts = [model(ids[:, s:s + 4], cache=cache, attention_mask=mask[:, s:s + 4]) for s in range(0, 13, 4)]
        assert cache.lengths() == [len(p) for p in prompts]
        assert_close(torch.cat(parts, 1)[mask.bool()], got[mask.bool()], atol=1e-5 * max_abs(got), what="chunked")


@pytest.mark.parametrize("k,chunk", [(0, None), (0, 4), (2, None), (3, 5)])
def test_padded_batch_generates_what_each_prompt_gives_alone(model, k, chunk):
    prompts = _prompts([4, 11, 7], seed=1)
    ids, mask = _batch(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=14, mtp_draft_tokens=k, prefill_chunk=chunk)
    assert out.shape == (3, 11 + 14)
    for b, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=14)
        assert_equal(out[b, 11:], alone[0, len(p):], what=f"row {b}, k={k}, chunk={chunk}")


def test_rows_stop_independently_at_eos(model):
    prompts = _prompts([6, 9], seed=2)
    alone = [model.generate(torch.tensor([p]), max_new_tokens=16)[0, len(p):].tolist() for p in prompts]
    eos = alone[0][3]                                            # row 0 stops early, row 1 later or never
    ids, mask = _batch(prompts)
    for k in (0, 2):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, mtp_draft_tokens=k)
        for b, row in enumerate(alone):
            stop = row.index(eos) + 1 if eos in row else len(row)
            assert out[b, 9:9 + stop].tolist() == row[:stop], (k, b)
            assert (out[b, 9 + stop:] == model.config.pad_token_id).all(), (k, b)


@pytest.fixture(scope="module")
def shipped():
    return NemotronHForCausalLM.from_pretrained(demo_checkpoint("nvfp4"))


def test_batched_mtp_greedy_equals_plain_greedy_on_the_trained_model(shipped):
    """The trained drafter is right often, so rows accept different numbers of tokens per round."""
    from nemotron.train import data as d
    tok = d.load_tokenizer(demo_checkpoint("nvfp4"))
    texts = ["import os\n\n\ndef walk(top):\n", "class Queue:\n    def __init__(self", "for i in range("]
    prompts = [tok.encode(t).ids for t in texts]
    ids, mask = _batch(prompts, pad=shipped.config.pad_token_id or 0)
    width = ids.shape[1]
    alone = [shipped.generate(torch.tensor([p]), max_new_tokens=24)[0, len(p):] for p in prompts]
    for k in (1, 3):
        out, st = shipped.generate(ids, attention_mask=mask, max_new_tokens=24, mtp_draft_tokens=k,
                                   output_stats=True)
        for b in range(len(prompts)):
            assert_equal(out[b, width:], alone[b], what=f"row {b}, k={k}")
        assert st.drafted > 0 and 0 < st.accepted < st.drafted, st
        assert st.tokens_per_round > 1.2, st
    # short budgets: rows reach max_new_tokens mid-round, having accepted drafts past it
    for new in (1, 2, 3, 5):
        out = shipped.generate(ids, attention_mask=mask, max_new_tokens=new, mtp_draft_tokens=3)
        for b in range(len(prompts)):
            assert_equal(out[b, width:], alone[b][:new], what=f"row {b}, {new} new tokens")


def test_batched_mtp_with_a_drafter_right_on_some_positions(model, monkeypatch):
    """A drafter right at some positions and wrong at others, differently per row, exercises every
    per-row acceptance count; the output must stay each row's plain greedy output."""
    prompts = _prompts([5, 8], seed=3)
    plain = [p + model.generate(torch.tensor([p]), max_new_tokens=20)[0, len(p):].tolist() for p in prompts]
    real = gen._draft_step

    def oracle(m, tok, hidden, valid, last, cache, k):
        real(m, tok, hidden, valid, last, cache, k)                  # the cache's bookkeeping
        rows = []
        for b, seq in enumerate(plain):
            p = int(cache.mtp_pos[b])                        # real positions caught up; draft i predicts p + i
            rows.append([(seq[q] if q % (3 + b) else (seq[q] + 1) % 256) if q < len(seq) else 0
                         for q in range(p + 1, p + k + 1)])
        return torch.tensor(rows)

    monkeypatch.setattr(gen, "_draft_step", oracle)
    ids, mask = _batch(prompts)
    out, st = model.generate(ids, attention_mask=mask, max_new_tokens=20, mtp_draft_tokens=3, output_stats=True)
    for b, seq in enumerate(plain):
        assert out[b, 8:].tolist() == seq[len(prompts[b]):], b
    assert 0 < st.accepted < st.drafted and st.tokens_per_round > 1.5, st


def test_compiled_mtp_has_no_recompiles_over_200_rounds():
    """Draft and verify steps compile once each (static [B, k+1] shapes) and serve every round,
    and a second call; the output equals eager greedy."""
    from torch._dynamo.testing import CompileCounterWithBackend
    m = _tiny(seed=22)                                # random drafts: about one token per round
    prompts = _prompts([6, 3], seed=4)
    ids, mask = _batch(prompts)
    want = m.generate(ids, attention_mask=mask, max_new_tokens=205)
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("nemotron")
    out, st = m.generate(ids, attention_mask=mask, max_new_tokens=205, mtp_draft_tokens=2, backend=cnt,
                         max_len=256, output_stats=True)
    assert st.rounds >= 200, st
    assert_equal(out, want, what="compiled MTP vs eager greedy")
    assert cnt.frame_count == 2, cnt.frame_count                     # the draft step and the verify step
    m.generate(ids, attention_mask=mask, max_new_tokens=30, mtp_draft_tokens=2, backend=cnt, max_len=256)
    assert cnt.frame_count == 2, cnt.frame_count


class _HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: every ``.item()`` / ``int()`` / ``bool()`` of a tensor
    (a device-to-host sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_decode_steps_make_no_host_reads(model):
    ids, mask = _batch(_prompts([4, 7], seed=5))
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        model(ids, cache=cache, attention_mask=mask)
        tok = ids[:, -1:]
        noise = torch.empty(2, model.config.vocab_size).exponential_()
        with _HostReads() as reads:
            for temperature, top_p, nz in ((0.0, 1.0, None), (0.8, 0.9, noise)):
                tok = gen._decode_step(model, tok, cache, temperature, top_p, nz)[:, None]
        assert reads.n == 0, reads.n
    # a whole call: the host reads do not grow with the tokens generated (checks once per call);
    # an MTP round reads one flag
    counts = {}
    for new in (8, 40):
        with _HostReads() as reads:
            model.generate(ids, attention_mask=mask, max_new_tokens=new)
        counts[new] = reads.n
    assert counts[8] == counts[40], counts
    with _HostReads() as reads:
        _, st = model.generate(ids, attention_mask=mask, max_new_tokens=40, mtp_draft_tokens=2, output_stats=True)
    assert reads.n <= counts[40] + st.rounds + 4, (reads.n, st.rounds)


def test_sampling_is_the_softmax_distribution_within_top_p():
    """The exponential race draws from softmax(logits / T) restricted to the top-p nucleus."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    s = gen._Sampler(0.7, 1.0, g, 5, "cpu")
    freq = torch.bincount(s(logits), minlength=5).double() / 40000
    p = torch.softmax(logits[0].double() / 0.7, 0)
    assert (freq - p).abs().max() < 0.01, (freq, p)           # 40000 draws: std of a frequency <= 0.0025
    cut = gen._Sampler(1.0, 0.6, g, 5, "cpu")(logits)           # p = .52, .19, .12, ...: the nucleus is {0, 1}
    assert set(cut.unique().tolist()) == {0, 1}


def test_cli_generates_several_prompts(tmp_path, capsys):
    from nemotron.__main__ import main
    m = _scaled(_tiny(seed=23), seed=23)
    m.save_pretrained(str(tmp_path))
    prompts = _prompts([3, 6], seed=6)
    argv = ["generate", "--model", str(tmp_path), "--max-new-tokens", "5", "--mtp", "2"]
    for p in prompts:
        argv += ["--ids", ",".join(map(str, p))]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()[-2:]
    for p, line in zip(prompts, lines):
        want = m.generate(torch.tensor([p]), max_new_tokens=5, eos_token_id=m.config.eos_token_id)[0, len(p):]
        assert line == ",".join(map(str, want.tolist()))
    assert "MTP: acceptance" in out.err


@pytest.mark.parametrize("mask,match", [
    ([[1, 1, 0], [1, 1, 1]], "left padding"),
    ([[0, 1, 2], [1, 1, 1]], "0 \\(pad\\) and 1"),
    ([[1, 1], [1, 1]], "expected shape"),
    ([[0, 0, 0], [1, 1, 1]], "last column"),
])
def test_bad_attention_masks_are_clear_errors(model, mask, match):
    with pytest.raises(ValueError, match=match):
        model.generate(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor(mask), max_new_tokens=2)
    with pytest.raises(TypeError, match="attention_mask"):
        model.generate(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3), max_new_tokens=2)
    with pytest.raises(TypeError, match="output_stats"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, output_stats=1)
