"""Expert parallelism of :class:`~nemotron.moe_kernels.LatentMoE` over ``torch.distributed``: the
dispatch of latent rows to the ranks owning their experts, the experts on the received rows, the
return of fp32 slot results, and (replicated tokens) the all_gather of the combined rows.

Modes (attributes of the layer): ``ep_tokens`` "local" (each rank routes its own tokens) or
"replicated" (every rank holds the same tokens and routes its ``ceil(T / W)`` share);
``ep_dispatch`` "exact" (the routed rows; split sizes read on the host), "padded" (fixed
capacities known on the host, no device read) or "auto". Every collective waits at most
``ep_timeout`` seconds on the host (or orders the stream only, on CUDA's padded path) and names
the peers it waited for when it fails.
"""
from __future__ import annotations

import torch

from .. import dispatch
from . import fast, ops

EP_DISPATCH = ("auto", "exact", "padded")
EP_TOKENS = ("local", "replicated")
# "auto" pads the exchange (no host sync) up to this many buffer rows per rank: W * T * min(k, E / W).
# Super (k = 22) on 8 GPUs: up to 46 tokens per forward, 8192 latent rows of 2 KiB (bf16) = 16 MiB.
PADDED_MAX_ROWS = 8192


def _pack(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rows ``x [R, l]``, expert ids int32 ``[R]`` and fp32 weights ``[R]`` as one byte tensor
    ``[R, l * itemsize + 8]``: one all_to_all per dispatch instead of three (each costs a latency)."""
    r = x.shape[0]
    return torch.cat([x.contiguous().view(torch.uint8).reshape(r, x.shape[1] * x.element_size()),
                      ids.contiguous().view(torch.uint8).reshape(r, 4),
                      w.contiguous().view(torch.uint8).reshape(r, 4)], 1)


def _unpack(b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x ``[R, l]``, ids ``[R]``, weights ``[R]``) of :func:`_pack`'s rows."""
    n = b.shape[1] - 8
    return (b[:, :n].contiguous().view(dtype), b[:, n:n + 4].contiguous().view(torch.int32).reshape(-1),
            b[:, n + 4:].contiguous().view(torch.float32).reshape(-1))


def ep_world(ep_group, num_experts: int) -> tuple[int, int]:
    """(world size, rank) of an expert-parallel group (``(1, 0)`` for None); a world size that does
    not divide the expert count is refused (every rank holds the same number of experts)."""
    if ep_group is None:
        return 1, 0
    if not (callable(getattr(ep_group, "size", None)) and callable(getattr(ep_group, "rank", None))):
        raise TypeError(f"ep_group: expected a torch.distributed ProcessGroup (e.g. dist.group.WORLD) or None, "
                        f"got {type(ep_group).__name__}")
    world, rank = ep_group.size(), ep_group.rank()
    if num_experts % world:
        raise ValueError(f"ep_group: the {num_experts} routed experts per MoE layer do not divide evenly over a world "
                         f"size of {world} (each rank holds E / W experts); use a world size that divides "
                         f"{num_experts}")
    return world, rank


class ExpertParallel:
    """The expert-parallel forward of a LatentMoE (mixed into it): needs ``ep_group``, ``top_k``,
    ``experts``, ``ep_timeout``, ``ep_dispatch``, ``ep_tokens`` and ``comm_bytes`` on the layer."""

    def padded_dispatch(self, tokens: int, device: torch.device) -> bool:
        """Whether an expert-parallel forward of ``tokens`` tokens exchanges fixed-capacity buffers
        (no split sizes, no host sync) rather than exact rows: ``ep_dispatch`` "padded" / "exact",
        or "auto": padded on CUDA when the buffers stay within :data:`PADDED_MAX_ROWS` rows (decode,
        MTP drafts and verification, small batches), exact otherwise (prefill: one host sync per
        layer, amortized over its tokens; and on CPU, where a host read costs nothing)."""
        if self.ep_dispatch != "auto":
            return self.ep_dispatch == "padded"
        world = self.ep_group.size()
        return device.type == "cuda" and world * tokens * min(self.top_k, self.experts.num_experts) <= PADDED_MAX_ROWS

    def _expert_parallel_padded(self, xl: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, shares: list,
                                one_call: bool) -> torch.Tensor:
        """The exchange with fixed-capacity buffers: source rank s sends every rank ``C_s = T_s *
        min(k, E/W)`` rows (the most one rank's experts can take of its ``T_s = shares[s]`` tokens,
        which every rank knows on the host), its real rows first, then padding rows (expert id -1,
        weight 0), each packed with its id and weight. The split sizes are host integers, so nothing
        is read from the device and the step has static shapes (CUDA graphs); the price is
        ``C_s`` rows per peer on the wire instead of the routed ones."""
        group, k = self.ep_group, self.top_k
        world, local, me = group.size(), self.experts.num_experts, group.rank()
        dev, n = xl.device, ids.numel()
        caps = [t * min(k, local) for t in shares]
        cap = caps[me]
        flat_ids = ids.reshape(-1).long()
        order = torch.argsort(flat_ids // local, stable=True)                            # slots by rank
        dest = flat_ids[order] // local
        counts = torch.zeros(world, dtype=torch.int64, device=dev).scatter_add_(0, dest, torch.ones_like(dest))
        where = dest * cap + torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[dest]   # buffer row
        peers = [r for r in range(world) if r != me and (cap or caps[r])]

        def exchange(t: torch.Tensor, rows: int, in_splits, out_splits, what="rows") -> torch.Tensor:
            out = t.new_empty(rows, t.shape[1])
            # on CUDA a bounded wait would block the host (the sync this path avoids): the work joins
            # the stream, and the group's timeout (NCCL's watchdog) bounds a hung exchange
            self._all_to_all(what, out, t, out_splits, in_splits, peers, host_wait=not t.is_cuda)
            return out

        pad = _pack(xl.new_zeros(1, xl.shape[1]), torch.full((1,), -1, dtype=torch.int32, device=dev),
                    torch.zeros(1, dtype=torch.float32, device=dev))                    # a padding row: id -1
        rows = _pack(xl[order // k], (flat_ids[order] % local).to(torch.int32), weights.reshape(-1)[order].float())
        send = pad.expand(world * cap, -1).clone().index_copy_(0, where, rows)
        x_recv, id_recv, w_recv = _unpack(exchange(send, sum(caps), [cap] * world, caps), xl.dtype)
        slots_recv = self._padded_slots(x_recv, w_recv, id_recv, caps, one_call)         # [sum C_s, l] fp32
        slots_back = exchange(slots_recv, world * cap, caps, [cap] * world, "result slots")
        slots = torch.empty(n, slots_back.shape[1], dtype=slots_back.dtype, device=dev)
        slots[order] = slots_back[where]
        out_rows, back_rows = (world - 1) * cap, sum(caps) - cap
        self.comm_bytes = {"dispatch": out_rows * xl.shape[1] * xl.element_size(),
                           "combine": back_rows * slots.shape[1] * slots.element_size(),
                           "metadata": out_rows * (4 + 4), "gather": 0}
        return ops.combine(slots, k, xl.dtype)

    def _expert_parallel(self, xl: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.ep_tokens == "local":
            return self._exchange(xl, weights, ids, [xl.shape[0]] * self.ep_group.size(), one_call=False)
        # replicated: rank r routes tokens [r * S, (r + 1) * S) only (S = ceil(T / W)), then every rank
        # gathers every share of the combined latent rows: each slot is computed once, not W times
        import torch.distributed as dist
        group = self.ep_group
        world, me, t = group.size(), group.rank(), xl.shape[0]
        share = -(-t // world)
        lo, hi = min(me * share, t), min((me + 1) * share, t)
        splits = None
        if not self.padded_dispatch(share, xl.device):
            # every rank routed all T tokens alike, so the split sizes of every pair of ranks are
            # known here without an exchange: slots[s, r] = slots of share s going to rank r
            pair = (torch.arange(t, device=xl.device) // share)[:, None] * world + ids.long() // self.experts.num_experts
            m = torch.bincount(pair.reshape(-1), minlength=world * world).view(world, world).tolist()
            splits = (m[me], [m[src][me] for src in range(world)])
        shares = [max(0, min(share, t - r * share)) for r in range(world)]           # host ints on every rank
        part = self._exchange(xl[lo:hi], weights[lo:hi], ids[lo:hi], shares, one_call=True, splits=splits)
        buf = torch.cat([part, part.new_zeros(share - (hi - lo), part.shape[1])]) if hi - lo < share else part
        every = [torch.empty_like(buf) for _ in range(world)]
        self._collective("all_gather", "combined rows", [r for r in range(world) if r != me], not buf.is_cuda,
                         lambda: dist.all_gather(every, buf.contiguous(), group=group, async_op=True))
        self.comm_bytes["gather"] = (world - 1) * share * buf.shape[1] * buf.element_size()
        return torch.cat(every)[:t]

    def _exchange(self, xl: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, shares: list,
                  one_call: bool, splits=None) -> torch.Tensor:
        """Dispatch, experts and combine of this rank's tokens ``xl [T, l]``; ``shares``: every
        rank's token count (for the padded exchange, which must know them on the host); ``one_call``:
        the received rows of all source ranks go through the experts in one call (replicated tokens:
        together they are the single-process rows); ``splits``: the (send, receive) row counts per
        rank when known, else exchanged first."""
        if self.padded_dispatch(max(shares), xl.device):
            return self._expert_parallel_padded(xl, weights, ids, shares, one_call)
        group, k = self.ep_group, self.top_k
        world, local = group.size(), self.experts.num_experts
        flat_ids = ids.reshape(-1).long()
        dest = flat_ids // local
        order = torch.argsort(dest, stable=True)                                        # slots by rank
        me = group.rank()
        if splits is None:
            send = torch.zeros(world, dtype=torch.int64, device=xl.device).scatter_add_(0, dest, torch.ones_like(dest))
            recv = torch.empty_like(send)
            self._all_to_all("split sizes", recv, send, None, None, [r for r in range(world) if r != me])
            send_n, recv_n = send.tolist(), recv.tolist()                               # the one host sync
        else:
            send_n, recv_n = splits
        peers = [r for r in range(world) if r != me and (send_n[r] or recv_n[r])]

        def exchange(t: torch.Tensor, out_rows, in_splits, out_splits, what="rows"):
            out = t.new_empty(out_rows, *t.shape[1:])
            self._all_to_all(what, out, t.contiguous(), out_splits, in_splits, peers)
            return out

        rows_in = sum(recv_n)
        packed = _pack(xl[order // k], (flat_ids[order] % local).to(torch.int32), weights.reshape(-1)[order].float())
        x_recv, ids_recv, w_recv = _unpack(exchange(packed, rows_in, send_n, recv_n), xl.dtype)   # [R, l], [R], [R]
        slots_recv = self._local_slots(x_recv, w_recv, ids_recv, [rows_in] if one_call else recv_n)   # [R, l] fp32
        slots_back = exchange(slots_recv, order.numel(), recv_n, send_n, "result slots")
        slots = torch.empty_like(slots_back)
        slots[order] = slots_back
        out_rows = sum(send_n) - send_n[me]                                             # rows that leave
        back_rows = rows_in - recv_n[me]
        self.comm_bytes = {"dispatch": out_rows * xl.shape[1] * xl.element_size(),
                           "combine": back_rows * slots.shape[1] * slots.element_size(),
                           "metadata": (world * 8 if splits is None else 0) + out_rows * (4 + 4), "gather": 0}
        return ops.combine(slots, k, xl.dtype)

    def _padded_slots(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, caps: list,
                      one_call: bool) -> torch.Tensor:
        """The slots of W fixed-capacity blocks (``caps`` rows each) whose padding rows carry expert
        id -1: the Triton
        kernel takes them all in one call (as expert 0 with weight 0; their slots are never read), so
        nothing is read on the host; the plain-torch paths read the real row counts (the ids >= 0 of
        each block) and multiply only the real rows, per source rank, as the exact exchange does."""
        if dispatch.choose("moe_expert_slots", x, record=False).name == "triton":
            return self._local_slots(x, w, ids, [x.shape[0]])
        starts = [sum(caps[:s]) for s in range(len(caps))]
        real = [int((b >= 0).sum()) for b in ids.split(caps)]
        out = x.new_zeros(x.shape[0], x.shape[1], dtype=fast.compute_dtype(x))
        if one_call:
            rows = torch.cat([torch.arange(a, a + n, device=x.device) for a, n in zip(starts, real)])
            if rows.numel():
                out[rows] = self.experts.slots(x[rows], w[rows, None], ids[rows, None])
            return out
        for a, n in zip(starts, real):
            if n:
                rows = slice(a, a + n)
                out[rows] = self.experts.slots(x[rows], w[rows, None], ids[rows, None])
        return out

    def _local_slots(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, splits: list) -> torch.Tensor:
        """The slots of the received rows, one call per source rank on the plain-torch paths, so each
        expert multiplies exactly the rows it multiplies in that rank's single-process layer (an fp32
        GEMM row depends on the row count of its call); the Triton kernel's rows do not, one call."""
        if dispatch.choose("moe_expert_slots", x, record=False).name == "triton":
            return self.experts.slots(x, w[:, None], ids[:, None].clamp_min(0))
        parts = [self.experts.slots(xs, ws[:, None], i[:, None])
                 for xs, ws, i in zip(x.split(splits), w.split(splits), ids.split(splits)) if xs.shape[0]]
        if not parts:
            return x.new_zeros(0, x.shape[1], dtype=fast.compute_dtype(x))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _all_to_all(self, what: str, out, inp, out_splits, in_splits, peers, host_wait: bool = True) -> None:
        """One ``all_to_all_single``, waited on for at most ``ep_timeout`` seconds; a failure (a peer
        that crashed, or one that never joined the exchange) raises naming this rank and its peers.
        Without ``host_wait`` the wait only orders the current stream after the exchange."""
        import torch.distributed as dist
        self._collective("all_to_all", what, peers, host_wait, lambda: dist.all_to_all_single(
            out, inp, out_splits, in_splits, group=self.ep_group, async_op=True))

    def _collective(self, kind: str, what: str, peers, host_wait: bool, start) -> None:
        bounded_collective(start, group=self.ep_group, timeout_s=self.ep_timeout if host_wait else None,
                           what=f"{kind} of the {what}", peers=peers, reached="this MoE layer's forward",
                           timeout_name="ep_timeout")


def bounded_collective(start, *, group, timeout_s, what: str, peers, reached: str, timeout_name: str = "") -> None:
    """Start a collective (``start()`` returns its work handle) and wait at most ``timeout_s`` seconds
    (None: the process group's own timeout). A failure, a peer that crashed or never joined, raises
    naming this rank, the peers, and the step they did not reach."""
    import datetime
    try:
        work = start()
        if timeout_s is None:
            work.wait()
        else:
            work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as err:
        waited = (f"{timeout_s} s" + (f" ({timeout_name})" if timeout_name else "") if timeout_s is not None
                  else "the process group's timeout")
        raise RuntimeError(f"expert parallelism: rank {group.rank()} of {group.size()}: the {what} with peer "
                           f"rank(s) {list(peers)} failed within {waited}; one of those ranks crashed or did not "
                           f"reach {reached}. Cause: {err}") from err
