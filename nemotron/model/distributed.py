"""Expert parallelism for the whole model over ``torch.distributed`` (gloo on CPU, NCCL on GPUs),
launched with torchrun; there is no process manager of our own.

With an ``ep_group`` of W ranks every rank holds the dense part (embeddings, Mamba, attention, the
shared experts, routers, latent projections, norms, head) and ``E / W`` consecutive routed experts of
each MoE layer, the MTP block's included: rank r holds experts ``[r * E / W, (r + 1) * E / W)``.
Every rank runs the same sequences (generation with a replicated prompt) through the dense layers;
in each MoE layer rank r routes its share of the tokens (``[r * S, (r + 1) * S)``, ``S = ceil(T / W)``):
it sends their latent rows to the ranks owning their experts, takes fp32 slot results back, combines
them, and an all_gather of the combined latent rows gives every rank all T
(:class:`nemotron.moe_kernels.LatentMoE`, ``ep_tokens="replicated"``). Each expert multiplies
exactly its single-process rows, in one call, so every rank computes exactly the single-process logits
and takes the same decisions (greedy tokens, MTP acceptance, stops) without further communication.
Sampling draws the same numbers on every rank when every rank passes the same seeded generator (or
seeds the global one alike).

Timeouts: each MoE exchange waits at most ``ep_timeout`` seconds (default
:data:`DEFAULT_TIMEOUT_S`), then raises a ``RuntimeError`` naming this rank and the peers it waited
for, so a failing peer never leaves the others hanging (on CUDA the padded decode exchange waits on
the stream only, bounded by the group's own timeout: NCCL's watchdog). Loading and saving agree on
a gloo side group (:func:`control_group`, :data:`CONTROL_TIMEOUT_S`): the checkpoint digest within
``ep_timeout``, the wait for the slowest reader and the expert transfers to rank 0 within the
side group's timeout or ``save_pretrained``'s ``ep_timeout``.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import re
from typing import Iterator, NoReturn, Optional

import torch
from torch import nn

from ..moe_kernels.expert_parallel import bounded_collective
from ..moe_kernels.layer import LatentMoE, MoEExperts, ep_world

DEFAULT_TIMEOUT_S = 60.0
# a routed expert's checkpoint entry: "{stack}.{e}.up_proj.weight" etc., and HF's stacked "{stack}.up_proj"
_EXPERT_KEY = re.compile(r"(?P<stack>.+\.experts)\.(?P<e>\d+)\.(?:up_proj|down_proj)(?:\..+)?")
_STACKED_KEY = re.compile(r"(?P<stack>.+\.experts)\.(?:up_proj|down_proj)")


def init_from_env(*, timeout_s: float = DEFAULT_TIMEOUT_S, backend: Optional[str] = None):
    """The process group of a torchrun launch (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``, which ``torchrun --nnodes`` sets on every node alike): NCCL with
    this process on GPU ``LOCAL_RANK`` when CUDA is available, gloo otherwise; every collective of
    the group bounded by ``timeout_s``. Returns ``(group, device)``."""
    import torch.distributed as dist
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"expert parallelism: {', '.join(missing)} not set; launch with "
                           "torchrun --nproc-per-node W (and --nnodes N for several machines)")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD, device


def exit_rank(group, code: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> NoReturn:
    """End a torchrun rank whose work is done: wait (at most ``timeout_s`` seconds) until every rank
    of ``group`` got here, so no peer is still inside an exchange with this one; destroy the process
    groups; flush stdout and stderr; exit with ``code`` without interpreter finalization. A peer that
    does not arrive in time is named on stderr, and the exit code is then ``code`` or, if 0, 1.

    Why not a plain return: gloo's worker threads drop a finished collective's tensors a moment after
    the collective completes, and dropping a tensor that Python has seen takes the GIL. A worker still
    waiting for the GIL when the interpreter finalizes is made to exit mid-destructor, and the process
    aborts ("terminate called without an active exception", SIGABRT) after all its work succeeded.
    ``destroy_process_group`` does not join those threads (the group's destructor does, on its last
    reference), so the only exit that cannot race them is one that skips finalization."""
    import sys

    import torch.distributed as dist
    try:
        if dist.is_initialized():
            bounded_collective(lambda: dist.barrier(group=group, async_op=True), group=group, timeout_s=timeout_s,
                               what="final barrier", peers=[r for r in range(group.size()) if r != group.rank()],
                               reached="the end of their run")
            dist.destroy_process_group()
    except Exception:                          # a peer that never arrived: say so, and fail this rank too
        import traceback
        traceback.print_exc()
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):          # a closed or broken stream has nothing left to write
            pass
    os._exit(code)


def check_group(ep_group, config) -> tuple[int, int]:
    """(world size, rank) of ``ep_group`` for a model of ``config``; refuses a world size that does
    not divide ``n_routed_experts`` (naming both)."""
    return ep_world(ep_group, config.n_routed_experts)


def shard_experts_(model: nn.Module, ep_group, timeout_s: Optional[float] = DEFAULT_TIMEOUT_S) -> nn.Module:
    """Every LatentMoE of ``model`` (MTP included) keeps its rank's experts and exchanges tokens over
    ``ep_group``, each exchange bounded by ``timeout_s``. Cheap on the meta device, where the
    loaders call it before any storage exists."""
    for mod in model.modules():
        if isinstance(mod, LatentMoE):
            mod.shard_experts_(ep_group)
            mod.ep_timeout = timeout_s
            mod.ep_dispatch = "auto"         # every rank runs the same tokens: padded decode exchanges on CUDA
            mod.ep_tokens = "replicated"     # ... so each rank routes its share of them, once
    return model


def ep_group_of(model: nn.Module):
    """The expert-parallel group of ``model``'s MoE layers (None on a single process)."""
    return next((m.ep_group for m in model.modules() if isinstance(m, LatentMoE) and m.ep_group is not None), None)


def expert_selector(model: nn.Module):
    """``select(name)`` for the checkpoint reader: ``None`` to skip a tensor (another rank's routed
    expert), ``slice(None)`` to read it whole, or the row slice of HF's stacked ``[E, ...]`` experts
    that this rank holds. Names outside the model's expert stacks are read (the loader judges them)."""
    held = {name: (m.first, m.first + m.num_experts) for name, m in model.named_modules() if isinstance(m, MoEExperts)}

    def select(name: str):
        m = _EXPERT_KEY.fullmatch(name)
        if m and m.group("stack") in held:
            lo, hi = held[m.group("stack")]
            return slice(None) if lo <= int(m.group("e")) < hi else None
        m = _STACKED_KEY.fullmatch(name)
        if m and m.group("stack") in held:
            return slice(*held[m.group("stack")])
        return slice(None)
    return select


def is_other_rank_expert(model: nn.Module):
    """``test(name)``: whether a module name (``{stack}.{e}.up_proj``, a quantization-config entry)
    is a routed expert that another rank holds."""
    select = expert_selector(model)
    return lambda name: bool(_EXPERT_KEY.fullmatch(name)) and select(name) is None


# ---- agreement between ranks --------------------------------------------------------------------

def checkpoint_digest(path: str, files: list) -> bytes:
    """SHA-256 over what identifies a checkpoint without reading its weights: config.json, the
    quantization config, the index, and each safetensors file's name, size and header (tensor names,
    dtypes, shapes, offsets). Two copies of one checkpoint agree; a different model or export does not
    (a fine-tune with the same shapes and byte layout does: the weights are not hashed, which would
    read every byte on every rank)."""
    h = hashlib.sha256()
    for name in ("config.json", "hf_quant_config.json", "model.safetensors.index.json"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    for name in files:
        p = os.path.join(path, name)
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(name.encode() + b"\0" + str(os.path.getsize(p)).encode() + b"\0" + f.read(min(n, 1 << 26)))
    return h.digest()


_CONTROL: dict = {}
CONTROL_TIMEOUT_S = 1800.0


def control_group(group):
    """A gloo group over the ranks of ``group`` (made once per group, by every rank alike, as the
    loaders and ``save_pretrained`` are called on every rank) for the host-side steps of loading
    and saving: checkpoint agreement, the wait for the slowest reader, expert transfers to rank 0.
    Its waits use no GPU and its own timeout (:data:`CONTROL_TIMEOUT_S`), so ``group`` itself can
    keep a short timeout (on NCCL its watchdog bounds the decode exchanges, see ``LatentMoE``)."""
    import torch.distributed as dist
    key = id(group)
    if key not in _CONTROL:
        _CONTROL[key] = dist.new_group(dist.get_process_group_ranks(group), backend="gloo",
                                       timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
    return _CONTROL[key]


def _global(group, r: int) -> int:
    import torch.distributed as dist
    return dist.get_global_rank(group, r)


def agree(group, digest: bytes, what: str, timeout_s: Optional[float] = DEFAULT_TIMEOUT_S) -> None:
    """All ranks of ``group`` hold the same ``digest`` of ``what`` (an all_gather of 32 bytes); a rank
    that differs raises a ValueError on every rank, naming the ranks that disagree with rank 0."""
    import torch.distributed as dist
    world, rank = group.size(), group.rank()
    if world == 1:
        return
    group = control_group(group)
    mine = torch.tensor(list(digest[:32].ljust(32, b"\0")), dtype=torch.uint8)
    every = [torch.empty_like(mine) for _ in range(world)]
    bounded_collective(lambda: dist.all_gather(every, mine, group=group, async_op=True), group=group,
                       timeout_s=timeout_s, what=f"all_gather of the {what} digests",
                       peers=[r for r in range(world) if r != rank], reached="this step")
    other = [r for r in range(world) if not torch.equal(every[r], every[0])]
    if other:
        raise ValueError(f"ep_group: rank(s) {other} of {world} have a different {what} than rank 0 "
                         f"(digests {[bytes(every[r].tolist()).hex()[:12] for r in (0, *other)]}); "
                         "every rank must load the same checkpoint")


def broadcast_int(group, value: int, what: str, timeout_s: Optional[float] = DEFAULT_TIMEOUT_S, src: int = 0) -> int:
    """``value`` of rank ``src`` on every rank (e.g. a sampling seed), bounded by ``timeout_s``."""
    import torch.distributed as dist
    if group.size() == 1:
        return value
    group = control_group(group)
    t = torch.tensor([value], dtype=torch.int64)
    bounded_collective(lambda: dist.broadcast(t, _global(group, src), group=group, async_op=True), group=group,
                       timeout_s=timeout_s, what=f"broadcast of the {what}",
                       peers=[src] if group.rank() != src else [r for r in range(group.size()) if r != src],
                       reached="this step")
    return int(t.item())


# ---- measurement --------------------------------------------------------------------------------

def param_bytes(model: nn.Module) -> dict:
    """Resident bytes of this rank's parameters and buffers (each tensor once, tied ones too):
    ``experts`` (the routed experts this rank holds), ``dense`` (the rest: every rank holds it) and
    ``total``."""
    seen, experts, dense = set(), 0, 0
    expert_ids = {id(t) for m in model.modules() if isinstance(m, MoEExperts) for t in m.stacked().values()}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        if id(t) in expert_ids:
            experts += n
        else:
            dense += n
    return {"dense": dense, "experts": experts, "total": dense + experts}


def memory_line(model: nn.Module) -> str:
    """One line: this rank's resident parameter memory, dense + routed experts."""
    b = param_bytes(model)
    group = ep_group_of(model)
    world, rank = (1, 0) if group is None else (group.size(), group.rank())
    unit, scale = ("GiB", 1024 ** 3) if b["total"] >= 1024 ** 3 else ("MiB", 1024 ** 2)
    stacks = [m for m in model.modules() if isinstance(m, MoEExperts)]
    held = f"{stacks[0].num_experts} of {stacks[0].num_global} experts per MoE layer" if stacks else "no MoE layers"
    return (f"rank {rank} of {world}: parameters {b['total'] / scale:.3f} {unit} = dense {b['dense'] / scale:.3f} "
            f"{unit} + routed experts {b['experts'] / scale:.3f} {unit} ({held})")


def comm_bytes(model: nn.Module) -> dict:
    """The bytes this rank sent in its MoE layers' exchanges during the last forward, summed over the
    layers: ``dispatch`` (latent rows), ``combine`` (fp32 slot results), ``metadata`` (split sizes,
    expert ids, routing weights), ``gather`` (this rank's share of the combined latent rows, sent to
    every other rank)."""
    out = {"dispatch": 0, "combine": 0, "metadata": 0, "gather": 0}
    for m in model.modules():
        if isinstance(m, LatentMoE) and m.ep_group is not None:
            for k in out:
                out[k] += m.comm_bytes[k]
    return out


# ---- saving -------------------------------------------------------------------------------------

def _stacks(model: nn.Module) -> list:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEExperts)]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def send_experts(model: nn.Module, group, timeout_s: Optional[float]) -> None:
    """On a rank other than 0: send this rank's expert stacks to rank 0 (which writes them), layer by
    layer, each transfer bounded by ``timeout_s`` (rank 0 writes the ranks' shards in rank order)."""
    import torch.distributed as dist
    group = control_group(group)
    for name, m in _stacks(model):
        for attr, t in m.stacked().items():
            data = _as_bytes(t).cpu()
            bounded_collective(lambda: dist.isend(data, _global(group, 0), group=group), group=group,
                               timeout_s=timeout_s, what=f"send of {name}.{attr} to rank 0", peers=[0],
                               reached="this step")


def receive_experts(model: nn.Module, group, timeout_s: Optional[float]) -> Iterator[tuple[int, dict]]:
    """On rank 0: ``(rank, state dict of that rank's routed experts)`` for ranks 1..W-1, one rank at a
    time (rank 0 holds its own experts and one peer's at once, never the whole model). The stacks
    have rank 0's shapes and dtypes: every rank holds the same number of experts in one format."""
    import torch.distributed as dist
    group = control_group(group)
    for r in range(1, group.size()):
        sd = {}
        for name, m in _stacks(model):
            stacks = {}
            for attr, t in m.stacked().items():
                buf = torch.empty(t.numel() * t.element_size(), dtype=torch.uint8)
                bounded_collective(lambda: dist.irecv(buf, _global(group, r), group=group), group=group,
                                   timeout_s=timeout_s, what=f"receive of {name}.{attr} from rank {r}", peers=[r],
                                   reached="this step")
                stacks[attr] = buf.view(t.dtype).view(t.shape)
            sd.update(m.peer(r * m.num_experts, stacks).state_dict(prefix=name + "."))
        yield r, {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_from_ranks(model: nn.Module, group, timeout_s: Optional[float], save) -> None:
    """``save_pretrained`` under expert parallelism: rank 0 runs ``save(peers)`` with ``peers`` =
    :func:`receive_experts`, the other ranks send their experts, then rank 0 broadcasts whether the
    checkpoint is in place, so every rank returns or raises. Every wait is bounded by ``timeout_s``."""
    if group.rank() != 0:
        send_experts(model, group, timeout_s)
        if not broadcast_int(group, 0, "save status", timeout_s):
            raise RuntimeError("save_pretrained: rank 0 failed to write the checkpoint (see its error)")
        return
    try:
        save(receive_experts(model, group, timeout_s))
    except BaseException:
        try:                     # ranks still waiting for their turn to send give up on their own timeout
            broadcast_int(group, 0, "save status", min(timeout_s or 5.0, 5.0))
        except RuntimeError:
            pass
        raise
    broadcast_int(group, 1, "save status", timeout_s)
