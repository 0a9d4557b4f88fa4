"""int64 address arithmetic: every Triton kernel (but the SSD scan, tested with its own) reads and
writes a batch row whose element offset is past 2^31 - 1.

Each input gets a dim-0 stride S < 2^31 (so Triton passes it as a 32-bit integer) with 2 * S >= 2^31:
in 32-bit arithmetic ``i_b * S`` wraps for batch row 2. The views live in an untouched virtual
allocation of about 2^32 elements (16-bit dtypes: 8 GiB of address space, a few pages committed),
starting at element 2^31, so a wrapped offset lands inside the allocation (reading zeros) instead of
faulting. Each kernel's result on the wide view must equal, bit for bit, its result on a contiguous
copy: the same arithmetic on the same values, only the addresses differ. The kernels run under the
Triton interpreter; on a GPU the allocations are real (8 GiB of device memory per wide view, at most
five at once).
"""
from __future__ import annotations

import math

import torch

from nemotron.moe_kernels import reference as moe_ref
from nemotron.moe_kernels.triton import grouped_gemm
from nemotron.nvfp4 import ops as nvfp4_ops
from nemotron.nvfp4.triton import gemm, norm_quantize, quantize
from nemotron.ssm_kernels.triton import conv1d, gated_rmsnorm, state_update

from .close import assert_equal

WRAP = 2 ** 31
STRIDE = WRAP // 2 + 64          # < 2^31, and 2 * STRIDE > 2^31 - 1: batch row 2 wraps in int32
B = 3


def wide(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` [B, ...] copied into a view on ``device`` whose dim-0 stride is STRIDE elements (see the module
    docstring); the inner dims stay contiguous."""
    assert t.shape[0] == B and math.prod(t.shape[1:]) <= STRIDE
    inner = torch.empty(t.shape[1:]).stride() if t.dim() > 1 else ()
    span = (B - 1) * STRIDE + math.prod(t.shape[1:])
    buf = torch.empty(WRAP + span, dtype=t.dtype, device=device)       # untouched: only address space
    v = buf.as_strided(t.shape, (STRIDE, *inner), WRAP)
    v.copy_(t)
    assert v.stride(0) * (B - 1) > WRAP - 1 > v.stride(0)
    return v


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_conv1d(kernel_device):
    g = _gen(1)
    t, d, w = 5, 40, 4
    x = torch.randn(B, t, d, generator=g).to(torch.bfloat16)
    weight, bias = torch.randn(d, w, generator=g).to(kernel_device), torch.randn(d, generator=g).to(kernel_device)
    s0 = torch.randn(B, w - 1, d, generator=g).to(torch.bfloat16).to(kernel_device)
    xw = wide(x, kernel_device)
    for init in (None, s0):
        y = conv1d.causal_conv1d(xw, weight, bias, activation="silu", initial_states=init)
        y_ref = conv1d.causal_conv1d(x.to(kernel_device), weight, bias, activation="silu", initial_states=init)
        assert_equal(y, y_ref, what=f"conv1d y (initial states: {init is not None})")


def test_conv1d_update_multi(kernel_device):
    g = _gen(2)
    t, d, w = 3, 40, 4
    x = torch.randn(B, t, d, generator=g).to(torch.bfloat16)
    weight = torch.randn(d, w, generator=g).to(kernel_device)
    state = torch.randn(B, w - 1, d, generator=g).to(torch.bfloat16)
    outs = []
    for xx, ss in ((wide(x, kernel_device), wide(state, kernel_device)), (x.to(kernel_device), state.to(kernel_device))):
        so = torch.zeros(B, t, w - 1, d, dtype=torch.bfloat16, device=kernel_device)
        y = conv1d.causal_conv1d_update_multi(xx, ss, weight, so, activation="silu")
        outs.append((y, so, ss.clone()))
    for name, a, e in zip(("y", "states_out", "conv_state"), outs[0], outs[1]):
        assert_equal(a, e, what=f"conv1d update multi {name}")


def _ssm_inputs(g, t=None):
    h, p, grp, n = 4, 8, 2, 16
    tt = () if t is None else (t,)
    x = torch.randn(B, *tt, h, p, generator=g).to(torch.bfloat16)
    dt = torch.rand(B, *tt, h, generator=g).to(torch.bfloat16)
    bb, cc = (torch.randn(B, *tt, grp, n, generator=g).to(torch.bfloat16) for _ in range(2))
    z = torch.randn(B, *tt, h, p, generator=g).to(torch.bfloat16)
    a = -torch.rand(h, generator=g) - 0.5
    state = torch.randn(B, h, p, n, generator=g)
    return x, dt, a, bb, cc, z, state


def test_state_update(kernel_device):
    x, dt, a, bb, cc, z, state = _ssm_inputs(_gen(3))
    dev = kernel_device
    d = torch.randn(x.shape[1], generator=_gen(4)).to(dev)
    results = []
    for move in (lambda v: wide(v, dev), lambda v: v.to(dev)):
        s = state.to(dev).clone()
        y = state_update.selective_state_update(s, move(x), move(dt), a.to(dev), move(bb), move(cc), D=d, z=move(z),
                                                dt_softplus=True)
        results.append((y, s))
    assert_equal(results[0][0], results[1][0], what="state update y")
    assert_equal(results[0][1], results[1][1], what="state update state")


def test_state_update_multi(kernel_device):
    t = 2
    x, dt, a, bb, cc, z, state = _ssm_inputs(_gen(5), t=t)
    dev = kernel_device
    results = []
    for move in (lambda v: wide(v, dev), lambda v: v.to(dev)):
        s = state.to(dev).clone()
        so = torch.zeros(B, t, *state.shape[1:], device=dev)
        y = state_update.selective_state_update_multi(s, move(x), move(dt), a.to(dev), move(bb), move(cc), so,
                                                      z=move(z), dt_softplus=True)
        results.append((y, s, so))
    for name, a_, e in zip(("y", "state", "states_out"), *results):
        assert_equal(a_, e, what=f"state update multi {name}")


def test_gated_rmsnorm(kernel_device):
    g = _gen(6)
    d = 64
    x, z = (torch.randn(B, d, generator=g).to(torch.bfloat16) for _ in range(2))
    weight = torch.randn(d, generator=g).to(kernel_device)
    y = gated_rmsnorm.gated_rmsnorm(wide(x, kernel_device), wide(z, kernel_device), weight, group_size=16)
    y_ref = gated_rmsnorm.gated_rmsnorm(x.to(kernel_device), z.to(kernel_device), weight, group_size=16)
    assert_equal(y, y_ref, what="gated rmsnorm")


def test_nvfp4_quantize_and_norm_quantize(kernel_device):
    g = _gen(7)
    k = 64
    x = torch.randn(B, k, generator=g).to(torch.bfloat16)
    xw, xc = wide(x, kernel_device), x.to(kernel_device)
    for had in (False, True):
        got = quantize.quantize(xw, tile_rows=1, global_scale=None, stochastic=False, seed=0, hadamard=had)
        exp = quantize.quantize(xc, tile_rows=1, global_scale=None, stochastic=False, seed=0, hadamard=had)
        for name, a, e in zip(("codes", "scales", "global scale"), got, exp):
            assert_equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                         e.view(torch.uint8) if e.dtype == torch.float8_e4m3fn else e, what=f"quantize {name}")
    assert_equal(quantize.hadamard(xw), quantize.hadamard(xc), what="hadamard")
    weight, scale = torch.randn(k, generator=g).to(kernel_device), torch.tensor(0.01, device=kernel_device)
    got = norm_quantize.norm_quantize(xw, weight, scale, z=xw, group_size=32, eps=1e-5)
    exp = norm_quantize.norm_quantize(xc, weight, scale, z=xc, group_size=32, eps=1e-5)
    for name, a, e in zip(("codes", "scales"), got, exp):
        assert_equal(a, e, what=f"norm quantize {name}")


def _nvfp4_weight(n, k, g, dev):
    w = nvfp4_ops.quantize(torch.randn(n, k, generator=g))
    return w.codes.to(dev), w.block_scales.view(torch.uint8).to(dev), w.global_scale.to(dev)


def test_nvfp4_gemm(kernel_device):
    g = _gen(8)
    n, k = 48, 256
    codes, scales, gs = _nvfp4_weight(n, k, g, kernel_device)
    x = torch.randn(B, k, generator=g).to(torch.bfloat16)
    # (W4A4 reads its NVFP4 activation rows at stride K/2: the launcher requires them contiguous)
    assert_equal(gemm.gemm(wide(x, kernel_device), codes, scales, gs), gemm.gemm(x.to(kernel_device), codes, scales, gs),
                 what="nvfp4 gemm")


def test_moe_experts(kernel_device):
    g = _gen(9)
    e, top_k, hdim, inter = 4, 2, 32, 48
    x = torch.randn(B, hdim, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(B)]).to(torch.int32)
    weights = torch.rand(B, top_k, generator=g)
    perm, offs = moe_ref.permute_reference(ids, e)
    dev = kernel_device
    perm, offs, weights = perm.to(dev), offs.to(dev), weights.to(dev)
    up = nvfp4_ops.quantize(torch.randn(e, inter, hdim, generator=g))
    down = nvfp4_ops.quantize(torch.randn(e, hdim, inter, generator=g))
    w_up = (up.codes.to(dev), up.block_scales.view(torch.uint8).to(dev), up.global_scale.reshape(1).expand(e).to(dev))
    w_down = (down.codes.to(dev), down.block_scales.view(torch.uint8).to(dev),
              down.global_scale.reshape(1).expand(e).contiguous().to(dev))
    got = grouped_gemm.expert_slots(wide(x, dev), weights, perm, offs, top_k, w_up, w_down)
    exp = grouped_gemm.expert_slots(x.to(dev), weights, perm, offs, top_k, w_up, w_down)
    assert_equal(got, exp, what="moe expert slots")
