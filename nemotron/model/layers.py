"""The blocks of the hybrid model, under the checkpoint's names (``backbone.layers.{i}.mixer.*``).

Each layer is pre-norm: ``h = h + mixer(rmsnorm(h))``; the mixer is a Mamba-2 mixer, GQA attention
without positional encoding, a LatentMoE or a relu2 MLP. Heavy math goes through this package's ops
(``nemotron.ssm_kernels``, ``nemotron.moe_kernels``, the NVFP4/FP8 linears after ``quantize_``), so
the same modules run the references on CPU and the kernels on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import attention as _attention  # noqa: F401  (registers nemotron::decode_attention)
from ..moe_kernels.layer import LatentMoE, ReLU2MLP
from ..ssm_kernels import ops as ssm
from .cache import LayerCache, token_slots
from .config import NemotronHConfig

# The SSD scan's chunk tile. The scan's result does not depend on it (only the summation order
# does), so it is the package's choice, not the config's: HF accepts any ``chunk_size`` and this
# model runs every such config with this tile (``config.chunk_size`` is kept for round trips).
SCAN_CHUNK = 128


class RMSNorm(nn.Module):
    """fp32 RMSNorm, weight applied in fp32, result in the input dtype (HF ``NemotronHRMSNorm``)."""

    def __init__(self, dim: int, eps: float, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class GatedNormWeight(nn.Module):
    """Holds ``mixer.norm.weight``; the math is :func:`nemotron.ssm_kernels.gated_rmsnorm`."""

    def __init__(self, dim: int, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))


class Conv1dWeight(nn.Module):
    """Holds ``mixer.conv1d.weight [C, 1, W]`` and ``.bias [C]`` as nn.Conv1d stores them."""

    def __init__(self, channels: int, width: int, bias: bool, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, width, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(channels, dtype=dtype, device=device)) if bias else None


class Mamba2Mixer(nn.Module):
    """in_proj -> [z | xBC | dt]; causal conv1d + silu on xBC; SSD scan (prefill) or state update
    (decode); gated grouped RMSNorm of y * silu(z); out_proj."""

    def __init__(self, cfg: NemotronHConfig, layer: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.cfg = cfg
        self.heads, self.head_dim, self.n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size
        self.inter, self.groups = cfg.mamba_intermediate, cfg.n_groups
        self.in_proj = nn.Linear(cfg.hidden_size, self.inter + cfg.conv_dim + self.heads, bias=cfg.use_bias, **kw)
        self.conv1d = Conv1dWeight(cfg.conv_dim, cfg.conv_kernel, cfg.use_conv_bias, **kw)
        self.A_log = nn.Parameter(torch.zeros(self.heads, **kw))
        self.D = nn.Parameter(torch.ones(self.heads, **kw))
        self.dt_bias = nn.Parameter(torch.zeros(self.heads, **kw))
        self.norm = GatedNormWeight(self.inter, **kw)
        self.out_proj = nn.Linear(self.inter, cfg.hidden_size, bias=cfg.use_bias, **kw)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid [B, T]`` (bool, left padding: each row's false entries come first) marks the real
        tokens. A padded position enters the conv as a zero input and the scan as a zero x, so a
        row's conv and SSM states stay exactly the zero states of an empty sequence until its first
        real token, as if its prompt were alone."""
        b, t, _ = x.shape
        zxbcdt = self.in_proj(x)
        z, xbc, dt = zxbcdt.split([self.inter, self.cfg.conv_dim, self.heads], dim=-1)
        w = self.conv1d.weight.squeeze(1)
        bias = self.conv1d.bias
        A = -torch.exp(self.A_log.float())
        xbc = _zero_pads(xbc, valid)
        if cache is not None and (t == 1 or cache.recording):
            y = self._steps(xbc, dt, w, bias, A, cache, valid)
        else:
            conv0 = cache.conv if cache is not None else None
            xbc, conv_final = ssm.causal_conv1d(xbc.contiguous(), w.contiguous(), bias, activation="silu",
                                                initial_states=conv0, return_final_states=True)
            xs, B, C = xbc.split([self.inter, self.groups * self.n, self.groups * self.n], dim=-1)
            xs = _zero_pads(xs, valid)
            s0 = cache.ssm_initial() if cache is not None else None
            y, s_final = ssm.ssd_scan(xs.reshape(b, t, self.heads, self.head_dim), dt.contiguous(), A,
                                      B.reshape(b, t, self.groups, self.n), C.reshape(b, t, self.groups, self.n),
                                      chunk_size=SCAN_CHUNK, D=self.D, dt_bias=self.dt_bias,
                                      dt_softplus=True, dt_limit=(self.cfg.time_step_min, float("inf")),
                                      initial_states=s0, return_final_states=True)
            if cache is not None:
                cache.conv.copy_(conv_final)
                cache.store_ssm(s_final)
            y = y.reshape(b, t, self.inter)
        y = ssm.gated_rmsnorm(y.contiguous(), z.contiguous(), self.norm.weight, group_size=self.inter // self.groups,
                              eps=self.cfg.layer_norm_epsilon)
        return self.out_proj(y)

    def _steps(self, xbc, dt, w, bias, A, cache: LayerCache, valid=None) -> torch.Tensor:
        """Through the cache with the decode updates: one token (decode), or the T drafted tokens of a
        verification in one multi-token call of each update, which keep the states after every token
        in the cache's record buffers so the cache can roll back to any of them."""
        b, t, _ = xbc.shape
        # dt: softplus(dt + bias) clamped below at time_step_min, the prefill's dt_limit
        dt_all = F.softplus(dt.float() + self.dt_bias.float()).clamp_min(self.cfg.time_step_min)
        gn = self.groups * self.n
        if not cache.recording:
            xj = ssm.causal_conv1d_update(xbc[:, 0].contiguous(), cache.conv, w.contiguous(), bias, activation="silu")
            xs, B, C = xj.split([self.inter, gn, gn], dim=-1)
            xs = _zero_pads(xs, valid)
            state = cache.ssm_working()
            y = ssm.selective_state_update(state, xs.reshape(b, self.heads, self.head_dim), dt_all[:, 0], A,
                                           B.reshape(b, self.groups, self.n), C.reshape(b, self.groups, self.n),
                                           D=self.D)
            cache.commit_ssm_step(state)
            return y.reshape(b, 1, self.inter)
        conv_out, ssm_out = cache.verify_buffers(t)
        xc = ssm.causal_conv1d_update_multi(xbc.contiguous(), cache.conv, w.contiguous(), bias, activation="silu",
                                            conv_states_out=conv_out)
        xs, B, C = xc.split([self.inter, gn, gn], dim=-1)
        xs = _zero_pads(xs, valid)
        state = cache.verify_state()
        y = ssm.selective_state_update_multi(state, xs.reshape(b, t, self.heads, self.head_dim), dt_all, A,
                                             B.reshape(b, t, self.groups, self.n), C.reshape(b, t, self.groups, self.n),
                                             D=self.D, states_out=ssm_out)
        cache.end_verify_step(state)
        return y.reshape(b, t, self.inter)


def _zero_pads(v: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``v [B, (T,) C]`` with its padded tokens (``valid [B, T]`` false) set to 0."""
    return v if valid is None else torch.where(valid.reshape(*v.shape[:-1], 1), v, 0)


class Attention(nn.Module):
    """GQA without positional encoding (Nemotron-H); torch SDPA over the static KV cache. The
    projections have no bias whatever ``config.attention_bias`` says: HF ignores the flag, so its
    checkpoints never carry attention biases."""

    def __init__(self, cfg: NemotronHConfig, layer, *, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, **kw)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, **kw)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid [B, T]`` (bool) marks real tokens: a padded position is never a key of a real
        query. The tokens are put in a stable partition, each row's real ones first (the order of
        :func:`~nemotron.model.cache.token_slots`), so under a causal mask no real query sees a pad;
        the cache keeps only the real tokens."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if cache is None:
            rel = None if valid is None else token_slots(valid)
            q, k, v = (_place(a, rel) for a in (q, k, v))
            # a query at place r sees places 0..r (with T = 1 the causal mask is no mask)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               scale=self.head_dim ** -0.5, enable_gqa=self.kv_heads != self.heads)
        else:
            kc, vc, lengths, rel = cache.append_kv(k, v, valid)                # [B, KVH, L, D], lengths [B]
            o = attend_cache(_place(q, rel).transpose(1, 2), kc, vc, lengths, scale=self.head_dim ** -0.5,
                             kv_scale=cache.parent.kv_scale)
        o = _unplace(o.transpose(1, 2), rel)                                  # [B, T, NH, D]
        return self.o_proj(o.reshape(b, t, self.heads * self.head_dim))


def _place(a: torch.Tensor, rel: torch.Tensor | None) -> torch.Tensor:
    """``a [B, T, ...]`` reordered so that token j of row b sits at ``rel[b, j]``."""
    if rel is None:
        return a
    order = rel.argsort(1)                                                # place -> token
    return a.gather(1, order.view(*order.shape, *([1] * (a.dim() - 2))).expand_as(a))


def _unplace(a: torch.Tensor, rel: torch.Tensor | None) -> torch.Tensor:
    if rel is None:
        return a
    return a.gather(1, rel.view(*rel.shape, *([1] * (a.dim() - 2))).expand_as(a))


def attend_cache(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, lengths: torch.Tensor, *,
                 scale: float, kv_scale: torch.Tensor | None) -> torch.Tensor:
    """The T newest tokens of each row over its live cache: q ``[B, NH, T, D]``, the KV buffers
    ``[B, KVH, max_len, D]``, ``lengths [B]`` (the new tokens included); query t of row b sits at
    ``lengths[b] - T + t`` and sees keys ``0..`` that position. ``nemotron::decode_attention``
    reads only the live prefix (flash decoding on a GPU; SDPA per row's live slice on CPU), whatever
    ``max_len``, and builds no ``[T, max_len]`` mask. Returns ``[B, NH, T, D]``."""
    work = q.dtype if kc.dtype in (q.dtype, torch.float8_e4m3fn) else kc.dtype      # a narrower cache: its dtype
    o = torch.ops.nemotron.decode_attention(q.transpose(1, 2).to(work), kc, vc, lengths, scale, kv_scale, kv_scale)
    return o.to(q.dtype).transpose(1, 2)


# A long input's MoE runs in token chunks of this size: its intermediates (latent rows, the k expert
# slots per token, relu2 activations) are per token, so they stay bounded at any prompt length
MOE_TOKEN_CHUNK = 8192


class MoEMixer(LatentMoE):
    """A LatentMoE that accepts (and ignores) the cache: it keeps no state across tokens. Inputs of
    more than :data:`MOE_TOKEN_CHUNK` tokens run in chunks of that many (each token's result is its
    own, so chunking changes nothing but the peak memory)."""

    def __init__(self, cfg: NemotronHConfig, layer, *, dtype=None, device=None):
        lat = cfg.moe_latent_size
        super().__init__(cfg.hidden_size, num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
                         intermediate_size=cfg.moe_intermediate_size,
                         shared_intermediate_size=cfg.moe_shared_expert_intermediate_size,
                         latent_size=lat, n_group=cfg.n_group, topk_group=cfg.topk_group,
                         renormalize=cfg.norm_topk_prob, scaling_factor=cfg.routed_scaling_factor, bias=cfg.mlp_bias,
                         dtype=dtype, device=device)

    def forward(self, h: torch.Tensor, cache: LayerCache | None = None, valid=None) -> torch.Tensor:
        n = h.shape[0] * h.shape[1]
        if n <= MOE_TOKEN_CHUNK:
            return super().forward(h)
        flat = h.reshape(n, h.shape[-1])
        parts = [LatentMoE.forward(self, flat[s:s + MOE_TOKEN_CHUNK]) for s in range(0, n, MOE_TOKEN_CHUNK)]
        return torch.cat(parts).view(h.shape)


class MLPMixer(ReLU2MLP):
    def __init__(self, cfg: NemotronHConfig, layer, *, dtype=None, device=None):
        super().__init__(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype, device=device)

    def forward(self, h: torch.Tensor, cache: LayerCache | None = None, valid=None) -> torch.Tensor:
        return super().forward(h)


MIXERS = {"linear_attention": Mamba2Mixer, "full_attention": Attention, "moe": MoEMixer, "mlp": MLPMixer}


class Block(nn.Module):
    def __init__(self, cfg: NemotronHConfig, layer, kind: str, *, dtype=None, device=None):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype=dtype, device=device)
        self.mixer = MIXERS[kind](cfg, layer, dtype=dtype, device=device)

    def forward(self, h: torch.Tensor, cache: LayerCache | None = None, valid=None) -> torch.Tensor:
        return h + self.mixer(self.norm(h), cache, valid)


class MTPLayer(Block):
    """A sublayer of the MTP block. The first also holds ``eh_proj`` / ``enorm`` / ``hnorm`` (it mixes
    the next token's embedding with the previous hidden state), the last ``final_layernorm``."""

    def __init__(self, cfg: NemotronHConfig, layer, kind: str, *, first: bool, last: bool, dtype=None, device=None):
        super().__init__(cfg, layer, kind, dtype=dtype, device=device)
        h = cfg.hidden_size
        if first:
            self.enorm = RMSNorm(h, cfg.layer_norm_epsilon, dtype=dtype, device=device)
            self.hnorm = RMSNorm(h, cfg.layer_norm_epsilon, dtype=dtype, device=device)
            self.eh_proj = nn.Linear(2 * h, h, bias=False, dtype=dtype, device=device)
        if last:
            self.final_layernorm = RMSNorm(h, cfg.layer_norm_epsilon, dtype=dtype, device=device)
