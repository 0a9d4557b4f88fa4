"""Command line (``python -m nemotron`` or the ``nemotron`` console script):

  demo                                  the shipped stdlib-tiny models (trained in NVFP4 and in BF16): Python
                                        from a prompt, held-out loss of both, generation with and without MTP,
                                        eager vs torch.compile(backend="nemotron"); then every kernel vs its
                                        reference
  generate --model DIR [--ids 1,2,3 | --prompt TEXT]...  generate from a checkpoint (a batch)
  quantize --model DIR --recipe R --out DIR            BF16 HF checkpoint -> ModelOpt NVFP4 checkpoint
  train --out DIR [--recipe nvfp4] [--steps N] [--max-minutes M] [--resume]
                                        train the stdlib-tiny model on the Python standard library
  eval --model DIR                      held-out loss, bits per byte, MTP acceptance of a trained model

A user mistake (a bad argument, an unreadable checkpoint or recipe, a missing file) ends the command
with one line on stderr, ``nemotron <command>: error: ...``, and exit status 2 (arguments) or 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

import nemotron  # noqa: F401  (chooses Triton's interpreter before triton is imported)
from nemotron import dispatch

# (label, block rows, rounding, hadamard): every NVFP4 quantize path
PATHS = [
    ("1x16 nearest", 1, "nearest", False),
    ("1x16 stochastic", 1, "stochastic", False),
    ("16x16 nearest", 16, "nearest", False),
    ("16x16 stochastic", 16, "stochastic", False),
    ("RHT + 1x16 nearest", 1, "nearest", True),
    ("RHT + 1x16 stochastic", 1, "stochastic", True),
]


class UsageError(ValueError):
    """A command-line argument that is not what the command takes (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):               # one line through main(), not usage + message + exit
        raise UsageError(message)


def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v
    return parse


def _multiple_of_16(s: str) -> int:
    v = _int_at_least(16)(s)
    if v % 16:
        raise argparse.ArgumentTypeError(f"expected a positive multiple of 16 (the NVFP4 block), got {v}")
    return v


def _positive_finite(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {s}")
    return v


def _token_ids(s: str) -> list:
    try:
        ids = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        ids = []
    if not ids:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer token ids, got {s!r}")
    return ids


def _time_ms(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def demo(argv=None) -> int:
    p = _Parser(prog="nemotron demo", description="The tiny model end to end, then every kernel.")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile step")
    p.add_argument("--explain", action="store_true",
                   help="print what the nemotron backend does to the tiny model (fusions, kernel per op) and stop")
    _kernel_options(p)
    a = p.parse_args(argv)                  # every option checked before the (slow) model demo runs
    if a.explain:
        return _explain_tiny()
    ok = _demo_model(compile_model=not a.no_compile)
    print()
    return _kernels(a) or (0 if ok else 1)


def _tiny(dev):
    """The tiny preset with unit-scale random weights (so every layer matters), fp32."""
    from nemotron.model import NemotronHConfig, NemotronHForCausalLM
    cfg = NemotronHConfig.preset("tiny")
    model = NemotronHForCausalLM.random(cfg, device=dev, seed=0)
    with torch.no_grad():
        g = torch.Generator(device=dev).manual_seed(0)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=dev) / p.shape[-1] ** 0.5)
    return cfg, model


def _to_w4a4(model, dev):
    """All linears but lm_head to NVFP4 W4A4 with a static input scale (as in a ModelOpt NVFP4
    checkpoint), routed experts to NVFP4."""
    from nemotron.nvfp4 import NVFP4Linear
    nemotron.quantize_(model, "nvfp4", exclude=["lm_head"], act_quant="nvfp4")
    for mod in model.modules():
        if isinstance(mod, NVFP4Linear):
            mod.input_scale = torch.tensor(0.05, device=dev)
    return model


def _explain_tiny() -> int:
    import nemotron.graph
    dev = torch.device("cuda" if not dispatch.interpreting() else "cpu")
    cfg, model = _tiny(dev)
    _to_w4a4(model, dev)
    ids = torch.randint(3, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)).to(dev)
    print(f"nemotron backend on the tiny model ({cfg.hybrid_override_pattern}, NVFP4 W4A4), prefill of 16 tokens:")
    print(nemotron.graph.explain(model, (ids,)))
    return 0


DEMO_PROMPT = "def fibonacci(n):\n    if n"     # the demo's generation prompt


def _demo_model(compile_model: bool) -> bool:
    """The shipped stdlib-tiny models (trained on the Python standard library, in NVFP4 and in high
    precision): Python from a prompt, held-out loss of both, generation with and without MTP
    (greedy output must be identical), torch.compile(backend="nemotron") against eager."""
    import time

    from nemotron.model import NemotronHForCausalLM, demo_checkpoint
    from nemotron.train import loop
    from nemotron.train.data import heldout_sample, load_tokenizer

    dev = torch.device("cuda" if not dispatch.interpreting() else "cpu")
    paths = {k: demo_checkpoint(k) for k in ("nvfp4", "bf16")}
    with open(os.path.join(os.path.dirname(paths["nvfp4"]), "results.json"), encoding="utf-8") as f:
        shipped = json.load(f)
    model = NemotronHForCausalLM.from_pretrained(paths["nvfp4"], device=dev).eval()
    tok = load_tokenizer(paths["nvfp4"])
    cfg, run = model.config, shipped["runs"]["nvfp4"]
    print(f"stdlib-tiny Nemotron-H ({cfg.hybrid_override_pattern} + MTP, {run['params'] / 1e6:.2f}M parameters, "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, latent {cfg.moe_latent_size}), trained "
          f"natively in NVFP4 on {run['tokens_trained'] / 1e6:.1f}M tokens of the Python {shipped['corpus']['python']} "
          f"standard library; ModelOpt NVFP4 checkpoint, on {dev}")

    # 1. Python from a prompt
    ids = torch.tensor([tok.encode(DEMO_PROMPT).ids], device=dev)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48)
    text = tok.decode(out[0].tolist())
    print(f"\n48 greedy tokens after the prompt {DEMO_PROMPT!r} (a 1.6M-parameter model: Python-shaped, not "
          "correct):\n    " + "\n    ".join(text.splitlines()))

    # 2. held-out loss, NVFP4 vs the high-precision baseline
    sample, names = heldout_sample(tok)
    base = NemotronHForCausalLM.from_pretrained(paths["bf16"], device=dev).eval()
    losses = {k: loop.token_loss(m, sample)[0] for k, m in (("nvfp4", model), ("bf16", base))}
    gap = losses["nvfp4"] / losses["bf16"] - 1
    full = {k: shipped["runs"][k]["heldout"]["loss"] for k in ("nvfp4", "bf16")}
    print(f"\nheld-out loss (nats/token) on {sample.numel()} tokens of {len(names)} held-out files "
          f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}):")
    print(f"  NVFP4-trained {losses['nvfp4']:.4f}   BF16 baseline {losses['bf16']:.4f}   gap {gap:+.2%}")
    print(f"  (the whole held-out split, results.json: NVFP4 {full['nvfp4']:.4f}, BF16 {full['bf16']:.4f}, "
          f"gap {full['nvfp4'] / full['bf16'] - 1:+.2%})")
    del base

    # 3. generation with and without MTP drafts
    prompt = sample[:64][None].to(dev)
    runs, ok = {}, True
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=8, mtp_draft_tokens=3)            # warm-up
        for k in (0, 1, 3):
            t0 = time.perf_counter()
            o, st = model.generate(prompt, max_new_tokens=64, mtp_draft_tokens=k, output_stats=True)
            runs[k] = (o, time.perf_counter() - t0, st)
    print("\ngreedy generation of 64 tokens after a 64-token held-out prompt:")
    for k, (o, secs, st) in runs.items():
        same = torch.equal(o, runs[0][0])
        ok &= same
        extra = (f"  acceptance {st.acceptance_rate:.2f}, {st.tokens_per_round:.2f} tokens/round, "
                 f"output identical: {same}" if k else "")
        speed = f"{64 / secs:6.1f} tok/s" + (f" ({runs[0][1] / secs:.2f}x)" if k else "")
        print(f"  {'MTP k=' + str(k) if k else 'no MTP':8s} {speed}{extra}")

    # 4. the compiled model against eager
    if compile_model:
        window = sample[:128][None].to(dev)
        with torch.no_grad():
            eager = model(window)
            t0 = time.perf_counter()
            compiled = torch.compile(model, backend="nemotron")  # fuses norm+quantize+GEMM and route+experts
            got = compiled(window)
        same = torch.allclose(got, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())
        agree = (got.argmax(-1) == eager.argmax(-1)).float().mean().item()
        ok &= same
        print(f"\ntorch.compile(backend='nemotron') == eager on 128 held-out tokens: {same} (next-token argmax "
              f"agrees at {agree:.0%}; compile + first run {time.perf_counter() - t0:.1f} s)")
    return ok


def _kernel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=_int_at_least(1), default=None,
                   help="rows of the test tensor (default 8192 on GPU, 96 on CPU)")
    p.add_argument("--cols", type=_multiple_of_16, default=None,
                   help="K, the quantized (block) dimension: a multiple of 16 (default 4096 on GPU, 1024 on CPU)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="data and stochastic-rounding seed")


def kernels_demo(argv=None) -> int:
    p = _Parser(prog="nemotron demo", description="Every kernel against its reference.")
    _kernel_options(p)
    return _kernels(p.parse_args(argv))


def _kernels(a: argparse.Namespace) -> int:
    from nemotron.nvfp4 import reference as ref
    from nemotron.nvfp4.triton import quantize as kernels

    gpu = not dispatch.interpreting()
    dev = torch.device("cuda" if gpu else "cpu")
    rows, cols = a.rows or (8192 if gpu else 96), a.cols or (4096 if gpu else 1024)

    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(2 * torch.rand(rows, 1, generator=g))  # per-row spread
    x.view(-1)[torch.randint(x.numel(), (8,), generator=g)] *= 20                            # outliers
    x = x.to(torch.bfloat16)
    xd = x.to(dev)
    x32 = x.float()
    where = f"GPU: {torch.cuda.get_device_name()}" if gpu else "CPU: Triton kernels under the interpreter (no bandwidth)"
    print(f"NVFP4 demo: x = bf16 [{rows}, {cols}], {where}")
    print(f"{'path':24s} {'rel RMS err (ref)':>18s} {'kernel == ref':>14s}" + (f" {'kernel GB/s':>12s}" if gpu else ""))
    ok = True
    for label, tile, rounding, had in PATHS:
        args = dict(tile_rows=tile, global_scale=None, stochastic=rounding == "stochastic", seed=a.seed, hadamard=had)
        want = ref.quantize_reference(x, **args)
        got = kernels.quantize(xd, **args)
        same = all(torch.equal(u.cpu().reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
                   for u, w in zip(got, want))
        ok &= same
        xq = ref.dequantize_reference(*want)
        if had:  # compare in the original basis: undo the (orthonormal) transform
            xq = ref.hadamard_reference(xq, inverse=True)
        line = f"{label:24s} {ref.qdq_error(x32, xq):18.4f} {str(same):>14s}"
        if gpu:
            ms = _time_ms(lambda: kernels.quantize(xd, **args))
            # amax pass reads x (2 B/elt), quantize pass reads x again and writes 0.5 + 1/16 B/elt
            line += f" {x.numel() * (2 + 2 + 0.5625) / ms / 1e6:12.1f}"
        print(line)
    ydq = kernels.dequantize(*[t.to(dev) for t in ref.quantize_reference(x)], torch.bfloat16)
    same = torch.equal(ydq.cpu(), ref.dequantize_reference(*ref.quantize_reference(x), torch.bfloat16))
    ok &= same
    print(f"{'dequantize -> bf16':24s} {'':18s} {str(same):>14s}")
    ok &= _demo_linear(x, xd, gpu)
    ok &= _demo_moe(gpu)
    print("all kernels agree with the FP32 reference" if ok else "MISMATCH between kernel and reference")
    return 0 if ok else 1


def _demo_linear(x: torch.Tensor, xd: torch.Tensor, gpu: bool) -> bool:
    """NVFP4 linear (x @ W.T with W [N, K] in NVFP4), W4A16 and W4A4, kernel vs the fp32 reference."""
    from nemotron.nvfp4 import reference as ref
    from nemotron.nvfp4.triton import gemm as gemm_kernels
    from nemotron.nvfp4.triton import quantize as kernels

    m, k = min(x.shape[0], 64), x.shape[1]
    n = 4 * k if gpu else 256
    g = torch.Generator().manual_seed(1)
    w32 = torch.randn(n, k, generator=g) * 0.02
    w = ref.quantize_reference(w32)
    wd = [t.to(xd.device) for t in w]
    exact = x[:m].double() @ w32.double().T
    print(f"\nNVFP4 linear: x [{m}, {k}] bf16 @ W.T, W [{n}, {k}] NVFP4")
    print(f"{'path':24s} {'rel err vs exact':>18s} {'kernel ~ ref':>14s}" + (f" {'kernel TFLOP/s':>15s}" if gpu else ""))
    ok = True
    for label, a4 in (("W4A16", False), ("W4A4 (emulated)", True)):
        def run():
            if not a4:
                return gemm_kernels.gemm(xd[:m], wd[0], wd[1].view(torch.uint8), wd[2])
            xc, xs, xg = kernels.quantize(xd[:m], tile_rows=1, global_scale=None, stochastic=False, seed=0,
                                          hadamard=False)
            return gemm_kernels.gemm(xc, wd[0], wd[1].view(torch.uint8), wd[2], x_scales=xs.view(torch.uint8),
                                     x_gs=xg, out_dtype=x.dtype)
        got = run().cpu()
        want = ref.linear_reference(x[:m], *w, act_quant=a4)
        x32 = ref.dequantize_reference(*ref.quantize_reference(x[:m])) if a4 else x[:m].float()
        close = bool(((got.double() - want.double()).abs()
                      <= ref.gemm_tolerance(x32, ref.dequantize_reference(*w), None, want)).all())
        ok &= close
        err = ((got.double() - exact).norm() / exact.norm()).item()
        line = f"{label:24s} {err:18.4f} {str(close):>14s}"
        if gpu:
            line += f" {2 * m * n * k / _time_ms(run) / 1e9:15.2f}"
        print(line)
    return ok


def _demo_moe(gpu: bool) -> bool:
    """Routed experts (sigmoid top-k, grouped GEMM with relu2 and the routing weight fused), bf16 and
    NVFP4 weights, kernel vs the fp64 reference; Super's shapes on a GPU, a small layer on CPU."""
    from nemotron import moe_kernels as mk
    from nemotron.moe_kernels import reference as ref

    dev = torch.device("cuda" if gpu else "cpu")
    t, e, k, lat, inter = (64, 512, 22, 1024, 2688) if gpu else (24, 16, 4, 64, 96)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(t, lat, generator=g).to(torch.bfloat16)
    w, ids = mk.route(torch.randn(t, e, generator=g), top_k=k, scaling_factor=5.0)
    up = torch.randn(e, inter, lat, generator=g) / lat ** 0.5
    down = torch.randn(e, lat, inter, generator=g) / inter ** 0.5
    print(f"\nLatentMoE experts: x [{t}, {lat}] bf16, E {e}, top-{k}, I {inter}")
    print(f"{'weights':24s} {'rel err vs fp32 experts':>24s} {'kernel ~ ref':>14s}" + (f" {'weight GB/s':>12s}" if gpu else ""))
    exact = ref.experts_reference(x, w, ids, up, down).double()
    ok = True
    for label, (wu, wd) in (("bf16", (up.bfloat16(), down.bfloat16())),
                            ("NVFP4", (mk.quantize_experts(up), mk.quantize_experts(down)))):
        args = [a.to(dev) for a in (x, w, ids, wu, wd)]
        with dispatch.use("triton"):
            got = mk.experts(*args).cpu()
        want = ref.experts_reference(x, w, ids, wu, wd)
        close = bool(((got.double() - want.double()).abs() <= ref.experts_tolerance(x, w, ids, wu, wd, want)).all())
        ok &= close
        err = ((got.double() - exact).norm() / exact.norm()).item()
        line = f"{label:24s} {err:24.4f} {str(close):>14s}"
        if gpu:
            touched = torch.unique(ids).numel()
            per_weight = 0.5625 if label == "NVFP4" else 2
            line += f" {touched * 2 * inter * lat * per_weight / _time_ms(lambda: mk.experts(*args)) / 1e6:12.1f}"
        print(line)
    return ok


def generate_cmd(argv=None) -> int:
    p = _Parser(prog="nemotron generate", description="Generate from a nemotron_h checkpoint. Several --prompt (or "
                "--ids) run as one left-padded batch; each row is printed on its own line.")
    p.add_argument("--model", required=True, help="checkpoint directory (HF or ModelOpt)")
    p.add_argument("--ids", type=_token_ids, action="append", default=None,
                   help="comma-separated prompt token ids (repeat for a batch)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (needs tokenizer.json in the model directory; repeat for a batch)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--mtp", type=_int_at_least(0), default=0, help="draft tokens per step with the MTP block")
    p.add_argument("--device", default=None)
    p.add_argument("--ep", action="store_true", help="expert parallelism over the ranks of a torchrun launch "
                   "(torchrun --nproc-per-node W [--nnodes N] -m nemotron generate ... --ep); only rank 0 prints")
    p.add_argument("--ep-timeout", type=_positive_finite, default=60.0,
                   help="with --ep: seconds each exchange waits for the other ranks (default 60)")
    a = p.parse_args(argv)
    from nemotron.model import NemotronHForCausalLM
    if (a.ids is None) == (a.prompt is None):
        p.error("give --ids or --prompt (either may repeat), not both")
    tok = None
    if a.prompt is not None:
        path = os.path.join(a.model, "tokenizer.json")
        if not os.path.exists(path):
            p.error(f"--prompt: no tokenizer.json in {a.model}; pass --ids instead")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            p.error("--prompt: needs the 'tokenizers' package (pip install tokenizers); or pass --ids")
        tok = Tokenizer.from_file(path)
        rows = [tok.encode(text).ids for text in a.prompt]
        for text, r in zip(a.prompt, rows):
            if not r:
                p.error(f"--prompt: {text!r} encodes to no tokens")
    else:
        rows = a.ids
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    group, rank = _ep_init(a) if a.ep else (None, 0)
    if group is not None:
        device = a.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    model = NemotronHForCausalLM.from_pretrained(a.model, device=device, progress=True, ep_group=group,
                                                 ep_timeout=a.ep_timeout)
    width = max(map(len, rows))
    pad = model.config.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    out, stats = model.generate(ids, attention_mask=mask, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                top_p=a.top_p, mtp_draft_tokens=a.mtp, eos_token_id=model.config.eos_token_id,
                                generator=gen, output_stats=True)
    eos = model.config.eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))       # the pads after a stop
        new = row[:cut]
        print(tok.decode(new) if tok is not None else ",".join(map(str, new)))
    if a.mtp and rank == 0:
        print(f"MTP: acceptance {stats.acceptance_rate:.2f} ({stats.accepted}/{stats.drafted} drafts), "
              f"{stats.tokens_per_round:.2f} tokens per round, {stats.rounds} rounds", file=sys.stderr)
    if group is not None:
        from nemotron.model import distributed
        distributed.exit_rank(group, 0, a.ep_timeout)
    return 0


def _ep_init(a):
    """The torchrun process group (gloo on CPU, NCCL with this rank's GPU), its timeout --ep-timeout
    (loading waits on a side group of its own, 30 minutes): (group, rank); every rank's stdout but
    rank 0's goes to /dev/null. A rank that finished ends through ``distributed.exit_rank``."""
    from nemotron.model import distributed
    if "WORLD_SIZE" not in os.environ:
        raise UsageError("--ep: launch under torchrun (torchrun --nproc-per-node W [--nnodes N ...] -m nemotron "
                         "generate ... --ep)")
    group, _ = distributed.init_from_env(timeout_s=a.ep_timeout)
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return group, group.rank()


def quantize_cmd(argv=None) -> int:
    p = _Parser(prog="nemotron quantize", description="BF16 HF checkpoint -> ModelOpt-format checkpoint.")
    p.add_argument("--model", required=True)
    p.add_argument("--recipe", default="nvfp4-experts",
                   help="nvfp4 | nvfp4-experts | a JSON file mapping module names to nvfp4 / fp8 / keep")
    p.add_argument("--out", required=True)
    p.add_argument("--exclude", default="lm_head,mtp.*", help="comma-separated module patterns kept in BF16")
    p.add_argument("--input-scale", type=_positive_finite, default=None,
                   help="a static activation decode scale for W4A4 (ModelOpt's input_scale; from calibration); "
                        "without it the export is weight-only (W4A16)")
    a = p.parse_args(argv)
    from nemotron.model import NemotronHForCausalLM
    if os.path.realpath(a.out) == os.path.realpath(a.model):
        p.error(f"--out: {a.out} is the --model directory; write the quantized checkpoint to a new one")
    recipe = a.recipe
    if recipe.endswith(".json"):
        try:
            with open(recipe, encoding="utf-8") as f:
                recipe = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            p.error(f"--recipe: {recipe} is not valid JSON ({err})")
        if not isinstance(recipe, dict):
            p.error(f"--recipe: {a.recipe} must hold a JSON object {{module name: format}}, "
                    f"got {type(recipe).__name__}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = NemotronHForCausalLM.from_pretrained(a.model, device=device, progress=True)
    nemotron.quantize_(model, recipe, exclude=[e for e in a.exclude.split(",") if e])
    if a.input_scale is not None:
        from nemotron.nvfp4 import NVFP4Linear
        for mod in model.modules():
            if isinstance(mod, NVFP4Linear):
                mod.act_quant = "nvfp4"
                mod.input_scale = torch.tensor(a.input_scale, dtype=torch.float32, device=mod.weight.device)
    model.save_pretrained(a.out)
    print(f"wrote {a.out}")
    return 0


def train_cmd(argv=None) -> int:
    from nemotron.train import loop
    p = _Parser(prog="nemotron train", description="Train a Nemotron-H model on the Python standard library.")
    p.add_argument("--out", required=True, help="the run's directory (checkpoint.pt, log.jsonl, model/)")
    p.add_argument("--recipe", choices=list(loop.RECIPES), default="nvfp4",
                   help="precision: bf16 (baseline), nvfp4 (Super's recipe) or an ablation of it")
    p.add_argument("--config", choices=sorted(_presets()), default="stdlib-tiny", help="model preset")
    p.add_argument("--steps", type=_int_at_least(1), default=2000)
    p.add_argument("--batch-size", type=_int_at_least(1), default=8)
    p.add_argument("--seq-len", type=_int_at_least(4), default=256)
    p.add_argument("--lr", type=_positive_finite, default=3e-3, help="peak learning rate (warmup-stable-decay)")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--checkpoint-every", type=_int_at_least(1), default=100)
    p.add_argument("--max-minutes", type=_positive_finite, default=None,
                   help="stop cleanly (with a checkpoint) after this many minutes; --resume continues")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out: {a.out} exists and is not a directory")
    if not a.resume and os.path.exists(os.path.join(a.out, loop.CHECKPOINT)):
        p.error(f"--out: {a.out} holds the checkpoint of an earlier run; pass --resume to continue it")
    try:
        r = loop.train(a.out, recipe=a.recipe, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                       lr=a.lr, seed=a.seed, checkpoint_every=a.checkpoint_every, max_minutes=a.max_minutes,
                       resume=a.resume, config=a.config, progress=not a.no_progress)
    except ValueError as err:               # an argument train() refuses: name it by its flag
        name, _, rest = str(err).partition(": ")
        if name in vars(a):
            p.error(f"--{name.replace('_', '-')}: {rest}")
        raise
    if r["finished"]:
        print(f"trained {r['step']} steps, final loss {r['loss']:.4f}; model in {r['model_dir']}")
    else:
        print(f"stopped at step {r['step']} of {a.steps} (--max-minutes); continue with --resume")
    return 0


def _presets():
    from nemotron.model.config import PRESETS
    return PRESETS


def eval_cmd(argv=None) -> int:
    from nemotron.train import loop
    p = _Parser(prog="nemotron eval", description="Held-out loss, bits per byte and MTP acceptance of a "
                                                  "model written by nemotron train.")
    p.add_argument("--model", required=True, help="the model directory (DIR/model of a training run)")
    p.add_argument("--cache", default=None,
                   help="the token cache (default: the data/ beside --model if there is one, else the user cache)")
    p.add_argument("--seq-len", type=_int_at_least(1), default=256)
    p.add_argument("--max-tokens", type=_int_at_least(2), default=None, help="evaluate the first N held-out tokens")
    p.add_argument("--prompts", type=_int_at_least(0), default=8, help="held-out prompts for MTP acceptance")
    a = p.parse_args(argv)
    if not os.path.isdir(a.model):
        p.error(f"--model: {a.model} is not a directory")
    if not os.path.exists(os.path.join(a.model, "tokenizer.json")):
        p.error(f"--model: no tokenizer.json in {a.model} (nemotron train writes one beside the model)")
    cache = a.cache or os.path.join(os.path.dirname(os.path.abspath(a.model)), "data")
    if a.cache is None and not os.path.isdir(cache):     # not a training run's model (e.g. a shipped one)
        from nemotron.train.data import default_cache_dir
        cache = str(default_cache_dir())
    heldout, bpt = loop.stdlib_heldout(a.model, cache)
    print(json.dumps(loop.evaluate(a.model, heldout, seq_len=a.seq_len, max_tokens=a.max_tokens,
                                   bytes_per_token=None if a.max_tokens else bpt, prompts=a.prompts), indent=2))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": demo, "generate": generate_cmd, "quantize": quantize_cmd, "train": train_cmd,
                "eval": eval_cmd}
    if not argv or argv[0] not in commands:
        print(f"usage: nemotron {{{','.join(commands)}}} [options]   (see nemotron <command> --help)", file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except (ValueError, TypeError, OSError) as err:
        # user errors: arguments, files, checkpoints (CheckpointError is a ValueError); one line
        print(f"nemotron {argv[0]}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
