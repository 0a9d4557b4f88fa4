"""Expert parallelism over gloo on CPU: 2 and 4 spawned ranks (loopback, bounded time) equal the
single-process layer exactly, including ranks that receive no tokens; latent dispatch moves l/H of
the bytes of full-width dispatch."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemotron.moe_kernels import LatentMoE

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
                assert torch.equal(got, want), f"rank {rank} skew={skew} latent={latent}: max diff {(got - want).abs().max()}"
                result[(skew, latent)] = dict(ep.comm_bytes)
        # the Triton grouped GEMM (interpreted here) too: rows batched differently, same slot values
        os.environ["NEMOTRON_KERNELS"] = "triton"
        ep, full = _layer(L, group)
        x = _tokens(rank)
        with torch.no_grad():
            got, want = ep(x), full(x)
        assert torch.equal(got, want), f"rank {rank} triton: max diff {(got - want).abs().max()}"
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world, tmp_path):
    ctx = mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False,
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
