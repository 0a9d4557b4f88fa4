"""Routed experts of a LatentMoE layer: our Triton grouped GEMM (bf16 and NVFP4 weights) against a
``torch._grouped_mm`` path (on Hopper that op is CUTLASS's sm90 grouped GEMM, sync-free for bf16),
nvidia-cutlass's Python grouped GEMM when it is installed and works here, and a loop over experts
(HF transformers' formulation).

Shape: (T, E, k, l, I) with Super's E 512, k 22, l 1024, I 2688. Traffic model: the touched
experts' NVFP4 bytes (expected touched = E * (1 - (1 - k/E)^T) under uniform routing; 0.5625 B per
weight, two projections) + x and out in bf16; work 2 * T * k * 2 * I * l. So ``pct_roofline`` of a
bf16 impl is measured against the NVFP4 floor: the decode goal counts only NVFP4 weight bytes.

``moe_layer``: the whole LatentMoE layer (router, latent projections, routed and shared experts)
against HF transformers' ``NemotronHMoE`` holding the same weights, with its ``eager`` experts
loop and its ``grouped_mm`` experts (what an HF model picks by default), and against our layer on
the fp64 reference experts. Shape (T, H, E, k, I, shared I, l); the ``decode`` set is the demo's
tiny layer and a mid-size one at a few tokens. Weights fp32 on CPU, bf16 on CUDA; the traffic
model counts the touched weights in fp32.
"""
from __future__ import annotations

import torch

from nemotron import dispatch
from nemotron import moe_kernels as mk
from nemotron.moe_kernels import reference as ref

from .harness import BenchOp

SUPER = (512, 22, 1024, 2688)
SHAPES = {
    "nemotron": [(t, *SUPER) for t in (1, 8, 64, 512, 4096, 16384)],
    "trimmed": [(t, *SUPER) for t in (1, 64, 4096)],            # decode, a small batch, prefill
    "smoke": [(3, 8, 2, 32, 48), (40, 6, 3, 64, 32)],
}
VERIFY_TOKENS = 8
_WEIGHTS: dict = {}


def _weights(shape, device):
    """bf16 and NVFP4 expert stacks, built once per shape (they dwarf L2 by themselves)."""
    key = (shape[1:], str(device))
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        _, e, k, lat, inter = shape
        g = torch.Generator(device=device).manual_seed(0)
        up = torch.randn(e, inter, lat, device=device, generator=g) / lat ** 0.5
        down = torch.randn(e, lat, inter, device=device, generator=g) / inter ** 0.5
        _WEIGHTS[key] = (up.bfloat16(), down.bfloat16(), mk.quantize_experts(up), mk.quantize_experts(down))
        del up, down
    return _WEIGHTS[key]


def _inputs(shape, device, seed):
    t, e, k, lat, inter = shape
    g = torch.Generator(device=device).manual_seed(seed + 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(t, lat, device=device, generator=g).to(dtype)
    w, ids = mk.route(torch.randn(t, e, device=device, generator=g), top_k=k, scaling_factor=5.0)
    up, down, q_up, q_down = _weights(shape, device)
    if dtype != torch.bfloat16:
        up, down = up.to(dtype), down.to(dtype)
    return x, w, ids, up, down, q_up, q_down


def _triton_dense(x, w, ids, up, down, q_up, q_down):
    return mk.experts(x, w, ids, up, down)


def _triton_nvfp4(x, w, ids, up, down, q_up, q_down):
    return mk.experts(x, w, ids, q_up, q_down)


def _grouped_mm(x, w, ids, up, down, q_up, q_down):
    k = ids.shape[1]
    perm, offs = mk.permute(ids, up.shape[0])
    perm = perm.long()
    h = torch._grouped_mm(x[perm // k], up.transpose(1, 2), offs=offs)
    h = torch.relu(h).square()
    y = torch._grouped_mm(h, down.transpose(1, 2), offs=offs).float() * w.reshape(-1)[perm, None]
    slots = torch.empty_like(y)
    slots[perm] = y
    return mk.combine(slots, k, x.dtype)


def _cutlass_grouped_mm():
    """A peer on nvidia-cutlass's Python interface (``cutlass_cppgen``, or ``cutlass`` before 4.2):
    its grouped GEMM (bf16, row-major) per projection, one problem per touched expert. It takes
    host-side lists of per-expert tensors, so it pays a device-to-host copy of the offsets per call.
    Registered only where the package imports and a probe problem runs and matches torch."""
    if not torch.cuda.is_available():
        return None
    try:
        try:
            import cutlass_cppgen as cutlass_py
        except ImportError:
            import cutlass as cutlass_py
        plan = cutlass_py.op.GroupedGemm(element=torch.bfloat16, layout=cutlass_py.LayoutType.RowMajor,
                                          element_accumulator=torch.float32)

        def grouped(a_list, b_list):
            outs = [torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device) for a, b in zip(a_list, b_list)]
            plan.run(a_list, b_list, outs, outs)
            return outs
        a = [torch.randn(m, 64, device="cuda", dtype=torch.bfloat16) for m in (3, 17)]
        b = [torch.randn(64, 32, device="cuda", dtype=torch.bfloat16) for _ in a]
        got = grouped(a, b)
        if not all(torch.allclose(g.float(), (x.float() @ y.float()), rtol=2e-2, atol=2e-1) for g, x, y in zip(got, a, b)):
            print("cutlass peer: probe result differs from torch; not benchmarked")
            return None
    except Exception as err:          # noqa: BLE001  (any failure only removes this peer)
        print(f"cutlass peer unavailable: {type(err).__name__}: {err}")
        return None

    def run(x, w, ids, up, down, q_up, q_down):
        k = ids.shape[1]
        perm, offs = mk.permute(ids, up.shape[0])
        perm = perm.long()
        bounds = [0] + offs.tolist()
        touched = [e for e in range(up.shape[0]) if bounds[e + 1] > bounds[e]]
        rows = x[perm // k]
        h = grouped([rows[bounds[e]:bounds[e + 1]] for e in touched], [up[e].t().contiguous() for e in touched])
        h = [torch.relu(t).square() for t in h]
        y = grouped(h, [down[e].t().contiguous() for e in touched])
        y = torch.cat(y).float() * w.reshape(-1)[perm, None]
        slots = torch.empty_like(y)
        slots[perm] = y
        return mk.combine(slots, k, x.dtype)
    return run


def _loop(x, w, ids, up, down, q_up, q_down):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        t, j = torch.where(ids == e)
        h = torch.relu(x[t] @ up[e].T).square()
        out.index_add_(0, t, (h @ down[e].T).float() * w[t, j, None])
    return out.to(x.dtype)


def _verify(args, outs):
    x, w, ids, up, down, q_up, q_down = args
    n = slice(0, VERIFY_TOKENS)
    differ = []
    for name, out in outs.items():
        wu, wd = (q_up, q_down) if name == "triton_nvfp4" else (up, down)
        want = ref.experts_reference(x[n], w[n], ids[n], wu, wd)
        ok = bool(((out[n].double() - want.double()).abs()
                   <= ref.experts_tolerance(x[n], w[n], ids[n], wu, wd, want)).all())
        if not ok:
            if name.startswith("triton"):
                raise AssertionError(f"{name}: outside the reference's tolerance; not timing a wrong kernel")
            differ.append(name)
    return differ


def _bytes(s):
    t, e, k, lat, inter = s
    touched = e * (1 - (1 - k / e) ** t)
    return touched * 2 * inter * lat * 0.5625 + 2 * t * lat * 2


# ---- the layer: ours against HF transformers' NemotronHMoE -----------------------------------------

TINY = (64, 8, 3, 32, 48, 32)                    # the demo's tiny preset: H, E, k, I, shared I, l
MID = (1024, 64, 6, 512, 1024, 256)
LAYER_SHAPES = {
    "nemotron": [(t, 4096, 512, 22, 2688, 5376, 1024) for t in (1, 8)],
    "decode": [(t, *TINY) for t in (1, 2, 4, 8)] + [(t, *MID) for t in (1, 4)],
    "smoke": [(1, *TINY), (3, 48, 6, 2, 32, 16, 16)],
}
_LAYERS: dict = {}


def _layers(shape, device):
    """Our layer and HF's two experts implementations with the same random weights, built once per shape."""
    from transformers.models.nemotron_h import modeling_nemotron_h as hf
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

    key = (shape[1:], str(device))
    if key not in _LAYERS:
        _LAYERS.clear()
        _, hid, e, k, inter, shared, lat = shape
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        mods = {}
        for impl in ("eager", "grouped_mm"):
            cfg = NemotronHConfig(hidden_size=hid, n_routed_experts=e, num_experts_per_tok=k,
                                  moe_intermediate_size=inter, moe_shared_expert_intermediate_size=shared,
                                  moe_latent_size=lat,
                                  mlp_hidden_act="relu2", layers_block_type=["moe"], num_hidden_layers=1,
                                  routed_scaling_factor=2.5)
            cfg._experts_implementation = impl
            mods[impl] = hf.NemotronHMoE(cfg)
        g = torch.Generator().manual_seed(0)
        sd = {n: torch.randn(v.shape, generator=g) / v.shape[-1] ** 0.5 for n, v in mods["eager"].state_dict().items()}
        sd["gate.e_score_correction_bias"] = torch.randn(e, generator=g) * 0.05
        ours = mk.LatentMoE.from_config(cfg)
        for m in (*mods.values(), ours):
            m.load_state_dict(sd)
            m.to(device=device, dtype=dtype).eval()
            m.gate.to(torch.float32)                       # HF's router stays fp32 (fp32 logits either way)
        _LAYERS[key] = (ours, mods["eager"], mods["grouped_mm"])
    return _LAYERS[key]


def _layer_inputs(shape, device, seed):
    ours, hf_eager, hf_grouped = _layers(shape, device)
    g = torch.Generator().manual_seed(seed + 1)
    h = torch.randn(shape[0], shape[1], generator=g).to(device=device, dtype=next(ours.parameters()).dtype)
    return h, ours, hf_eager, hf_grouped


def _ours(h, ours, hf_eager, hf_grouped):
    with torch.no_grad():
        return ours(h)


def _ours_reference(h, ours, hf_eager, hf_grouped):
    with torch.no_grad(), dispatch.use("reference"):
        return ours(h)


def _hf_eager(h, ours, hf_eager, hf_grouped):
    with torch.no_grad():
        return hf_eager(h)


def _hf_grouped(h, ours, hf_eager, hf_grouped):
    with torch.no_grad():
        return hf_grouped(h)


def _verify_layer(args, outs):
    """Ours against our layer on the fp64 reference experts; the HF peers flagged where they differ."""
    want = _ours_reference(*args)
    # fp32 (bf16 on CUDA) throughout, the same math in other summation orders
    tol = (1e-5 if want.dtype == torch.float32 else 2e-2) * want.abs().max().item()
    differ = []
    for name, out in outs.items():
        if not bool(((out.float() - want.float()).abs() <= tol).all()):
            if name.startswith("ours"):
                raise AssertionError(f"{name}: differs from the reference layer; not timing a wrong layer")
            differ.append(name)
    return differ


def _layer_bytes(s):
    t, hid, e, k, inter, shared, lat = s
    touched = e * (1 - (1 - k / e) ** t)
    return 4 * (e * hid + 2 * hid * lat + touched * 2 * inter * lat + 2 * hid * shared + 2 * t * hid)


def _layer_flops(s):
    t, hid, e, k, inter, shared, lat = s
    return 2 * t * (e * hid + 2 * hid * lat + k * 2 * inter * lat + 2 * hid * shared)


def _layer_op():
    try:
        from transformers.models.nemotron_h import modeling_nemotron_h  # noqa: F401
    except ImportError:
        return None
    return BenchOp(name="moe_layer", shapes=LAYER_SHAPES, make_inputs=_layer_inputs,
                   impls={"ours": _ours, "ours_reference": _ours_reference, "hf_eager": _hf_eager,
                          "hf_grouped_mm": _hf_grouped},
                   peers=("hf_eager", "hf_grouped_mm", "ours_reference"), bytes=_layer_bytes, flops=_layer_flops,
                   verify=_verify_layer)


def ops() -> dict:
    impls = {"triton_nvfp4": _triton_nvfp4, "triton_bf16": _triton_dense, "grouped_mm": _grouped_mm, "loop": _loop}
    cutlass_peer = _cutlass_grouped_mm()
    if cutlass_peer is not None:
        impls["cutlass_grouped"] = cutlass_peer
    op = BenchOp(name="moe_experts", shapes=SHAPES, make_inputs=_inputs, impls=impls,
                 peers=("grouped_mm", "cutlass_grouped", "loop"), bytes=_bytes,
                 flops=lambda s: 2 * s[0] * s[2] * 2 * s[4] * s[3], verify=_verify)
    layer = _layer_op()
    return {op.name: op, **({layer.name: layer} if layer is not None else {})}
