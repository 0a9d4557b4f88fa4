"""End-to-end model benchmark: prefill tokens/s and batch-1 decode tokens/s versus context length.

``python -m bench.model --preset super-120b-a12b --recipe nvfp4 --backends eager,inductor,nemotron`` builds the preset with random
weights directly in the target format on the GPU (``NemotronHForCausalLM.random``), then for each
implementation (``reference``: the plain-torch paths; ``kernels``: the Triton kernels) times

  prefill  a forward over T fresh tokens (T in --prefill), tokens / s
  decode   one-token steps on a cache holding C tokens (C in --contexts); the cache's KV entries and
           Mamba states are filled with random values instead of prefilling C tokens, which leaves
           the per-step work unchanged (attention reads C cached positions, Mamba is O(1))

With ``--backends`` each implementation also runs under ``torch.compile`` (``inductor`` or this
package's ``nemotron`` backend); ``first_call_s`` is the first call's time (compilation included).
Results go to ``bench/results/<device>/model_<preset>.json``. On CPU the defaults are the tiny
preset and short contexts (CPU numbers, interpreter for the kernels).

``python -m bench.model --mtp 0,1,3 [--checkpoint nvfp4|bf16|DIR]`` instead times greedy generation
on a trained model (default: the shipped NVFP4 demo checkpoint, ``nemotron.model.demo_checkpoint``):
``--new-tokens`` tokens after each of ``--prompts`` 64-token held-out prompts, for each number of MTP
draft tokens k; it reports tokens/s, the ratio to k = 0 measured in the same run, the draft acceptance
rate, tokens per round, and whether the output equals plain greedy token for token (the median of
``--reps`` passes, the k values interleaved). Results go to
``bench/results/<device>/model_mtp_<checkpoint>.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

import nemotron  # noqa: F401  (chooses Triton's interpreter before triton is imported)
from nemotron import dispatch
from nemotron.model import NemotronHConfig, NemotronHForCausalLM

from . import harness


def _fill_cache(cache, context: int, gen: torch.Generator) -> None:
    for k, v in cache.kv.values():                                  # [B, KVH, max_len, D]
        k[:, :, :context].copy_(torch.randn(k[:, :, :context].shape, generator=gen, device=k.device).to(k.dtype))
        v[:, :, :context].copy_(torch.randn(v[:, :, :context].shape, generator=gen, device=v.device).to(v.dtype))
    for s in cache.ssm.values():
        s.copy_(torch.randn(s.shape, generator=gen, device=s.device).to(s.dtype) * 0.1)
    for c in cache.conv.values():
        c.copy_(torch.randn(c.shape, generator=gen, device=c.device).to(c.dtype))
    cache.pos.fill_(context)


def _time(fn, device, reps: int) -> float:
    fn()
    harness._sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    harness._sync(device)
    return (time.perf_counter() - t0) / reps


def _compiled(model, backend: str, regional: bool):
    torch._dynamo.reset()
    if backend == "eager":
        return model
    if regional:                       # one compiled graph per layer kind, reused by every layer
        import nemotron.graph
        return nemotron.graph.compile_regions(model, backend=backend)
    return torch.compile(model, backend=backend)


def run(preset: str, recipe, impls, backends, prefill, contexts, steps: int, kv_dtype, device,
        regional: bool = False, emit=None, max_lens=None) -> dict:
    """The result document; ``emit(doc)``, when given, receives the document so far after each measured row."""
    cfg = NemotronHConfig.preset(preset)
    model = NemotronHForCausalLM.random(cfg, device=device, recipe=recipe, seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    info = harness.device_info(device)

    def doc(**extra):
        return dict(kernel=f"model_{preset}", preset=preset, recipe=recipe, kv_dtype=str(kv_dtype), device=info,
                    cpu_numbers=device.type != "cuda", rows=rows, date=time.strftime("%Y-%m-%d %H:%M:%S"), **extra)

    def add(row):
        rows.append(row)
        if emit is not None:
            emit(doc(partial=True))
    max_len = max(contexts + prefill) + steps + 1         # one cache size: one decode graph per backend
    lens = max_lens or [max_len]                          # --max-len: the decode steps under each cache length
    for impl in impls:
        for backend in backends:
            f = _compiled(model, backend, regional)
            torch._dynamo.utils.counters.clear()
            tag = f"{impl}/{backend}"
            with dispatch.use("reference" if impl == "reference" else "triton"):
                with torch.no_grad():
                    for t in prefill:
                        ids = torch.randint(3, cfg.vocab_size, (1, t), generator=gen, device=device)
                        t0 = time.perf_counter()
                        f(ids, cache=model.new_cache(1, max_len, kv_dtype=kv_dtype))      # compiles when compiled
                        harness._sync(device)
                        first = time.perf_counter() - t0
                        sec = _time(lambda: f(ids, cache=model.new_cache(1, max_len, kv_dtype=kv_dtype)), device, 2)
                        add(dict(impl=impl, backend=backend, phase="prefill", tokens=t, seconds=sec,
                                         tokens_per_s=t / sec, first_call_s=first))
                        print(f"{tag:22s} prefill {t:8d} tokens: {t / sec:10.1f} tok/s (first call {first:.1f} s)",
                              flush=True)
                    for L, c in ((L, c) for L in lens for c in contexts if c + 1 <= L):
                        cache = model.new_cache(1, L, kv_dtype=kv_dtype)
                        _fill_cache(cache, c, gen)
                        tok = torch.randint(3, cfg.vocab_size, (1, 1), generator=gen, device=device)

                        def step():
                            cache.pos.fill_(c)                   # every step decodes at context c
                            f(tok, cache=cache)
                        t0 = time.perf_counter()
                        step()
                        harness._sync(device)
                        first = time.perf_counter() - t0
                        sec = _time(step, device, steps)
                        add(dict(impl=impl, backend=backend, phase="decode", context=c, max_len=L, seconds=sec,
                                 tokens_per_s=1 / sec, first_call_s=first))
                        print(f"{tag:22s} decode at context {c:8d}, max_len {L:8d}: {1 / sec:10.1f} tok/s "
                              f"(first call {first:.1f} s)", flush=True)
                    if len(lens) > 1:          # the step's cost of a longer buffer at the same live context
                        for c in contexts:
                            t = {r["max_len"]: r["seconds"] for r in rows if r.get("phase") == "decode"
                                 and r["impl"] == impl and r["backend"] == backend and r["context"] == c}
                            if len(t) > 1:
                                ratio = t[max(t)] / t[min(t)]
                                add(dict(impl=impl, backend=backend, phase="max_len_ratio", context=c,
                                         max_lens=[min(t), max(t)], ratio=ratio))
                                print(f"{tag:22s} context {c}: step time at max_len {max(t)} / at {min(t)} = "
                                      f"{ratio:.2f}x", flush=True)
            if backend != "eager":
                graphs = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
                add(dict(impl=impl, backend=backend, phase="compile", graphs=graphs))
                print(f"{tag:22s} graphs compiled over all calls: {graphs}", flush=True)
            if regional and backend != "eager":     # back to eager layers (no second copy of the weights)
                for layer in list(model.backbone.layers) + (list(model.mtp.layers) if model.mtp is not None else []):
                    layer._compiled_call_impl = None
    return doc()


def _launches(fn, device) -> int:
    """Kernel launches of ``fn()`` from the profiler: CUDA runtime launches on a GPU; on CPU, the
    top-level aten ops (each one kernel call of an eager CPU step; a compiled graph's fused C++
    kernels are not ops, so they do not count)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return sum(1 for e in events if e.name.startswith("aten::") and (e.cpu_parent is None
                                                                      or not e.cpu_parent.name.startswith("aten::")))


def run_mtp(checkpoint: str, ks, prompts: int, new_tokens: int, reps: int, device, batches=(1,),
            backends=("eager",)) -> dict:
    """Greedy generation with k MTP drafts per round (k = 0: plain greedy) on a trained checkpoint,
    for each compile backend and batch size: tokens/s (all rows), its ratio to k = 0 measured in the
    same run, acceptance, tokens per round, launches per round (profiler), and whether every row
    equals plain greedy. Batch b generates ``prompts`` prompts as batches of b rows; the k values
    are interleaved within each pass, the median pass counts."""
    from nemotron.model import DEMO_CHECKPOINTS, demo_checkpoint
    from nemotron.train.data import heldout_sample, load_tokenizer

    path = demo_checkpoint(checkpoint) if checkpoint in DEMO_CHECKPOINTS else checkpoint
    model = NemotronHForCausalLM.from_pretrained(path, device=device).eval()
    sample, _ = heldout_sample(load_tokenizer(path), files=prompts, tokens_per_file=64)
    prompt_rows = torch.stack([sample[i * 65:i * 65 + 64] for i in range(prompts)]).to(device)   # [prompts, 64]
    rows = []
    with torch.no_grad():
        for backend in backends:
            bk = None if backend == "eager" else backend
            torch._dynamo.reset()
            for bsz in batches:
                groups = [prompt_rows[i:i + bsz] for i in range(0, prompts, bsz)]

                def gen(k, g):
                    return model.generate(g, max_new_tokens=new_tokens, mtp_draft_tokens=k, backend=bk,
                                          max_len=64 + new_tokens + 2 * max(ks) + 1, output_stats=True)
                for k in ks:                                          # warm-up (compiles each step once)
                    gen(k, groups[0])
                outs, stats, times = {}, {}, {k: [] for k in ks}
                for _ in range(reps):             # the k values interleaved, so drifts of a shared machine hit all
                    for k in ks:
                        harness._sync(device)
                        t0 = time.perf_counter()
                        res = [gen(k, g) for g in groups]
                        harness._sync(device)
                        times[k].append(time.perf_counter() - t0)
                        outs[k], stats[k] = [o for o, _ in res], [dataclasses.asdict(st) for _, st in res]
                for k in ks:
                    drafted, accepted, rounds = (sum(st[f] for st in stats[k]) for f in ("drafted", "accepted", "rounds"))
                    sec = sorted(times[k])[len(times[k]) // 2]         # the median pass
                    emitted = sum(o[:, 64:].numel() for o in outs[k])
                    same = None if 0 not in outs else all(torch.equal(a, b) for a, b in zip(outs[k], outs[0]))
                    launches = _launches(lambda: gen(k, groups[0]), device)
                    row_rounds = drafted // k if k else rounds
                    rows.append(dict(backend=backend, batch=bsz, mtp_draft_tokens=k, tokens_per_s=emitted / sec,
                                     seconds=sec, pass_seconds=times[k],
                                     acceptance_rate=accepted / drafted if drafted else None,
                                     tokens_per_round=(row_rounds + accepted) / row_rounds if k and row_rounds else 1.0,
                                     launches_per_round=launches / (stats[k][0]["rounds"] or 1),
                                     identical_to_plain=same))
    for r in rows:
        base = next((b["tokens_per_s"] for b in rows if b["mtp_draft_tokens"] == 0 and b["backend"] == r["backend"]
                     and b["batch"] == r["batch"]), None)
        r["speedup_vs_plain"] = r["tokens_per_s"] / base if base else None
        acc = "" if r["acceptance_rate"] is None else f", acceptance {r['acceptance_rate']:.3f}"
        print(f"{r['backend']:8s} batch {r['batch']} MTP k={r['mtp_draft_tokens']}: {r['tokens_per_s']:7.1f} tok/s"
              + (f" ({r['speedup_vs_plain']:.2f}x plain)" if base else "")
              + f"{acc}, {r['tokens_per_round']:.2f} tokens/round, {r['launches_per_round']:.0f} launches/round, "
              f"identical to plain: {r['identical_to_plain']}", flush=True)
    tag = "".join(f"_{b}" for b in backends if b != "eager")             # compiled runs keep their own file
    return dict(kernel=f"model_mtp_{os.path.basename(os.path.normpath(checkpoint))}{tag}", checkpoint=checkpoint,
                prompts=prompts, prompt_tokens=64, new_tokens=new_tokens, device=harness.device_info(device),
                cpu_numbers=device.type != "cuda", threads=torch.get_num_threads(), rows=rows,
                launches="CUDA runtime launches" if device.type == "cuda" else "top-level aten ops (CPU)",
                date=time.strftime("%Y-%m-%d %H:%M:%S"))


# A tiny-width model for million-token prefills on a CPU: every layer kind, one attention layer with
# one head (the attention is the one O(T^2) part), Mamba and MoE as in the tiny preset
LONG_TINY = dict(vocab_size=256, hidden_size=32, layers_block_type=list("M*E"), mamba_num_heads=2, mamba_head_dim=16,
                 ssm_state_size=16, n_groups=1, chunk_size=128, num_attention_heads=1, num_key_value_heads=1,
                 head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 moe_shared_expert_intermediate_size=32, moe_latent_size=None, num_nextn_predict_layers=0,
                 max_position_embeddings=1 << 21, dtype="float32")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prefill_memory_one(tokens: int, chunk: int) -> dict:
    """One prefill of ``tokens`` tokens through the cache in ``chunk``-token chunks, as ``generate``
    runs it, on :data:`LONG_TINY`: seconds, and the peak RSS growth over the RSS after the model,
    the cache and the input were allocated (so the growth is the prefill's working memory alone)."""
    import threading
    cfg = NemotronHConfig(**LONG_TINY)
    model = NemotronHForCausalLM.random(cfg, seed=0)
    ids = torch.randint(3, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))

    def prefill(n, cache):
        for s in range(0, n, chunk):
            h = model.step_hidden(ids[:, s:min(s + chunk, n)], cache)
        return model.lm_head(h[:, -1])

    with torch.no_grad():
        prefill(min(tokens, 2 * chunk), model.new_cache(1, 2 * chunk + 1))   # warm-up: lazy libraries, allocator
        cache = model.new_cache(1, tokens + 1)
        for k, v in cache.kv.values():                 # touch the KV pages: they count as the base, not growth
            k.fill_(0)
            v.fill_(0)
        base, peak, running = _rss_bytes(), [0], [True]

        def sample():                                  # the run's own peak (ru_maxrss would include the warm-up)
            while running[0]:
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.002)
        watcher = threading.Thread(target=sample)
        watcher.start()
        t0 = time.perf_counter()
        prefill(tokens, cache)
        sec = time.perf_counter() - t0
        running[0] = False
        watcher.join()
    kv = sum(k.numel() * k.element_size() * 2 for k, _ in cache.kv.values())
    return dict(tokens=tokens, chunk=chunk, seconds=sec, tokens_per_s=tokens / sec,
                peak_growth_bytes=max(0, peak[0] - base), kv_cache_bytes=kv, base_rss_bytes=base)


def run_prefill_memory(lengths, chunks) -> dict:
    """Each (length, chunk) in a fresh process (a clean peak RSS): the rows of :func:`prefill_memory_one`."""
    import subprocess
    rows = []
    for chunk in chunks:
        for t in lengths:
            r = subprocess.run([sys.executable, "-m", "bench.model", "--prefill-memory-one", f"{t},{chunk}"],
                               capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"prefill {t:8d} tokens in chunks of {chunk:6d}: {row['tokens_per_s']:9.1f} tok/s, peak RSS growth "
                  f"{row['peak_growth_bytes'] / 2**20:8.1f} MiB (KV cache {row['kv_cache_bytes'] / 2**20:.1f} MiB)",
                  flush=True)
    for chunk in chunks:
        mine = sorted((r for r in rows if r["chunk"] == chunk), key=lambda r: r["tokens"])
        if len(mine) > 1:
            a, b = mine[0], mine[-1]
            per_token = (b["peak_growth_bytes"] - a["peak_growth_bytes"]) / (b["tokens"] - a["tokens"])
            kv_per_token = b["kv_cache_bytes"] / b["tokens"]
            print(f"chunk {chunk}: growth per extra token {per_token:.1f} B (KV cache per token {kv_per_token:.0f} B)")
    return dict(kernel="model_prefill_memory", config=LONG_TINY, device=harness.device_info(torch.device("cpu")),
                cpu_numbers=True, threads=1, rows=rows, date=time.strftime("%Y-%m-%d %H:%M:%S"))


def _all_ranks(comm: dict, group) -> dict:
    """``comm`` summed over the ranks (on the host-side gloo group; outside the timed region)."""
    if group is None:
        return comm
    import torch.distributed as dist

    from nemotron.model import distributed
    t = torch.tensor([comm[k] for k in sorted(comm)], dtype=torch.int64)
    dist.all_reduce(t, group=distributed.control_group(group))
    return dict(zip(sorted(comm), t.tolist()))


def run_ep(preset: str, recipe, world: int, prompt: int, steps: int, device) -> dict:
    """Expert parallelism over ``world`` torchrun ranks (1: one plain process): prefill tokens/s of a
    ``prompt``-token batch-1 forward, then ``steps`` greedy batch-1 decode steps, each step's time and
    the bytes all ranks sent in the MoE exchanges (latent ``dispatch`` rows, fp32 ``combine`` slots,
    ``metadata``, the ``gather`` of combined latent rows) summed over the MoE layers, counted outside
    the timed region; ``full_width_dispatch`` is what hidden-width rows would have cost (dispatch x
    H / l). Every rank steps in lockstep (each exchange waits for all); rank 0 reports its clock."""
    from nemotron.model import distributed
    group = None
    if "WORLD_SIZE" in os.environ:
        group, device = distributed.init_from_env()
    if (group.size() if group is not None else 1) != world:
        raise SystemExit(f"--ep {world}: launch with torchrun --nproc-per-node {world} -m bench.model --ep {world}")
    cfg = NemotronHConfig.preset(preset)
    model = NemotronHForCausalLM.random(cfg, device=device, seed=0, recipe=recipe, ep_group=group)
    rank = group.rank() if group is not None else 0
    say = print if rank == 0 else (lambda *a, **k: None)
    say(distributed.memory_line(model), flush=True)
    ids = torch.randint(3, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    rows, latent = [], cfg.moe_latent_size or cfg.hidden_size
    with torch.no_grad():
        model(ids)                                                      # warm-up
        prefill = []
        for _ in range(3):
            harness._sync(device)
            t0 = time.perf_counter()
            model(ids)
            harness._sync(device)
            prefill.append(time.perf_counter() - t0)
        sec = sorted(prefill)[1]
        comm = _all_ranks(distributed.comm_bytes(model), group)
        rows.append(dict(phase="prefill", tokens=prompt, seconds=sec, tokens_per_s=prompt / sec, **comm))
        say(f"ep {world} prefill {prompt} tokens: {prompt / sec:9.1f} tok/s, bytes sent by all ranks: "
            f"dispatch {comm['dispatch']}, combine {comm['combine']}, metadata {comm['metadata']}, "
            f"gather {comm['gather']}", flush=True)
        cache = model.new_cache(1, prompt + steps + 1)
        nxt = model(ids, cache=cache)[:, -1:].argmax(-1)
        times, per_step = [], []
        for _ in range(steps):
            harness._sync(device)
            t0 = time.perf_counter()
            nxt = model(nxt, cache=cache)[:, -1:].argmax(-1)
            harness._sync(device)
            times.append(time.perf_counter() - t0)
            per_step.append(_all_ranks(distributed.comm_bytes(model), group))
    sec = sorted(times)[len(times) // 2]
    mean = {k: sum(c[k] for c in per_step) / steps for k in ("dispatch", "combine", "metadata", "gather")}
    rows.append(dict(phase="decode", steps=steps, seconds=sec, tokens_per_s=1 / sec, step_seconds=times,
                     bytes_per_step=mean, full_width_dispatch_per_step=mean["dispatch"] * cfg.hidden_size / latent,
                     per_step_bytes=per_step))
    say(f"ep {world} decode: {1 / sec:9.1f} tok/s (median of {steps} steps), bytes per step sent by all ranks: "
        f"dispatch {mean['dispatch']:.0f} (hidden-width rows would be {mean['dispatch'] * cfg.hidden_size / latent:.0f}), "
        f"combine {mean['combine']:.0f}, metadata {mean['metadata']:.0f}, gather {mean['gather']:.0f}", flush=True)
    doc = dict(kernel=f"model_ep{world}_{preset}", preset=preset, recipe=recipe, world=world, device=harness.device_info(device),
               cpu_numbers=device.type != "cuda", threads=torch.get_num_threads(), memory=distributed.param_bytes(model),
               rows=rows, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    return doc if rank == 0 else None


def _save(doc: dict):
    out = harness.RESULTS / harness.slug(doc["device"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{doc['kernel']}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def main(argv=None) -> int:
    device = harness.env_device()
    gpu = device.type == "cuda"
    p = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="super-120b-a12b" if gpu else "tiny")
    p.add_argument("--recipe", default="nvfp4-experts" if gpu else None,
                   help="quantize_ recipe for the random weights (nvfp4 | nvfp4-experts; default none on CPU)")
    p.add_argument("--impls", default="kernels,reference" if gpu else "reference,kernels")
    p.add_argument("--backends", default="eager", help="comma-separated: eager, inductor, nemotron")
    p.add_argument("--regional", action="store_true", help="compile per layer (nemotron.graph.compile_regions)")
    p.add_argument("--prefill", default="1024,8192" if gpu else "64")
    p.add_argument("--contexts", default="1024,32768,131072,524288" if gpu else "64,512")
    p.add_argument("--steps", type=int, default=20 if gpu else 3)
    p.add_argument("--kv-fp8", action="store_true", help="FP8 KV cache")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--mtp", default=None, help="comma-separated MTP draft counts: time generation on a trained model")
    p.add_argument("--checkpoint", default="nvfp4", help="with --mtp: nvfp4 | bf16 (the demo checkpoints) or a DIR")
    p.add_argument("--prompts", type=int, default=8, help="with --mtp: held-out prompts")
    p.add_argument("--batch", default="1", help="with --mtp: comma-separated batch sizes (prompts per generate call)")
    p.add_argument("--new-tokens", type=int, default=64, help="with --mtp: tokens generated per prompt")
    p.add_argument("--reps", type=int, default=5, help="with --mtp: timed passes over the prompts (median)")
    p.add_argument("--ep", type=int, default=None, help="expert parallelism over W torchrun ranks: prefill and decode "
                   "tok/s and all-to-all bytes per step (torchrun --nproc-per-node W -m bench.model --ep W)")
    p.add_argument("--max-len", default=None, help="comma-separated cache lengths: decode at each context under "
                   "each (the step must not grow with max_len at a fixed live context)")
    p.add_argument("--prefill-memory", default=None, help="comma-separated prompt lengths: peak RSS growth of a "
                   "chunked prefill on a tiny-width model (CPU), each in its own process")
    p.add_argument("--prefill-chunks", default="8192", help="with --prefill-memory: comma-separated chunk sizes")
    p.add_argument("--prefill-memory-one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if a.prefill_memory_one is not None:
        t, chunk = ints(a.prefill_memory_one)
        print(json.dumps(prefill_memory_one(t, chunk)))
        return 0
    if a.ep is not None:
        doc = run_ep(a.preset, a.recipe, a.ep, ints(a.prefill)[0], max(a.steps, 16), device)
        if "WORLD_SIZE" in os.environ:  # a torchrun rank: rank 0 writes, then every rank ends cleanly
            import torch.distributed as dist

            from nemotron.model import distributed
            if doc is not None and not a.no_save:
                print(f"wrote {_save(doc)}")
            distributed.exit_rank(dist.group.WORLD)
    elif a.prefill_memory is not None:
        doc = run_prefill_memory(ints(a.prefill_memory), ints(a.prefill_chunks))
    elif a.mtp is not None:
        doc = run_mtp(a.checkpoint, ints(a.mtp), a.prompts, a.new_tokens, a.reps, device, batches=ints(a.batch),
                      backends=a.backends.split(","))
    else:
        doc = run(a.preset, a.recipe, a.impls.split(","), a.backends.split(","), ints(a.prefill), ints(a.contexts), a.steps,
                  torch.float8_e4m3fn if a.kv_fp8 else None, device, regional=a.regional,
                  emit=None if a.no_save else _save, max_lens=ints(a.max_len) if a.max_len else None)     # rewritten after each row: a run cut off keeps its rows
    if not a.no_save:
        print(f"wrote {_save(doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
