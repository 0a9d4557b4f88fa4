"""The fused (gated) RMSNorm + NVFP4 quantize kernel and the fused W4A4 linear op against the references."""

import torch
from hypothesis import example, given, strategies as st

import nemotron.moe_kernels  # noqa: F401  (registers nemotron::moe_routed_experts)
import nemotron.nvfp4 as nvfp4
from nemotron import dispatch
from nemotron.nvfp4 import reference as ref
from nemotron.nvfp4.triton import norm_quantize as nq

from ..close import assert_close, assert_equal, max_abs
from ..strategies import seeds


@given(m=st.integers(1, 40), groups=st.integers(1, 3), gsize=st.sampled_from([16, 32, 48, 64, 96]),
       gated=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=seeds)
@example(m=3, groups=1, gsize=4096, gated=False, dtype=torch.bfloat16, seed=0)      # Super's hidden
@example(m=2, groups=8, gsize=1024, gated=True, dtype=torch.bfloat16, seed=1)       # Super's mixer norm
def test_norm_quantize_kernel_matches_reference(kernel_device, m, groups, gsize, gated, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = groups * gsize
    x = (torch.randn(m, k, generator=g) * 2.0 ** torch.randint(-4, 5, (m, 1), generator=g)).to(dtype)
    z = torch.randn(m, k, generator=g).to(dtype) if gated else None
    w = (torch.rand(k, generator=g) + 0.5).to(dtype)
    input_scale = torch.tensor(0.003)
    d = kernel_device
    codes, scales = nq.norm_quantize(x.to(d), w.to(d), input_scale.to(d), z=None if z is None else z.to(d),
                                     group_size=gsize if gated else k, eps=1e-5)
    xn = ref.norm_reference(x, w, z=z, group_size=gsize if gated else k, eps=1e-5)
    want_c, want_s, _ = ref.quantize_reference(xn, global_scale=input_scale)
    # the two norms sum their squares in different orders: the normalized value may differ in its last
    # bit and move a code across a rounding midpoint; such flips are rare and one step each
    got_v = ref.dequantize_reference(codes.cpu(), scales.cpu().view(torch.float8_e4m3fn), input_scale)
    want_v = ref.dequantize_reference(want_c, want_s, input_scale)
    differ = (got_v != want_v).float().mean().item()
    assert differ <= 0.01, f"{differ:.2%} of the quantized values differ"
    step = max_abs(want_v) / 6 * 2 + 1e-30                  # largest code step of any block, generous
    assert_close(got_v, want_v, atol=step, what="dequantized codes")


def test_fused_linear_op_matches_unfused(kernel_device):
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(9, 96, generator=g), torch.randn(9, 96, generator=g)
    w = torch.rand(96, generator=g) + 0.5
    W = nvfp4.quantize(torch.randn(40, 96, generator=g))
    s = torch.tensor(0.01)
    for zz, gs in ((None, 96), (z, 32)):
        args = (x, w, zz, gs, 1e-5, W.codes, W.block_scales.view(torch.uint8), W.global_scale, None, s)
        want = nvfp4.linear(ref.norm_reference(x, w, z=zz, group_size=gs, eps=1e-5), W, act_quant="nvfp4", input_scale=s)
        assert_equal(torch.ops.nemotron.norm_nvfp4_linear(*args), want)
        d = kernel_device
        with dispatch.use("triton"):
            got = torch.ops.nemotron.norm_nvfp4_linear(*[a.to(d) if isinstance(a, torch.Tensor) else a for a in args])
        # fp32 GEMM reordering plus rare code flips from the norm's summation order
        assert_close(got, want, rtol=1e-2, atol=1e-2 * max_abs(want))


def test_opcheck_fused_ops():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(5, 64, generator=g), torch.rand(64, generator=g) + 0.5
    W = nvfp4.quantize(torch.randn(32, 64, generator=g))
    torch.library.opcheck(torch.ops.nemotron.norm_nvfp4_linear.default,
                          (x, w, x.clone(), 32, 1e-5, W.codes, W.block_scales.view(torch.uint8), W.global_scale, None,
                           torch.tensor(0.02)))
    up, down = torch.randn(4, 32, 64, generator=g), torch.randn(4, 64, 32, generator=g)
    torch.library.opcheck(torch.ops.nemotron.moe_routed_experts.default,
                          (x, torch.randn(5, 4, generator=g), torch.zeros(4), 2, 1, 1, True, 2.0, up, None, None, down,
                           None, None))
