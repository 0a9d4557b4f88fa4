"""NVFP4 ops: validation at the public boundary, ``torch.library`` registrations.

Each op picks its implementation through :mod:`nemotron.dispatch` (Triton kernels for CUDA tensors,
the references elsewhere; ``torch._scaled_mm`` for FP8); its trailing ``impl`` argument names one
outright, which is what the ``nemotron`` backend's lowering pass writes into compiled graphs.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from ..dispatch import FLOAT_DTYPES as _FLOAT_DTYPES
from . import fast
from . import reference as ref
from .format import BLOCK_SHAPES, NVFP4Tensor
from .triton import gemm as gemm_kernels
from .triton import norm_quantize as nq_kernels
from .triton import quantize as kernels

# ---- torch.library ops -------------------------------------------------------------------------

@torch.library.custom_op("nemotron::nvfp4_amax", mutates_args=())
def _amax_op(x: torch.Tensor, hadamard: bool, impl: str = "") -> torch.Tensor:
    if dispatch.choose("nvfp4_amax", x, impl).name == "triton":
        return kernels.amax(x, hadamard=hadamard)
    return ref.global_amax_reference(ref.hadamard_reference(x) if hadamard else x)


@_amax_op.register_fake
def _(x, hadamard, impl=""):
    return x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("nemotron::nvfp4_quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, global_scale: Optional[torch.Tensor], tile_rows: int, stochastic: bool,
                 seed: int, hadamard: bool, impl: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = dict(tile_rows=tile_rows, global_scale=global_scale, stochastic=stochastic, seed=seed, hadamard=hadamard)
    name = dispatch.choose("nvfp4_quantize", x, impl).name
    run = kernels.quantize if name == "triton" else fast.quantize if name == "torch" else ref.quantize_reference
    codes, scales, gs = run(x, **args)
    return codes, scales.view(torch.uint8), gs  # E4M3 scales travel as their bytes (opcheck has no fp8 math)


@_quantize_op.register_fake
def _(x, global_scale, tile_rows, stochastic, seed, hadamard, impl=""):
    k = x.shape[-1]
    return (x.new_empty(*x.shape[:-1], k // 2, dtype=torch.uint8),
            x.new_empty(*x.shape[:-1], k // 16, dtype=torch.uint8),
            x.new_empty((), dtype=torch.float32))


@torch.library.custom_op("nemotron::nvfp4_dequantize", mutates_args=())
def _dequantize_op(codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                   dtype: torch.dtype, impl: str = "") -> torch.Tensor:
    block_scales = block_scales.view(torch.float8_e4m3fn)
    name = dispatch.choose("nvfp4_dequantize", codes, impl).name
    run = kernels.dequantize if name == "triton" else fast.dequantize if name == "torch" else ref.dequantize_reference
    return run(codes, block_scales, global_scale, dtype)


@_dequantize_op.register_fake
def _(codes, block_scales, global_scale, dtype, impl=""):
    return codes.new_empty(*codes.shape[:-1], codes.shape[-1] * 2, dtype=dtype)


@torch.library.custom_op("nemotron::hadamard16", mutates_args=())
def _hadamard_op(x: torch.Tensor, inverse: bool, impl: str = "") -> torch.Tensor:
    if dispatch.choose("hadamard16", x, impl).name == "triton":
        return kernels.hadamard(x, inverse=inverse)
    return ref.hadamard_reference(x, inverse=inverse)


@_hadamard_op.register_fake
def _(x, inverse, impl=""):
    return torch.empty_like(x)


@torch.library.custom_op("nemotron::nvfp4_linear", mutates_args=())
def _linear_op(x: torch.Tensor, codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
               bias: Optional[torch.Tensor], act_quant: bool, input_scale: Optional[torch.Tensor],
               impl: str = "") -> torch.Tensor:
    k, n = x.shape[-1], codes.shape[0]
    name = dispatch.choose("nvfp4_linear", x, impl).name
    if name != "triton":
        f = fast.linear if name == "torch" else ref.linear_reference
        return f(x, codes, block_scales.view(torch.float8_e4m3fn), global_scale, bias, act_quant=act_quant,
                 input_scale=input_scale)
    x2 = x.reshape(-1, k)
    if act_quant:
        xc, xs, xg = kernels.quantize(x2, tile_rows=1, global_scale=input_scale, stochastic=False, seed=0,
                                      hadamard=False)
        out = gemm_kernels.gemm(xc, codes, block_scales, global_scale, bias, x_scales=xs.view(torch.uint8),
                                x_gs=xg, out_dtype=x.dtype)
    else:
        out = gemm_kernels.gemm(x2, codes, block_scales, global_scale, bias)
    return out.reshape(*x.shape[:-1], n)


@_linear_op.register_fake
def _(x, codes, block_scales, global_scale, bias, act_quant, input_scale, impl=""):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op("nemotron::norm_nvfp4_linear", mutates_args=())
def _norm_linear_op(x: torch.Tensor, norm_weight: torch.Tensor, z: Optional[torch.Tensor], group_size: int, eps: float,
                    codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                    bias: Optional[torch.Tensor], input_scale: torch.Tensor, impl: str = "") -> torch.Tensor:
    """(gated) RMSNorm -> NVFP4 activation quantize (static input_scale) -> W4A4 GEMM: the fusion the
    ``nemotron`` backend substitutes for a norm feeding an ``nvfp4_linear`` (see triton/norm_quantize.py)."""
    k, n = x.shape[-1], codes.shape[0]
    if dispatch.choose("norm_nvfp4_linear", x, impl).name != "triton":
        xn = ref.norm_reference(x, norm_weight, z=z, group_size=group_size, eps=eps)
        return ref.linear_reference(xn, codes, block_scales.view(torch.float8_e4m3fn), global_scale, bias,
                                    act_quant=True, input_scale=input_scale)
    x2 = x.reshape(-1, k)
    xc, xs = nq_kernels.norm_quantize(x2, norm_weight, input_scale, z=None if z is None else z.reshape(-1, k),
                                      group_size=group_size, eps=eps)
    out = gemm_kernels.gemm(xc, codes, block_scales, global_scale, bias, x_scales=xs,
                            x_gs=input_scale.float().reshape(()), out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], n)


@_norm_linear_op.register_fake
def _(x, norm_weight, z, group_size, eps, codes, block_scales, global_scale, bias, input_scale, impl=""):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op("nemotron::fp8_linear", mutates_args=())
def _fp8_linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   input_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], impl: str = "") -> torch.Tensor:
    weight = weight.view(torch.float8_e4m3fn)  # travels as its bytes, like the NVFP4 scales
    if dispatch.choose("fp8_linear", x, impl).name != "scaled_mm":
        return ref.fp8_linear_reference(x, weight, weight_scale, input_scale, bias)
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    if input_scale is None:  # dynamic per-tensor scale, computed on the device (no host sync)
        input_scale = ref.fp8_scale(x2)
    xq = ref.fp8_quantize_reference(x2, input_scale)
    out = torch._scaled_mm(xq, weight.t(), scale_a=input_scale.float().reshape(()),
                           scale_b=weight_scale.float().reshape(()), out_dtype=torch.float32)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


@_fp8_linear_op.register_fake
def _(x, weight, weight_scale, input_scale, bias, impl=""):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# ---- public API --------------------------------------------------------------------------------

def _check_input(name: str, x, *, min_dim: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got device {x.device}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if k == 0 or k % 16:
        raise ValueError(f"{name}: the last dim K must be a positive multiple of 16, got {k}")
    if x.numel() and (x.stride(-1) != 1 or not dispatch.flattens(x)):
        raise ValueError(f"{name}: unsupported layout (strides {x.stride()}): the last dim must be contiguous and "
                         "the leading dims must flatten without a copy; call .contiguous() first")


def _check_global_scale(global_scale, x: torch.Tensor) -> Optional[torch.Tensor]:
    if global_scale is None:
        return None
    if isinstance(global_scale, (int, float)):
        global_scale = torch.tensor(float(global_scale), dtype=torch.float32, device=x.device)
    if not isinstance(global_scale, torch.Tensor) or global_scale.numel() != 1:
        raise ValueError(f"global_scale: expected a float or a one-element tensor (the decode scale S_dec), got {global_scale!r}")
    if global_scale.device != x.device:
        raise ValueError(f"global_scale: expected a tensor on {x.device}, got {global_scale.device}")
    gs = global_scale.float().reshape(())
    if not gs.is_cuda and not torch.compiler.is_compiling():  # a host sync on CUDA: CUDA callers own the value
        v = gs.item()
        if not (v > 0 and v < float("inf")):
            raise ValueError(f"global_scale: expected a positive finite decode scale, got {v}")
    return gs


def quantize(x: torch.Tensor, *, block_shape=(1, 16), global_scale=None, rounding: str = "nearest",
             hadamard: bool = False, generator: Optional[torch.Generator] = None) -> NVFP4Tensor:
    """Quantize ``x`` ``[..., K]`` (fp32/fp16/bf16, K a multiple of 16) to NVFP4.

    Args:
        x: the tensor; its last dim must be contiguous.
        block_shape: ``(1, 16)`` (one E4M3 scale per 16 elements of K) or ``(16, 16)`` (one per
            16x16 tile of the last two dims, replicated per row; needs ``x.dim() >= 2``).
        global_scale: the decode scale S_dec (a float or one-element fp32 tensor, e.g. a static
            ``input_scale``); default: ``amax(x) / 2688`` over the finite elements of x.
        rounding: ``"nearest"`` (round-to-nearest-even, bit-identical to Transformer Engine) or
            ``"stochastic"`` (unbiased; counter-hash bits, ``reference.sr_uniform``, seeded from ``generator``).
        hadamard: first apply :func:`hadamard` (the RHT, rounded to x's dtype); fused in the kernel.
        generator: seeds stochastic rounding (default: torch's global CPU generator).

    Returns an :class:`NVFP4Tensor` with ``codes`` ``[..., K/2]``, ``block_scales`` ``[..., K/16]``
    and the 0-dim ``global_scale``. Numerics and inf/NaN handling: ``nemotron/nvfp4/reference.py``.

    Example::

        >>> w = nemotron.nvfp4.quantize(torch.randn(256, 1024, dtype=torch.bfloat16), block_shape=(16, 16))
        >>> w.dequantize(torch.bfloat16).shape
        torch.Size([256, 1024])
    """
    block_shape = tuple(block_shape)
    if block_shape not in BLOCK_SHAPES:
        raise ValueError(f"block_shape: expected one of {BLOCK_SHAPES}, got {block_shape}")
    _check_input("x", x, min_dim=2 if block_shape == (16, 16) else 1)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    gs = _check_global_scale(global_scale, x)
    seed = 0
    if rounding == "stochastic":
        dev = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=dev).item())
    codes, scales, s_dec = _quantize_op(x, gs, block_shape[0], rounding == "stochastic", seed, hadamard)
    return NVFP4Tensor(codes, scales.view(torch.float8_e4m3fn), s_dec, block_shape)


def dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``e2m1(t.codes) * fp32(t.block_scales) * t.global_scale`` as ``dtype`` (float64, float32, float16
    or bfloat16), shape ``t.shape``."""
    if not isinstance(t, NVFP4Tensor):
        raise TypeError(f"t: expected an NVFP4Tensor, got {type(t).__name__}")
    if dtype == torch.float64:       # e2m1 * e4m3 * fp32 is formed in fp32 (the reference); widening is exact
        return dequantize(t, torch.float32).double()
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float64, float32, float16 or bfloat16, got {dtype}")
    if t.per_matrix_scale:
        if t.shape[0] == 0:
            return torch.empty(t.shape, dtype=dtype, device=t.device)
        return torch.stack([dequantize(t[g], dtype) for g in range(t.shape[0])])
    return _dequantize_op(t.codes.contiguous(), t.block_scales.contiguous().view(torch.uint8), t.global_scale, dtype)


def hadamard(x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """The 16-point random Hadamard transform of each consecutive 16-element block of the last dim.

    ``y_blk = x_blk @ (diag(s) @ H16 / 4)``: H16 the Sylvester Hadamard matrix (entries +-1), s
    Transformer Engine's fixed sign vector ``reference.HADAMARD_SIGNS`` (mask 0xD7E8). The matrix is
    orthonormal, so ``hadamard(hadamard(x), inverse=True) == x`` up to rounding; ``inverse=True``
    applies the transpose ``H16 @ diag(s) / 4``. fp32 math, result in ``x.dtype``; x ``[..., K]``,
    K a multiple of 16.
    """
    _check_input("x", x)
    return _hadamard_op(x, inverse)


def global_amax(x: torch.Tensor, *, hadamard: bool = False) -> torch.Tensor:
    """max |x| over the finite elements (of ``hadamard(x)`` when asked), fp32 0-dim; 0 if none."""
    _check_input("x", x)
    return _amax_op(x, hadamard)


def _check_bias(bias, n: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.shape != (n,):
        raise ValueError(f"bias: expected a tensor of shape [{n}], got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if bias.device != x.device or bias.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"bias: expected a float tensor on {x.device}, got {bias.dtype} on {bias.device}")


def linear(x: torch.Tensor, w: NVFP4Tensor, bias: Optional[torch.Tensor] = None, *,
           act_quant: Optional[str] = None, input_scale=None) -> torch.Tensor:
    """``x @ dequantize(w).T (+ bias)`` with an NVFP4 weight, in x's dtype.

    Args:
        x: ``[..., K]`` bf16 / fp16 / fp32, last dim contiguous.
        w: :class:`NVFP4Tensor` ``[N, K]`` (1x16 or 16x16 blocks), on x's device.
        bias: ``[N]`` or None.
        act_quant: None (W4A16: x stays in its dtype) or ``"nvfp4"`` (W4A4: x is first quantized to
            NVFP4 1x16 and dequantized, the numerics of a Blackwell NVFP4 GEMM, emulated).
        input_scale: with ``act_quant="nvfp4"``, the static activation decode scale (ModelOpt's
            ``input_scale``); None takes x's own amax.

    Returns ``[..., N]`` in x's dtype. On CUDA a Triton GEMM expands the packed weights in registers
    (0.5625 B read per weight); on CPU a torch path expands them per chunk of rows, exactly, into an
    fp32 (bf16 for bf16 x of more than 64 rows) GEMM. Equal to the reference up to accumulation order
    (and that one bf16 rounding).

    Example::

        >>> w = nemotron.nvfp4.quantize(torch.randn(256, 512))
        >>> y = nemotron.nvfp4.linear(torch.randn(4, 512), w)        # [4, 256]
    """
    _check_input("x", x)
    if not isinstance(w, NVFP4Tensor):
        raise TypeError(f"w: expected an NVFP4Tensor, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"w: expected a 2-D [N, K] NVFP4Tensor, got shape {tuple(w.shape)}")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x: last dim {x.shape[-1]} does not match w's K = {k}")
    if w.device != x.device:
        raise ValueError(f"w: expected it on x's device {x.device}, got {w.device}")
    _check_bias(bias, n, x)
    if act_quant not in (None, "nvfp4"):
        raise ValueError(f"act_quant: expected None or 'nvfp4', got {act_quant!r}")
    if input_scale is not None and act_quant is None:
        raise ValueError("input_scale: only meaningful with act_quant='nvfp4'")
    gs = _check_global_scale(input_scale, x)
    return _linear_op(x, w.codes.contiguous(), w.block_scales.contiguous().view(torch.uint8), w.global_scale,
                      bias, act_quant == "nvfp4", gs)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 per-tensor FP8 linear (ModelOpt FP8 layout): ``weight`` float8_e4m3fn ``[N, K]``,
    ``weight_scale`` / ``input_scale`` fp32 scalars (decode scales; ``input_scale`` None = dynamic
    ``amax(x) / 448``). ``torch._scaled_mm`` on sm_89+ GPUs, the fp32 reference elsewhere."""
    _check_input("x", x)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise TypeError(f"weight: expected a 2-D torch.float8_e4m3fn tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x: last dim {x.shape[-1]} does not match weight's K = {k}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected it on x's device {x.device}, got {weight.device}")
    for name, sc in (("weight_scale", weight_scale), ("input_scale", input_scale)):
        if sc is not None and (not isinstance(sc, torch.Tensor) or sc.numel() != 1 or sc.device != x.device):
            raise ValueError(f"{name}: expected a one-element tensor on {x.device}")
    _check_bias(bias, n, x)
    return _fp8_linear_op(x, weight.contiguous().view(torch.uint8), weight_scale.float().reshape(()),
                          None if input_scale is None else input_scale.float().reshape(()), bias)
