"""The LatentMoE layer (Nemotron 3): HF ``NemotronHMoE`` parameter names, our kernels, expert parallelism.

Order of ops (HF transformers / Megatron-Core / vLLM agree, see the architecture notes section 5):
  logits = fp32(h) @ fp32(gate.weight).T                        router on the full width H
  w, ids = route(logits)                                        sigmoid, bias for selection, renorm, scale
  y      = fc2_latent_proj(experts(fc1_latent_proj(h), w, ids)) experts, dispatch and combine in latent l
  out    = y + shared_experts(h)                                shared expert relu2 MLP, full width

With ``ep_group`` each rank holds ``E / world_size`` consecutive experts and exchanges latent rows
(l wide, not H wide) and their fp32 slot results with ``all_to_all_single``; the result equals the
single-process layer exactly, because both sum the same fp32 slot values in the same order. (An
fp32 GEMM row depends on the rows it shares the matmul with, so on the plain-torch paths the rows
from each source rank are multiplied in their own call: each expert then multiplies the same rows
as in that rank's single-process layer.)

On a single process the layer is differentiable end to end (the ops' backward, :mod:`.autograd`):
router, latent projections, float experts and shared expert get gradients; NVFP4 experts are
constants. Expert parallelism is forward only.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nvfp4.format import KeepsStorageDtypes, NVFP4Tensor
from . import ops
from .expert_parallel import EP_DISPATCH, EP_TOKENS, ExpertParallel, ep_world  # noqa: F401  (ep_world: public)


class MoEExperts(KeepsStorageDtypes, nn.Module):
    """Stacked routed experts, ``up_proj [E, I, l]`` and ``down_proj [E, l, I]`` (HF's in-memory layout).

    ``state_dict()`` writes one entry per expert as checkpoints do (``{e}.up_proj.weight [I, l]``,
    ``{e}.down_proj.weight [l, I]``; NVFP4: ``weight`` uint8, ``weight_scale`` e4m3, ``weight_scale_2``,
    ``input_scale`` under ModelOpt's names); loading accepts those and HF's stacked ``up_proj`` /
    ``down_proj``. Under expert parallelism the module holds experts ``[first, first + E)`` of
    ``num_global`` and reads or writes only its own. With ``training_recipe`` set (by
    :func:`nemotron.prepare_training_`) the float experts' GEMMs train in NVFP4
    (:func:`nemotron.nvfp4.training.nvfp4_training_experts`).
    """

    _STORAGE = ("up_scales", "up_gs", "up_input_scale", "down_scales", "down_gs", "down_input_scale")

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, first: int = 0,
                 num_global: Optional[int] = None, dtype=None, device=None):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.first, self.num_global = first, num_global if num_global is not None else num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate, dtype=dtype, device=device))
        self.quant = None   # or "nvfp4": then up_q / down_q hold stacked NVFP4Tensors
        # set by nemotron.prepare_training_: the float experts' GEMMs then train in NVFP4
        self.training_recipe, self.training_generator = None, None

    # -- format -----------------------------------------------------------------------------------
    def quantize_(self) -> "MoEExperts":
        """Replace the float weights by NVFP4 (one global scale per expert; 1x16 blocks, or the 16x16
        tiles experts trained with under a ``weight_2d`` recipe, so inference sees the trained weights)."""
        if self.quant is None:
            up, down = self.up_proj.detach(), self.down_proj.detach()
            del self.up_proj, self.down_proj
            trained_2d = self.training_recipe is not None and self.training_recipe.weight_2d
            block = (16, 16) if trained_2d else (1, 16)
            self._set_nvfp4(ops.quantize_experts(up, block_shape=block), ops.quantize_experts(down, block_shape=block))
        return self

    def _set_nvfp4(self, up: NVFP4Tensor, down: NVFP4Tensor,
                   input_scales: tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)):
        self.quant = "nvfp4"
        for name, q, ins in (("up", up, input_scales[0]), ("down", down, input_scales[1])):
            self.register_buffer(f"{name}_codes", q.codes)
            self.register_buffer(f"{name}_scales", q.block_scales)
            self.register_buffer(f"{name}_gs", q.global_scale)
            # ModelOpt's static activation scales; the experts run W4A16, kept for round trips
            self.register_buffer(f"{name}_input_scale", ins)

    def weights(self):
        """(up, down) as the float stacks or as stacked NVFP4Tensors, what :func:`ops.experts` takes."""
        if self.quant is None:
            return self.up_proj, self.down_proj
        return (NVFP4Tensor(self.up_codes, self.up_scales, self.up_gs),
                NVFP4Tensor(self.down_codes, self.down_scales, self.down_gs))

    def forward(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None, *,
                logits: Optional[torch.Tensor] = None, **route) -> torch.Tensor:
        """The routed experts of ``x [T, l]`` -> ``[T, l]``: given the routing (``weights``, ``ids``
        ``[T, k]``, :func:`ops.experts`), or given the router ``logits [T, E]`` and the routing
        arguments of :func:`ops.route` as keywords (one fused op, :func:`ops.routed_experts`)."""
        if logits is not None:
            if weights is not None or ids is not None:
                raise TypeError("MoEExperts: pass either weights and ids, or logits (and routing keywords), not both")
            if self.training_recipe is None or self.quant is not None:
                return ops.routed_experts(x, logits, *self.weights(), **route)
            weights, ids = ops.route(logits, **route)
        elif weights is None or ids is None or route:
            raise TypeError("MoEExperts: expected weights and ids [T, k] (no routing keywords), or logits=...")
        if self.training_recipe is not None and self.quant is None:
            from ..nvfp4 import nvfp4_training_experts
            return nvfp4_training_experts(x, weights, ids, self.up_proj, self.down_proj, recipe=self.training_recipe,
                                          generator=self.training_generator)
        return ops.experts(x, weights, ids, *self.weights())

    def slots(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return ops.expert_slots(x, weights, ids, *self.weights())

    # -- expert parallelism ---------------------------------------------------------------------
    def stacked(self) -> dict:
        """The per-expert stacks by attribute name, each ``[E_local, ...]`` (absent ones left out):
        ``up_proj`` / ``down_proj``, or the NVFP4 ``{up,down}_{codes,scales,gs,input_scale}``."""
        names = ("up_proj", "down_proj") if self.quant is None else tuple(
            f"{s}_{f}" for s in ("up", "down") for f in ("codes", "scales", "gs", "input_scale"))
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def narrow_(self, first: int, count: int) -> "MoEExperts":
        """Keep only experts ``[first, first + count)`` (global ids) of those held, in place; the
        others' storage is released (free on the meta device, where a model is built)."""
        lo = first - self.first
        if not (0 <= lo and count >= 1 and lo + count <= self.num_experts):
            raise ValueError(f"narrow_: experts [{first}, {first + count}) are not all held by this module "
                             f"(it holds [{self.first}, {self.first + self.num_experts}))")
        for name, t in self.stacked().items():
            part = t.detach()[lo:lo + count].clone()
            if isinstance(t, nn.Parameter):
                setattr(self, name, nn.Parameter(part, requires_grad=t.requires_grad))
            else:
                setattr(self, name, part)
        self.first, self.num_experts = first, count
        return self

    def peer(self, first: int, stacks: dict) -> "MoEExperts":
        """A module like this one holding another rank's experts ``[first, first + E_local)`` from
        ``stacks`` (as :meth:`stacked` returns them): its ``state_dict()`` names them as checkpoints do."""
        other = MoEExperts(self.num_experts, self.hidden, self.intermediate, first=first, num_global=self.num_global,
                           device="meta")
        if self.quant is None:
            other.up_proj, other.down_proj = nn.Parameter(stacks["up_proj"]), nn.Parameter(stacks["down_proj"])
            return other
        del other.up_proj, other.down_proj
        other._set_nvfp4(NVFP4Tensor(stacks["up_codes"], stacks["up_scales"], stacks["up_gs"]),
                         NVFP4Tensor(stacks["down_codes"], stacks["down_scales"], stacks["down_gs"]),
                         (stacks.get("up_input_scale"), stacks.get("down_input_scale")))
        return other

    def extra_repr(self) -> str:
        return (f"experts={self.first}..{self.first + self.num_experts - 1} of {self.num_global}, "
                f"hidden={self.hidden}, intermediate={self.intermediate}, format={self.quant or 'float'}")

    # -- checkpoint names -------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in ("up_proj", "down_proj"):
            for e in range(self.num_experts):
                key = f"{prefix}{self.first + e}.{name}."
                if self.quant is None:
                    w = getattr(self, name)
                    destination[key + "weight"] = w[e] if keep_vars else w.detach()[e]
                    continue
                short = name.split("_")[0]
                destination[key + "weight"] = getattr(self, f"{short}_codes")[e]
                destination[key + "weight_scale"] = getattr(self, f"{short}_scales")[e]
                destination[key + "weight_scale_2"] = getattr(self, f"{short}_gs")[e]
                ins = getattr(self, f"{short}_input_scale")
                if ins is not None:
                    destination[key + "input_scale"] = ins[e]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        own = range(self.first, self.first + self.num_experts)
        per_expert = re.compile(r"(\d+)\.(up_proj|down_proj)\.(weight|weight_scale|weight_scale_2|input_scale)$")
        used = set()
        try:
            if "up_proj" in mine or "down_proj" in mine:          # HF's stacked in-memory layout
                for name in ("up_proj", "down_proj"):
                    if name not in mine:
                        missing_keys.append(prefix + name)
                        continue
                    self._load_stacked(name, mine[name], prefix)
                    used.add(name)
            else:
                used |= self._load_per_expert(mine, own, prefix, missing_keys)
        except (ValueError, TypeError) as err:
            error_msgs.append(str(err))
            return
        for k in mine:
            if k in used:
                continue
            m = per_expert.fullmatch(k)
            if m and int(m.group(1)) < self.num_global and int(m.group(1)) not in own:
                continue   # another rank's expert under expert parallelism
            unexpected_keys.append(prefix + k)

    def _load_stacked(self, name: str, t: torch.Tensor, prefix: str):
        if self.quant is not None:
            raise TypeError(f"{prefix}{name}: the module holds NVFP4 experts; a stacked float tensor cannot load")
        p = getattr(self, name)
        want = (self.num_global, *p.shape[1:])
        if self.num_experts != self.num_global and tuple(t.shape) == tuple(p.shape):
            rows = t                        # this rank's rows only, as the expert-parallel loader reads them
        elif tuple(t.shape) != want:
            raise ValueError(f"{prefix}{name}: expected shape {want}, got {tuple(t.shape)}")
        else:
            rows = t[self.first:self.first + self.num_experts]
        with torch.no_grad():
            p.copy_(rows)

    def _load_per_expert(self, mine, own, prefix, missing_keys) -> set:
        used = set()
        fields = ("weight",) if self.quant is None else ("weight", "weight_scale", "weight_scale_2")
        if self.quant is None:      # FP8 per-tensor experts (ModelOpt FP8): dequantized into the float stack
            used |= self._dequantize_fp8(mine, own, prefix)
        for name in ("up_proj", "down_proj"):
            parts = {f: [] for f in (*fields, "input_scale")}
            for e in own:
                for f in fields:
                    key = f"{e}.{name}.{f}"
                    if key not in mine:
                        missing_keys.append(prefix + key)
                        continue
                    parts[f].append(mine[key])
                    used.add(key)
                if f"{e}.{name}.input_scale" in mine:
                    parts["input_scale"].append(mine[f"{e}.{name}.input_scale"])
                    used.add(f"{e}.{name}.input_scale")
            if any(len(parts[f]) != len(own) for f in fields):
                continue  # reported as missing
            self._assign(name, parts, prefix)
        return used

    def _dequantize_fp8(self, mine, own, prefix) -> set:
        used = set()
        for e in own:
            for name in ("up_proj", "down_proj"):
                key = f"{e}.{name}.weight"
                if key in mine and mine[key].dtype == torch.float8_e4m3fn:
                    scale = mine.get(f"{e}.{name}.weight_scale")
                    if scale is None or scale.numel() != 1:
                        raise ValueError(f"{prefix}{e}.{name}.weight_scale: an FP8 expert weight needs its "
                                         "one-element weight_scale")
                    mine[key] = mine[key].float() * scale.float().reshape(())
                    used |= {f"{e}.{name}.weight_scale", f"{e}.{name}.input_scale"} & set(mine)
        return used

    def _assign(self, name: str, parts: dict, prefix: str):
        rows, cols = (self.intermediate, self.hidden) if name == "up_proj" else (self.hidden, self.intermediate)
        w = parts["weight"]
        if self.quant is None:
            bad = [i for i, t in enumerate(w) if tuple(t.shape) != (rows, cols) or not t.is_floating_point()]
            if bad:
                e = self.first + bad[0]
                raise ValueError(f"{prefix}{e}.{name}.weight: expected a float tensor of shape [{rows}, {cols}], "
                                 f"got {w[bad[0]].dtype} {tuple(w[bad[0]].shape)}")
            with torch.no_grad():
                getattr(self, name).copy_(torch.stack(w))
            return
        checks = (("weight", torch.uint8, (rows, cols // 2)), ("weight_scale", torch.float8_e4m3fn, (rows, cols // 16)))
        for f, dtype, shape in checks:
            for i, t in enumerate(parts[f]):
                if t.dtype != dtype or tuple(t.shape) != shape:
                    raise ValueError(f"{prefix}{self.first + i}.{name}.{f}: expected {dtype} of shape "
                                     f"{list(shape)}, got {t.dtype} {tuple(t.shape)}")
        for f in ("weight_scale_2", "input_scale"):
            for i, t in enumerate(parts[f]):
                if t.numel() != 1:
                    raise ValueError(f"{prefix}{self.first + i}.{name}.{f}: expected one element, got {tuple(t.shape)}")
        short = name.split("_")[0]
        dev = getattr(self, f"{short}_codes").device
        getattr(self, f"{short}_codes").copy_(torch.stack(w))
        getattr(self, f"{short}_scales").copy_(torch.stack(parts["weight_scale"]))
        getattr(self, f"{short}_gs").copy_(torch.stack([t.float().reshape(()) for t in parts["weight_scale_2"]]))
        if parts["input_scale"]:
            if len(parts["input_scale"]) != self.num_experts:
                raise ValueError(f"{prefix}*.{name}.input_scale: present for some experts only")
            setattr(self, f"{short}_input_scale",
                    torch.stack([t.float().reshape(()) for t in parts["input_scale"]]).to(dev))


class Router(nn.Module):
    """HF ``NemotronHTopkRouter``'s parameters: ``weight [E, H]`` and ``e_score_correction_bias [E]`` fp32.
    The logits are fp32 (fp64 when the input or the weight is fp64: gradient checks)."""

    def __init__(self, hidden: int, num_experts: int, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden, dtype=dtype, device=device))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if torch.float64 in (x.dtype, self.weight.dtype) else torch.float32
        return F.linear(x.to(dt), self.weight.to(dt))            # fp32 logits [T, E]


class ReLU2MLP(nn.Module):
    """``down(relu(up(x))^2)``: the shared expert (HF ``NemotronHMLP``)."""

    def __init__(self, hidden: int, intermediate: int, *, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())


class LatentMoE(ExpertParallel, nn.Module):
    """Nemotron 3 LatentMoE with HF ``NemotronHMoE`` names, so HF state dicts load as they are.

    Args:
        hidden_size: H (4096 in Super).
        num_experts: E routed experts (512); top_k: k (22).
        intermediate_size: expert width I (2688); shared_intermediate_size: shared expert width (5376).
        latent_size: l (1024), or None for no latent projections (l = H, as in Nano).
        n_group, topk_group, renormalize, scaling_factor: routing, see :func:`nemotron.moe_kernels.route`.
        bias: biases on the latent projections and the shared expert (HF ``mlp_bias``).
        ep_group: a ``torch.distributed`` process group for expert parallelism; this rank then holds
            experts ``[rank * E / W, (rank + 1) * E / W)``. Token rows go to the ranks owning their
            experts in the latent width, results return as fp32 slots; ``self.comm_bytes`` holds the
            bytes this rank sent in the last forward. How the rows travel: ``ep_dispatch``.
        ep_timeout: seconds each exchange may wait for its peers (default 60; None: the process
            group's own timeout, 30 minutes on gloo and 10 on NCCL by default). A rank that fails
            mid-step leaves its peers waiting in ``all_to_all``; past the timeout they raise a
            ``RuntimeError`` naming their rank and the peer ranks of the exchange. Bound the group
            too (``init_process_group(timeout=timedelta(seconds=60))``) for the collectives outside
            this layer, and for the padded exchange on CUDA, which does not wait on the host (the
            group's timeout bounds it there: NCCL's watchdog aborts a hung collective).
        ep_dispatch: "exact" (default): each exchange carries exactly the rows routed to each rank,
            after an exchange of the split sizes (one device-to-host read per forward); ranks may
            pass different token counts. "padded": fixed-capacity buffers of ``T * min(k, E / W)``
            rows per peer, no host read (CUDA graphs), every rank must pass the same T. "auto":
            padded on CUDA for small T (decode), exact otherwise (:meth:`padded_dispatch`); the
            model's expert parallelism uses it, every rank running the same sequences.
        ep_tokens: "local" (default): each rank's tokens are its own (data parallel), all of them
            routed. "replicated": every rank passes the same tokens (the model under expert
            parallelism); rank r routes only tokens ``[r * S, (r + 1) * S)``, ``S = ceil(T / W)``,
            and an all_gather of the combined latent rows (``comm_bytes["gather"]``) gives every
            rank all T, so each slot is computed once across the ranks rather than once per rank.

    Parameters (HF names): ``gate.weight [E, H]``, ``gate.e_score_correction_bias [E]``,
    ``fc1_latent_proj.weight [l, H]``, ``fc2_latent_proj.weight [H, l]``, ``experts.{e}.up_proj.weight
    [I, l]`` / ``experts.{e}.down_proj.weight [l, I]`` (or HF's stacked ``experts.up_proj [E, I, l]``),
    ``shared_experts.up_proj.weight``, ``shared_experts.down_proj.weight``.

    Example::

        >>> moe = LatentMoE(4096, num_experts=512, top_k=22, intermediate_size=2688, latent_size=1024,
        ...                 shared_intermediate_size=5376, scaling_factor=5.0)
        >>> y = moe(h)                       # h [B, T, 4096] -> [B, T, 4096]
    """

    def __init__(self, hidden_size: int, *, num_experts: int, top_k: int, intermediate_size: int,
                 shared_intermediate_size: int, latent_size: Optional[int] = None, n_group: int = 1,
                 topk_group: int = 1, renormalize: bool = True, scaling_factor: float = 1.0, bias: bool = False,
                 ep_group=None, ep_timeout: Optional[float] = 60.0, ep_dispatch: str = "exact", ep_tokens: str = "local", dtype=None,
                 device=None):
        super().__init__()
        if ep_dispatch not in EP_DISPATCH:
            raise ValueError(f"ep_dispatch: expected one of {EP_DISPATCH}, got {ep_dispatch!r}")
        self.ep_dispatch = ep_dispatch
        if ep_tokens not in EP_TOKENS:
            raise ValueError(f"ep_tokens: expected one of {EP_TOKENS}, got {ep_tokens!r}")
        self.ep_tokens = ep_tokens
        if ep_timeout is not None and (isinstance(ep_timeout, bool) or not isinstance(ep_timeout, (int, float))
                                       or not 0 < ep_timeout < float("inf")):
            raise ValueError(f"ep_timeout: expected a positive finite number of seconds or None, got {ep_timeout!r}")
        self.ep_timeout = ep_timeout
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected an int in [1, num_experts = {num_experts}], got {top_k}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.latent_size = latent_size
        self.route_args = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, renormalize=renormalize,
                               scaling_factor=scaling_factor)
        width = latent_size or hidden_size
        kw = dict(dtype=dtype, device=device)
        self.gate = Router(hidden_size, num_experts, **kw)
        if latent_size is not None:
            self.fc1_latent_proj = nn.Linear(hidden_size, latent_size, bias=bias, **kw)
            self.fc2_latent_proj = nn.Linear(latent_size, hidden_size, bias=bias, **kw)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = nn.Identity()
        self.ep_group = ep_group
        world, rank = ep_world(ep_group, num_experts)
        local = num_experts // world
        self.experts = MoEExperts(local, width, intermediate_size, first=rank * local, num_global=num_experts, **kw)
        self.shared_experts = ReLU2MLP(hidden_size, shared_intermediate_size, bias=bias, **kw)
        self.comm_bytes = {"dispatch": 0, "combine": 0, "metadata": 0, "gather": 0}

    @classmethod
    def from_config(cls, config, **kwargs) -> "LatentMoE":
        """Build from an HF ``NemotronHConfig`` (or any object with its attribute names)."""
        return cls(config.hidden_size, num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
                   intermediate_size=config.moe_intermediate_size,
                   shared_intermediate_size=config.moe_shared_expert_intermediate_size,
                   latent_size=getattr(config, "moe_latent_size", None), n_group=getattr(config, "n_group", 1),
                   topk_group=getattr(config, "topk_group", 1),
                   renormalize=getattr(config, "norm_topk_prob", True),
                   scaling_factor=getattr(config, "routed_scaling_factor", 1.0),
                   bias=getattr(config, "mlp_bias", False), **kwargs)

    def shard_experts_(self, ep_group) -> "LatentMoE":
        """Put a layer holding all E experts under expert parallelism, in place: it keeps experts
        ``[rank * E / W, (rank + 1) * E / W)`` (the others' storage is released; free when the layer
        is on the meta device, as the model loaders build it) and exchanges tokens over ``ep_group``."""
        if self.ep_group is not None or self.experts.num_experts != self.num_experts:
            raise ValueError("shard_experts_: the layer's experts are already split over a group")
        world, rank = ep_world(ep_group, self.num_experts)
        local = self.num_experts // world
        self.experts.narrow_(rank * local, local)
        self.ep_group = ep_group
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.ep_group is not None and torch.is_grad_enabled() and (
                h.requires_grad or any(p.requires_grad for p in self.parameters())):
            raise RuntimeError("LatentMoE: expert parallelism (ep_group) is forward only (its all_to_all exchanges "
                               "carry no gradient); run it under torch.no_grad() / torch.inference_mode(), or "
                               "train without ep_group")
        x = h.reshape(-1, self.hidden_size)                                             # [T, H]
        logits = self.gate(x)                                                           # [T, E] fp32
        xl = self.fc1_latent_proj(x)                                                    # [T, l]
        bias = self.gate.e_score_correction_bias
        if self.ep_group is None and not torch.compiler.is_compiling():
            # eagerly, the one op the backend's MoE fusion makes of route + experts (an op call and
            # its checks fewer per layer); a compiled graph shows the pair and the pass fuses it
            y = self.experts(xl, logits=logits, correction_bias=bias, **self.route_args)
        else:
            weights, ids = ops.route(logits, correction_bias=bias, **self.route_args)   # [T, k]
            y = self.experts(xl, weights, ids) if self.ep_group is None else self._expert_parallel(xl, weights, ids)
        y = self.fc2_latent_proj(y)                                                     # [T, H]
        return y.view(h.shape) + self.shared_experts(h)
