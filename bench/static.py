"""``python -m bench.static``: the sm_90 static report of every Triton kernel, without a GPU.

Each case calls one of the package's kernel launchers on ``meta`` tensors at a real Nemotron shape
(Super, and Nano where it differs). Launches are intercepted: the kernel is compiled for sm_90a
through the same binder the JIT uses (so constexprs, integer / alignment specialization, warps and
stages are the launcher's own) and never run. From the compiled kernel and its SASS
(``cuobjdump`` shipped in Triton's wheel) each row records:

- ``regs`` per thread, ``spill``: bytes of spill stores (the widths of the STL instructions, as
  ``ptxas -v`` counts them), ``stack`` (the frame) and ``local_ops`` (LDL/STL instructions);
- ``smem``: dynamic shared memory per block, against the 232,448 B opt-in limit of H100/H200;
- ``warps``, ``stages``; ``mma``: wgmma (HGMMA), mma.sync (HMMA) or none; ``tma``;
- the grid, its CTAs against 132 SMs, ``occ`` (resident CTAs per SM from registers, shared memory
  and warps) and ``waves`` = CTAs / (132 * occ);
- ``loop``: the SASS instruction count (per warp, NOPs excluded) of the hot loop: the innermost loop
  holding the MMA (else the largest innermost loop, else the whole kernel), and ``per_unit``: thread
  instructions per weight (GEMM, MoE) or per element (the others) = loop * 32 * warps / units per
  iteration.

A kernel whose shared memory exceeds the limit cannot launch; its compile stops after the LLVM IR
(regs, spills and SASS then read "-"), unless Triton's cache already holds it whole.

Results: the table on stdout and ``bench/results/static_sm90.json``. Compiles run one at a time and
go through Triton's own cache (outside the repository). The module imports only the standard
library until ``report`` runs, so tests can import ``violations`` without leaving the interpreter.

    python -m bench.static [--preset super|nano|all] [--cases SUBSTR,...] [--skip SUBSTR,...] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results" / "static_sm90.json"

# Hopper (H100 / H200 SXM) limits per SM and per block.
SMS = 132
SMEM_PER_BLOCK = 232_448          # opt-in maximum of dynamic shared memory per block
SMEM_PER_SM = 233_472             # 228 KiB; each resident block also reserves 1 KiB
SMEM_RESERVED = 1024
REGS_PER_SM = 65_536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32


@dataclasses.dataclass
class Case:
    """One launcher call at one shape; ``run()`` builds meta tensors and calls the launcher."""
    name: str                      # "<op>/<shape label>", e.g. "nvfp4_gemm/super.in_proj.M1"
    preset: str
    run: Callable[[], None]


# ---- cases -------------------------------------------------------------------------------------

_SHAPES = {
    # the Super and Nano presets of nemotron/model/config.py, as the widths each op sees
    "super": dict(hidden=4096, heads=128, head_dim=64, groups=8, state=128, conv=4, q_heads=32, kv_heads=2,
                  attn_dim=128, experts=512, top_k=22, moe_inter=2688, shared_inter=5376, latent=1024, vocab=131072),
    "nano": dict(hidden=2688, heads=64, head_dim=64, groups=8, state=128, conv=4, q_heads=32, kv_heads=2,
                 attn_dim=128, experts=128, top_k=6, moe_inter=1856, shared_inter=3712, latent=None, vocab=131072),
}
GEMM_M = (1, 32, 64, 256, 8192)        # one M per launch-config bucket of nvfp4.triton.gemm.CONFIGS
NANO_GEMM_M = (1, 8192)                # Nano: decode and prefill only (its configs are Super's)
MOE_TOKENS = (1, 1024, 8192)           # mean rows per touched expert 1 / 44 / 88 at Super: every bucket
PREFILL_T = 8192
SCAN_T = 65536                         # the long-context batch-1 scan (T does not specialize)
DRAFT_T = 4                            # MTP verification: the drafted tokens in one update call
DECODE_MAX_LEN = 512 * 1024            # decode attention's KV buffer (the grid depends on it, not on the length)
SSD_CHUNKS = (16, 32, 64, 128, 256)    # ops.CHUNK_SIZES: every chunk size the public API accepts
SSD_DTYPES = ("bfloat16", "float16", "float32")


def _meta(*shape, dtype="bfloat16"):
    import torch
    return torch.empty(shape, dtype=getattr(torch, dtype), device="meta")


def _linears(s: dict) -> dict:
    """name -> (N, K) of each linear of one layer kind."""
    inter = s["heads"] * s["head_dim"]
    out = {"in_proj": (2 * inter + 2 * s["groups"] * s["state"] + s["heads"], s["hidden"]),
           "out_proj": (s["hidden"], inter),
           "q_proj": (s["q_heads"] * s["attn_dim"], s["hidden"]),
           "kv_proj": (s["kv_heads"] * s["attn_dim"], s["hidden"]),
           "o_proj": (s["hidden"], s["q_heads"] * s["attn_dim"]),
           "shared_up": (s["shared_inter"], s["hidden"]),
           "shared_down": (s["hidden"], s["shared_inter"]),
           "lm_head": (s["vocab"], s["hidden"])}
    if s["latent"]:
        out.update(fc1_latent=(s["latent"], s["hidden"]), fc2_latent=(s["hidden"], s["latent"]))
    return out


def _gemm_case(m, n, k, *, fp4_x=False):
    def run():
        from nemotron.nvfp4.triton import gemm
        w, ws, gs = _meta(n, k // 2, dtype="uint8"), _meta(n, k // 16, dtype="uint8"), _meta(dtype="float32")
        if fp4_x:
            gemm.gemm(_meta(m, k // 2, dtype="uint8"), w, ws, gs, x_scales=_meta(m, k // 16, dtype="uint8"),
                      x_gs=_meta(dtype="float32"), out_dtype=_torch_dtype("bfloat16"))
        else:
            gemm.gemm(_meta(m, k), w, ws, gs)
    return run


def _torch_dtype(name):
    import torch
    return getattr(torch, name)


def _moe_case(s, tokens, *, fp4):
    def run():
        from nemotron.moe_kernels.triton import grouped_gemm
        e, top_k, hid, inter = s["experts"], s["top_k"], s["latent"] or s["hidden"], s["moe_inter"]

        def weights(n, k):
            if fp4:
                return (_meta(e, n, k // 2, dtype="uint8"), _meta(e, n, k // 16, dtype="uint8"),
                        _meta(e, dtype="float32"))
            return None, _meta(e, n, k)
        grouped_gemm.expert_slots(_meta(tokens, hid), _meta(tokens, top_k, dtype="float32"),
                                  _meta(tokens * top_k, dtype="int32"), _meta(e, dtype="int32"), top_k,
                                  weights(inter, hid), weights(hid, inter))
    return run


def _ssd_case(s, *, dtype="bfloat16", chunk=128, varlen=False):
    def run():
        from nemotron.ssm_kernels.triton import ssd
        h, p, g, n = s["heads"], s["head_dim"], s["groups"], s["state"]
        b, t = 1, SCAN_T
        # the model's call (layers.Mamba2Mixer): D, dt_bias, softplus, dt_limit (time_step_min, inf)
        ssd.ssd_scan(_meta(b, t, h, p, dtype=dtype), _meta(b, t, h, dtype=dtype), _meta(h, dtype="float32"),
                     _meta(b, t, g, n, dtype=dtype), _meta(b, t, g, n, dtype=dtype), chunk_size=chunk,
                     D=_meta(h, dtype="float32"), dt_bias=_meta(h, dtype="float32"), dt_softplus=True,
                     dt_limit=(0.001, math.inf), initial_states=_meta(b if not varlen else 4, h, p, n, dtype="float32"),
                     cu_seqlens=_meta(5, dtype="int32") if varlen else None, return_final_states=True)
    return run


def _conv_case(s):
    def run():
        from nemotron.ssm_kernels.triton import conv1d
        d = s["heads"] * s["head_dim"] + 2 * s["groups"] * s["state"]
        conv1d.causal_conv1d(_meta(1, PREFILL_T, d), _meta(d, s["conv"]), _meta(d), activation="silu",
                             initial_states=_meta(1, s["conv"] - 1, d))
    return run


def _conv_multi_case(s):
    def run():
        from nemotron.ssm_kernels.triton import conv1d
        d, w = s["heads"] * s["head_dim"] + 2 * s["groups"] * s["state"], s["conv"]
        conv1d.causal_conv1d_update_multi(_meta(1, DRAFT_T, d), _meta(1, w - 1, d), _meta(d, w),
                                          _meta(1, DRAFT_T, w - 1, d), _meta(d), activation="silu")
    return run


def _state_update_case(s, *, multi):
    def run():
        from nemotron.ssm_kernels.triton import state_update
        h, p, g, n = s["heads"], s["head_dim"], s["groups"], s["state"]
        a, d = _meta(h, dtype="float32"), _meta(h, dtype="float32")
        state = _meta(1, h, p, n, dtype="float32")        # mamba_ssm_cache_dtype float32
        if multi:
            t = DRAFT_T
            state_update.selective_state_update_multi(
                state, _meta(1, t, h, p), _meta(1, t, h, dtype="float32"), a, _meta(1, t, g, n), _meta(1, t, g, n),
                _meta(1, t, h, p, n, dtype="float32"), D=d)
        else:
            state_update.selective_state_update(state, _meta(1, h, p), _meta(1, h, dtype="float32"), a,
                                                _meta(1, g, n), _meta(1, g, n), D=d)
    return run


def _decode_attention_case(s, *, fp8, t=1):
    def run():
        from nemotron.attention.triton import decode
        hq, hkv, d = s["q_heads"], s["kv_heads"], s["attn_dim"]
        kv = "float8_e4m3fn" if fp8 else "bfloat16"
        scales = dict(k_scale=_meta(1, dtype="float32"), v_scale=_meta(1, dtype="float32")) if fp8 else {}
        decode.decode_attention(_meta(1, t, hq, d), _meta(1, hkv, DECODE_MAX_LEN, d, dtype=kv),
                                _meta(1, hkv, DECODE_MAX_LEN, d, dtype=kv), _meta(1, dtype="int32"), scale=d ** -0.5,
                                **scales)
    return run


def _gated_rmsnorm_case(s, rows):
    def run():
        from nemotron.ssm_kernels.triton import gated_rmsnorm
        d = s["heads"] * s["head_dim"]
        gated_rmsnorm.gated_rmsnorm(_meta(rows, d), _meta(rows, d), _meta(d), group_size=d // s["groups"])
    return run


def _norm_quantize_case(rows, k, group, *, gated):
    def run():
        from nemotron.nvfp4.triton import norm_quantize
        norm_quantize.norm_quantize(_meta(rows, k), _meta(k), _meta(dtype="float32"),
                                    z=_meta(rows, k) if gated else None, group_size=group, eps=1e-5)
    return run


def _quantize_case(rows, k, *, hadamard, stochastic=False, tile_rows=1):
    def run():
        from nemotron.nvfp4.triton import quantize
        quantize.quantize(_meta(rows, k), tile_rows=tile_rows, global_scale=None, stochastic=stochastic, seed=1,
                          hadamard=hadamard)
    return run


def _dequantize_case(rows, k):
    def run():
        from nemotron.nvfp4.triton import quantize
        quantize.dequantize(_meta(rows, k // 2, dtype="uint8"), _meta(rows, k // 16, dtype="uint8"),
                            _meta(dtype="float32"), _torch_dtype("bfloat16"))
    return run


def _hadamard_case(rows, k):
    def run():
        from nemotron.nvfp4.triton import quantize
        quantize.hadamard(_meta(rows, k))
    return run


def _row_col_case(m, k, *, hadamard, stochastic):
    def run():
        from nemotron.nvfp4.triton import row_col
        check = row_col._check
        row_col._check = lambda *a: None       # it rejects meta tensors; what it validates is not measured here
        try:
            row_col.quantize_row_col(_meta(m, k), hadamard_col=hadamard, stochastic=stochastic, seed_row=1,
                                     seed_col=2)
        finally:
            row_col._check = check
    return run


def cases(presets=("super", "nano")) -> list[Case]:
    """Every case of the report, Super first."""
    out = []
    for preset in presets:
        s = _SHAPES[preset]
        add = lambda op, label, run: out.append(Case(f"{op}/{preset}.{label}", preset, run))  # noqa: E731
        for m in GEMM_M if preset == "super" else NANO_GEMM_M:
            for lin, (n, k) in _linears(s).items():
                add("nvfp4_gemm", f"{lin}.M{m}", _gemm_case(m, n, k))
        n, k = _linears(s)["in_proj"]
        for m in (1, PREFILL_T):
            add("nvfp4_gemm_w4a4", f"in_proj.M{m}", _gemm_case(m, n, k, fp4_x=True))
        for fp4 in (True, False):
            for t in MOE_TOKENS if preset == "super" else (1, PREFILL_T):
                add("moe_experts", f"{'nvfp4' if fp4 else 'bf16'}.T{t}", _moe_case(s, t, fp4=fp4))
        add("ssd_scan", "bf16.chunk128", _ssd_case(s))
        if preset == "super":
            add("ssd_scan", "bf16.chunk128.varlen", _ssd_case(s, varlen=True))
            for dtype in SSD_DTYPES:
                for chunk in SSD_CHUNKS:
                    if (dtype, chunk) != ("bfloat16", 128):
                        add("ssd_scan", f"{_short(dtype)}.chunk{chunk}", _ssd_case(s, dtype=dtype, chunk=chunk))
        add("causal_conv1d", f"T{PREFILL_T}", _conv_case(s))
        add("causal_conv1d_update_multi", f"T{DRAFT_T}", _conv_multi_case(s))
        add("selective_state_update", "B1", _state_update_case(s, multi=False))
        add("selective_state_update_multi", f"T{DRAFT_T}", _state_update_case(s, multi=True))
        for fp8 in (False, True):
            for t in (1, DRAFT_T):
                add("decode_attention", f"{'fp8' if fp8 else 'bf16'}.T{t}.L512K", _decode_attention_case(s, fp8=fp8, t=t))
        add("gated_rmsnorm", f"T{PREFILL_T}", _gated_rmsnorm_case(s, PREFILL_T))
        inter = s["heads"] * s["head_dim"]
        add("norm_quantize", f"hidden.T{PREFILL_T}", _norm_quantize_case(PREFILL_T, s["hidden"], s["hidden"],
                                                                          gated=False))
        add("norm_quantize", f"gated.T{PREFILL_T}", _norm_quantize_case(PREFILL_T, inter, inter // s["groups"],
                                                                         gated=True))
        if preset == "super":
            hid = s["hidden"]
            for had in (False, True):
                add("nvfp4_quantize", f"{'rht' if had else 'plain'}.T{PREFILL_T}",
                    _quantize_case(PREFILL_T, hid, hadamard=had))
            add("nvfp4_quantize", f"2d16.sr.rht.T{PREFILL_T}",
                _quantize_case(PREFILL_T, hid, hadamard=True, stochastic=True, tile_rows=16))
            add("nvfp4_dequantize", f"T{PREFILL_T}", _dequantize_case(PREFILL_T, hid))
            add("nvfp4_hadamard", f"T{PREFILL_T}", _hadamard_case(PREFILL_T, hid))
            for had, sr in ((False, False), (True, True)):
                add("nvfp4_row_col", f"{'rht.sr' if had else 'plain'}.T{PREFILL_T}",
                    _row_col_case(PREFILL_T, hid, hadamard=had, stochastic=sr))
    return out


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]


# ---- compile through the launchers --------------------------------------------------------------

class _Capture:
    """Replaces ``JITFunction.run`` while active: each launch is bound as the JIT binds it, compiled
    for sm_90 (memoized by the JIT's own cache key) and recorded with its grid; nothing runs."""

    def __init__(self):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.target = GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        self.kernels = {}              # cache key -> (compiled kernel, compile seconds)
        self.launches = []
        self._triton = triton

    def __enter__(self):
        from triton.runtime.jit import JITFunction
        self._orig, capture = JITFunction.run, self
        backend_cls = type(self.backend)
        self._orig_stages = add_stages = backend_cls.add_stages

        def run(fn, *args, grid, warmup, **kwargs):
            capture.launch(fn, args, grid, kwargs)

        def stages_stopping_over_smem(backend, stages, options, language):
            # a kernel over the shared-memory limit cannot launch: stop after the LLVM IR (where the
            # allocation is known) instead of spending minutes in codegen and ptxas on it
            add_stages(backend, stages, options, language)
            make_ptx = stages["ptx"]

            def ptx(src, metadata):
                if metadata["shared"] > SMEM_PER_BLOCK:
                    raise _OverSmem(dict(metadata), src)
                return make_ptx(src, metadata)
            stages["ptx"] = ptx
        JITFunction.run = run
        backend_cls.add_stages = stages_stopping_over_smem
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction
        JITFunction.run = self._orig
        type(self.backend).add_stages = self._orig_stages

    def launch(self, fn, args, grid, kwargs):
        from triton.compiler import ASTSource
        from triton.runtime.jit import compute_cache_key, create_function_from_signature
        knobs = self._triton.knobs
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, spec, options = binder(*args, **kwargs)
        key = (fn.fn.__qualname__, fn.module, compute_cache_key({}, spec, options))
        if key not in self.kernels:
            options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, spec, options)
            t0 = time.perf_counter()
            try:
                k = self._triton.compile(ASTSource(fn, signature, constexprs, attrs), target=self.target,
                                         options=options.__dict__)
            except _OverSmem as e:
                k = e
            self.kernels[key] = (k, time.perf_counter() - t0)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        constexprs = {n: bound[n] for i, n in enumerate(fn.arg_names) if i in fn.constexprs}
        self.launches.append((fn.fn.__name__, grid, key, constexprs))


class _OverSmem(Exception):
    """Raised inside the compiler for a kernel whose shared memory exceeds the per-block limit."""

    def __init__(self, metadata: dict, llir: str):
        super().__init__(f"{metadata['shared']} B of shared memory")
        self.metadata, self.llir = metadata, llir


def _bin_dir() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(_bin_dir() / "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each SASS instruction in ``cuobjdump -sass`` text."""
    return [(int(a, 16), op, rest.strip()) for a, _, op, rest in _INSTR.findall(sass)]


def hot_loop(instrs) -> tuple[list, bool]:
    """The instructions of the hot loop and whether a loop was found (see module docstring)."""
    loops = []
    for addr, op, rest in instrs:
        m = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr:                # a backward branch closes a loop
            loops.append((int(m.group(1), 16), addr))
    inner = [(lo, hi) for lo, hi in loops if not any(lo <= a < b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    if not inner:
        return [i for i in instrs if i[1] != "NOP" and not (i[1] == "BRA" and f"0x{i[0]:x}" in i[2])], False
    bodies = [[i for i in instrs if lo <= i[0] <= hi and i[1] != "NOP"] for lo, hi in inner]
    with_mma = [b for b in bodies if any(_mma_kind(i[1]) for i in b)]
    return max(with_mma or bodies, key=len), True


def _mma_kind(op: str) -> str | None:
    return "wgmma" if op.startswith("HGMMA") else "mma.sync" if op.startswith("HMMA") else None


# units of work per hot-loop iteration (or per program when the kernel has no loop), by kernel
_UNITS = {
    "_nvfp4_gemm_fwd_kernel": ("weight", lambda c: c["BN"] * c["BK"]),
    "_moe_gemm_fwd_kernel": ("weight", lambda c: c["BN"] * c["BK"]),
    "_splitk_reduce_fwd_kernel": ("element", lambda c: c["BM"] * c["BN"]),
    "_ssd_cumsum_fwd_kernel": ("element", lambda c: c["Q"] * c["BH"]),
    "_ssd_chunk_state_fwd_kernel": ("element", lambda c: c["BK"] * c["BP"]),
    "_ssd_state_passing_fwd_kernel": ("element", lambda c: c["BS"]),
    "_ssd_chunk_scan_fwd_kernel": ("element", lambda c: c["BM"] * c["BP"]),
    "_conv1d_fwd_kernel": ("element", lambda c: c["BT"] * c["BD"]),
    "_conv1d_update_multi_fwd_kernel": ("element", lambda c: c["BD"]),
    "_state_update_fwd_kernel": ("element", lambda c: c["BP"] * c["BN"]),
    "_state_update_multi_fwd_kernel": ("element", lambda c: c["BP"] * c["BN"]),
    "_gated_rmsnorm_fwd_kernel": ("element", lambda c: c["BG"]),
    "_norm_quantize_fwd_kernel": ("element", lambda c: c["BM"] * c["GB"]),
    "_amax_fwd_kernel": ("element", lambda c: c["BM"] * c["NB"] * 16),
    "_quantize_fwd_kernel": ("element", lambda c: c["BM"] * c["NB"] * 16),
    "_dequantize_fwd_kernel": ("element", lambda c: c["BM"] * c["NB"] * 16),
    "_hadamard_fwd_kernel": ("element", lambda c: c["BM"] * c["NB"] * 16),
    "_row_col_amax_fwd_kernel": ("element", lambda c: c["BM"] * c["BK"]),
    "_row_col_quantize_fwd_kernel": ("element", lambda c: c["BM"] * c["BK"]),
    "_decode_attention_fwd_kernel": ("element", lambda c: 2 * c["BN"] * c["BD"]),    # K and V elements of a tile
    "_decode_attention_reduce_fwd_kernel": ("element", lambda c: c["BD"]),
}


def occupancy(regs: int, smem: int, warps: int) -> int:
    """Resident CTAs per SM on Hopper, from registers (allocated per warp in units of 256),
    shared memory (plus the 1 KiB reserved per block) and warps."""
    per_warp = math.ceil((regs or 0) * 32 / 256) * 256         # regs None: not assembled (over smem: 0 CTAs)
    by_regs = (REGS_PER_SM // per_warp) // warps if per_warp else MAX_CTAS_PER_SM
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED) if smem + SMEM_RESERVED <= SMEM_PER_SM else 0
    return max(0, min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_CTAS_PER_SM))


def analyse(kernel) -> dict:
    """The per-compile facts (no grid) of one compiled kernel (or of one stopped over the shared-memory
    limit: then only what the LLVM IR tells, the rest None)."""
    if isinstance(kernel, _OverSmem):
        md, llir = kernel.metadata, kernel.llir
        mma = "wgmma" if "wgmma.mma_async" in llir else "mma.sync" if "mma.sync" in llir else "none"
        return dict(regs=None, spill=None, stack=None, local_ops=None, smem=int(md["shared"]),
                    warps=int(md["num_warps"]), stages=int(md["num_stages"]), mma=mma,
                    tma="cp.async.bulk.tensor" in llir, sass=None, loop=None, loop_found=None)
    cubin = kernel.asm["cubin"]
    res = _cuobjdump(cubin, "-res-usage")
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    instrs = sass_instructions(_cuobjdump(cubin, "-sass"))
    loop, found = hot_loop(instrs)
    mma = {_mma_kind(op) for _, op, _ in instrs} - {None}
    ptx = kernel.asm["ptx"]
    md = kernel.metadata
    # spill stores in bytes as ptxas -v counts them: the widths of the STL instructions
    spill = sum(int(m.group(1) or 32) // 8 for _, op, _ in instrs if (m := re.fullmatch(r"STL(?:\.(\d+))?", op)))
    return dict(regs=regs, spill=spill, stack=stack, local_ops=sum(op.startswith(("LDL", "STL")) for _, op, _ in instrs),
                smem=int(md.shared), warps=int(md.num_warps), stages=int(md.num_stages),
                mma="wgmma" if "wgmma" in mma else "mma.sync" if mma else "none",
                tma="cp.async.bulk.tensor" in ptx or any(op.startswith("UTMA") for _, op, _ in instrs),
                sass=len(instrs), loop=len(loop), loop_found=found)


def report(selected: list[Case], log=print) -> list[dict]:
    """Compile every launch of the selected cases; one row per (case, launched kernel)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or "triton" in sys.modules and _interpreting():
        raise RuntimeError("bench.static compiles for sm_90: run it in a process without TRITON_INTERPRET=1 "
                           "(python -m bench.static)")
    os.environ["TRITON_INTERPRET"] = "0"
    import nemotron  # noqa: F401
    from nemotron.nvfp4.triton import gemm
    rows, facts = [], {}
    num_sms = gemm._num_sms
    gemm._num_sms = lambda device: SMS          # size grids for an H100/H200, not the meta device
    try:
        with _Capture() as cap:
            for case in selected:
                first = len(cap.launches)
                try:
                    case.run()
                except Exception as e:  # noqa: BLE001  (one broken case must not hide the others)
                    rows.append(dict(case=case.name, preset=case.preset, error=f"{type(e).__name__}: {e}"[:300]))
                    log(f"  {case.name}: ERROR {rows[-1]['error']}")
                    continue
                for name, grid, key, constexprs in cap.launches[first:]:
                    if key not in facts:
                        k, seconds = cap.kernels[key]
                        facts[key] = analyse(k)
                        log(f"  {case.name}: {name} compiled in {seconds:.1f} s")
                    rows.append(_row(case, name, grid, constexprs, facts[key]))
    finally:
        gemm._num_sms = num_sms
    return rows


def _interpreting() -> bool:
    import triton
    return bool(triton.knobs.runtime.interpret)


def _row(case: Case, name: str, grid, constexprs: dict, f: dict) -> dict:
    ctas = grid[0] * grid[1] * grid[2]
    occ = occupancy(f["regs"], f["smem"], f["warps"])
    unit, per_iter = _UNITS.get(name, (None, None))
    per_unit = None
    if per_iter is not None and f["loop"] is not None:
        per_unit = round(f["loop"] * 32 * f["warps"] / per_iter(constexprs), 2)
    config = {k: (str(v) if not isinstance(v, (bool, int, float, str)) else v) for k, v in constexprs.items()}
    return dict(case=case.name, preset=case.preset, kernel=name, config=config, grid=list(grid), ctas=ctas,
                occ=occ, waves=round(ctas / (SMS * occ), 2) if occ else None,
                unit=unit, per_unit=per_unit, **f)


# ---- rules (the CI test applies them) -----------------------------------------------------------

def violations(row: dict) -> dict:
    """Rule name -> measured value for each rule the row breaks: ``spill`` (bytes of spill stores),
    ``smem`` (bytes, over the per-block limit: such a launch fails on the GPU) or ``error``."""
    if "error" in row:
        return {"error": row["error"]}
    if row["smem"] > SMEM_PER_BLOCK:
        # it cannot launch, so no other rule applies (and it is assembled only when Triton's cache
        # already holds it: its spills are reported only then)
        return {"smem": row["smem"]}
    return {"spill": row["spill"]} if row["spill"] or row["local_ops"] else {}


# ---- output -------------------------------------------------------------------------------------

COLUMNS = [("case", 38), ("kernel", 30), ("regs", 4), ("spill", 5), ("smem", 6), ("w", 2), ("st", 2),
           ("mma", 8), ("tma", 3), ("ctas", 6), ("occ", 3), ("waves", 6), ("loop", 5), ("per", 9)]


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = " ".join(f"{n:<{w}}" if n in ("case", "kernel", "mma") else f"{n:>{w}}" for n, w in COLUMNS)
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<38} ERROR {r['error']}", file=out)
            continue
        per = f"{r['per_unit']:g}/{r['unit'][0]}" if r["per_unit"] is not None else "-"
        vals = dict(case=r["case"], kernel=r["kernel"].strip("_").removesuffix("_fwd_kernel"), regs=r["regs"],
                    spill=r["spill"], smem=r["smem"], w=r["warps"], st=r["stages"], mma=r["mma"],
                    tma="yes" if r["tma"] else "no", ctas=r["ctas"], occ=r["occ"],
                    waves="-" if r["waves"] is None else f"{r['waves']:g}",
                    loop=r["loop"] if r["loop_found"] is not False else f"{r['loop']}*", per=per)
        vals = {n: "-" if v is None else v for n, v in vals.items()}
        flag = " !" + ",".join(violations(r)) if violations(r) else ""
        print(" ".join(f"{str(vals[n]):<{w}}" if n in ("case", "kernel", "mma") else f"{str(vals[n]):>{w}}"
                       for n, w in COLUMNS) + flag, file=out)
    print(f"\nsmem: dynamic shared memory per block (limit {SMEM_PER_BLOCK:,} B); occ: CTAs per SM; waves: CTAs / "
          f"({SMS} SMs * occ); loop: SASS instructions per warp in the hot loop (* = whole kernel, no loop); "
          "per: thread instructions per weight (/w) or element (/e); ! marks a broken rule.", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="all", choices=["super", "nano", "all"])
    p.add_argument("--cases", default=None, help="comma-separated substrings of case names (default all)")
    p.add_argument("--skip", default=None, help="comma-separated substrings of case names to leave out")
    p.add_argument("--json", default=None, help="output path (default bench/results/static_sm90.json)")
    p.add_argument("--no-save", action="store_true", help="print only")
    a = p.parse_args(argv)
    selected = cases(("super", "nano") if a.preset == "all" else (a.preset,))
    if a.cases:
        subs = a.cases.split(",")
        selected = [c for c in selected if any(s in c.name for s in subs)]
        if not selected:
            p.error(f"--cases: no case name contains any of {subs}")
    if a.skip:
        selected = [c for c in selected if not any(s in c.name for s in a.skip.split(","))]
    t0 = time.perf_counter()
    rows = report(selected, log=lambda s: print(s, file=sys.stderr))
    print_table(rows)
    print(f"{len(selected)} cases in {time.perf_counter() - t0:.0f} s")
    if not a.no_save:
        import triton
        path = Path(a.json) if a.json else RESULTS
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = dict(target="sm_90a (H100/H200)", sms=SMS, smem_per_block=SMEM_PER_BLOCK, triton=triton.__version__,
                   rows=rows)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
