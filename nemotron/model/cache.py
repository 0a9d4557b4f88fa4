"""The hybrid cache: per-layer KV for attention, conv and SSM states for Mamba-2, allocated once.

  KV          ``[B, max_len, KVH, D]`` per attention layer, the model dtype (or float8_e4m3fn with a
              unit scale, ``kv_dtype=torch.float8_e4m3fn``: values are saturated to +-448)
  conv state  ``[B, W-1, conv_dim]`` per Mamba layer, channel-last: the last W-1 xBC inputs
  SSM state   ``[B, H, P, N]`` per Mamba layer, fp32 (or fp16, rounded to nearest or stochastically
              with a seeded generator; the update itself always runs in fp32)

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
        self.seq_len = 0          # tokens of the main model in the cache
        self.mtp_len = 0          # tokens the MTP attention has cached
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

    # -- attention --------------------------------------------------------------------------------
    def position(self, key) -> int:
        return self.mtp_len if isinstance(key, str) else self.seq_len

    def append_kv(self, key, k: torch.Tensor, v: torch.Tensor):
        """Write k, v ``[B, T, KVH, D]`` at the current position; the cached ``[B, pos + T, KVH, D]``."""
        pos, t = self.position(key), k.shape[1]
        if pos + t > self.max_len:
            raise ValueError(f"cache: {pos + t} tokens exceed max_len {self.max_len}; allocate a longer cache")
        kc, vc = self.kv[key]
        if kc.dtype == torch.float8_e4m3fn:
            k, v = k.clamp(-448, 448), v.clamp(-448, 448)
        kc[:, pos:pos + t] = k
        vc[:, pos:pos + t] = v
        return kc[:, :pos + t], vc[:, :pos + t]

    def advance(self, t: int, *, mtp: bool = False) -> None:
        if mtp:
            self.mtp_len += t
        else:
            self.seq_len += t

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
        self.seq_len += n
