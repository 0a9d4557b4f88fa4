"""Generation: (chunked) prefill of a left-padded batch, decode, and self-speculative decoding with
the MTP block, every row at its own position.

Batching follows HF: ``input_ids [B, T]`` with ``attention_mask [B, T]`` (1 real, 0 pad), the pads
on the left. A row's pads never enter its Mamba states or its KV cache (see
:meth:`~nemotron.model.NemotronHForCausalLM.hidden_states`), so each row's tokens are the ones its
prompt gives alone; rows stop independently at an eos id and continue with the pad token.

With ``mtp_draft_tokens=k`` each round: the MTP block catches up on the positions each row accepted
last round (a right-padded ``[B, k+1]`` step), drafts k tokens by applying itself recursively, the
main model verifies ``[last token, draft_1..draft_k]`` of every row in one forward (one multi-token
update per Mamba layer, every state kept), each row emits its longest agreeing prefix plus the
model's own next token, and the cache rolls each row back to its last accepted token. Every emitted
token is the main model's choice (greedy: its argmax; sampling: a sample from its distribution), so
greedy output is the same with MTP on or off, row for row.

No step reads the device on the host: sampling is an exponential race (``argmax p / E`` with
``E ~ Exp(1)`` drawn from ``generator``, the same law as ``torch.multinomial`` without its sync),
positions and acceptance counts stay on the device, tokens are written into a device buffer. A
plain decode step makes no host read at all; the loop reads the "all rows finished" flag every
:data:`STOP_CHECK` steps when an eos id is given. An MTP round makes one read, that flag. Ids,
mask and cache room are checked once per call, before the first forward.

With ``backend=`` the decode step, the MTP draft step and the verify step are each compiled once
(static shapes: ``[B, 1]``, ``[B, k+1]``), kept on the model and reused across rounds and calls.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from .. import dispatch
from .model import check_attention_mask, check_input_ids

STOP_CHECK = 16          # plain decode reads the all-finished flag once per this many steps (with eos)


@dataclasses.dataclass
class GenerationStats:
    """What one ``generate`` call did (``output_stats=True``).

    rounds: decode steps, or MTP rounds (verify forwards); drafted / accepted: MTP draft tokens
    proposed and accepted over the rows still generating; acceptance_rate = accepted / drafted;
    tokens_per_round: tokens a generating row gained per round (1 + accepted per row-round)."""
    rounds: int
    drafted: int = 0
    accepted: int = 0
    acceptance_rate: float = 0.0
    tokens_per_round: float = 1.0


def _int_arg(name: str, v, lo: int, *, optional: bool = False):
    """``v`` as an int >= lo (None passes if optional); bools and floats are not ints."""
    return v if v is None and optional else dispatch.check_int(name, v, lo=lo)


def _eos_arg(v) -> tuple:
    """The stop ids as a tuple: None -> (), an id, or a non-empty list of ids (as HF configs write)."""
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError("eos_token_id: expected an int >= 0, a non-empty list of them, or None, got []")
        return tuple(_int_arg("eos_token_id", x, 0) for x in v)
    return (_int_arg("eos_token_id", v, 0),)


def sample(logits: torch.Tensor, temperature: float, top_p: float, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Next tokens ``[...]`` from fp32 logits ``[..., V]``: the argmax when ``temperature`` is 0,
    else a draw from softmax(logits / temperature) cut to its top-p nucleus, by the exponential race
    ``argmax(p / noise)`` with ``noise ~ Exp(1)`` of the logits' shape (no host sync)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p              # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p * keep)
    return (probs / noise).argmax(-1)


class _Sampler:
    """The sampling options and the noise source of one call."""

    def __init__(self, temperature: float, top_p: float, generator, vocab: int, device):
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.vocab, self.device = vocab, device

    def noise(self, *shape) -> Optional[torch.Tensor]:
        if self.temperature == 0.0:
            return None
        e = torch.empty(*shape, self.vocab, device=self.device)
        return e.exponential_(generator=self.generator)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, self.temperature, self.top_p, self.noise(*logits.shape[:-1]))


def generate(model, input_ids: torch.Tensor, *, max_new_tokens: int, attention_mask: Optional[torch.Tensor] = None,
             temperature: float = 0.0, top_p: float = 1.0, mtp_draft_tokens: int = 0,
             prefill_chunk: Optional[int] = None, eos_token_id: Union[int, Sequence[int], None] = None,
             generator: Optional[torch.Generator] = None, cache_kwargs: Optional[dict] = None,
             max_len: Optional[int] = None, backend: Optional[str] = None, output_stats: bool = False):
    """Continue ``input_ids [B, T]`` by up to ``max_new_tokens`` tokens per row; returns ``[B, T + n]``
    (``n`` = max_new_tokens, or fewer when every row stopped at eos), or ``(tokens, GenerationStats)``
    with ``output_stats=True``.

    Args:
        attention_mask: ``[B, T]``, 1 for real tokens, 0 for pads, left padding (HF's convention for
            a batch of prompts of different lengths); each row's output equals its prompt alone.
        temperature: 0 = greedy; otherwise softmax sampling at this temperature (with ``top_p``
            nucleus filtering), the randomness drawn from ``generator``.
        mtp_draft_tokens: k > 0 drafts k tokens per round with the MTP block, every row accepting
            its own prefix.
        prefill_chunk: prefill the prompt in chunks of this many tokens; default the config's
            ``prefill_chunk_size``, so a long prompt's activations stay bounded (the KV cache and
            the states carry between chunks; the result equals an unchunked prefill).
        eos_token_id: stop a row at this id (or at any id of a list); finished rows continue with
            the config's pad token (its first stop id if it has none).
        cache_kwargs: passed to :meth:`NemotronHForCausalLM.new_cache` (``kv_dtype``, ``ssm_dtype``,
            ``ssm_rounding``).
        max_len: the cache length (default: prompt + max_new_tokens + 2 x drafts + 1). A compiled model
            keeps one decode graph per cache length, so serving passes one fixed value.
        backend: run the decode steps (and the MTP draft and verify steps) through ``torch.compile``
            with this backend (e.g. ``"nemotron"``); compiled once, kept on the model.
        output_stats: also return a :class:`GenerationStats`.

    Example::

        >>> ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]); mask = (ids != 0).long()
        >>> out, st = model.generate(ids, attention_mask=mask, max_new_tokens=8, mtp_draft_tokens=3,
        ...                          output_stats=True)           # st.acceptance_rate
    """
    check_input_ids(input_ids)
    max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, 1)
    temperature = dispatch.check_float("temperature", temperature, lo=0.0)
    top_p = dispatch.check_float("top_p", top_p, lo=0.0, hi=1.0, lo_open=True)
    prefill_chunk = _int_arg("prefill_chunk", prefill_chunk, 1, optional=True)
    max_len = _int_arg("max_len", max_len, 1, optional=True)
    eos = _eos_arg(eos_token_id)
    k = _int_arg("mtp_draft_tokens", mtp_draft_tokens, 0)
    if not isinstance(output_stats, bool):
        raise TypeError(f"output_stats: expected a bool, got {output_stats!r}")
    if k and model.mtp is None:
        raise ValueError(f"mtp_draft_tokens: {k} drafts need a model with an MTP block (num_nextn_predict_layers > 0)")
    if k and input_ids.shape[0] > 1 and "linear_attention" in model.config.mtp_layers_block_type:
        raise ValueError("mtp_draft_tokens: batched speculative decoding needs an MTP block without Mamba layers "
                         "(its catch-up steps are right-padded); run batch 1")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if cache_kwargs is not None and not isinstance(cache_kwargs, dict):
        raise TypeError(f"cache_kwargs: expected a dict or None, got {type(cache_kwargs).__name__}")
    if backend is not None and not (isinstance(backend, str) or callable(backend)):
        raise TypeError(f"backend: expected a torch.compile backend name (or callable) or None, got {backend!r}")
    b, t = input_ids.shape
    input_ids = input_ids.to(model.device)
    valid = check_attention_mask(attention_mask, input_ids.shape)
    if valid is not None:
        valid = valid.to(model.device)
        if not bool(valid[:, -1].all()):
            raise ValueError("attention_mask: every row needs a real token in the last column (left padding)")
        if bool(valid.all()):
            valid = None
    model.check_ids(input_ids)                                    # once: sampled ids are in range
    # a row finishing mid-round may have accepted up to k tokens past its last kept one, and a finished
    # row's verify still writes k + 1 slots: 2k + 1 slots past prompt + max_new_tokens bound both
    need = t + max_new_tokens + 2 * k + 1
    if max_len is not None and max_len < need:
        raise ValueError(f"max_len: {max_len} is shorter than the {need} positions this call may use")
    cache = model.new_cache(b, max_len or need, **(cache_kwargs or {}))
    sampler = _Sampler(temperature, top_p, generator, model.config.vocab_size, model.device)
    with torch.no_grad():
        hidden = _prefill(model, input_ids, valid, cache, prefill_chunk or model.config.prefill_chunk_size,
                          keep_all=k > 0)
        nxt = sampler(model.lm_head(hidden[:, -1]).float())
        if k:
            out, stats = _speculate(model, input_ids, valid, hidden, nxt, cache, max_new_tokens, k, sampler, eos,
                                    backend)
        else:
            out, stats = _decode(model, nxt, cache, max_new_tokens, sampler, eos, backend)
    out = torch.cat([input_ids, out], 1)
    return (out, stats) if output_stats else out


def _prefill(model, input_ids, valid, cache, chunk: Optional[int], keep_all: bool) -> torch.Tensor:
    t = input_ids.shape[1]
    step = chunk or t
    hs = []
    for s in range(0, t, step):
        v = None if valid is None else valid[:, s:s + step]
        h = model.step_hidden(input_ids[:, s:s + step], cache, v)    # Mamba states carried between chunks
        hs.append(h if keep_all else h[:, -1:])
    return torch.cat(hs, 1) if keep_all else hs[-1]


def _steps(model, backend) -> dict:
    """The step functions, compiled once per backend and kept on the model (eager without one)."""
    fns = {"decode": _decode_step, "draft": _draft_step, "verify": _verify_step}
    if backend is None:
        return fns
    kept = model.__dict__.setdefault("_compiled_steps", {})
    if backend not in kept:
        kept[backend] = {name: torch.compile(fn, backend=backend) for name, fn in fns.items()}
    return kept[backend]


def _pad_id(model, eos: tuple) -> int:
    pad = model.config.pad_token_id
    return (eos[0] if eos else 0) if pad is None else pad


def _decode_step(model, tok, cache, temperature, top_p, noise):
    """One plain decode step of every row: the next tokens ``[B]`` after ``tok [B, 1]``."""
    logits = model.lm_head(model.step_hidden(tok, cache)[:, -1]).float()
    return sample(logits, temperature, top_p, noise)


def _decode(model, nxt, cache, max_new, sampler: _Sampler, eos: tuple, backend):
    step = _steps(model, backend)["decode"]
    b, dev = nxt.shape[0], nxt.device
    pad = _pad_id(model, eos)
    stops = torch.tensor(eos, dtype=nxt.dtype, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    out = torch.empty(b, max_new, dtype=nxt.dtype, device=dev)
    n = max_new
    for i in range(max_new):
        if eos:
            nxt = torch.where(done, pad, nxt)
            done = done | torch.isin(nxt, stops)
        out[:, i] = nxt
        if i + 1 == max_new:
            break
        if eos and (i + 1) % STOP_CHECK == 0 and bool(done.all()):
            n = i + 1
            break
        nxt = step(model, nxt[:, None], cache, sampler.temperature, sampler.top_p, sampler.noise(b))
    out = out[:, :n]
    if eos:   # every row stopped: end at the last row's stop, as a check after every step would
        hit = torch.isin(out, stops)
        if bool(hit.any(1).all()):
            out = out[:, :int(hit.int().argmax(1).max()) + 1]
    return out, GenerationStats(rounds=out.shape[1])


def _draft_step(model, tok, hidden, valid, last, cache, k: int):
    """The MTP block catches up on the accepted positions (``tok``/``hidden``/``valid`` ``[B, T]``;
    row b's newest real position is ``last[b]``), then drafts k tokens ``[B, k]`` by applying itself
    k - 1 more times; the recursive steps are speculative, so the MTP positions give them back."""
    h = model.step_mtp(tok, hidden, cache, valid)
    rows = torch.arange(tok.shape[0], device=tok.device)
    h = h[rows, last][:, None]                                               # [B, 1, H]
    drafts = [model.lm_head(h[:, -1]).float().argmax(-1)]
    for _ in range(k - 1):
        h = model.step_mtp(drafts[-1][:, None], h, cache)
        drafts.append(model.lm_head(h[:, -1]).float().argmax(-1))
    if k > 1:
        cache.advance(1 - k, mtp=True)
    return torch.stack(drafts, 1)


def _verify_step(model, last, drafts, cache, frozen, temperature, top_p, noise):
    """Verify ``[last, drafts]`` (``[B, 1 + k]``) in one forward; returns the model's tokens
    ``[B, k+1]``, the accepted draft counts ``[B]`` and the hidden states. Each row keeps its
    agreeing prefix plus one token; ``frozen`` rows (finished) keep their positions."""
    tokens = torch.cat([last[:, None], drafts], 1)
    cache.begin_verify()
    hv = model.step_hidden(tokens, cache)
    target = sample(model.lm_head(hv).float(), temperature, top_p, noise)       # [B, k+1]
    n_acc = (drafts == target[:, :-1]).long().cumprod(1).sum(1)                # [B]
    cache.accept(n_acc + 1, check=False)
    cache.advance(-frozen.long() * (n_acc + 1))
    return target, n_acc, hv


def _speculate(model, input_ids, valid, hidden, nxt, cache, max_new, k, sampler: _Sampler, eos: tuple, backend):
    fns = _steps(model, backend)
    b, dev = nxt.shape[0], nxt.device
    pad = _pad_id(model, eos)
    stops = torch.tensor(eos, dtype=nxt.dtype, device=dev)
    out = torch.full((b, max_new + k + 2), pad, dtype=nxt.dtype, device=dev)   # the last column takes discards
    trash = out.shape[1] - 1
    out[:, 0] = nxt
    cnt = torch.ones(b, dtype=torch.long, device=dev)                         # tokens emitted per row
    done = torch.isin(nxt, stops) if eos else torch.zeros(b, dtype=torch.bool, device=dev)
    cache.reserve_verify(k + 1)
    # the first catch-up covers the prompt (its length varies: not a compiled step)
    tok = torch.cat([input_ids[:, 1:], nxt[:, None]], 1)
    last_pos = torch.full((b,), input_ids.shape[1] - 1, dtype=torch.long, device=dev)
    drafts = _draft_step(model, tok, hidden, valid, last_pos, cache, k)
    last = nxt
    j = torch.arange(k + 1, device=dev)
    rounds = 0
    drafted = accepted = torch.zeros((), dtype=torch.long, device=dev)
    frozen = done | (cnt >= max_new)                                          # finished rows keep their positions
    while True:
        rounds += 1
        target, n_acc, hv = fns["verify"](model, last, drafts, cache, frozen, sampler.temperature, sampler.top_p,
                                          sampler.noise(b, k + 1))
        live = ~frozen
        drafted = drafted + k * live.sum()
        accepted = accepted + torch.where(live, n_acc, 0).sum()
        # emit target[:, :n_acc+1] of each live row, up to its first stop id and its max_new-th token
        keep = (j <= n_acc[:, None]) & live[:, None] & (cnt[:, None] + j < max_new)
        if eos:
            stop = torch.isin(target, stops) & keep
            keep = keep & (stop.long().cumsum(1) - stop.long() == 0)           # nothing after the first stop
            done = done | stop.any(1)
        out.scatter_(1, torch.where(keep, cnt[:, None] + j, trash), target)
        cnt = cnt + keep.sum(1)
        frozen = done | (cnt >= max_new)
        if bool(frozen.all()):                                                # the round's one host read
            break
        drafts = fns["draft"](model, target, hv, j <= n_acc[:, None], n_acc, cache, k)
        cache.advance(-frozen.long() * (n_acc + 1), mtp=True)
        last = target.gather(1, n_acc[:, None])[:, 0]
    n = int(cnt.max())
    drafted, accepted = int(drafted), int(accepted)
    row_rounds = drafted // k
    stats = GenerationStats(rounds=rounds, drafted=drafted, accepted=accepted,
                            acceptance_rate=accepted / drafted if drafted else 0.0,
                            tokens_per_round=(row_rounds + accepted) / row_rounds if row_rounds else 0.0)
    return out[:, :n], stats
