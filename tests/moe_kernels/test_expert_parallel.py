"""Expert parallelism over gloo on CPU: 2 and 4 spawned ranks (loopback, bounded time) equal the
single-process layer exactly, including ranks that receive no tokens, with the exact exchange and
with the fixed-capacity one; latent dispatch moves l/H of the bytes of full-width dispatch."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemotron import dispatch
from nemotron.model import distributed
from nemotron.moe_kernels import LatentMoE

from ..close import assert_close, assert_equal
from ..ports import free_port, publish

H, L, E, K = 64, 16, 8, 3
TIMEOUT_S = 120


def _layer(latent, ep_group=None, skew=False):
    torch.manual_seed(0)
    m = LatentMoE(H, num_experts=E, top_k=K, intermediate_size=32, shared_intermediate_size=48, latent_size=latent,
                  scaling_factor=2.5, ep_group=ep_group)
    full = LatentMoE(H, num_experts=E, top_k=K, intermediate_size=32, shared_intermediate_size=48, latent_size=latent,
                     scaling_factor=2.5)
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(v.shape, generator=g) / v.shape[-1] ** 0.5 for k, v in full.state_dict().items()}
    sd["gate.e_score_correction_bias"] = torch.zeros(E)
    if skew:                     # every token prefers experts 0..K-1
        sd["gate.e_score_correction_bias"][:K] = 10.0
    m.load_state_dict(sd, strict=True)
    full.load_state_dict(sd, strict=True)
    return m, full


def _tokens(rank):
    # rank 1 has no tokens at all; the others a different count each
    n = 0 if rank == 1 else 5 + 3 * rank
    return torch.randn(n, H, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.group.WORLD
        result = {}
        for skew in (False, True):
            for latent in (L, None):
                ep, full = _layer(latent, group, skew)
                assert ep.experts.num_experts == E // world and ep.experts.first == rank * E // world
                x = _tokens(rank)
                with torch.no_grad():
                    got, want = ep(x), full(x)
                assert_equal(got, want, what=f"rank {rank} skew={skew} latent={latent}")
                result[(skew, latent)] = dict(ep.comm_bytes)
        # fixed-capacity ("padded") exchange: every rank the same token count, no split sizes; on the
        # plain-torch paths the real rows are multiplied per source rank as in the exact exchange
        for latent in (L, None):
            ep, full = _layer(latent, group)
            ep.ep_dispatch = "padded"
            x = torch.randn(6, H, generator=torch.Generator().manual_seed(200 + rank))
            with torch.no_grad():
                got, want = ep(x), full(x)
            assert_equal(got, want, what=f"rank {rank} padded latent={latent}")
            cap = 6 * min(K, E // world)
            assert ep.comm_bytes["dispatch"] == (world - 1) * cap * (latent or H) * 4, ep.comm_bytes
            assert ep.comm_bytes["combine"] == (world - 1) * cap * (latent or H) * 4, ep.comm_bytes
            result.setdefault("padded", []).append(latent)
            if latent is None:
                continue
            with torch.no_grad(), dispatch.use("triton"):
                got = ep(x)
            # interpreted Triton: one call over all W * C rows (padding as expert 0, weight 0); numpy's
            # BLAS sums in an order set by the tile's row count, and an output element that cancels
            # (routed + shared) keeps the rounding of its summands: atol at fp32 level of the output scale
            assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()),
                         what=f"rank {rank} padded triton latent={latent}")
        # replicated tokens (the model's mode): every rank the same T tokens, each routes its share
        # ceil(T / W) and gathers the others'; T below W leaves ranks without a share
        for t, mode in ((7, "exact"), (1, "exact"), (5, "padded"), (1, "padded")):
            ep, full = _layer(L, group)
            ep.ep_tokens, ep.ep_dispatch = "replicated", mode
            x = torch.randn(t, H, generator=torch.Generator().manual_seed(300 + t))     # the same on every rank
            with torch.no_grad():
                got, want = ep(x), full(x)
            assert_equal(got, want, what=f"rank {rank} replicated T={t} {mode}")
            share = -(-t // world)
            assert ep.comm_bytes["gather"] == (world - 1) * share * L * 4, ep.comm_bytes
            result.setdefault("replicated", []).append((t, mode))
        # the Triton grouped GEMM (interpreted here) too: rows batched differently, same slot values
        ep, full = _layer(L, group)
        x = _tokens(rank)
        with torch.no_grad(), dispatch.use("triton"):
            got, want = ep(x), full(x)
        if dispatch.interpreting():
            # the interpreter's tl.dot is numpy's BLAS, whose summation order follows the tile's row
            # count (the launch config depends on T): fp32 rounding-level differences only
            assert_close(got, want, rtol=1e-5, atol=1e-6, what=f"rank {rank} triton (interpreted)")
        else:
            assert_equal(got, want, what=f"rank {rank} triton")
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    # the exit code is checked: end as the CLI does (a plain return can abort in gloo's teardown)
    distributed.exit_rank(dist.group.WORLD)


def _run(world, tmp_path):
    ctx = mp.start_processes(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"expert-parallel ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(world, tmp_path):
    results = _run(world, tmp_path)
    for rank, res in enumerate(results):
        latent, full = res[(False, L)], res[(False, None)]
        assert res["padded"] == [L, None] and len(res["replicated"]) == 4
        # the same routing (the router sees the full width either way) sends the same rows:
        # latent dispatch moves exactly l/H of the full-width bytes
        assert full["dispatch"] * L == latent["dispatch"] * H
        if rank != 1:
            assert latent["dispatch"] > 0
        # skewed routing: every token picks experts 0..K-1, so ranks owning none of them receive no
        # rows (and send nothing back), and rank 0 sends nothing away when it owns all K
        skewed, local = res[(True, L)], E // world
        if rank * local >= K:
            assert skewed["combine"] == 0
        if rank == 0 and K <= local:
            assert skewed["dispatch"] == 0


def _stuck_peer_worker(rank, world, port, out_dir):
    """Rank 1 fails before the MoE forward but stays alive (the case that waits for the group's
    timeout); rank 0 must fail within its ep_timeout and name rank 1."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        if rank == 1:
            time.sleep(20)
            return
        ep, _ = _layer(L, dist.group.WORLD)
        ep.ep_timeout = 3.0
        t0 = time.monotonic()
        try:
            with torch.no_grad():
                ep(_tokens(rank))
            msg = "no error"
        except RuntimeError as err:
            msg = str(err)
        publish(os.path.join(out_dir, "rank0.txt"), lambda f: f.write(f"{time.monotonic() - t0:.1f}\n{msg}".encode()))
    finally:
        if rank == 0:
            os._exit(0)          # do not wait for the stuck peer in destroy_process_group
        dist.destroy_process_group()


def test_a_stuck_peer_is_named_within_the_timeout(tmp_path):
    ctx = mp.start_processes(_stuck_peer_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not (tmp_path / "rank0.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    for p in ctx.processes:
        p.kill()
    elapsed, msg = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert "rank 0 of 2" in msg and "peer rank(s) [1]" in msg and "ep_timeout" in msg, msg
    assert float(elapsed) < 15, f"rank 0 waited {elapsed} s for a 3 s ep_timeout"
