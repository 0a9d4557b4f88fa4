"""Generation: (chunked) prefill, decode, and self-speculative decoding with the MTP block.

With ``mtp_draft_tokens=k`` each round: the MTP block catches up on the positions the main model
accepted last round, drafts k tokens by applying itself recursively, the main model verifies
``[last token, draft_1..draft_k]`` in one forward (Mamba layers token by token with every state
kept), the longest agreeing prefix plus the model's own next token are emitted, and the cache rolls
back to the last accepted token. Every emitted token is the main model's choice (greedy: its
argmax; sampling: a sample from its distribution), so greedy output is the same with MTP on or off.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import dispatch

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


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next tokens ``[B]`` from fp32 logits ``[B, V]`` without host syncs."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p              # the smallest set reaching top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _prefill(model, input_ids, cache, chunk: Optional[int], keep_all: bool) -> torch.Tensor:
    t = input_ids.shape[1]
    step = chunk or t
    hs = []
    for s in range(0, t, step):
        h = model.hidden_states(input_ids[:, s:s + step], cache)    # Mamba states carried between chunks
        hs.append(h if keep_all else h[:, -1:])
    return torch.cat(hs, 1) if keep_all else hs[-1]


def generate(model, input_ids: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             mtp_draft_tokens: int = 0, prefill_chunk: Optional[int] = None,
             eos_token_id: Union[int, Sequence[int], None] = None,
             generator: Optional[torch.Generator] = None, cache_kwargs: Optional[dict] = None,
             max_len: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Continue ``input_ids [B, T]`` by up to ``max_new_tokens`` tokens; returns ``[B, T + n]``.

    Args:
        temperature: 0 = greedy; otherwise softmax sampling at this temperature (with ``top_p``
            nucleus filtering) using ``generator``.
        mtp_draft_tokens: k > 0 drafts k tokens per round with the MTP block (batch 1); statistics
            land in ``model.last_generate_stats`` (drafted, accepted, acceptance rate, rounds).
        prefill_chunk: prefill the prompt in chunks of this many tokens (long prompts).
        eos_token_id: stop a sequence at this id (or at any id of a list); finished rows of a batch
            continue with the config's pad token (its first stop id if it has none).
        cache_kwargs: passed to :meth:`NemotronHForCausalLM.new_cache` (``kv_dtype``, ``ssm_dtype``,
            ``ssm_rounding``).
        max_len: the cache length (default: prompt + max_new_tokens + drafts). A compiled model
            keeps one decode graph per cache length, so serving passes one fixed value.
        backend: run the decode steps through ``torch.compile(model, backend=backend)`` (e.g.
            ``"nemotron"``); the compiled model is kept on the model and reused across calls.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected an int tensor [B, T], got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
    max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, 1)
    temperature = dispatch.check_float("temperature", temperature, lo=0.0)
    top_p = dispatch.check_float("top_p", top_p, lo=0.0, hi=1.0, lo_open=True)
    prefill_chunk = _int_arg("prefill_chunk", prefill_chunk, 1, optional=True)
    max_len = _int_arg("max_len", max_len, 1, optional=True)
    eos = _eos_arg(eos_token_id)
    k = _int_arg("mtp_draft_tokens", mtp_draft_tokens, 0)
    if k and model.mtp is None:
        raise ValueError(f"mtp_draft_tokens: {k} drafts need a model with an MTP block (num_nextn_predict_layers > 0)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if cache_kwargs is not None and not isinstance(cache_kwargs, dict):
        raise TypeError(f"cache_kwargs: expected a dict or None, got {type(cache_kwargs).__name__}")
    if backend is not None and not (isinstance(backend, str) or callable(backend)):
        raise TypeError(f"backend: expected a torch.compile backend name (or callable) or None, got {backend!r}")
    if k and input_ids.shape[0] != 1:
        raise ValueError(f"mtp_draft_tokens: speculative decoding runs batch 1, got batch {input_ids.shape[0]}")
    b, t = input_ids.shape
    input_ids = input_ids.to(model.device)
    need = t + max_new_tokens + k + 1
    if max_len is not None and max_len < need:
        raise ValueError(f"max_len: {max_len} is shorter than the {need} positions this call may use")
    cache = model.new_cache(b, max_len or need, **(cache_kwargs or {}))
    with torch.no_grad():
        hidden = _prefill(model, input_ids, cache, prefill_chunk, keep_all=k > 0)
        nxt = _sample(model.lm_head(hidden[:, -1]).float(), temperature, top_p, generator)
        if k:
            out = _speculate(model, input_ids, hidden, nxt, cache, max_new_tokens, k, temperature, top_p, generator,
                             eos)
        else:
            step = _compiled(model, backend) if backend else model
            out = _decode(model, step, nxt, cache, max_new_tokens, temperature, top_p, generator, eos)
    return torch.cat([input_ids, out], 1)


def _compiled(model, backend: str):
    """``torch.compile(model, backend=backend)``, made once per backend and kept on the model."""
    cache = model.__dict__.setdefault("_compiled_steps", {})
    if backend not in cache:
        cache[backend] = torch.compile(model, backend=backend)
    return cache[backend]


def _decode(model, step, nxt, cache, max_new, temperature, top_p, generator, eos: tuple):
    pad = model.config.pad_token_id
    pad = eos[0] if pad is None and eos else pad
    stops = torch.tensor(eos, dtype=nxt.dtype, device=nxt.device)
    done = torch.zeros_like(nxt, dtype=torch.bool)
    tokens = []
    for i in range(max_new):
        if eos:
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done = done | torch.isin(nxt, stops)
        tokens.append(nxt)
        if i + 1 == max_new or (eos and bool(done.all())):
            break
        nxt = _sample(step(nxt[:, None], cache=cache)[:, -1], temperature, top_p, generator)
    model.last_generate_stats = {"rounds": len(tokens), "drafted": 0, "accepted": 0}
    return torch.stack(tokens, 1)


def _speculate(model, input_ids, hidden, nxt, cache, max_new, k, temperature, top_p, generator, eos: tuple):
    emitted = [int(nxt)]
    pend_h = hidden                                                  # positions the MTP has not seen
    pend_tok = torch.cat([input_ids[:, 1:], nxt[:, None]], 1)        # the token after each of them
    last = nxt
    drafted = accepted = rounds = 0
    while len(emitted) < max_new and emitted[-1] not in eos:
        rounds += 1
        # draft: catch up on the pending positions, then apply the MTP block recursively
        h_m, lg = model.mtp_step(pend_tok, pend_h, cache)
        drafts = [lg[:, -1].argmax(-1)]
        for _ in range(k - 1):
            h_m, lg = model.mtp_step(drafts[-1][:, None], h_m[:, -1:], cache)
            drafts.append(lg[:, -1].argmax(-1))
        cache.mtp_len -= k - 1                                       # the recursive steps were speculative
        # verify [last, d_1..d_k] in one forward; emit the agreeing prefix and the model's next token
        cache.begin_verify()
        hv = model.hidden_states(torch.stack([last, *drafts], 1), cache)
        target = _sample(model.lm_head(hv[0]).float(), temperature, top_p, generator)       # [k + 1]
        d = torch.stack(drafts, 1)[0]
        agree = (d == target[:k]).int().cumprod(0).sum()
        n_acc = int(agree)
        cache.accept(n_acc + 1)
        new = d[:n_acc].tolist() + [int(target[n_acc])]
        drafted, accepted = drafted + k, accepted + n_acc
        pend_h = hv[:, :n_acc + 1]
        pend_tok = torch.tensor([new], device=hv.device)
        last = target[n_acc:n_acc + 1]
        for tok in new:
            if len(emitted) < max_new and emitted[-1] not in eos:
                emitted.append(tok)
    model.last_generate_stats = {"rounds": rounds, "drafted": drafted, "accepted": accepted,
                                 "acceptance_rate": accepted / drafted if drafted else 0.0,
                                 "tokens_per_round": (len(emitted) - 1) / rounds if rounds else 0.0}
    return torch.tensor([emitted], device=input_ids.device)
