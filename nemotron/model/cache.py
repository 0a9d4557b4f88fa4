"""The hybrid cache: per-layer KV for attention, conv and SSM states for Mamba-2, allocated once.

  KV          ``[B, KVH, max_len, D]`` per attention layer (head-major: a decode step reads each
              head's live prefix contiguously), the model dtype, or ``kv_dtype``: float32,
              bfloat16, float16, or float8_e4m3fn with a unit scale (values saturated to +-448)
  conv state  ``[B, W-1, conv_dim]`` per Mamba layer, channel-last: the last W-1 xBC inputs
  SSM state   ``[B, H, P, N]`` per Mamba layer, fp32 (or fp16, rounded to nearest or stochastically
              with a seeded generator; the update itself always runs in fp32). A model's cache
              takes the config's ``mamba_ssm_cache_dtype`` by default (:func:`config_ssm_dtype`)

Positions are per sequence: ``pos`` and ``mtp_pos`` are int64 device tensors ``[B]``, the number of
tokens each row holds (its KV occupies slots ``[0, pos[b])``), advanced in place. Rows advance by
different amounts: a left-padded prompt stores only its real tokens (its pads never enter the
cache), and speculative decoding accepts a different number of tokens per row. Nothing in a step
reads a position on the host, so a compiled step never recompiles and can be captured in a CUDA
graph. ``lengths()`` reads them back (a device-to-host copy) for host-side bookkeeping.

Tokens that are not real (``valid`` false: left padding of a prompt, right padding of an MTP
catch-up) are written after the row's real ones, past its length, where later tokens overwrite
them: :meth:`LayerCache.append_kv` places a call's tokens in a stable partition, real first.

Speculative decoding: between :meth:`begin_verify` and :meth:`accept`, each Mamba layer runs the
T verified tokens in one multi-token conv update and one multi-token state update, which write the
conv and SSM states after every token into per-layer buffers ``[B, T, W-1, conv_dim]`` and
``[B, T, H, P, N]`` (allocated by :meth:`reserve_verify` or on first use, kept and grown as needed),
so ``accept(n)``, with one count per row, rolls each row back by copying the states after its
n-th verified token out of them; KV entries past the accepted position are overwritten later.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .. import dispatch

KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)
SSM_DTYPES = (torch.float32, torch.float16)


def config_ssm_dtype(config) -> torch.dtype:
    """The SSM state dtype a config's ``mamba_ssm_cache_dtype`` asks for, as vLLM reads it:
    "float32" or "float16". "bfloat16" (which the config accepts, as HF's does) keeps float32
    states, with a warning: the cache stores no bfloat16 state, and float32 is the more exact one."""
    name = config.mamba_ssm_cache_dtype
    if name == "bfloat16":
        warnings.warn("mamba_ssm_cache_dtype: the cache keeps SSM states in float32 or float16, not bfloat16; "
                      "using float32 (pass ssm_dtype= to choose)", stacklevel=3)
        return torch.float32
    dtype = {"float32": torch.float32, "float16": torch.float16}.get(name)
    if dtype is None:                       # a config edited after it was validated
        raise ValueError(f"mamba_ssm_cache_dtype: expected 'float32', 'float16' or 'bfloat16', got {name!r}")
    return dtype


def _dtype_arg(name: str, v, allowed: tuple) -> torch.dtype:
    if not isinstance(v, torch.dtype):
        raise TypeError(f"{name}: expected a torch.dtype, one of {allowed}, got {v!r}")
    if v not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {v}")
    return v


class LayerCache:
    """One layer's slots of the hybrid cache: what its mixer reads and writes.

    It holds the tensors themselves (no layer index), so one compiled layer graph serves every layer
    of its kind (regional compilation) without guards on which layer it is.
    """

    def __init__(self, parent: "HybridCache", pos: torch.Tensor, kv=None, conv=None, ssm=None):
        self.parent, self.pos = parent, pos
        self.k, self.v = kv if kv is not None else (None, None)
        self.conv, self.ssm = conv, ssm
        self.rec_t = 0                      # tokens recorded since begin_verify
        self._rec_conv: Optional[torch.Tensor] = None    # [B, cap, W-1, conv_dim]
        self._rec_ssm: Optional[torch.Tensor] = None     # [B, cap, H, P, N]

    @property
    def recording(self) -> bool:
        return self.parent.recording

    # attention
    def append_kv(self, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor] = None):
        """Write k, v ``[B, T, KVH, D]`` after each row's ``pos[b]`` tokens. Returns the buffers
        ``[B, KVH, max_len, D]``, the lengths ``[B]`` = pos + T that the attention reads, and
        ``rel [B, T]`` (None when every token is real): token j of row b went to slot
        ``pos[b] + rel[b, j]``, real tokens first in their order, then the others (``valid`` false)
        past the row's new length, where later tokens overwrite them."""
        b, t = k.shape[:2]
        rel = None if valid is None else token_slots(valid)
        off = torch.arange(t, device=k.device) if rel is None else rel
        idx = self.pos[:, None] + off                                           # [B, T]
        rows = torch.arange(b, device=k.device)[:, None].expand(b, t)
        kc, vc = self.k, self.v
        if kc.dtype == torch.float8_e4m3fn:   # saturate; written as bytes (no fp8 index_put on CPU)
            k, v = k.clamp(-448, 448).to(kc.dtype), v.clamp(-448, 448).to(kc.dtype)
            kc.view(torch.uint8)[rows, :, idx] = k.view(torch.uint8)
            vc.view(torch.uint8)[rows, :, idx] = v.view(torch.uint8)
        else:
            kc[rows, :, idx] = k.to(kc.dtype)
            vc[rows, :, idx] = v.to(vc.dtype)
        return kc, vc, self.pos + t, rel

    # Mamba: SSM state precision
    def ssm_initial(self) -> torch.Tensor:
        return self.ssm if self.ssm.dtype == torch.float32 else self.ssm.float()

    def store_ssm(self, state32: torch.Tensor) -> None:
        self.ssm.copy_(self.parent.round_state(state32))

    def ssm_working(self) -> torch.Tensor:
        """The state a decode step updates in place (fp32)."""
        return self.ssm if self.ssm.dtype == torch.float32 else self.ssm.float()

    def commit_ssm_step(self, state32: torch.Tensor) -> None:
        if state32 is not self.ssm:
            self.ssm.copy_(self.parent.round_state(state32))

    # Mamba: speculative verification
    @property
    def _stochastic(self) -> bool:
        return self.ssm.dtype != torch.float32 and self.parent.ssm_rounding == "stochastic"

    def verify_state(self) -> torch.Tensor:
        """The state a verification's multi-token update advances in place. fp32 and nearest-rounded
        fp16 states are updated where they are stored (the update rounds between tokens as a decode
        step does); stochastically rounded ones are advanced in an fp32 copy and rounded once, when
        :meth:`HybridCache.accept` stores the kept state."""
        return self.ssm.float() if self._stochastic else self.ssm

    def verify_buffers(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[B, t, W-1, conv_dim]`` and ``[B, t, H, P, N]`` of the record buffers for the next t
        verified tokens, which a multi-token update fills with the state after each token."""
        lo, hi = self.rec_t, self.rec_t + t
        if self._rec_ssm is None or self._rec_ssm.shape[1] < hi:
            conv, ssm = self._rec_conv, self._rec_ssm
            dtype = torch.float32 if self._stochastic else self.ssm.dtype
            self._rec_conv = self.conv.new_empty(self.conv.shape[0], hi, *self.conv.shape[1:])
            self._rec_ssm = self.ssm.new_empty(self.ssm.shape[0], hi, *self.ssm.shape[1:], dtype=dtype)
            if ssm is not None and lo:                   # a second forward in one verification: keep the first
                self._rec_conv[:, :lo].copy_(conv[:, :lo])
                self._rec_ssm[:, :lo].copy_(ssm[:, :lo])
            if self.conv.is_cuda:
                torch._dynamo.mark_static_address(self._rec_conv)
                torch._dynamo.mark_static_address(self._rec_ssm)
        self.rec_t = hi
        return self._rec_conv[:, lo:hi], self._rec_ssm[:, lo:hi]

    def end_verify_step(self, state: torch.Tensor) -> None:
        """After a multi-token update of :meth:`verify_state`: keep a copy's result for the next forward."""
        if state is not self.ssm:
            self.ssm.copy_(self.parent.round_state(state))

    def roll_back(self, n: torch.Tensor) -> None:
        """Keep each row's first ``n[b]`` recorded tokens (``n``: int64 ``[B]``, 1..rec_t): the conv
        and SSM states after them, copied out of the record buffers (no host read)."""
        rows = torch.arange(n.shape[0], device=n.device)
        last = n - 1
        self.conv.copy_(self._rec_conv[rows, last])
        self.ssm.copy_(self.parent.round_state(self._rec_ssm[rows, last]))
        self.rec_t = 0


def token_slots(valid: torch.Tensor) -> torch.Tensor:
    """``rel [B, T]`` int64 for a bool mask ``valid [B, T]``: the stable partition that puts each
    row's real tokens first (in order), then its others: ``rel[b, j]`` is token j's place."""
    v = valid.long()
    return torch.where(valid, v.cumsum(1) - 1, v.sum(1, keepdim=True) + (1 - v).cumsum(1) - 1)


class HybridCache:
    def __init__(self, config, batch: int, max_len: int, *, device=None, dtype=torch.float32,
                 kv_dtype: Optional[torch.dtype] = None, ssm_dtype: torch.dtype = torch.float32,
                 ssm_rounding: str = "nearest", seed: int = 0, mtp: bool = False):
        _dtype_arg("ssm_dtype", ssm_dtype, SSM_DTYPES)
        kv_dtype = dtype if kv_dtype is None else _dtype_arg("kv_dtype", kv_dtype, KV_DTYPES)
        if ssm_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"ssm_rounding: expected 'nearest' or 'stochastic', got {ssm_rounding!r}")
        batch, max_len = dispatch.check_int("batch", batch, lo=1), dispatch.check_int("max_len", max_len, lo=1)
        self.batch, self.max_len = batch, max_len
        self.pos = torch.zeros(batch, dtype=torch.int64, device=device)      # tokens of the main model, per row
        self.mtp_pos = torch.zeros(batch, dtype=torch.int64, device=device)  # tokens the MTP attention cached
        self.ssm_dtype, self.ssm_rounding = ssm_dtype, ssm_rounding
        self.recording = False
        self._gen = torch.Generator(device=device).manual_seed(seed) if ssm_rounding == "stochastic" else None
        self.kv, self.conv, self.ssm = {}, {}, {}
        # the FP8 cache's dequantization scale (unit: values are saturated, not scaled), as a tensor so
        # a CUDA graph reads it from the device
        self.kv_scale = torch.ones(1, device=device) if kv_dtype == torch.float8_e4m3fn else None
        kv_shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
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
        self.layers = {}
        for key, kind in kinds:
            pos = self.mtp_pos if isinstance(key, str) else self.pos
            self.layers[key] = LayerCache(self, pos, kv=self.kv.get(key), conv=self.conv.get(key), ssm=self.ssm.get(key))
        fp8 = self.kv_scale is not None
        if torch.device(device or "cpu").type == "cuda":
            # fixed addresses: a compiled decode step mutates them in place inside a CUDA graph
            for t in [self.pos, self.mtp_pos, *self.conv.values(), *self.ssm.values(), *([self.kv_scale] * fp8),
                      *(x for kv in self.kv.values() for x in kv)]:
                torch._dynamo.mark_static_address(t)

    # -- positions ----------------------------------------------------------------------------
    def lengths(self, *, mtp: bool = False) -> list:
        """Each row's token count (a device-to-host copy)."""
        return (self.mtp_pos if mtp else self.pos).tolist()

    def _uniform(self, mtp: bool) -> int:
        n = self.lengths(mtp=mtp)
        if len(set(n)) != 1:
            raise ValueError(f"cache: the rows hold different numbers of tokens {n}; read lengths() instead")
        return n[0]

    @property
    def seq_len(self) -> int:
        """The rows' common token count (raises when they differ: see :meth:`lengths`)."""
        return self._uniform(False)

    @seq_len.setter
    def seq_len(self, n: int) -> None:
        self.pos.fill_(n)

    @property
    def mtp_len(self) -> int:
        return self._uniform(True)

    @mtp_len.setter
    def mtp_len(self, n: int) -> None:
        self.mtp_pos.fill_(n)

    def check_room(self, t: int, *, mtp: bool = False) -> None:
        """Eager bound check for t more tokens per row (one device-to-host read); ``generate``
        checks once per call instead, and compiled callers size the cache."""
        if torch.compiler.is_compiling():
            return
        used = max(self.lengths(mtp=mtp))
        if used + t > self.max_len:
            raise ValueError(f"cache: {used + t} {'MTP ' if mtp else ''}tokens exceed max_len {self.max_len}; "
                             "allocate a longer cache")

    def advance(self, t, *, mtp: bool = False) -> None:
        """Advance every row by t tokens (an int), or row b by ``t[b]`` (an int64 tensor ``[B]``)."""
        (self.mtp_pos if mtp else self.pos).add_(t)

    # -- SSM state precision ----------------------------------------------------------------------
    def round_state(self, x: torch.Tensor) -> torch.Tensor:
        """An fp32 SSM state in the storage dtype (nearest or stochastic rounding)."""
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
    def reserve_verify(self, t: int) -> None:
        """Allocate the record buffers for verifications of up to t tokens now (a compiled verify
        step then finds them in place rather than allocating on its first call)."""
        for lc in self.layers.values():
            if lc.conv is not None:
                lc.verify_buffers(t)
                lc.rec_t = 0

    def begin_verify(self) -> None:
        """Start a verification: the forwards until :meth:`accept` record every Mamba state."""
        self.recording = True
        for lc in self.layers.values():
            lc.rec_t = 0

    def accept(self, n, *, check: bool = True) -> None:
        """Keep the first ``n`` verified tokens of each row (an int for every row, or an int64
        tensor ``[B]``, each in 1..T): Mamba states roll back (a copy out of the record buffers),
        each row's position advances by its count. ``check=False`` skips the range check of a
        tensor ``n`` (a host read), for callers that compute n in range, as ``generate`` does."""
        if not self.recording:
            raise RuntimeError("accept: no verification in progress (call begin_verify first)")
        recorded = [lc for lc in self.layers.values() if lc.rec_t]
        t = recorded[0].rec_t if recorded else None             # every Mamba layer recorded the same tokens
        if isinstance(n, torch.Tensor):
            if n.shape != (self.batch,) or n.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"n: expected an int tensor [{self.batch}], got {n.dtype} {tuple(n.shape)}")
            n = n.to(device=self.pos.device, dtype=torch.int64)
            if check and t is not None:
                lo, hi = n.min().item(), n.max().item()
                if lo < 1 or hi > t:
                    raise ValueError(f"n: expected 1..{t} verified tokens per row, got values in [{lo}, {hi}]")
        else:
            n = dispatch.check_int("n", n, lo=1)
            if t is not None and n > t:
                raise ValueError(f"n: expected 1..{t} verified tokens, got {n}")
            n = torch.full((self.batch,), n, dtype=torch.int64, device=self.pos.device)
        for lc in recorded:
            lc.roll_back(n)
        self.recording = False
        self.pos.add_(n)
