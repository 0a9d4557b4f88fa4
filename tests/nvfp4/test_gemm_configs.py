"""The NVFP4 GEMM's launch shapes (nvfp4.triton.gemm.pick_config): the tuned table fills a 132-SM Hopper
at decode, and the persistent prefill grid holds as many programs per SM as can be resident.

Pure Python: no kernel runs. The registers and shared memory behind the occupancies are measured by
``python -m bench.static`` (see the README's static report)."""
import pytest
import triton

from nemotron.nvfp4.triton import gemm

SMS = gemm.TUNED_SMS
# Super (and Nano) linears, (N, K): in_proj, out_proj, q/o_proj, k/v_proj, shared expert up/down, lm_head,
# fc1/fc2_latent_proj
SUPER = [(18560, 4096), (4096, 8192), (4096, 4096), (256, 4096), (5376, 4096), (4096, 5376), (131072, 4096),
         (1024, 4096), (4096, 1024)]
NANO = [(10304, 2688), (2688, 4096), (4096, 2688), (256, 2688), (3712, 2688), (2688, 3712), (131072, 2688)]
# k/v_proj (256 x 4096) at the 64-row bucket: its weights give at most 256 CTAs of a 32-wide wgmma tile
# (a 16-wide one doubles the instructions per weight), 1.94 per SM
BELOW_TWO_PER_SM = {(256, 4096, 64): 256, (256, 2688, 64): 168}


@pytest.mark.parametrize("n,k", SUPER + NANO)
@pytest.mark.parametrize("m", [1, 16, 32, 64])
def test_decode_fills_the_gpu(n, k, m):
    cfg = gemm.pick_config(m, n, k, SMS)
    max_m = gemm._bucket(m)[0]
    assert (n, k, max_m) in gemm.TUNED, "every Nemotron linear has a tuned decode shape"
    ctas = cfg.programs * cfg.split
    assert cfg.programs == triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), "one program per output tile"
    expected = BELOW_TWO_PER_SM.get((n, k, max_m))
    if expected is None:
        assert ctas >= 2 * SMS, f"{ctas} CTAs for [{m}, {k}] x [{n}, {k}]"
    else:
        assert ctas == expected
    steps = triton.cdiv(k, cfg.bk)
    per = triton.cdiv(steps, cfg.split)
    assert (cfg.split - 1) * per < steps, "no split is empty"


@pytest.mark.parametrize("n,k", SUPER + NANO)
def test_17_to_32_rows_use_wgmma_tiles_unless_16_wide(n, k):
    # a 64-row wgmma tile expands a weight for fewer instructions than 32-row mma.sync ones at BN >= 32
    # (static sm_90, BN 64: 4.92 vs 6.55 per weight); 16-wide tiles (k/v_proj) keep mma.sync
    for m in (17, 32):
        cfg = gemm.pick_config(m, n, k, SMS)
        assert cfg.bm == (64 if cfg.bn >= gemm.WGMMA_MIN_BN else 32), (m, cfg)
        assert cfg.warps == (4 if cfg.bm == 64 else max(1, 4 * cfg.bn // 64))


@pytest.mark.parametrize("n,k", SUPER)
def test_tuned_in_proj_tail_and_balance(n, k):
    # the per-SM share of CTAs within 10% of the mean (in_proj was 290 tiles over 264 programs)
    cfg = gemm.pick_config(1, n, k, SMS)
    ctas = cfg.programs * cfg.split
    if (n, k) != (256, 4096):
        assert gemm._imbalance(ctas, SMS) <= 1.1, (cfg, ctas)


@pytest.mark.parametrize("m", [256, 8192, 65536])
@pytest.mark.parametrize("n,k", SUPER)
def test_prefill_grid_is_the_occupancy(m, n, k):
    occ = gemm._bucket(m)[-1]
    cfg = gemm.pick_config(m, n, k, SMS)
    tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
    assert cfg.split == 1 and cfg.programs == min(tiles, occ * SMS)


@pytest.mark.parametrize("n,k", SUPER)
def test_mid_rows_narrow_tiles_when_few(n, k):
    # 65..512 rows: 128-wide tiles, or 64-wide ones where those give fewer than 2 per SM
    cfg = gemm.pick_config(256, n, k, SMS)
    wide = triton.cdiv(256, cfg.bm) * triton.cdiv(n, 128)
    assert cfg.bn == (128 if wide >= 2 * SMS else gemm.NARROW_BN)


def test_untuned_shapes_and_other_gpus():
    # shapes outside the table, and GPUs of another SM count, derive their decode shape from the same rule
    for sms in (78, 114, 132):
        cfg = gemm.pick_config(1, 3000, 2048, sms)
        assert cfg.programs * cfg.split >= 2 * sms
    cfg = gemm.pick_config(1, 18560, 4096, 114)
    assert cfg.programs * cfg.split >= 2 * 114
    tiny = gemm.pick_config(1, 16, 16, 132)       # nothing to split: one program, the most CTAs there are
    assert (tiny.split, tiny.programs) == (1, 1)
