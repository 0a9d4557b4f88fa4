"""Every Triton kernel compiles for Hopper (sm_90) on this CPU machine.

The interpreter runs kernels as Python and so misses what only the compiler rejects (a non-constexpr
global, a layout the backend cannot lower). Triton's compiler and ptxas need no GPU, so a subprocess
without the interpreter compiles each kernel to a cubin for sm_90 with representative constexprs.
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "0"
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import nemotron  # noqa: F401
    from nemotron.nvfp4.triton import gemm, quantize as q
    from nemotron.ssm_kernels.triton import conv1d, gated_rmsnorm, ssd, state_update
    from nemotron.moe_kernels.triton import grouped_gemm as moe
    from nemotron.nvfp4.triton import norm_quantize as nq
    from nemotron.nvfp4.triton import row_col as rc

    FLOATS = {"dt_lo", "dt_hi", "eps"}

    def compile_one(kernel, constexprs, ptr_types=None):
        ptr_types = ptr_types or {}
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = ptr_types.get(name, "*fp32")
            else:
                sig[name] = "fp32" if name in FLOATS else "i32"
        k = triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
        assert len(k.asm["cubin"]) > 0
        return kernel.fn.__name__

    done = []
    x_bf16 = {"x_ptr": "*bf16", "codes_ptr": "*u8", "scales_ptr": "*u8"}
    done.append(compile_one(q._amax_fwd_kernel, dict(HADAMARD=True, BM=q.BM, NB=q.NB), x_bf16))
    for tile, gs, sr, had in [(1, False, False, False), (16, True, True, True), (1, False, True, True)]:
        done.append(compile_one(q._quantize_fwd_kernel, dict(TILE_M=tile, HAS_GLOBAL_SCALE=gs, STOCHASTIC=sr,
                                                            HADAMARD=had, BM=q.BM, NB=q.NB), x_bf16))
    done.append(compile_one(q._dequantize_fwd_kernel, dict(BM=q.BM, NB=q.NB),
                            {"codes_ptr": "*u8", "scales_ptr": "*u8", "y_ptr": "*bf16"}))
    done.append(compile_one(q._hadamard_fwd_kernel, dict(INVERSE=True, BM=q.BM, NB=q.NB),
                            {"x_ptr": "*bf16", "y_ptr": "*bf16"}))
    fp4 = {"w_ptr": "*u8", "ws_ptr": "*u8", "xs_ptr": "*u8", "out_ptr": "*bf16", "x_ptr": "*bf16", "bias_ptr": "*bf16"}
    for x_fp4, bm, bn, bk, split in [(False, 16, 64, 128, 4), (False, 128, 128, 64, 1), (True, 64, 128, 64, 1)]:
        types = dict(fp4, x_ptr="*u8" if x_fp4 else "*bf16", out_ptr="*fp32" if split > 1 else "*bf16")
        done.append(compile_one(gemm._nvfp4_gemm_fwd_kernel, dict(
            X_FP4=x_fp4, HAS_BIAS=True, IS_SPLIT=split > 1, DOT_DTYPE=tl.bfloat16, IEEE=False, BM=bm, BN=bn, BK=bk,
            GROUP_M=8), types))
    done.append(compile_one(gemm._nvfp4_gemm_fwd_kernel, dict(
        X_FP4=False, HAS_BIAS=False, IS_SPLIT=False, DOT_DTYPE=tl.float32, IEEE=True, BM=64, BN=64, BK=64, GROUP_M=8),
        dict(fp4, x_ptr="*fp32", out_ptr="*fp32")))
    io = {n: "*bf16" for n in ("x_ptr", "b_ptr", "c_ptr", "z_ptr", "y_ptr")}
    io["tab_ptr"] = io["off_ptr"] = "*i64"
    done.append(compile_one(ssd._ssd_cumsum_fwd_kernel, dict(HAS_DTB=True, SOFTPLUS=True, CLAMP_DT=True,
                                                             IS_VARLEN=True, Q=128, BH=8), dict(io, dt_ptr="*bf16")))
    done.append(compile_one(ssd._ssd_chunk_state_fwd_kernel, dict(IS_VARLEN=False, DOT_DTYPE=tl.bfloat16, IEEE=False,
                                                                  Q=128, BK=64, BP=64, BN=128), io))
    done.append(compile_one(ssd._ssd_state_passing_fwd_kernel, dict(HAS_S0=True, STORE_FINAL=True, IS_VARLEN=True,
                                                                    Q=128, BS=256), io))
    for varlen, z in [(False, True), (True, False)]:
        done.append(compile_one(ssd._ssd_chunk_scan_fwd_kernel, dict(
            HAS_D=True, D_PER_P=False, HAS_Z=z, IS_VARLEN=varlen, DOT_DTYPE=tl.bfloat16, IEEE=False, Q=128, BM=64,
            BP=64, BN=128, ONE_N=True), io))
    done.append(compile_one(conv1d._conv1d_fwd_kernel, dict(W=4, HAS_BIAS=True, HAS_S0=True, SILU=True, IS_VARLEN=True,
                                                        BT=32, BD=128),
                            {"x_ptr": "*bf16", "y_ptr": "*bf16", "s0_ptr": "*bf16", "cu_ptr": "*i32"}))
    done.append(compile_one(state_update._state_update_fwd_kernel, dict(HAS_D=True, HAS_Z=True, HAS_DTB=True, SOFTPLUS=True,
                                                              HAS_IDX=True, BP=16, BN=128),
                            {"x_ptr": "*bf16", "y_ptr": "*bf16", "idx_ptr": "*i32"}))
    done.append(compile_one(gated_rmsnorm._gated_rmsnorm_fwd_kernel, dict(BG=1024),
                            {"x_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": "*bf16"}))
    idx = {n: "*i32" for n in ("perm_ptr", "blk_e_ptr", "blk_r_ptr", "offs_ptr")}
    for gather, w_fp4, (_, bm, bn, warps, stages) in [(True, False, moe.CONFIGS[0]), (False, True, moe.CONFIGS[0]),
                                                      (True, True, moe.CONFIGS[2]), (False, False, moe.CONFIGS[1])]:
        types = dict(idx, a_ptr="*bf16", w_ptr="*u8" if w_fp4 else "*bf16", ws_ptr="*u8",
                     out_ptr="*bf16" if gather else "*fp32")
        done.append(compile_one(moe._moe_gemm_fwd_kernel, dict(
            GATHER=gather, SCATTER=not gather, W_FP4=w_fp4, DOT_DTYPE=tl.bfloat16, IEEE=False, BM=bm, BN=bn,
            BK=moe.BK), types))
    nq_types = {"x_ptr": "*bf16", "z_ptr": "*bf16", "w_ptr": "*bf16", "codes_ptr": "*u8", "scales_ptr": "*u8"}
    for has_z, gs, gb, bm in [(False, 4096, 4096, 1), (True, 1024, 1024, 4), (False, 2688, 4096, 1)]:
        done.append(compile_one(nq._norm_quantize_fwd_kernel, dict(HAS_Z=has_z, GS=gs, GB=gb, BM=bm), nq_types))
    rc_types = {"x_ptr": "*bf16", **{n: "*u8" for n in ("row_codes_ptr", "row_scales_ptr", "col_codes_ptr",
                                                         "col_scales_ptr")}}
    done.append(compile_one(rc._row_col_amax_fwd_kernel, dict(HADAMARD=True, BM=rc.BM, BK=rc.BK), rc_types))
    for had, sr in [(True, True), (False, False)]:
        done.append(compile_one(rc._row_col_quantize_fwd_kernel, dict(HADAMARD=had, STOCHASTIC=sr, BM=rc.BM, BK=rc.BK),
                                rc_types))
    print("compiled", len(done), "kernels:", ", ".join(sorted(set(done))))
''')


def test_every_kernel_compiles_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "compiled 28 kernels" in r.stdout, r.stdout
