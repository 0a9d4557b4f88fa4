"""NVFP4 and FP8 linear layers with ModelOpt state-dict names (``nemotron.quantize_`` swaps them in).

ModelOpt layouts (../shared/notes/nemotron3_architecture.md §7):
  NVFP4: ``weight`` uint8 [out, in/2], ``weight_scale`` float8_e4m3fn [out, in/16],
         ``weight_scale_2`` fp32 scalar, ``input_scale`` fp32 scalar (W4A4 activations)
  FP8:   ``weight`` float8_e4m3fn [out, in], ``weight_scale`` fp32 scalar, ``input_scale`` fp32 scalar
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import reference as ref
from .format import KeepsStorageDtypes, NVFP4Tensor
from .ops import fp8_linear, linear, quantize


class _ScaledLinear(KeepsStorageDtypes, nn.Module):
    """Shared plumbing: optional bias, optional ``input_scale`` buffer, scalar-shape tolerant loading;
    the quantized buffers keep their storage dtypes through ``.to(dtype)`` (only the bias follows)."""

    _SCALARS = ("weight_scale_2", "input_scale", "weight_scale")
    _STORAGE = ("weight", "weight_scale", "weight_scale_2", "input_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool, device, bias_dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=bias_dtype)) if bias else None
        self.register_buffer("input_scale", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints store scalars as [] or [1]; an input_scale may exist in the file only
        for name in self._SCALARS:
            key = prefix + name
            if key in state_dict and getattr(self, name, None) is not None and getattr(self, name).dim() == 0:
                state_dict[key] = state_dict[key].reshape(())
        key = prefix + "input_scale"
        if key in state_dict and self.input_scale is None:
            self.input_scale = torch.empty((), dtype=torch.float32, device=state_dict[key].device)
            state_dict[key] = state_dict[key].reshape(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"static_input_scale={self.input_scale is not None}")


class NVFP4Linear(_ScaledLinear):
    """``y = x @ W.T (+ b)`` with W stored as NVFP4 under ModelOpt's names.

    ``act_quant=None`` runs W4A16 (x stays bf16/fp16/fp32); ``"nvfp4"`` quantizes x to NVFP4 first
    (W4A4), with the ``input_scale`` buffer as its static global scale when present.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, act_quant: Optional[str] = None,
                 device=None, dtype: torch.dtype = torch.bfloat16):
        if in_features % 16:
            raise ValueError(f"in_features: NVFP4 needs a multiple of 16, got {in_features}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.act_quant = act_quant
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, in_features // 16, dtype=torch.float8_e4m3fn,
                                                         device=device))
        self.register_buffer("weight_scale_2", torch.ones((), dtype=torch.float32, device=device))

    @property
    def nvfp4_weight(self) -> NVFP4Tensor:
        return NVFP4Tensor(self.weight, self.weight_scale, self.weight_scale_2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.nvfp4_weight, self.bias, act_quant=self.act_quant,
                      input_scale=self.input_scale if self.act_quant else None)

    @classmethod
    def from_linear(cls, lin: nn.Linear, *, act_quant: Optional[str] = None, input_scale=None,
                    block_shape=(1, 16)) -> "NVFP4Linear":
        """Quantize an ``nn.Linear``'s weight (round-to-nearest, 1x16 or 16x16 blocks)."""
        w = lin.weight.detach()
        dev = w.device
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, act_quant=act_quant, device=dev,
                dtype=lin.bias.dtype if lin.bias is not None else w.dtype)
        q = quantize(w if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else w.float(),
                     block_shape=block_shape)
        m.weight.copy_(q.codes)
        m.weight_scale.copy_(q.block_scales)
        m.weight_scale_2.copy_(q.global_scale)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        if input_scale is not None:
            m.input_scale = torch.as_tensor(input_scale, dtype=torch.float32, device=dev).reshape(())
        return m


class FP8Linear(_ScaledLinear):
    """W8A8 per-tensor FP8 linear under ModelOpt's names; ``torch._scaled_mm`` on sm_89+ GPUs.

    Without an ``input_scale`` buffer the activation scale is dynamic (``amax(x) / 448``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias)

    @classmethod
    def from_linear(cls, lin: nn.Linear, *, input_scale=None) -> "FP8Linear":
        w = lin.weight.detach()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=w.device,
                dtype=lin.bias.dtype if lin.bias is not None else w.dtype)
        scale = ref.fp8_scale(w)
        m.weight.copy_(ref.fp8_quantize_reference(w, scale))
        m.weight_scale.copy_(scale)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        if input_scale is not None:
            m.input_scale = torch.as_tensor(input_scale, dtype=torch.float32, device=w.device).reshape(())
        return m
