"""The ``nemotron::decode_attention`` op: opcheck (schema, fake, dynamic shapes), the dispatch by device,
a compiled call without graph breaks, errors at the public boundary, and the KV bytes a step reads
(counted on the aten ops of the reference and of the torch path) proportional to the live length."""
import pytest
import torch

from nemotron import dispatch
from nemotron.attention import decode_attention
from nemotron.attention import ops
from nemotron.attention import reference as ref

from ..close import assert_close, assert_equal, max_abs

FP8 = torch.float8_e4m3fn


def _inputs(kv_dtype=torch.bfloat16, *, b=2, t=1, hq=4, hkv=2, d=16, max_len=24, lengths=(24, 7)):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, t, hq, d, generator=g).to(torch.bfloat16)
    kc, vc = (torch.randn(b, hkv, max_len, d, generator=g).to(kv_dtype) for _ in range(2))
    return q, kc, vc, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize("impl", ["", "triton", "reference"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
def test_opcheck(impl, kv_dtype):
    q, kc, vc, lens = _inputs(kv_dtype, t=2)
    scales = (torch.tensor([0.5]), torch.tensor([2.0])) if kv_dtype == FP8 else (None, None)
    utils = torch.library._OPCHECK_DEFAULT_UTILS
    if kv_dtype == FP8:     # torch's schema check compares inputs with allclose, which has no CPU float8 kernel
        utils = tuple(u for u in utils if u != "test_schema")
    torch.library.opcheck(torch.ops.nemotron.decode_attention.default, (q, kc, vc, lens, 0.25, *scales, impl),
                          test_utils=utils)


def test_cpu_default_is_sdpa_on_the_live_slice_and_says_why():
    q, kc, vc, lens = _inputs()
    c = dispatch.choose("decode_attention", q, record=False)
    assert c.name == "torch" and c.rejected[0][0] == "triton" and "CPU tensor" in c.rejected[0][1]
    with dispatch.trace() as ran:
        decode_attention(q[:, 0], kc, vc, lens)
    assert ran == [("decode_attention", "torch")]


def test_compiles_without_graph_breaks():
    """The CPU length check is skipped under torch.compile, so decode does not break the graph."""
    q, kc, vc, lens = _inputs(FP8, t=3)
    f = torch.compile(lambda *a: decode_attention(*a, k_scale=0.5, v_scale=torch.tensor([2.0])), backend="aot_eager",
                      fullgraph=True)
    torch._dynamo.reset()
    want = decode_attention(q, kc, vc, lens, k_scale=0.5, v_scale=torch.tensor([2.0]))
    assert_close(f(q, kc, vc, lens), want, atol=0.0, what="compiled vs eager")


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, FP8])
def test_kv_bytes_read_per_step_proportional_to_live_length(impl, kv_dtype):
    """Bytes read from the KV buffers by the aten ops of one step: 2 * len * Hkv * D * itemsize per
    row, the same for max_len 64 and 1024 (the step never touches the dead part of the buffer)."""
    hkv, d = 2, 16
    for max_len in (64, 1024):
        for n in (1, 16, 64):
            q = torch.randn(1, 1, 4, d)
            kc, vc = (torch.randn(1, hkv, max_len, d).to(kv_dtype) for _ in range(2))
            lens = torch.tensor([n])
            s = torch.tensor([0.5]) if kv_dtype == FP8 else None
            if impl == "reference":
                fn = lambda: ref.decode_attention_reference(q, kc, vc, lens, k_scale=s, v_scale=s)  # noqa: E731
            else:        # the torch path's body: the op itself is one opaque call taking the whole buffer
                fn = lambda: ops._sdpa_live(q, kc, vc, lens, d ** -0.5, s, s)  # noqa: E731
            _, nbytes = ref.kv_bytes_read(fn, kc, vc)
            assert nbytes == ref.kv_bytes_live(lens, hkv, d, kv_dtype) == 2 * n * hkv * d * kc.element_size(), \
                (max_len, n, nbytes)


@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
def test_rows_of_length_zero_and_queries_before_the_first_key_are_zero(impl):
    q, kc, vc, _ = _inputs(t=3)
    lens = torch.tensor([0, 2], dtype=torch.int64)
    with dispatch.use(impl):
        out = decode_attention(q, kc, vc, lens)
    assert (out[0] == 0).all() and (out[1, 0] == 0).all() and out[1, 1:].abs().sum() > 0
    want = ref.decode_attention_reference(q, kc, vc, lens)
    assert_close(out, want, atol=1.6e-2 * max_abs(want), what=impl)       # bf16 output rounding


def _bad_cases():
    q, kc, vc, lens = _inputs()
    f8 = kc.to(FP8)
    return [
        (dict(q=q.float().numpy()), TypeError, "q: expected a torch.Tensor"),
        (dict(q=q.to(torch.int32)), TypeError, "q: expected dtype"),
        (dict(q=q[0, 0]), ValueError, r"q: expected \[B, Hq, D\] or \[B, T, Hq, D\]"),
        (dict(q=q[..., :0]), ValueError, "q: the head dim D must be >= 1"),
        (dict(k_cache=kc[:1], v_cache=vc[:1]), ValueError, r"k_cache: expected \[B=2, Hkv, L, D=16\]"),
        (dict(q=torch.randn(2, 1, 3, 16, dtype=torch.bfloat16)), ValueError, "Hkv=2 must divide the query head count Hq=3"),
        (dict(v_cache=vc[:, :, :10]), ValueError, "v_cache: expected k_cache's shape"),
        (dict(v_cache=vc.float()), TypeError, "v_cache: expected dtype"),
        (dict(k_cache=kc.half(), v_cache=vc.half()), TypeError, "k_cache: expected q's dtype"),
        (dict(k_cache=kc.to(torch.int8)), TypeError, "k_cache: expected dtype"),
        (dict(k_cache=torch.randn(2, 2, 24, 32, dtype=torch.bfloat16)[..., ::2]), ValueError,
         "k_cache: the head dim must be contiguous"),
        (dict(lengths=lens.float()), TypeError, "lengths: expected dtype"),
        (dict(lengths=lens[:1]), ValueError, r"lengths: expected shape \[B=2\]"),
        (dict(lengths=torch.tensor([25, 1])), ValueError, r"lengths: expected values in 0 .. 24"),
        (dict(lengths=torch.tensor([-1, 1])), ValueError, r"lengths: expected values in 0 .. 24"),
        (dict(lengths=[24, 7]), TypeError, "lengths: expected a torch.Tensor"),
        (dict(k_cache=f8, v_cache=f8), ValueError, "k_scale, v_scale: required for a float8_e4m3fn cache"),
        (dict(k_cache=f8, v_cache=f8, k_scale=1.0, v_scale=0.0), ValueError, "v_scale: expected a finite float"),
        (dict(k_cache=f8, v_cache=f8, k_scale=torch.ones(2), v_scale=1.0), ValueError, "k_scale: expected one element"),
        (dict(k_cache=f8, v_cache=f8, k_scale=torch.ones(1, dtype=torch.float64), v_scale=1.0), TypeError,
         "k_scale: expected dtype"),
        (dict(k_cache=f8, v_cache=f8, k_scale="1", v_scale=1.0), TypeError, "k_scale: expected a float"),
        (dict(scale=float("nan")), ValueError, "scale: expected a finite float"),
        (dict(scale=-1.0), ValueError, "scale: expected a finite float"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_cases())))
def test_bad_arguments_raise_naming_the_argument(i):
    q, kc, vc, lens = _inputs()
    bad, exc, match = _bad_cases()[i]
    args = {**dict(q=q, k_cache=kc, v_cache=vc, lengths=lens), **bad}
    with pytest.raises(exc, match=match):
        decode_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("lengths"), **args)


@pytest.mark.parametrize("scale", [None, torch.tensor([0.37])])
def test_torch_path_fp8_table_equals_the_reference_dequantization(scale):
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).reshape(2, 8, 16)        # every E4M3 code, NaN included
    assert_equal(ops._live_kv(codes, scale, torch.float32), ref.dequantize_kv(codes, scale, torch.float32),
                 equal_nan=True, what="fp8 table")
