"""NVFP4 training: one linear's fprop + dgrad + wgrad against the bf16 ``nn.Linear``, the fused
rowwise + columnwise (RHT) quantize against the HBM roofline, and a whole model's training step.

``nvfp4_training_linear``: shapes (M, N, K), M the tokens of a step, on the Nemotron 3 Super linears.
Work 3 * 2*M*N*K (three GEMMs). The NVFP4 path quantizes x, w and dy (both copies of x and dy) and
runs its GEMMs on the dequantized, exactly representable values (the emulation of a Blackwell FP4
GEMM; Hopper has no FP4 tensor cores), so its cost over bf16 is the quantizers plus fp32 GEMMs.

``nvfp4_row_col_quantize``: shapes (M, K). Traffic as the kernels move it: the amax pass reads x
(2 B/elt), the quantize pass reads x again and writes two copies of 0.5 + 1/16 B/elt.

``nvfp4_training_step``: shapes (batch, tokens, width); forward + backward of a small hybrid model
(every layer kind, LatentMoE, MTP unused) in fp32 (the CPU baseline: bf16 matmuls on CPU do not
accumulate into fp32 outputs) and under the NVFP4 recipe, Super's carve-outs and none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import nemotron.nvfp4 as nvfp4

from .harness import BenchOp

# (N, K): in_proj, out_proj, shared expert up / down of Super
SUPER_TRAINING_LINEARS = [(18560, 4096), (4096, 8192), (5376, 4096), (4096, 5376)]
LINEAR_SHAPES = {
    "nemotron": [(m, n, k) for n, k in SUPER_TRAINING_LINEARS for m in (2048, 8192)],
    "smoke": [(256, 512, 512), (1024, 1024, 1024)],
}
QUANT_SHAPES = {
    "nemotron": [(8192, 4096), (8192, 8192), (2048, 14336)],
    "smoke": [(256, 512), (1024, 1024)],
}


def _linear_inputs(shape, device, seed):
    m, n, k = shape
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(n, k, device=device, generator=g) * 0.02).requires_grad_()          # fp32 master
    w_bf16 = w.detach().to(torch.bfloat16).requires_grad_()
    dy = (torch.randn(m, n, device=device, generator=g) * 1e-3).to(torch.bfloat16)
    return x, w, w_bf16, dy


RECIPE = nvfp4.NVFP4Recipe()


def _nvfp4_step(x, w, w_bf16, dy):
    nvfp4.nvfp4_training_linear(x, w, recipe=RECIPE).backward(dy)
    dw, x.grad, w.grad = w.grad, None, None
    return dw


def _bf16_step(x, w, w_bf16, dy):
    F.linear(x, w_bf16).backward(dy)
    dw, x.grad, w_bf16.grad = w_bf16.grad, None, None
    return dw


def _verify_linear(args, outs):
    """The NVFP4 step's gradients follow the bf16 ones (~10% NVFP4 noise per operand; 0.35 for a product)."""
    x, w, w_bf16, dy = args
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    nvfp4.nvfp4_training_linear(xr, wr, recipe=RECIPE).backward(dy)
    want = dy.float().T @ x.detach().float()
    err = (wr.grad - want).norm() / want.norm()
    if not err < 0.35:
        raise AssertionError(f"nvfp4_training_linear: wgrad relative error {err:.3f} vs the unquantized one")
    return []


def _quant_inputs(shape, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, device=device, generator=g).to(torch.bfloat16),)


def _row_col(impl: str, stochastic: bool):
    return lambda x: torch.ops.nemotron.nvfp4_quantize_row_col(x, True, stochastic, 1, 2, impl)


def ops() -> dict:
    linear = BenchOp(
        name="nvfp4_training_linear", shapes=LINEAR_SHAPES, make_inputs=_linear_inputs,
        impls={"nvfp4_recipe": _nvfp4_step, "bf16_linear": _bf16_step}, peers=("bf16_linear",),
        bytes=lambda s: 2 * s[0] * s[2] + 4 * s[1] * s[2] + 2 * s[0] * s[1], flops=lambda s: 6 * s[0] * s[1] * s[2],
        verify=_verify_linear)
    # the interpreter runs the Triton kernel as Python: on CPU only the torch path is timed
    impls = {"torch_rn": _row_col("torch", False), "torch_sr": _row_col("torch", True)}
    if torch.cuda.is_available():
        impls = {"triton_rn": _row_col("triton", False), "triton_sr": _row_col("triton", True), **impls}
    quant = BenchOp(
        name="nvfp4_row_col_quantize", shapes=QUANT_SHAPES, make_inputs=_quant_inputs, impls=impls,
        peers=("torch_rn",), bytes=lambda s: s[0] * s[1] * (2 + 2 + 2 * (0.5 + 1 / 16)))
    return {linear.name: linear, quant.name: quant, **_step_ops()}


# ---- a whole training step ------------------------------------------------------------------

STEP_SHAPES = {"nemotron": [(4, 128, 64), (8, 256, 256)], "smoke": [(4, 128, 64), (8, 256, 256)]}


def _step_config(hidden: int):
    """The tiny preset (every layer kind, LatentMoE, MTP) at width 64 with 16 Mamba heads (every
    linear width a multiple of 16), or scaled to width 256 (16 experts of 256, top-4, latent 128)."""
    from nemotron.model import NemotronHConfig
    from nemotron.model.config import PRESETS
    cfg = dict(PRESETS["tiny"], mamba_num_heads=16, mamba_head_dim=4)
    if hidden == 256:
        cfg.update(hidden_size=256, mamba_head_dim=16, ssm_state_size=32, num_attention_heads=8, head_dim=32,
                   moe_intermediate_size=256, moe_shared_expert_intermediate_size=512, moe_latent_size=128,
                   intermediate_size=512, vocab_size=4096, n_routed_experts=16, num_experts_per_tok=4)
    elif hidden != 64:
        raise ValueError(f"hidden: the step benchmark has models of width 64 and 256, got {hidden}")
    return NemotronHConfig(**cfg)


def _step_inputs(shape, device, seed):
    """(models by recipe, ids [batch, tokens]) for shape (batch, tokens, model width)."""
    import copy

    import nemotron
    from nemotron.model import NemotronHForCausalLM
    cfg = _step_config(shape[2])
    base = NemotronHForCausalLM.random(cfg, seed=seed, device=device)
    models = {"fp32": base,
              "nvfp4_nemotron3": nemotron.prepare_training_(copy.deepcopy(base), nvfp4.NVFP4Recipe.nemotron3()),
              "nvfp4_all": nemotron.prepare_training_(copy.deepcopy(base), nvfp4.NVFP4Recipe())}
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, shape[:2], device=device, generator=g)
    return models, ids


def _train_step(recipe: str):
    def step(models, ids):
        model = models[recipe]
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _step_ops() -> dict:
    op = BenchOp(
        name="nvfp4_training_step", shapes=STEP_SHAPES, make_inputs=_step_inputs,
        impls={r: _train_step(r) for r in ("fp32", "nvfp4_nemotron3", "nvfp4_all")}, peers=("fp32",),
        bytes=lambda s: 0)
    return {op.name: op}
