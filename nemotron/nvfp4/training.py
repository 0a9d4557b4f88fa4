"""NVFP4 training: Transformer Engine's ``NVFP4BlockScaling`` recipe as autograd, on every device.

The recipe (NVIDIA, "Pretraining LLMs with NVFP4", arXiv 2509.25149; Transformer Engine's
``NVFP4BlockScaling``; ../shared/notes/nvfp4_and_gemm.md §2) for ``y = x @ w.T``, with x ``[M, K]``
(M tokens), w ``[N, K]`` and the output gradient dy ``[M, N]``::

    fprop  y  = deq(Q_1x16,RN(x))            @ deq(Q_W(w)).T          contraction over K
    dgrad  dx = deq(Q_1x16,SR(dy))           @ deq(Q_W'(w))           contraction over N
    wgrad  dw = deq(Q_1x16,SR(RHT(dy^T)))    @ deq(Q_1x16,RN(RHT(x^T))).T   contraction over M

* ``Q_W``: 16x16 blocks with ``weight_2d`` (one scale per 16x16 tile, so the same quantized tensor
  serves fprop and, transposed, dgrad: ``Q_W' = Q_W``); otherwise 1x16 blocks along K for fprop
  and a second, columnwise copy ``Q_W'`` in 1x16 blocks along N for dgrad, as TE makes.
* ``RHT``: the 16-point random Hadamard transform (TE's sign vector, :func:`nemotron.nvfp4.hadamard`)
  along the token dimension of both wgrad operands, rounded to the operand's dtype, with the global
  amax taken after it; ``(dy^T H)(H^T x) = dy^T x``, so only the quantization noise changes.
  Off with ``rht_wgrad=False``.
* ``SR``: stochastic rounding (unbiased) of both copies of dy; round-to-nearest-even otherwise and
  for x and w. Off with ``stochastic_grads=False``. Random bits come from ``generator``.
* Every quantizer takes its own tensor-wide amax (two-level scaling: E4M3 block scales, an fp32
  global scale). Each GEMM multiplies the dequantized E2M1 x E4M3 values (exact in fp32, bf16 and
  TF32) in fp32 and applies the two global scales to the fp32 result, as a native block-scaled
  FP4 GEMM does: on every device the result equals the emulation up to fp32 summation order.
* Master weights and ``dw`` stay in the weight's dtype (fp32 for training); dx is in x's dtype,
  y in x's dtype, and the bias gradient is the fp32 sum of dy.
* Padding: the wgrad operands are blocked along M, so a token count that is not a multiple of 16
  (32 for MXFP8) is padded with zero tokens for those two copies only. A zero token adds nothing to
  ``dy^T x``; under the RHT it shares a 16-block with real tokens, as in TE.

Super's carve-outs (``NVFP4Recipe.nemotron3()``; notes/nemotron3_architecture.md §8): the final 15%
of layers, the latent projections, MTP, the attention projections and the embeddings / lm_head stay
high precision, and the Mamba ``out_proj`` trains in MXFP8 (E4M3 elements, 1x32 blocks, E8M0
power-of-two scales, round-to-nearest, no RHT: :func:`mxfp8_training_linear`).

On CPU the quantizers run their fast plain-torch paths; on CUDA the Triton kernels (the fused
row + column quantize reads each activation / gradient tile once). No Triton backward GEMM is
needed: the GEMMs are dense fp32 matmuls of exactly representable values.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from .. import dispatch
from ..dispatch import FLOAT_DTYPES
from . import fast
from . import reference as ref
from .format import NVFP4Tensor
from .ops import _dequantize_op, _quantize_op
from .triton import row_col

# ---- the recipe ------------------------------------------------------------------------------

# Super's high-precision carve-outs by module name (the final-layers share is ``high_precision_final``).
_NEMOTRON3_HIGH_PRECISION = ("*fc1_latent_proj", "*fc2_latent_proj", "mtp.*", "*q_proj", "*k_proj", "*v_proj",
                             "*o_proj", "lm_head", "*embeddings")
_NEMOTRON3_MXFP8 = ("*.out_proj",)


@dataclasses.dataclass(frozen=True)
class NVFP4Recipe:
    """What an NVFP4 training linear quantizes, and how (Transformer Engine's ``NVFP4BlockScaling``).

    Attributes:
        weight_2d: 16x16 blocks for weights, so the rowwise and columnwise copies are one tensor
            (else 1x16 along K for fprop and a 1x16 columnwise copy along N for dgrad).
        rht_wgrad: the 16-point RHT on both wgrad operands, along the token dimension.
        stochastic_grads: stochastic rounding of the output gradients (both copies).
        high_precision: module-name patterns (``fnmatch``) that :func:`nemotron.prepare_training_`
            keeps in high precision (plain ``nn.Linear``).
        high_precision_final: the share of the backbone's final layers kept in high precision
            (``ceil(share * num_layers)`` layers; 0 keeps none).
        mxfp8: module-name patterns trained in MXFP8 instead (:class:`MXFP8TrainingLinear`).
    """
    weight_2d: bool = True
    rht_wgrad: bool = True
    stochastic_grads: bool = True
    high_precision: tuple = ()
    high_precision_final: float = 0.0
    mxfp8: tuple = ()

    def __post_init__(self):
        for name in ("weight_2d", "rht_wgrad", "stochastic_grads"):
            dispatch.check_bool(name, getattr(self, name))
        for name in ("high_precision", "mxfp8"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            if not isinstance(v, (tuple, list)) or not all(isinstance(p, str) for p in v):
                raise TypeError(f"{name}: expected a tuple of module-name patterns (str), got {v!r}")
            object.__setattr__(self, name, tuple(v))
        dispatch.check_float("high_precision_final", self.high_precision_final, lo=0.0, hi=1.0)

    @classmethod
    def nemotron3(cls) -> "NVFP4Recipe":
        """Nemotron 3 Super's recipe: NVFP4 linears with 2D weights, RHT on wgrad and SR gradients;
        the final 15% of layers, the latent projections, MTP, the attention projections and the
        embeddings / lm_head in high precision; the Mamba ``out_proj`` in MXFP8."""
        return cls(high_precision=_NEMOTRON3_HIGH_PRECISION, high_precision_final=0.15, mxfp8=_NEMOTRON3_MXFP8)


# ---- operand quantization --------------------------------------------------------------------

def _nvfp4(t: torch.Tensor, *, tile_rows: int = 1, stochastic: bool = False, seed: int = 0,
           hadamard: bool = False) -> NVFP4Tensor:
    codes, scales, gs = _quantize_op(t, None, tile_rows, stochastic, seed, hadamard)
    return NVFP4Tensor(codes, scales.view(torch.float8_e4m3fn), gs, (tile_rows, 16))


def _row_col(t: torch.Tensor, *, hadamard_col: bool, stochastic: bool, seeds: tuple) -> tuple:
    """The rowwise copy of t ``[M, K]`` (1x16 along K) and the columnwise copy of ``t^T`` (1x16 along
    M, after the RHT when asked): one read of t on the fused kernel."""
    rc, rs, rg, cc, cs, cg = _row_col_op(t, hadamard_col, stochastic, seeds[0], seeds[1])
    return (NVFP4Tensor(rc, rs.view(torch.float8_e4m3fn), rg),
            NVFP4Tensor(cc, cs.view(torch.float8_e4m3fn), cg))


@torch.library.custom_op("nemotron::nvfp4_quantize_row_col", mutates_args=())
def _row_col_op(x: torch.Tensor, hadamard_col: bool, stochastic: bool, seed_row: int, seed_col: int,
                impl: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    """Both NVFP4 copies of a 2-D ``x [M, K]`` (M, K multiples of 16) that a training backward reads:
    ``quantize(x)`` and ``quantize(x.T, hadamard=hadamard_col)``, with the given SR seeds."""
    name = dispatch.choose("nvfp4_quantize_row_col", x, impl).name
    if name == "triton":
        rc, rs, rg, cc, cs, cg = row_col.quantize_row_col(x, hadamard_col=hadamard_col, stochastic=stochastic,
                                                          seed_row=seed_row, seed_col=seed_col)
    else:                   # the two quantizes of the definition, by the fast path or the reference
        run = fast.quantize if name == "torch" else ref.quantize_reference
        rc, rs, rg = run(x, stochastic=stochastic, seed=seed_row)
        cc, cs, cg = run(x.t().contiguous(), stochastic=stochastic, seed=seed_col, hadamard=hadamard_col)
    return rc, rs.view(torch.uint8), rg, cc, cs.view(torch.uint8), cg


@_row_col_op.register_fake
def _(x, hadamard_col, stochastic, seed_row, seed_col, impl=""):
    m, k = x.shape
    u8 = dict(dtype=torch.uint8)
    return (x.new_empty(m, k // 2, **u8), x.new_empty(m, k // 16, **u8), x.new_empty((), dtype=torch.float32),
            x.new_empty(k, m // 2, **u8), x.new_empty(k, m // 16, **u8), x.new_empty((), dtype=torch.float32))


def _unscaled(q: NVFP4Tensor) -> torch.Tensor:
    """``e2m1(codes) * fp32(block_scales)`` in fp32 (exact), without the global scale."""
    one = torch.ones((), dtype=torch.float32, device=q.device)
    return _dequantize_op(q.codes, q.block_scales.view(torch.uint8), one, torch.float32)


def _mm(a: NVFP4Tensor, b: NVFP4Tensor) -> torch.Tensor:
    """``deq(a) [M, C] @ deq(b) [N, C].T`` in fp32: exact products, fp32 sums, global scales last."""
    return (_unscaled(a) @ _unscaled(b).T) * (a.global_scale * b.global_scale)


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -t.shape[0] % multiple
    return t if pad == 0 else torch.cat([t, t.new_zeros(pad, t.shape[1])])


def _seeds(generator: Optional[torch.Generator], n: int) -> tuple:
    """n stochastic-rounding seeds from ``generator`` (torch's default CPU generator when None)."""
    dev = generator.device if generator is not None else "cpu"
    return tuple(torch.randint(0, 2 ** 31 - 1, (n,), generator=generator, device=dev).tolist())


@dataclasses.dataclass
class Operands:
    """The six quantized GEMM operands of one training step of ``y = x @ w.T`` (see the module
    docstring): ``x_row``/``w_row`` (fprop), ``dy_row``/``w_col`` (dgrad, ``w_col`` is ``w_row`` with
    ``weight_2d``), ``dy_col``/``x_col`` (wgrad: ``[N, Mp]`` and ``[K, Mp]``, tokens padded to 16)."""
    x_row: Optional[NVFP4Tensor]
    w_row: NVFP4Tensor
    x_col: NVFP4Tensor
    dy_row: Optional[NVFP4Tensor] = None
    dy_col: Optional[NVFP4Tensor] = None
    w_col: Optional[NVFP4Tensor] = None


def _forward_operands(x2: torch.Tensor, w: torch.Tensor, recipe: NVFP4Recipe) -> Operands:
    w_row = _nvfp4(w, tile_rows=16 if recipe.weight_2d else 1)
    x_row, x_col = _row_col(_pad_rows(x2, 16), hadamard_col=recipe.rht_wgrad, stochastic=False, seeds=(0, 0))
    if x2.shape[0] % 16:                       # the rowwise copy of the real tokens only
        m = x2.shape[0]
        x_row = NVFP4Tensor(x_row.codes[:m], x_row.block_scales[:m], x_row.global_scale)
    return Operands(x_row, w_row, x_col)


def _backward_operands(ops: Operands, dy2: torch.Tensor, w: torch.Tensor, recipe: NVFP4Recipe,
                       generator: Optional[torch.Generator]) -> Operands:
    sr = recipe.stochastic_grads
    seeds = _seeds(generator, 2) if sr else (0, 0)
    m = dy2.shape[0]
    dy_row, dy_col = _row_col(_pad_rows(dy2, 16), hadamard_col=recipe.rht_wgrad, stochastic=sr, seeds=seeds)
    if m % 16:
        dy_row = NVFP4Tensor(dy_row.codes[:m], dy_row.block_scales[:m], dy_row.global_scale)
    # dgrad contracts over N: the 2D weight serves transposed; a 1x16 weight needs its copy along N
    w_col = ops.w_row if recipe.weight_2d else _nvfp4(w.t().contiguous())
    return dataclasses.replace(ops, dy_row=dy_row, dy_col=dy_col, w_col=w_col)


def _check_linear(x, weight, bias, recipe, generator, fmt: str, block: int) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [N, K] tensor, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % block or n % block or k == 0 or n == 0:
        raise ValueError(f"weight: {fmt} training needs K (in_features) and N (out_features) to be positive "
                         f"multiples of {block}, got N={n}, K={k}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected a last dim of K = {k} (weight's in_features), got shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x: expected it on weight's device {weight.device}, got {x.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)
                             or bias.dtype not in FLOAT_DTYPES or bias.device != weight.device):
        raise ValueError(f"bias: expected a float tensor of shape [{n}] on {weight.device}, got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    if recipe is not None and not isinstance(recipe, NVFP4Recipe):
        raise TypeError(f"recipe: expected an NVFP4Recipe, got {type(recipe).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")


class _NVFP4LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe, generator):
        k, n = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, k).contiguous()
        ops = _forward_operands(x2, weight.detach(), recipe)
        y = _mm(ops.x_row, ops.w_row)
        if bias is not None:
            y = y + bias.float()
        # the backward reads x's columnwise copy and the weight (x_row is fprop's alone)
        ctx.ops, ctx.recipe, ctx.generator = dataclasses.replace(ops, x_row=None), recipe, generator
        ctx.shapes = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(weight)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, b_dtype = ctx.shapes
        n = weight.shape[0]
        dy2 = dy.reshape(-1, n).contiguous()
        ops = _backward_operands(ctx.ops, dy2, weight.detach(), ctx.recipe, ctx.generator)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.recipe.weight_2d:         # dy [M, N] @ w [N, K]: the one 16x16-block weight, transposed use
                dx = (_unscaled(ops.dy_row) @ _unscaled(ops.w_row)) * (ops.dy_row.global_scale * ops.w_row.global_scale)
            else:                            # the columnwise copy w^T [K, N], blocked along N
                dx = _mm(ops.dy_row, ops.w_col)
            dx = dx.to(x_dtype).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            dw = _mm(ops.dy_col, ops.x_col).to(w_dtype)
        if ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(b_dtype)
        ctx.ops = None
        return dx, dw, db, None, None


def nvfp4_training_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                          recipe: Optional[NVFP4Recipe] = None,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` whose forward and backward GEMMs run on NVFP4 operands (the module
    docstring gives the recipe), differentiable with respect to x, weight and bias.

    Args:
        x: ``[..., K]`` fp32 / bf16 / fp16 activations.
        weight: ``[N, K]`` master weight (fp32 for training); K and N multiples of 16.
        bias: ``[N]`` or None (added in fp32).
        recipe: an :class:`NVFP4Recipe` (default: ``NVFP4Recipe()``, TE's defaults).
        generator: the source of stochastic-rounding seeds (two per backward); default torch's
            global CPU generator, so ``torch.manual_seed`` makes a run reproducible.

    Returns ``[..., N]`` in x's dtype.

    Example::

        >>> w = torch.randn(256, 512, requires_grad=True)
        >>> y = nemotron.nvfp4.nvfp4_training_linear(torch.randn(8, 512), w, recipe=NVFP4Recipe())
        >>> y.square().mean().backward()                    # w.grad: fp32 [256, 512]
    """
    _check_linear(x, weight, bias, recipe, generator, "NVFP4", 16)
    return _NVFP4LinearFn.apply(x, weight, bias, recipe or NVFP4Recipe(), generator)


def training_operands(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, *,
                      recipe: Optional[NVFP4Recipe] = None,
                      generator: Optional[torch.Generator] = None) -> Operands:
    """The six quantized operands :func:`nvfp4_training_linear` computes for ``x [M, K]``,
    ``weight [N, K]`` and an output gradient ``dy [M, N]`` (for inspection and tests)."""
    _check_linear(x, weight, None, recipe, generator, "NVFP4", 16)
    recipe = recipe or NVFP4Recipe()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    ops = _forward_operands(x2, weight.detach(), recipe)
    return _backward_operands(ops, dy.reshape(-1, weight.shape[0]).contiguous(), weight.detach(), recipe, generator)


def nvfp4_training_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, up: torch.Tensor,
                           down: torch.Tensor, *, recipe: Optional[NVFP4Recipe] = None,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Routed experts ``out[t] = sum_j w[t, j] * down[e](relu(up[e] @ x[t])^2)`` (``e = ids[t, j]``)
    whose two GEMMs per touched expert are :func:`nvfp4_training_linear`: differentiable with respect
    to x ``[T, H]``, the routing weights ``[T, k]`` and the float stacks ``up [E, I, H]`` /
    ``down [E, H, I]``. Each expert's tokens form its own GEMM (their count is read once, a host
    sync on CUDA); slots are fp32 and a token's k slots are summed in slot order, as in the
    inference ops. Returns ``[T, H]`` in x's dtype."""
    t, k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=up.shape[0]).tolist()
    w_flat = weights.reshape(-1)
    rows_all, vals = [], []
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = order[start:start + c]
        start += c
        h = nvfp4_training_linear(x[rows // k], up[e], recipe=recipe, generator=generator)
        h = torch.relu(h).square()
        o = nvfp4_training_linear(h, down[e], recipe=recipe, generator=generator)
        rows_all.append(rows)
        vals.append(o.float() * w_flat[rows, None].float())
    slots = x.new_zeros(t * k, up.shape[2], dtype=torch.float32)
    if rows_all:
        slots = slots.index_copy(0, torch.cat(rows_all), torch.cat(vals))
    return slots.view(t, k, -1).sum(1).to(x.dtype)


# ---- MXFP8 (Super's Mamba out_proj) ------------------------------------------------------------

MX_BLOCK = 32
E4M3_MAX = 448.0


def mxfp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 of ``x [..., K]`` (K a multiple of 32) along its last dim: ``(elements float8_e4m3fn
    [..., K], scales uint8 [..., K/32])``. Each block of 32 gets the E8M0 scale ``2^e`` (stored
    ``e + 127``) with the smallest e in [-127, 127] such that ``amax <= 448 * 2^e`` (no element
    saturates; an all-zero block gets ``2^-127``); elements are ``rn_satfinite(x / 2^e)`` in E4M3.
    Division by a power of two is exact, so this is the whole definition; fp32 math."""
    k = x.shape[-1]
    b = x.float().reshape(*x.shape[:-1], k // MX_BLOCK, MX_BLOCK)
    amax = b.abs().amax(-1)
    amax = torch.where(torch.isfinite(amax), amax, torch.full_like(amax, torch.finfo(torch.float32).max))
    _, ex = torch.frexp(amax / E4M3_MAX)                    # amax / 448 = m * 2^ex, m in [0.5, 1)
    e = ex.clamp(-127, 127)
    # fix the estimate up exactly: the smallest e with amax <= 448 * 2^e
    e = torch.where((e > -127) & (amax <= E4M3_MAX * torch.ldexp(torch.ones_like(amax), e - 1)), e - 1, e)
    e = torch.where((e < 127) & (amax > E4M3_MAX * torch.ldexp(torch.ones_like(amax), e)), e + 1, e)
    e = torch.where(amax == 0, torch.full_like(e, -127), e)
    scale = torch.ldexp(torch.ones_like(amax), e)
    q = (b / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), (e + 127).to(torch.uint8)


def mxfp8_dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 ``e4m3 * 2^(scale - 127)`` (exact)."""
    k = q.shape[-1]
    v = q.float().reshape(*q.shape[:-1], k // MX_BLOCK, MX_BLOCK)
    return (v * torch.ldexp(torch.ones_like(v[..., :1]), scales.to(torch.int32)[..., None] - 127)).reshape(q.shape)


def _mx(t: torch.Tensor) -> torch.Tensor:
    """t quantized to MXFP8 along its last dim and dequantized (fp32, exact values)."""
    return mxfp8_dequantize(*mxfp8_quantize(t))


class _MXFP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        k, n = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, k)
        y = _mx(x2) @ _mx(weight.detach()).T
        if bias is not None:
            y = y + bias.float()
        ctx.shapes = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.x_col = _mx(_pad_rows(x2, MX_BLOCK).t()) if ctx.needs_input_grad[1] else None    # [K, Mp]
        ctx.save_for_backward(weight)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, b_dtype = ctx.shapes
        n = weight.shape[0]
        dy2 = dy.reshape(-1, n)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (_mx(dy2) @ _mx(weight.detach().t()).T).to(x_dtype).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            dw = (_mx(_pad_rows(dy2, MX_BLOCK).t()) @ ctx.x_col.T).to(w_dtype)
        if ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(b_dtype)
        ctx.x_col = None
        return dx, dw, db


def mxfp8_training_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` with MXFP8 operands in fprop, dgrad and wgrad (TE's
    ``MXFP8BlockScaling`` with E4M3 everywhere): each operand quantized along its GEMM's contraction
    dim in blocks of 32 (:func:`mxfp8_quantize`), round-to-nearest, fp32 products and sums. K and N
    must be multiples of 32; tokens are zero-padded to 32 for wgrad."""
    _check_linear(x, weight, bias, None, None, "MXFP8", MX_BLOCK)
    return _MXFP8LinearFn.apply(x, weight, bias)


# ---- modules ---------------------------------------------------------------------------------

class NVFP4TrainingLinear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs train in NVFP4 (:func:`nvfp4_training_linear`): same parameters
    (``weight`` fp32 master, ``bias``), same state dict, so checkpoints and optimizers see a Linear.
    ``nemotron.quantize_`` exports it to ModelOpt NVFP4 with the recipe's weight blocks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 recipe: Optional[NVFP4Recipe] = None, generator: Optional[torch.Generator] = None,
                 device=None, dtype=None):
        if in_features % 16 or out_features % 16:
            raise ValueError(f"in_features / out_features: NVFP4 training needs multiples of 16, got "
                             f"{in_features} x {out_features}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe or NVFP4Recipe()
        self.generator = generator

    @property
    def weight_block_shape(self) -> tuple:
        return (16, 16) if self.recipe.weight_2d else (1, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nvfp4_training_linear(x, self.weight, self.bias, recipe=self.recipe, generator=self.generator)

    @classmethod
    def from_linear(cls, lin: nn.Linear, recipe: Optional[NVFP4Recipe] = None,
                    generator: Optional[torch.Generator] = None) -> "NVFP4TrainingLinear":
        """The same Parameters (not copies) under an NVFP4 training forward."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        if lin.in_features % 16 or lin.out_features % 16:
            raise ValueError(f"in_features / out_features: NVFP4 training needs multiples of 16, got "
                             f"{lin.in_features} x {lin.out_features}")
        m.in_features, m.out_features = lin.in_features, lin.out_features
        m.weight, m.bias = lin.weight, lin.bias
        m.recipe, m.generator = recipe or NVFP4Recipe(), generator
        return m

    def extra_repr(self) -> str:
        r = self.recipe
        return (super().extra_repr() + f", nvfp4(weight_2d={r.weight_2d}, rht_wgrad={r.rht_wgrad}, "
                f"stochastic_grads={r.stochastic_grads})")


class MXFP8TrainingLinear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs train in MXFP8 (:func:`mxfp8_training_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mxfp8_training_linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "MXFP8TrainingLinear":
        if lin.in_features % MX_BLOCK or lin.out_features % MX_BLOCK:
            raise ValueError(f"in_features / out_features: MXFP8 training needs multiples of {MX_BLOCK}, got "
                             f"{lin.in_features} x {lin.out_features}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = lin.in_features, lin.out_features
        m.weight, m.bias = lin.weight, lin.bias
        return m

    def extra_repr(self) -> str:
        return super().extra_repr() + ", mxfp8"


def final_layers(num_layers: int, share: float) -> int:
    """How many of the last layers a ``high_precision_final`` share keeps: ``ceil(share * L)``
    (Super: 15% of 88 = 13.2 -> 14, Megatron-Bridge's ``num_layers_at_end_in_bf16``)."""
    return min(num_layers, math.ceil(share * num_layers - 1e-9))
