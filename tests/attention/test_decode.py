"""Decode attention over the live KV prefix: every implementation (Triton split-KV kernel, torch SDPA
on the live slice) against the fp32 reference, over drawn shapes, dtypes, GQA ratios, ragged lengths
(0 included), T new tokens per row, FP8 caches with scales, token-major cache views; the kernel's
split boundaries at lengths 1, 15, 16, 17; T tokens at once equal T sequential single-token steps.

Cache positions at and past each row's length hold NaN, so an implementation that reads (and uses)
them fails."""
import pytest
import torch
from hypothesis import example, given, strategies as st

from nemotron import dispatch
from nemotron.attention import decode_attention
from nemotron.attention import reference as ref
from nemotron.attention.triton import decode as kernels

from ..close import assert_close, max_abs
from ..strategies import seeds

FP8 = torch.float8_e4m3fn
# relative to max |reference|: one rounding of the output to its dtype (2^-24 / 2^-11 / 2^-9), plus,
# on a GPU, q.k and P.V with fp16/bf16 operands (fp32 accumulation) and P rounded to that dtype
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
IMPLS = ["triton", "torch"]


def make_case(seed, *, b, t, hq, hkv, d, max_len, lengths, dtype, kv_dtype, token_major=False):
    """(q, k_cache, v_cache, lengths, kwargs): NaN past each row's length (in the cache's own dtype)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g).to(dtype)
    kv = [torch.randn(b, hkv, max_len, d, generator=g) * 2 for _ in range(2)]
    live = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]                   # [B, L]
    kv = [torch.where(live[:, None, :, None], c, float("nan")).to(kv_dtype) for c in kv]
    if token_major:      # a [B, L, Hkv, D] buffer seen as [B, Hkv, L, D]
        kv = [c.transpose(1, 2).contiguous().transpose(1, 2) for c in kv]
    kw = {}
    if kv_dtype == FP8:
        kw = dict(k_scale=float(torch.rand((), generator=g)) + 0.25, v_scale=torch.rand(1, generator=g) + 0.25)
    return q, kv[0], kv[1], torch.tensor(lengths, dtype=torch.int32), kw


@st.composite
def cases(draw):
    b, t = draw(st.integers(1, 3)), draw(st.sampled_from([1, 1, 2, 4]))
    hkv, grp = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 4, 16]))
    d = draw(st.sampled_from([8, 16, 24, 64]))
    max_len = draw(st.integers(1, 80))
    lengths = draw(st.lists(st.integers(0, max_len), min_size=b, max_size=b))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    kv_dtype = draw(st.sampled_from([dtype, FP8]))
    return dict(seed=draw(seeds), b=b, t=t, hq=hkv * grp, hkv=hkv, d=d, max_len=max_len, lengths=lengths,
                dtype=dtype, kv_dtype=kv_dtype, token_major=draw(st.booleans()))


SUPER = dict(seed=0, b=1, t=1, hq=32, hkv=2, d=128, max_len=70, lengths=[67], dtype=torch.bfloat16, kv_dtype=FP8)


@pytest.mark.parametrize("impl", IMPLS)
@given(spec=cases())
@example(spec=SUPER)
@example(spec=dict(SUPER, t=4, kv_dtype=torch.bfloat16, lengths=[65]))
@example(spec=dict(SUPER, b=3, hq=4, d=16, lengths=[0, 2, 70], t=3))
def test_impls_match_reference(impl, spec):
    q, kc, vc, lengths, kw = make_case(**spec)
    want = ref.decode_attention_reference(q, kc, vc, lengths, **kw)
    with dispatch.use(impl), dispatch.trace() as ran:
        got = decode_attention(q, kc, vc, lengths, **kw)
    assert ran == [("decode_attention", impl)]
    assert got.dtype == q.dtype and got.shape == q.shape
    assert_close(got, want, atol=TOL[q.dtype] * max_abs(want), what=f"{impl} {spec}")


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_split_and_tile_boundaries(kv_dtype, t, splits):
    """Tiles of 16 keys: lengths 1, 15, 16, 17 (and 2 full tiles + 1) put the live end on both
    sides of a tile and, with 3 splits, of a split; the rows are ragged within one call."""
    lengths = [1, 15, 16, 17, 33]
    q, kc, vc, lens, kw = make_case(splits, b=5, t=t, hq=4, hkv=2, d=16, max_len=40, lengths=lengths,
                                    dtype=torch.float16, kv_dtype=kv_dtype)
    want = ref.decode_attention_reference(q, kc, vc, lens, **kw)
    scales = {k: torch.tensor([float(v)]) for k, v in kw.items()}
    got = kernels.decode_attention(q, kc, vc, lens, scale=16 ** -0.5, splits=splits, block_n=16, **scales)
    assert_close(got, want, atol=TOL[q.dtype] * max_abs(want), what=f"splits={splits} T={t}")


@pytest.mark.parametrize("magnitude", [2.0 ** -20, 2.0 ** 20])
def test_kernel_bf16_q_beyond_fp16_range_against_fp8_cache(magnitude):
    """An FP8 cache runs fp16 MMAs: bf16 q rows far outside fp16's range (above its max, below its
    normal numbers) are scaled by a power of two per row (exact), so they keep bf16's relative precision."""
    q, kc, vc, lens, kw = make_case(3, b=2, t=2, hq=4, hkv=2, d=16, max_len=20, lengths=[20, 9],
                                    dtype=torch.bfloat16, kv_dtype=FP8)
    q = (q.float() * magnitude * 2.0 ** -torch.arange(4.0)[:, None]).to(torch.bfloat16)     # heads 1..8x apart
    want = ref.decode_attention_reference(q, kc, vc, lens, scale=1 / magnitude, **kw)
    with dispatch.use("triton"):
        got = decode_attention(q, kc, vc, lens, scale=1 / magnitude, **kw)
    assert_close(got, want, atol=TOL[q.dtype] * max_abs(want), what=f"|q| ~ {magnitude:g}")


def test_kernel_many_query_blocks():
    """T x Hq/Hkv = 144 query rows: three blocks of 64, each stopping at its own last query's position
    (prefill of 9 tokens over a cache; a row shorter than T included)."""
    q, kc, vc, lens, _ = make_case(13, b=3, t=9, hq=16, hkv=1, d=16, max_len=40, lengths=[9, 40, 5],
                                   dtype=torch.float16, kv_dtype=torch.float16)
    want = ref.decode_attention_reference(q, kc, vc, lens)
    got = kernels.decode_attention(q, kc, vc, lens, scale=16 ** -0.5, splits=2, block_n=16)
    assert_close(got, want, atol=TOL[q.dtype] * max_abs(want), what="3 query blocks")


def test_torch_path_query_chunks(monkeypatch):
    """T > 1 on the torch path runs in query chunks bounded by the mask size: chunks of 1-2 tokens here."""
    from nemotron.attention import ops
    monkeypatch.setattr(ops, "MASK_ELEMENTS", 80)
    q, kc, vc, lens, kw = make_case(11, b=3, t=5, hq=4, hkv=2, d=16, max_len=24, lengths=[24, 3, 20],
                                    dtype=torch.float32, kv_dtype=FP8)
    want = ref.decode_attention_reference(q, kc, vc, lens, **kw)
    with dispatch.use("torch"):
        got = decode_attention(q, kc, vc, lens, **kw)
    assert_close(got, want, atol=TOL[q.dtype] * max_abs(want), what="chunked torch path")


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_t_tokens_equal_t_sequential_steps(impl):
    """Query t of T sits at len - T + t: the same as a one-token step on the prefix of that length."""
    t = 3
    q, kc, vc, lens, _ = make_case(5, b=3, t=t, hq=4, hkv=1, d=16, max_len=24, lengths=[2, 9, 24],
                                   dtype=torch.float32, kv_dtype=torch.float32)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()        # the shorter prefixes' steps need no NaN guard
    with dispatch.use(impl):
        together = decode_attention(q, kc, vc, lens)
        steps = torch.stack([decode_attention(q[:, i], kc, vc, (lens - t + 1 + i).clamp(min=0)) for i in range(t)], 1)
    assert_close(together, steps, atol=1e-5 * max_abs(steps), what=impl)      # fp32, summation order only
    assert (together[0, 0] == 0).all()                     # row of length 2: its first query sees no key


@pytest.mark.parametrize("impl", IMPLS)
def test_gqa_equals_repeated_kv_heads(impl):
    q, kc, vc, lens, kw = make_case(7, b=2, t=2, hq=8, hkv=2, d=16, max_len=20, lengths=[20, 11],
                                    dtype=torch.float32, kv_dtype=torch.float32)
    with dispatch.use(impl):
        gqa = decode_attention(q, kc, vc, lens)
        mha = decode_attention(q, kc.repeat_interleave(4, 1), vc.repeat_interleave(4, 1), lens)
    assert_close(gqa, mha, atol=1e-5 * max_abs(mha), what=impl)


def test_num_splits_is_fixed_by_max_len_batch_heads_and_sms():
    assert kernels.num_splits(512 * 1024, 1, 2, 132) == 132          # Super, batch 1: two programs per SM
    assert kernels.num_splits(512 * 1024, 64, 2, 132) == 3
    assert kernels.num_splits(100, 1, 2, 132) == 2                     # at most one tile per split
    assert kernels.num_splits(1 << 30, 1, 1, 1000) == kernels.MAX_SPLITS
    assert kernels.num_splits(512 * 1024, 1, 2, 132, m_blocks=4096) == 1            # prefill: query blocks fill it
