"""The hybrid cache: per-layer KV for attention, conv and SSM states for Mamba-2, allocated once.

  KV          ``[B, max_len, KVH, D]`` per attention layer, the model dtype (or float8_e4m3fn with a
              unit scale, ``kv_dtype=torch.float8_e4m3fn``: values are saturated to +-448)
  conv state  ``[B, W-1, conv_dim]`` per Mamba layer, channel-last: the last W-1 xBC inputs
  SSM state   ``[B, H, P, N]`` per Mamba layer, fp32 (or fp16, rounded to nearest or stochastically
              with a seeded generator; the update itself always runs in fp32)

Positions are 0-dim int64 device tensors (``pos``, ``mtp_pos``), advanced in place, and attention
reads the whole static KV buffer under a mask: a decode step has the same shapes and reads no
Python integer that changes, so a compiled step never recompiles and can be captured in a CUDA
graph. ``seq_len`` / ``mtp_len`` read them back (a device-to-host copy) for host-side bookkeeping.

Speculative decoding: between :meth:`begin_verify` and :meth:`accept`, Mamba layers run token by
token and the cache keeps the conv state before and the SSM state after every step, so
``accept(n)`` rolls them back to just after the n-th verified token; KV entries past the accepted
position are simply overwritten later.
"""
from __future__ import annotations

from typing import Optional

import torch


class HybridCache:
    def __init__(self, config, batch: int, max_len: int, *, device=None, dtype=torch.float32,
                 kv_dtype: Optional[torch.dtype] = None, ssm_dtype: torch.dtype = torch.float32,
                 ssm_rounding: str = "nearest", seed: int = 0, mtp: bool = False):
        if ssm_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"ssm_dtype: expected torch.float32 or torch.float16, got {ssm_dtype}")
        if ssm_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"ssm_rounding: expected 'nearest' or 'stochastic', got {ssm_rounding!r}")
        if max_len < 1 or batch < 1:
            raise ValueError(f"batch, max_len: expected positive sizes, got {batch}, {max_len}")
        self.batch, self.max_len = batch, max_len
        self.pos = torch.zeros((), dtype=torch.int64, device=device)      # tokens of the main model
        self.mtp_pos = torch.zeros((), dtype=torch.int64, device=device)  # tokens the MTP attention cached
        self.ssm_dtype, self.ssm_rounding = ssm_dtype, ssm_rounding
        self.recording = False
        self._gen = torch.Generator(device=device).manual_seed(seed) if ssm_rounding == "stochastic" else None
        kv_dtype = kv_dtype or dtype
        self.kv, self.conv, self.ssm = {}, {}, {}
        kv_shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        kinds = list(enumerate(config.layers_block_type))
        if mtp:
            kinds += [(f"mtp.{j}", k) for j, k in enumerate(config.mtp_layers_block_type)]
        for key, kind in kinds:
            if kind == "full_attention":
                self.kv[key] = (torch.zeros(kv_shape, dtype=kv_dtype, device=device),
                                torch.zeros(kv_shape, dtype=kv_dtype, device=device))
            elif kind == "linear_attention":
                self.conv[key] = torch.zeros(batch, config.conv_kernel - 1, config.conv_dim, dtype=dtype, device=device)
                self.ssm[key] = torch.zeros(batch, config.mamba_num_heads, config.mamba_head_dim,
                                            config.ssm_state_size, dtype=ssm_dtype, device=device)
        self._rec_conv: dict = {}
        self._rec_ssm: dict = {}
        self._work: dict = {}

    # -- positions and attention -----------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return int(self.pos)

    @seq_len.setter
    def seq_len(self, n: int) -> None:
        self.pos.fill_(n)

    @property
    def mtp_len(self) -> int:
        return int(self.mtp_pos)

    @mtp_len.setter
    def mtp_len(self, n: int) -> None:
        self.mtp_pos.fill_(n)

    def position(self, key) -> torch.Tensor:
        return self.mtp_pos if isinstance(key, str) else self.pos

    def append_kv(self, key, k: torch.Tensor, v: torch.Tensor):
        """Write k, v ``[B, T, KVH, D]`` at the current position; returns the whole buffers
        ``[B, max_len, KVH, D]`` and the positions ``[T]`` of the new tokens (for the mask)."""
        idx = self.position(key) + torch.arange(k.shape[1], device=k.device)
        kc, vc = self.kv[key]
        if kc.dtype == torch.float8_e4m3fn:   # saturate; written as bytes (no fp8 index_copy on CPU)
            k, v = k.clamp(-448, 448).to(kc.dtype), v.clamp(-448, 448).to(kc.dtype)
            kc.view(torch.uint8).index_copy_(1, idx, k.view(torch.uint8))
            vc.view(torch.uint8).index_copy_(1, idx, v.view(torch.uint8))
        else:
            kc.index_copy_(1, idx, k.to(kc.dtype))
            vc.index_copy_(1, idx, v.to(vc.dtype))
        return kc, vc, idx

    def check_room(self, t: int) -> None:
        """Eager-mode bound check (one device-to-host read); compiled callers size the cache."""
        if not torch.compiler.is_compiling() and self.seq_len + t > self.max_len:
            raise ValueError(f"cache: {self.seq_len + t} tokens exceed max_len {self.max_len}; allocate a longer cache")

    def advance(self, t: int, *, mtp: bool = False) -> None:
        (self.mtp_pos if mtp else self.pos).add_(t)

    # -- SSM state precision ----------------------------------------------------------------------
    def ssm_initial(self, key) -> torch.Tensor:
        s = self.ssm[key]
        return s if s.dtype == torch.float32 else s.float()

    def store_ssm(self, key, state32: torch.Tensor) -> None:
        self.ssm[key].copy_(self._round(state32))

    def ssm_working(self, key) -> torch.Tensor:
        """The state a decode step updates in place (fp32)."""
        s = self.ssm[key]
        if s.dtype == torch.float32:
            return s
        self._work[key] = s.float()
        return self._work[key]

    def commit_ssm_step(self, key, state32: torch.Tensor) -> None:
        if state32 is not self.ssm[key]:
            self.ssm[key].copy_(self._round(state32))
        if self.recording:
            self._rec_ssm.setdefault(key, []).append(self.ssm[key].clone())

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        if self.ssm_dtype == torch.float32:
            return x
        y = x.to(self.ssm_dtype)
        if self.ssm_rounding == "nearest":
            return y
        # stochastic: pick the fp16 neighbour above with probability (x - lo) / (hi - lo)
        up = y.float() < x
        other = torch.nextafter(y, torch.where(up, torch.full_like(y, float("inf")), torch.full_like(y, float("-inf"))))
        lo, hi = torch.where(up, y, other).float(), torch.where(up, other, y).float()
        p = torch.where(hi > lo, (x - lo) / (hi - lo), torch.zeros_like(x))
        u = torch.rand(x.shape, generator=self._gen, device=x.device)
        return torch.where(u < p, hi, lo).to(self.ssm_dtype)

    # -- speculative verification -----------------------------------------------------------------
    def begin_verify(self) -> None:
        self.recording = True
        self._rec_conv, self._rec_ssm = {}, {}

    def record_conv(self, key, conv: torch.Tensor) -> None:
        self._rec_conv.setdefault(key, []).append(conv.clone())

    def accept(self, n: int) -> None:
        """Keep the first ``n`` verified tokens: Mamba states roll back, the position advances by n."""
        if not self.recording:
            raise RuntimeError("accept: no verification in progress (call begin_verify first)")
        for key, states in self._rec_ssm.items():
            if not 1 <= n <= len(states):
                raise ValueError(f"n: expected 1..{len(states)} verified tokens, got {n}")
            self.ssm[key].copy_(states[n - 1])
            convs = self._rec_conv[key]
            if n < len(convs):
                self.conv[key].copy_(convs[n])
        self.recording = False
        self._rec_conv, self._rec_ssm = {}, {}
        self.pos.add_(n)
