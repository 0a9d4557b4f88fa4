"""``NemotronHForCausalLM``: the hybrid model under the checkpoint's names (``backbone.*``,
``lm_head.weight``, ``mtp.layers.{j}.*``), so ``state_dict()`` is the HF checkpoint layout.

With ``tie_word_embeddings`` the head is :class:`TiedLMHead`: ``lm_head.weight`` is the embedding
Parameter itself (both names stay in ``state_dict()``, as transformers writes both)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cache import HybridCache, config_ssm_dtype


def check_input_ids(input_ids) -> None:
    """``input_ids``: an int32/int64 tensor ``[B, T]`` with B, T >= 1 (the values are checked by
    :meth:`NemotronHForCausalLM.check_ids`, a host read)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected an int tensor [B, T], got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64) or 0 in input_ids.shape:
        raise ValueError(f"input_ids: expected an int tensor [B, T] with B, T >= 1, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")


def check_attention_mask(mask: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
    """An HF ``attention_mask [B, T]`` (bool or 0/1 ints) as a bool mask of the real tokens, or None
    when there is no mask. Eager calls also check (host reads) that it is 0/1 and left-padded (each
    row: pads, then real tokens; a row of pads only is allowed, as in a chunk of a long padding)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a tensor [B, T] or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask: expected shape {tuple(shape)} (that of input_ids), got {tuple(mask.shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"attention_mask: expected a bool or integer tensor, got {mask.dtype}")
    valid = mask.bool() if mask.dtype != torch.bool else mask
    if not torch.compiler.is_compiling():
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask: expected 0 (pad) and 1 (real token) values only")
        if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
            raise ValueError("attention_mask: expected left padding (each row: its pads, then its real tokens)")
    return valid
from .config import NemotronHConfig
from .layers import Block, MTPLayer, RMSNorm


class Backbone(nn.Module):
    def __init__(self, cfg: NemotronHConfig, *, dtype=None, device=None):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList([Block(cfg, i, kind, dtype=dtype, device=device)
                                     for i, kind in enumerate(cfg.layers_block_type)])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype=dtype, device=device)


class TiedLMHead(nn.Module):
    """The output projection of a tied model: logits ``[..., vocab] = h [..., H] @ E^T`` with ``E``
    the embedding table ``[vocab, H]``, held as ``weight`` (the same Parameter).

    Not an ``nn.Linear`` on purpose: :func:`nemotron.quantize_` converts ``nn.Linear`` modules, and
    a quantized copy of the head would untie it from the float table the lookup reads. So a tied
    head stays float and tied under every recipe (ModelOpt leaves lm_head unquantized too)."""

    def __init__(self, embeddings: nn.Embedding):
        super().__init__()
        self.weight = embeddings.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class MTP(nn.Module):
    """The multi-token-prediction block: one set of sublayers (``mtp_layers_block_type``, "*E" in
    Super) applied recursively to draft tokens; embeddings and lm_head are shared with the model."""

    def __init__(self, cfg: NemotronHConfig, *, dtype=None, device=None):
        super().__init__()
        kinds = cfg.mtp_layers_block_type
        self.layers = nn.ModuleList([MTPLayer(cfg, f"mtp.{j}", kind, first=j == 0, last=j == len(kinds) - 1,
                                              dtype=dtype, device=device) for j, kind in enumerate(kinds)])

    def forward(self, emb: torch.Tensor, hidden: torch.Tensor, cache: Optional[HybridCache],
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """emb: embeddings of the next tokens ``[B, T, H]``; hidden: the hidden states at the current
        positions ``[B, T, H]`` (the model's final-normed states, or the previous MTP step's);
        ``valid [B, T]`` marks the real positions. Returns the new hidden states (final-normed),
        whose logits predict one token further."""
        first = self.layers[0]
        h = first.eh_proj(torch.cat([first.enorm(emb), first.hnorm(hidden)], dim=-1))
        for j, layer in enumerate(self.layers):
            h = layer(h, cache.layers.get(f"mtp.{j}") if cache is not None else None, valid)
        return self.layers[-1].final_layernorm(h)


class NemotronHForCausalLM(nn.Module):
    """Nemotron-H (Mamba-2 + attention + LatentMoE, optional MTP), HF ``nemotron_h`` compatible.

    Example::

        >>> model = NemotronHForCausalLM.random(NemotronHConfig.preset("tiny"), seed=0)
        >>> logits = model(torch.tensor([[1, 5, 7]]))                     # [1, 3, vocab] fp32
        >>> out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=8, mtp_draft_tokens=2)
    """

    def __init__(self, config: NemotronHConfig, *, dtype=None, device=None):
        super().__init__()
        if not isinstance(config, NemotronHConfig):
            raise TypeError(f"config: expected a NemotronHConfig (NemotronHConfig.from_dict reads a config.json "
                            f"dict), got {type(config).__name__}")
        self.config = config
        self.backbone = Backbone(config, dtype=dtype, device=device)
        if config.tie_word_embeddings:
            self.lm_head = TiedLMHead(self.backbone.embeddings)
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        self.mtp = MTP(config, dtype=dtype, device=device) if config.num_nextn_predict_layers else None
        self.register_load_state_dict_pre_hook(_alias_tied)
        self.register_load_state_dict_post_hook(_retie)

    def tie_weights(self) -> None:
        """Make a tied head's weight the embedding Parameter again (untied: nothing to do).
        ``to_empty`` and ``load_state_dict(assign=True)`` give each module a Parameter of its own,
        so both end here (through ``_apply`` and the load hook)."""
        if isinstance(self.lm_head, TiedLMHead):
            self.lm_head.weight = self.backbone.embeddings.weight

    def _apply(self, fn, recurse=True):
        # every module conversion (to, to_empty, half, ...) goes through here
        out = super()._apply(fn, recurse)
        self.tie_weights()
        return out

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype

    def new_cache(self, batch: int, max_len: int, *, ssm_dtype: Optional[torch.dtype] = None,
                  **kwargs) -> HybridCache:
        """A cache for ``batch`` sequences of up to ``max_len`` tokens (see :class:`HybridCache`).
        ``ssm_dtype`` defaults to the config's ``mamba_ssm_cache_dtype``, as in vLLM (see
        :func:`~nemotron.model.cache.config_ssm_dtype`); an explicit one wins."""
        if ssm_dtype is None:
            ssm_dtype = config_ssm_dtype(self.config)
        return HybridCache(self.config, batch, max_len, device=self.device, dtype=self.dtype,
                           mtp=self.mtp is not None, ssm_dtype=ssm_dtype, **kwargs)

    def hidden_states(self, input_ids: torch.Tensor, cache: Optional[HybridCache] = None, *,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, H]``; advances the cache by each row's real tokens
        (unless verifying). ``attention_mask [B, T]`` (1 real, 0 pad; HF's convention) is a
        left-padded batch: each row's pads come first. With a cache it covers only the new tokens
        (the cache holds only real ones). Eager calls check the ids, the mask and the cache's room
        (host reads); ``generate`` checks once per call and steps through the unchecked path."""
        check_input_ids(input_ids)
        valid = check_attention_mask(attention_mask, input_ids.shape)
        if not torch.compiler.is_compiling():
            self.check_ids(input_ids)
            if cache is not None:
                if input_ids.shape[0] != cache.batch:
                    raise ValueError(f"input_ids: batch {input_ids.shape[0]} does not match the cache's {cache.batch}")
                cache.check_room(input_ids.shape[1])
        return self.step_hidden(input_ids, cache, valid)

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Token ids in ``[0, vocab)`` (one device-to-host read; an id past the table would be a
        device assert on CUDA)."""
        lo, hi = torch.aminmax(input_ids)
        if int(lo) < 0 or int(hi) >= self.config.vocab_size:
            raise ValueError(f"input_ids: token ids must be in [0, {self.config.vocab_size}), got values in "
                             f"[{int(lo)}, {int(hi)}]")

    def step_hidden(self, input_ids: torch.Tensor, cache: Optional[HybridCache] = None,
                    valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`hidden_states` without its checks and without host reads (``valid``: a bool
        ``[B, T]`` or None): the decode path, for callers that validated their ids and sized the cache."""
        h = self.backbone.embeddings(input_ids)
        for i, layer in enumerate(self.backbone.layers):
            h = layer(h, cache.layers.get(i) if cache is not None else None, valid)
        if cache is not None and not cache.recording:
            cache.advance(input_ids.shape[1] if valid is None else valid.sum(1))
        return self.backbone.norm_f(h)

    def forward(self, input_ids: torch.Tensor, *, cache: Optional[HybridCache] = None,
                attention_mask: Optional[torch.Tensor] = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits fp32 ``[B, T, vocab]`` for ``input_ids [B, T]`` (``logits_to_keep`` = n > 0: only
        the last n positions, ``[B, n, vocab]``; a long prompt needs only the last); with a cache, the
        tokens continue the cached ones (prefill, chunked prefill or decode) and the cache advances.
        ``attention_mask``: see :meth:`hidden_states`."""
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep: expected an int >= 0 (0 = every position), got {logits_to_keep!r}")
        h = self.hidden_states(input_ids, cache, attention_mask=attention_mask)
        return self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h).float()

    def mtp_step(self, next_ids: torch.Tensor, hidden: torch.Tensor, cache: Optional[HybridCache] = None,
                 valid: Optional[torch.Tensor] = None):
        """One MTP application: (hidden ``[B, T, H]``, logits fp32 ``[B, T, vocab]``); ``valid [B, T]``
        marks the real positions (the cache advances each row by its count)."""
        if self.mtp is None:
            raise ValueError("mtp_step: this model has no MTP block (num_nextn_predict_layers = 0)")
        if cache is not None:
            cache.check_room(next_ids.shape[1], mtp=True)
        h = self.step_mtp(next_ids, hidden, cache, valid)
        return h, self.lm_head(h).float()

    def step_mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, cache: Optional[HybridCache] = None,
                 valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`mtp_step`'s hidden states, without checks or host reads (the decode path)."""
        h = self.mtp(self.backbone.embeddings(next_ids), hidden, cache, valid)
        if cache is not None:
            cache.advance(next_ids.shape[1] if valid is None else valid.sum(1), mtp=True)
        return h

    # -- construction and checkpoints (nemotron/model/checkpoint.py) ----------------------------
    @classmethod
    def random(cls, config: NemotronHConfig, *, device=None, dtype=None, recipe=None, seed: int = 0, ep_group=None,
               ep_timeout: Optional[float] = 60.0):
        """Random weights built layer by layer in the target format (``recipe`` as in
        :func:`nemotron.quantize_`), never holding the whole model in full precision. With
        ``ep_group`` (W ranks) this rank keeps E / W routed experts per MoE layer, with the values the
        single-process model has (see :mod:`nemotron.model.distributed`)."""
        from .checkpoint import build_random
        return build_random(cls, config, device=device, dtype=dtype, recipe=recipe, seed=seed, ep_group=ep_group,
                            ep_timeout=ep_timeout)

    @classmethod
    def from_pretrained(cls, path: str, *, device=None, dtype=None, progress: bool = False, ep_group=None,
                        ep_timeout: Optional[float] = 60.0):
        """Load an HF ``nemotron_h`` checkpoint directory (single file or sharded) or a ModelOpt
        NVFP4 / FP8 / MIXED_PRECISION export of one. With ``ep_group`` (a ``torch.distributed``
        group of W ranks dividing the expert count) this rank reads and holds the dense part and
        only its E / W routed experts per MoE layer; every collective waits at most ``ep_timeout``
        seconds (see :mod:`nemotron.model.distributed`)."""
        from .checkpoint import load_pretrained
        return load_pretrained(cls, path, device=device, dtype=dtype, progress=progress, ep_group=ep_group,
                               ep_timeout=ep_timeout)

    @classmethod
    def from_hf(cls, hf_model, *, device=None, dtype=None):
        """Swap an HF transformers ``NemotronHForCausalLM`` for this package's model (same weights)."""
        from .checkpoint import from_hf
        return from_hf(cls, hf_model, device=device, dtype=dtype)

    def save_pretrained(self, path: str, *, max_shard_bytes: Optional[int] = None,
                        ep_timeout: Optional[float] = 600.0) -> None:
        """Write config.json (+ the ModelOpt quantization config when quantized) and safetensors.
        Under expert parallelism every rank calls it and rank 0 writes one sharded checkpoint of
        the whole model (see :func:`nemotron.model.checkpoint.save_pretrained`)."""
        from .checkpoint import save_pretrained
        save_pretrained(self, path, max_shard_bytes=max_shard_bytes, ep_timeout=ep_timeout)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """See :func:`nemotron.model.generate.generate`."""
        from .generate import generate
        return generate(self, input_ids, **kwargs)


_EMB, _HEAD = "backbone.embeddings.weight", "lm_head.weight"


def _alias_tied(model: NemotronHForCausalLM, state_dict, prefix, *args) -> None:
    """Before ``load_state_dict``: in a tied model the two names are one tensor, so either supplies
    both (the embeddings when a checkpoint holds both, as transformers' tying does)."""
    if isinstance(model.lm_head, TiedLMHead):
        src = state_dict.get(prefix + _EMB, state_dict.get(prefix + _HEAD))
        if src is not None:
            state_dict[prefix + _EMB] = state_dict[prefix + _HEAD] = src


def _retie(model: NemotronHForCausalLM, incompatible) -> None:
    model.tie_weights()             # ``assign=True`` gave each name its own Parameter
