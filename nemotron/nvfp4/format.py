"""The NVFP4 container and the 128x4 swizzled block-scale layout.

Layout (NVIDIA ModelOpt / Transformer Engine / cuBLAS convention):
  codes        uint8 [..., K/2]          two E2M1 codes per byte along K, element 0 in the low nibble
  block_scales float8_e4m3fn [..., K/16] one decode scale per 16 elements (16x16 tiles: replicated per row)
  global_scale fp32 []                   S_dec = amax / 2688; x = e2m1 * fp32(block_scale) * global_scale
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .reference import BLOCK

BLOCK_SHAPES = ((1, 16), (16, 16))


@dataclass(frozen=True)
class NVFP4Tensor:
    """An NVFP4-quantized tensor of logical shape ``[..., K]``: a plain container of three tensors.

    Attributes:
        codes: uint8 ``[..., K/2]``, E2M1 codes, element ``2i`` in the low nibble of byte ``i``.
        block_scales: float8_e4m3fn ``[..., K/16]``, the per-block decode scales.
        global_scale: fp32 0-dim, the decode scale S_dec (ModelOpt's ``weight_scale_2``); or, for a
            stack of matrices ``[G, N, K]`` (e.g. one per MoE expert, each with its own ModelOpt
            ``weight_scale_2``), fp32 ``[G]``: one decode scale per leading index.
        block_shape: ``(1, 16)`` or ``(16, 16)`` (one scale per 16x16 tile of the last two dims,
            stored replicated per row, so the storage layout is the same).

    Example::

        >>> t = nemotron.nvfp4.quantize(torch.randn(4, 64))
        >>> t.shape, t.codes.shape, t.block_scales.shape
        (torch.Size([4, 64]), torch.Size([4, 32]), torch.Size([4, 4]))
        >>> x_hat = t.dequantize(torch.bfloat16)
    """

    codes: torch.Tensor
    block_scales: torch.Tensor
    global_scale: torch.Tensor
    block_shape: tuple = (1, 16)

    def __post_init__(self):
        if self.codes.dtype != torch.uint8:
            raise TypeError(f"codes: expected torch.uint8, got {self.codes.dtype}")
        if self.block_scales.dtype != torch.float8_e4m3fn:
            raise TypeError(f"block_scales: expected torch.float8_e4m3fn, got {self.block_scales.dtype}")
        stacked = self.codes.dim() >= 3 and tuple(self.global_scale.shape) == tuple(self.codes.shape[:1])
        if self.global_scale.dtype != torch.float32 or not (self.global_scale.dim() == 0 or stacked):
            raise TypeError(f"global_scale: expected a 0-dim torch.float32 tensor (or [G] for a stack [G, N, K]), "
                            f"got {self.global_scale.dtype} of shape {tuple(self.global_scale.shape)}")
        if self.codes.dim() == 0 or self.codes.shape[-1] % (BLOCK // 2):
            raise ValueError(f"codes: the last dim must be K/2 with K a multiple of 16, got shape {tuple(self.codes.shape)}")
        expected = (*self.codes.shape[:-1], self.codes.shape[-1] * 2 // BLOCK)
        if tuple(self.block_scales.shape) != expected:
            raise ValueError(f"block_scales: expected shape {expected} for codes of shape "
                             f"{tuple(self.codes.shape)}, got {tuple(self.block_scales.shape)}")
        if tuple(self.block_shape) not in BLOCK_SHAPES:
            raise ValueError(f"block_shape: expected one of {BLOCK_SHAPES}, got {self.block_shape}")
        if not (self.codes.device == self.block_scales.device == self.global_scale.device):
            raise ValueError("codes, block_scales and global_scale must be on one device, got "
                             f"{self.codes.device}, {self.block_scales.device}, {self.global_scale.device}")
        object.__setattr__(self, "block_shape", tuple(self.block_shape))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.codes.shape[:-1], self.codes.shape[-1] * 2))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def per_matrix_scale(self) -> bool:
        """True for a stack ``[G, N, K]`` whose global scale is ``[G]`` (one per matrix)."""
        return self.global_scale.dim() == 1

    def __getitem__(self, g: int) -> "NVFP4Tensor":
        """Matrix ``g`` of a stack (with its own global scale when the scale is per matrix)."""
        if self.codes.dim() < 3:
            raise IndexError(f"indexing needs a stacked NVFP4Tensor (3 or more dims), got shape {tuple(self.shape)}")
        gs = self.global_scale[g] if self.per_matrix_scale else self.global_scale
        return NVFP4Tensor(self.codes[g], self.block_scales[g], gs, self.block_shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor ``e2m1(codes) * fp32(block_scales) * global_scale`` in ``dtype``, shape ``self.shape``."""
        from .ops import dequantize
        return dequantize(self, dtype)

    def to(self, device) -> "NVFP4Tensor":
        return NVFP4Tensor(self.codes.to(device), self.block_scales.to(device), self.global_scale.to(device),
                           self.block_shape)

    def swizzled_block_scales(self) -> torch.Tensor:
        """The block scales in the 128x4 tiled layout of cuBLAS / CUTLASS block-scaled GEMMs."""
        return swizzle_block_scales(self.block_scales)

    # ModelOpt checkpoint names: weight uint8 [out, in/2], weight_scale e4m3 [out, in/16],
    # weight_scale_2 fp32 scalar (S_dec); input_scale fp32 scalar belongs to the activation.
    def to_modelopt(self, prefix: str = "", *, input_scale: torch.Tensor | None = None) -> dict:
        """State-dict entries under ModelOpt's names (``{prefix}weight``, ``weight_scale``, ``weight_scale_2``)."""
        out = {f"{prefix}weight": self.codes, f"{prefix}weight_scale": self.block_scales,
               f"{prefix}weight_scale_2": self.global_scale}
        if input_scale is not None:
            out[f"{prefix}input_scale"] = input_scale.float().reshape(())
        return out

    @classmethod
    def from_modelopt(cls, state: Mapping[str, torch.Tensor], prefix: str = "", *,
                      block_shape: tuple = (1, 16)) -> "NVFP4Tensor":
        """Build from ModelOpt names; ``weight_scale_2`` may be 0-dim or of shape [1]."""
        missing = [n for n in ("weight", "weight_scale", "weight_scale_2") if f"{prefix}{n}" not in state]
        if missing:
            raise KeyError(f"state: missing ModelOpt NVFP4 entries {[prefix + n for n in missing]}")
        gs = state[f"{prefix}weight_scale_2"]
        if gs.numel() != 1:
            raise ValueError(f"{prefix}weight_scale_2: expected one element, got shape {tuple(gs.shape)}")
        return cls(state[f"{prefix}weight"], state[f"{prefix}weight_scale"], gs.float().reshape(()), block_shape)


def _ceil(a: int, b: int) -> int:
    return -(-a // b) * b


def swizzle_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """[..., M, S] scales -> [..., ceil128(M), ceil4(S)] in the 128x4 tiled order, zero-padded.

    Each 128x4 tile is 512 contiguous bytes; tile (i, j) is the (i * ceil4(S)/4 + j)-th, and inside
    it scale (r, c) sits at byte ``(r % 32) * 16 + (r // 32) * 4 + c`` (cuBLAS block-scaling layout).
    """
    *lead, m, s = scales.shape
    mp, sp = _ceil(m, 128), _ceil(s, 4)
    padded = scales.new_zeros(*lead, mp, sp)
    padded[..., :m, :s] = scales
    t = padded.reshape(*lead, mp // 128, 4, 32, sp // 4, 4)        # [.., i, r//32, r%32, j, c]
    t = t.movedim(-2, -4)                                          # [.., i, j, r//32, r%32, c]
    t = t.transpose(-3, -2)                                        # [.., i, j, r%32, r//32, c]
    return t.reshape(*lead, mp, sp)


def unswizzle_block_scales(swizzled: torch.Tensor, m: int, s: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_block_scales`: [..., ceil128(M), ceil4(S)] -> [..., M, S]."""
    *lead, mp, sp = swizzled.shape
    if mp != _ceil(m, 128) or sp != _ceil(s, 4):
        raise ValueError(f"swizzled: expected shape [..., {_ceil(m, 128)}, {_ceil(s, 4)}] for M={m}, S={s}, "
                         f"got {tuple(swizzled.shape)}")
    t = swizzled.reshape(*lead, mp // 128, sp // 4, 32, 4, 4)      # [.., i, j, r%32, r//32, c]
    t = t.transpose(-3, -2).movedim(-4, -2)                        # [.., i, r//32, r%32, j, c]
    return t.reshape(*lead, mp, sp)[..., :m, :s]


class KeepsStorageDtypes:
    """Mixin for modules that hold quantized storage (codes, E4M3 scales, fp32 decode scales) as
    buffers: ``module.to(dtype)``, ``.half()``, ``.bfloat16()`` and the like change the compute
    dtype of its float parameters but move these buffers to the new device only, as torchao's
    quantized modules do. ``_STORAGE`` names the buffers; float8 and fp32 scales would otherwise
    be cast like any float tensor (an E4M3 scale cast to bf16 is no longer a scale the kernels read,
    and an fp32 decode scale loses bits)."""

    _STORAGE: tuple = ()

    def _apply(self, fn, recurse=True):
        kept = {n: b for n in self._STORAGE if (b := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers.get(name)
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self
