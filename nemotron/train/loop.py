"""Training the Nemotron-H hybrid natively in NVFP4, and evaluating what it learned.

:func:`train` runs next-token prediction plus Super's multi-token prediction (the one MTP block
applied twice) under a precision recipe (:data:`RECIPES`), with AdamW, a warmup-stable-decay
schedule and gradient clipping. Everything that decides a step is a function of the step number
or lives in the checkpoint (the data order is ``batch(..., step=step)``; stochastic rounding draws
its seeds from torch's default generator, whose state is checkpointed), so a run cut off and
resumed equals the uninterrupted run bit for bit. Files under ``out_dir``:

  checkpoint.pt   model and optimizer state, step, RNG states, recipe, config, run arguments
  log.jsonl       a ``start`` record per invocation, then one record per step
  model/          the final model (``save_pretrained``; NVFP4 runs as the ModelOpt NVFP4 export)
                  and tokenizer.json, loadable with ``NemotronHForCausalLM.from_pretrained``

:func:`evaluate` reads such a model: held-out loss per token, bits per byte, and the acceptance
rate of greedy MTP drafts at k = 1 and k = 3.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

import nemotron
from .. import dispatch
from ..model import NemotronHConfig, NemotronHForCausalLM
from ..moe_kernels.layer import MoEExperts
from ..nvfp4.training import NVFP4Recipe, NVFP4TrainingLinear

MTP_WEIGHT = 0.3            # Super's weight of the MTP loss (the mean over the depths)
MTP_DEPTHS = 2              # the shared MTP block applied twice: depth d predicts token t + 1 + d
CHECKPOINT, LOG, MODEL_DIR = "checkpoint.pt", "log.jsonl", "model"
_FORMAT = 1                 # the checkpoint layout's version


def _nemotron3(**changes) -> Callable[[], NVFP4Recipe]:
    return lambda: dataclasses.replace(NVFP4Recipe.nemotron3(), **changes)


# name -> the NVFP4 recipe (None: the high-precision baseline)
RECIPES: dict = {
    "bf16": None,
    "nvfp4": _nemotron3(),                                  # Super's recipe with its carve-outs
    "nvfp4-no-rht": _nemotron3(rht_wgrad=False),
    "nvfp4-no-sr": _nemotron3(stochastic_grads=False),
    "nvfp4-1d-weights": _nemotron3(weight_2d=False),
    "nvfp4-all": NVFP4Recipe,                               # no carve-outs: every linear and expert in NVFP4
}


@dataclasses.dataclass
class Data:
    """What :func:`train` reads: ``train`` (1-D int token stream), optionally ``heldout`` (1-D) and
    ``tokenizer`` (a ``tokenizers.Tokenizer``, written beside the final model), and ``batch``, the
    deterministic batcher ``batch(tokens, *, step, batch_size, seq_len, seed) -> int64
    [B, seq_len + 1]`` (default: :func:`nemotron.train.data.batch`)."""
    train: torch.Tensor
    heldout: Optional[torch.Tensor] = None
    tokenizer: object = None
    batch: Optional[Callable] = None


def _stdlib_split():
    from . import data as d
    root = d.stdlib_root()
    return d, *d.split(d.stdlib_files(root), root)


def stdlib_data(cache_dir: str, *, vocab_size: int = 8192) -> Data:
    """The Python standard library's source, split into train / held-out files, with a byte-level
    BPE tokenizer trained on the train files (kept as ``cache_dir/tokenizer.json``) and the token
    streams cached under ``cache_dir``."""
    d, train_files, heldout_files = _stdlib_split()
    os.makedirs(cache_dir, exist_ok=True)
    tok_path = os.path.join(cache_dir, "tokenizer.json")
    if os.path.exists(tok_path):
        tok = d.load_tokenizer(tok_path)
    else:
        tok = d.train_tokenizer(train_files, vocab_size=vocab_size)
        d.save_tokenizer(tok, tok_path)
    return Data(train=d.cached_tokens("train", train_files, tok, cache_dir),
                heldout=d.cached_tokens("heldout", heldout_files, tok, cache_dir), tokenizer=tok, batch=d.batch)


def stdlib_heldout(model_dir: str, cache_dir: str) -> tuple[torch.Tensor, float]:
    """(the held-out standard-library files as tokens of ``model_dir``'s tokenizer.json, cached
    under ``cache_dir``; their UTF-8 bytes per token, for bits per byte)."""
    d, _, heldout_files = _stdlib_split()
    tok = d.load_tokenizer(model_dir)
    tokens = d.cached_tokens("heldout", heldout_files, tok, cache_dir)
    return tokens, d.bytes_per_token(heldout_files, tok, tokens=tokens)


def lr_at(step: int, steps: int, peak: float, *, warmup: float = 0.05, decay: float = 0.2,
          floor: float = 0.1) -> float:
    """Warmup-stable-decay: linear warmup over the first ``warmup`` share of the steps, ``peak``,
    then a linear decay over the last ``decay`` share to ``floor * peak`` at the final step."""
    w, d = max(1, round(warmup * steps)), max(1, round(decay * steps))
    if step < w:
        return peak * (step + 1) / w
    if step >= steps - d:
        return peak * (floor + (1 - floor) * (steps - 1 - step) / d)
    return peak


def losses(model: NemotronHForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(next-token loss, MTP loss or None) of a batch ``ids [B, T + 1]`` (mean cross-entropy, nats).

    The backbone reads tokens ``0..T-1`` and predicts ``1..T``. MTP depth 1 mixes the backbone's
    final states at positions ``0..T-2`` with the embeddings of tokens ``1..T-1`` and predicts
    ``2..T``; depth 2 mixes depth 1's states at ``0..T-3`` with the embeddings of ``2..T-1`` and
    predicts ``3..T`` (:meth:`NemotronHForCausalLM.mtp_step`). The MTP loss is the depths' mean."""
    h = model.hidden_states(ids[:, :-1])
    loss = F.cross_entropy(model.lm_head(h).float().flatten(0, 1), ids[:, 1:].flatten())
    if model.mtp is None:
        return loss, None
    per_depth = []
    for d in range(1, MTP_DEPTHS + 1):
        h, logits = model.mtp_step(ids[:, d:-1], h[:, :-1])
        per_depth.append(F.cross_entropy(logits.flatten(0, 1), ids[:, d + 1:].flatten()))
    return loss, sum(per_depth) / len(per_depth)


def build_model(config: NemotronHConfig, recipe: str, *, seed: int = 0, device=None) -> NemotronHForCausalLM:
    """The model to train: random weights (fp32 masters) and, for NVFP4 recipes, its linears and
    expert stacks swapped for the training layers (:func:`nemotron.prepare_training_`)."""
    model = NemotronHForCausalLM.random(config, seed=seed, device=device, dtype=torch.float32)
    if RECIPES[recipe] is not None:
        nemotron.prepare_training_(model, RECIPES[recipe]())
    return model.train()


def _optimizer(model, lr: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95), weight decay 0.1 on matrices (and stacks: dim >= 2) only, none on norms,
    biases, A_log, D and dt_bias."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=False)


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)               # a cut during the save leaves the previous checkpoint whole


def _read_checkpoint(out_dir: str) -> dict:
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"out_dir: no {CHECKPOINT} in {out_dir}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a training checkpoint of this package (format {_FORMAT})")
    return state


def load_checkpoint(out_dir: str, *, device=None) -> tuple[NemotronHForCausalLM, dict]:
    """(the training model with the checkpoint's weights, the checkpoint dict) of a run's
    ``out_dir``: ``step``, ``optimizer``, ``rng``, ``recipe``, ``config``, ``run`` (the run's
    arguments), ``elapsed`` (seconds trained)."""
    state = _read_checkpoint(out_dir)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = build_model(NemotronHConfig.from_dict(state["config"]), state["recipe"], device=device)
    model.load_state_dict(state["model"])
    return model, state


def _check_data(data: Data, vocab: int, seq_len: int) -> None:
    if not isinstance(data, Data):
        raise TypeError(f"data: expected a nemotron.train.loop.Data (or None for the standard library), "
                        f"got {type(data).__name__}")
    for name in ("train", "heldout"):
        t = getattr(data, name)
        if t is None and name == "heldout":
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"data.{name}: expected a 1-D int tensor of token ids, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ValueError(f"data.{name}: token ids must be in [0, {vocab}) (the config's vocab_size), got "
                             f"[{int(t.min())}, {int(t.max())}]")
    if data.train.numel() < seq_len + 1:
        raise ValueError(f"data.train: {data.train.numel()} tokens, fewer than one sequence of seq_len + 1 = "
                         f"{seq_len + 1}")


def _truncate_log(path: str, step: int) -> None:
    """Drop the step records after ``step`` (written after the checkpoint a resume starts from)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def _export_recipe(model) -> dict:
    """The mixed map of what trained in NVFP4 (NVFP4 training linears, NVFP4-trained expert stacks,
    per expert as ModelOpt lists them); the high-precision carve-outs stay as they trained."""
    plan = {}
    for name, mod in model.named_modules():
        if isinstance(mod, NVFP4TrainingLinear):
            plan[name] = "nvfp4"
        elif isinstance(mod, MoEExperts) and mod.training_recipe is not None and mod.quant is None:
            plan.update({f"{name}.{mod.first + e}.{p}": "nvfp4" for e in range(mod.num_experts)
                         for p in ("up_proj", "down_proj")})
    return plan


def export(model: NemotronHForCausalLM, path: str, *, recipe: str, tokenizer=None) -> None:
    """Write the trained model for serving: NVFP4 recipes quantize what trained in NVFP4 with the
    recipe's weight blocks (:func:`nemotron.quantize_`, the ModelOpt NVFP4 export, in place);
    ``bf16`` writes the weights as they are; then tokenizer.json when there is a tokenizer."""
    if RECIPES[recipe] is not None:
        nemotron.quantize_(model, _export_recipe(model))
    model.eval().save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer.json"))


def train(out_dir: str, *, recipe: str = "nvfp4", steps: int = 2000, batch_size: int = 8, seq_len: int = 256,
          lr: float = 3e-3, seed: int = 0, checkpoint_every: int = 100, max_minutes: Optional[float] = None,
          resume: bool = False, data: Optional[Data] = None, config: Union[str, NemotronHConfig] = "stdlib-tiny",
          device=None, progress: bool = True) -> dict:
    """Train a Nemotron-H model from scratch (or ``resume`` a run) and export it.

    Args:
        out_dir: the run's directory (see the module docstring for its files).
        recipe: a key of :data:`RECIPES`. ``"bf16"`` is the high-precision baseline: on CUDA bf16
            autocast over fp32 master weights; on CPU fp32 master weights and fp32 compute (CPUs
            have no fast bf16 GEMM), as the log's start record says. ``"nvfp4"`` is Super's recipe
            (:meth:`NVFP4Recipe.nemotron3`); ``"nvfp4-no-rht"`` / ``"nvfp4-no-sr"`` /
            ``"nvfp4-1d-weights"`` drop one of its parts; ``"nvfp4-all"`` has no carve-outs.
        steps: optimizer steps of the whole run; each reads ``batch_size`` sequences of
            ``seq_len + 1`` tokens (``seq_len >= 4``: the MTP depths need three positions).
        lr: the peak learning rate of the warmup-stable-decay schedule (:func:`lr_at`).
        checkpoint_every: write ``checkpoint.pt`` every this many steps (and at the end).
        max_minutes: stop cleanly after the first step past this many minutes of training in this call,
            with a checkpoint written (``resume=True`` continues); None runs to ``steps``.
        resume: continue the run in ``out_dir`` from its checkpoint (bit-identical to a run never
            cut); the run's arguments must be the checkpoint's. Without a checkpoint it starts
            afresh. Without ``resume``, an ``out_dir`` holding a checkpoint is an error.
        data: a :class:`Data`; None reads the standard library (:func:`stdlib_data`, cached under
            ``out_dir/data``).
        config: a preset name or a :class:`NemotronHConfig`.

    Returns ``{"step", "finished", "loss", "mtp_loss", "checkpoint", "model_dir"}`` (``model_dir``
    None until the run finishes).
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a path, got {type(out_dir).__name__}")
    out_dir = os.fspath(out_dir)
    if recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {list(RECIPES)}, got {recipe!r}")
    steps = dispatch.check_int("steps", steps, lo=1)
    batch_size = dispatch.check_int("batch_size", batch_size, lo=1)
    seq_len = dispatch.check_int("seq_len", seq_len, lo=4)
    lr = dispatch.check_float("lr", lr, lo=0.0, lo_open=True)
    seed = dispatch.check_int("seed", seed, lo=0)
    checkpoint_every = dispatch.check_int("checkpoint_every", checkpoint_every, lo=1)
    if max_minutes is not None:
        max_minutes = dispatch.check_float("max_minutes", max_minutes, lo=0.0, lo_open=True)
    dispatch.check_bool("resume", resume)
    if isinstance(config, str):
        config = NemotronHConfig.preset(config)
    if not isinstance(config, NemotronHConfig):
        raise TypeError(f"config: expected a preset name or a NemotronHConfig, got {type(config).__name__}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    run = dict(recipe=recipe, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed)

    ckpt_path, log_path = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, LOG)
    have = os.path.isfile(ckpt_path)
    if have and not resume:
        raise ValueError(f"out_dir: {out_dir} holds the checkpoint of an earlier run; pass resume=True "
                         "(--resume) to continue it, or choose a new directory")
    if have:                                # before the data: a mismatch is found at once
        saved = _read_checkpoint(out_dir)
        for k, v in run.items():
            if saved["run"][k] != v:
                raise ValueError(f"{k}: {v!r} differs from the checkpoint's {saved['run'][k]!r} (a resumed run "
                                 "continues with the arguments it was started with)")
        if saved["config"] != config.to_dict():
            raise ValueError("config: differs from the checkpoint's config (a resumed run keeps its model)")
        del saved
    if data is None:
        data = stdlib_data(os.path.join(out_dir, "data"), vocab_size=config.vocab_size)
    _check_data(data, config.vocab_size, seq_len)
    batch_fn = data.batch
    if batch_fn is None:
        from .data import batch as batch_fn
    os.makedirs(out_dir, exist_ok=True)

    if have:
        model, state = load_checkpoint(out_dir, device=device)
        opt = _optimizer(model, lr)
        opt.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        _set_rng_state(state["rng"], device)
        _truncate_log(log_path, step)
    else:
        model, step, elapsed = build_model(config, recipe, seed=seed, device=device), 0, 0.0
        opt = _optimizer(model, lr)
        torch.manual_seed(seed)             # the stochastic-rounding seeds' source
        random.seed(seed)
        if os.path.exists(log_path):
            os.remove(log_path)

    cuda = device.type == "cuda"
    compute = ("bf16 autocast, fp32 master weights" if cuda else "fp32 master weights and fp32 compute "
               "(the CPU baseline: no bf16 GEMMs)") if recipe == "bf16" else f"NVFP4 training: {RECIPES[recipe]()}"
    n_params = sum(p.numel() for p in model.parameters())
    start_rec = {"event": "start", "step": step, **run, "params": n_params, "device": str(device),
                 "compute": compute, "config": config.hybrid_override_pattern}

    def checkpoint():
        _atomic_save({"format": _FORMAT, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                      "rng": _rng_state(device), "recipe": recipe, "config": config.to_dict(), "run": run,
                      "elapsed": elapsed}, ckpt_path)

    from tqdm.auto import tqdm
    t_start = time.perf_counter()
    loss_v = mtp_v = None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and recipe == "bf16"
                else contextlib.nullcontext())
    stopped = False
    with open(log_path, "a", encoding="utf-8") as log, \
            tqdm(total=steps, initial=step, disable=not progress, desc=f"train {recipe}", dynamic_ncols=True) as bar:
        log.write(json.dumps(start_rec) + "\n")
        bar.write(f"{n_params / 1e6:.2f}M parameters on {device}; {compute}")
        while step < steps:
            t0 = time.perf_counter()
            ids = batch_fn(data.train, step=step, batch_size=batch_size, seq_len=seq_len, seed=seed).to(device)
            now = lr_at(step, steps, lr)
            for g in opt.param_groups:
                g["lr"] = now
            with autocast:
                loss, mtp = losses(model, ids)
                total = loss if mtp is None else loss + MTP_WEIGHT * mtp
            total.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_v, mtp_v = loss.item(), None if mtp is None else mtp.item()
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"loss: not finite ({loss_v}) at step {step}; lower lr (the last "
                                         "checkpoint is intact)")
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            tok_s = batch_size * seq_len / dt
            log.write(json.dumps({"step": step, "lr": now, "loss": loss_v, "mtp_loss": mtp_v,
                                  "grad_norm": float(gnorm), "tokens_per_s": tok_s, "elapsed": elapsed}) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}", mtp=f"{mtp_v:.3f}" if mtp_v is not None else "-",
                            tok_s=f"{tok_s:.0f}")
            stopped = max_minutes is not None and time.perf_counter() - t_start >= 60 * max_minutes
            if step % checkpoint_every == 0 or step == steps or stopped:
                checkpoint()
            if stopped:
                break
    model_dir = None
    if step >= steps:
        model_dir = os.path.join(out_dir, MODEL_DIR)
        export(model, model_dir, recipe=recipe, tokenizer=data.tokenizer)
    return {"step": step, "finished": step >= steps, "loss": loss_v, "mtp_loss": mtp_v, "checkpoint": ckpt_path,
            "model_dir": model_dir}


# ---- evaluation ----------------------------------------------------------------------------------

def _bytes_per_token(model_dir: str, tokens: torch.Tensor) -> Optional[float]:
    """UTF-8 bytes per token of ``tokens`` decoded by the model's tokenizer.json (None without one);
    the document separators count as tokens of no bytes, as in :func:`nemotron.train.data.bytes_per_token`."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer
    text = Tokenizer.from_file(path).decode(tokens.tolist(), skip_special_tokens=True)
    return len(text.encode("utf-8")) / max(1, tokens.numel())


def evaluate(model_dir: str, heldout_tokens: torch.Tensor, *, seq_len: int = 256, batch_size: int = 8,
             max_tokens: Optional[int] = None, bytes_per_token: Optional[float] = None, prompts: int = 8,
             prompt_len: int = 64, new_tokens: int = 32, device=None) -> dict:
    """Held-out quality of an exported model (``model_dir`` as :func:`train` writes it).

    Args:
        heldout_tokens: 1-D int token stream, cut into windows of ``seq_len + 1`` tokens (the first
            ``max_tokens`` only, when given); every token after a window's first is predicted once.
        bytes_per_token: UTF-8 bytes per token of the held-out text, for bits per byte; None
            measures it by decoding the evaluated tokens with ``model_dir/tokenizer.json``.
        prompts, prompt_len, new_tokens: the MTP acceptance runs: greedy generation of
            ``new_tokens`` after each of ``prompts`` held-out prompts (evenly spaced), drafting
            k = 1 and k = 3 tokens per round with the MTP block; a draft counts as accepted when it
            equals the model's own greedy token (see :func:`nemotron.model.generate.generate`).

    Returns ``{"loss": nats per token, "tokens": count, "bits_per_byte", "bytes_per_token",
    "mtp_acceptance_k1", "mtp_acceptance_k3", "mtp_tokens_per_round_k1", "mtp_tokens_per_round_k3"}``
    (the MTP and byte entries None when the model has no MTP block / there is no byte count).
    """
    if not isinstance(heldout_tokens, torch.Tensor) or heldout_tokens.dim() != 1 or heldout_tokens.dtype.is_floating_point:
        raise TypeError(f"heldout_tokens: expected a 1-D int tensor, got "
                        f"{getattr(heldout_tokens, 'dtype', type(heldout_tokens).__name__)}")
    seq_len = dispatch.check_int("seq_len", seq_len, lo=1)
    batch_size = dispatch.check_int("batch_size", batch_size, lo=1)
    prompts = dispatch.check_int("prompts", prompts, lo=0)
    prompt_len = dispatch.check_int("prompt_len", prompt_len, lo=1)
    new_tokens = dispatch.check_int("new_tokens", new_tokens, lo=1)
    if max_tokens is not None:
        heldout_tokens = heldout_tokens[:dispatch.check_int("max_tokens", max_tokens, lo=2)]
    if heldout_tokens.numel() < 2:
        raise ValueError(f"heldout_tokens: expected at least 2 tokens, got {heldout_tokens.numel()}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = NemotronHForCausalLM.from_pretrained(model_dir, device=device).eval()
    toks = heldout_tokens.long()
    loss, count = token_loss(model, toks, seq_len=seq_len, batch_size=batch_size)
    bpt = bytes_per_token if bytes_per_token is not None else _bytes_per_token(model_dir, toks)
    out = {"loss": loss, "tokens": count, "bytes_per_token": bpt,
           "bits_per_byte": loss / math.log(2) / bpt if bpt else None}
    for k in (1, 3):
        st = (mtp_acceptance(model, toks, k, prompts=prompts, prompt_len=prompt_len, new_tokens=new_tokens)
              if model.mtp is not None and prompts and toks.numel() > prompt_len else None)
        out[f"mtp_acceptance_k{k}"] = st["acceptance_rate"] if st else None
        out[f"mtp_tokens_per_round_k{k}"] = st["tokens_per_round"] if st else None
    return out


def token_loss(model: NemotronHForCausalLM, tokens: torch.Tensor, *, seq_len: int = 256,
               batch_size: int = 8) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats, tokens predicted) of ``model`` over the 1-D stream
    ``tokens``, cut into windows of ``seq_len + 1`` tokens: every token after a window's first is
    predicted once, with the window's earlier tokens as context (full windows batched, the
    shorter last one alone)."""
    toks = tokens.long()
    windows = [toks[s:s + seq_len + 1] for s in range(0, toks.numel() - 1, seq_len)]
    full = [w for w in windows if w.numel() == seq_len + 1]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(full), batch_size):
            ids = torch.stack(full[i:i + batch_size]).to(model.device)
            logits = model(ids[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
        tail = windows[-1] if windows and windows[-1].numel() < seq_len + 1 else None
        if tail is not None and tail.numel() >= 2:
            ids = tail[None].to(model.device)
            total += F.cross_entropy(model(ids[:, :-1])[0].float(), ids[0, 1:], reduction="sum").item()
            count += tail.numel() - 1
    return total / count, count


def mtp_acceptance(model: NemotronHForCausalLM, tokens: torch.Tensor, k: int, *, prompts: int = 8,
                   prompt_len: int = 64, new_tokens: int = 32) -> dict:
    """Greedy speculative generation of ``new_tokens`` after each of ``prompts`` prompts of
    ``prompt_len`` tokens, evenly spaced over the 1-D stream ``tokens``, drafting ``k`` tokens per
    round with the MTP block: ``{"drafted", "accepted", "rounds", "acceptance_rate",
    "tokens_per_round"}`` over all prompts (tokens per round counts the verified model token too)."""
    toks = tokens.long()
    if toks.numel() <= prompt_len:
        raise ValueError(f"tokens: expected more than prompt_len={prompt_len} tokens, got {toks.numel()}")
    drafted = accepted = rounds = 0
    emitted = 0.0
    for s in torch.linspace(0, toks.numel() - prompt_len - 1, prompts).long().tolist():
        out, st = model.generate(toks[s:s + prompt_len][None].to(model.device), max_new_tokens=new_tokens,
                                 mtp_draft_tokens=k, output_stats=True)
        drafted, accepted, rounds = drafted + st.drafted, accepted + st.accepted, rounds + st.rounds
        emitted += out.shape[1] - prompt_len - 1          # the prefill's token is no round's
    return {"drafted": drafted, "accepted": accepted, "rounds": rounds,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_round": emitted / rounds if rounds else 0.0}
