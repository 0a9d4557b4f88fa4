"""The whole model under expert parallelism over gloo (spawned ranks, loopback, bounded time): 2 and 4
ranks give the single-process logits and tokens bit for bit (prefill, decode, MTP, greedy and
seeded sampling); each rank holds the dense part plus exactly E / W experts per MoE layer; a saved
sharded checkpoint is read partially (the tensors each rank opened are counted); a different
checkpoint on one rank, an uneven world size and a failing peer raise clear errors in bounded time."""
import datetime
import json
import os
import shutil
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemotron.model import NemotronHConfig, NemotronHForCausalLM, checkpoint, distributed

from ..ports import free_port, publish

TIMEOUT_S = 150          # the whole spawned run, a hang guard (each rank's own waits are bounded far below)
EP_TIMEOUT_S = 3.0       # the failing-peer test's ep_timeout


def _config():
    return NemotronHConfig.preset("tiny")        # 8 experts top-3, latent 32 of 64, 3 MoE layers + an MTP MoE


def _scaled(model):
    """Unit-scale weights (an elementwise function of each tensor, so a rank's expert slice scales as
    the full stack does): every layer and routing decision then matters."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(1 / (0.02 * p.shape[-1] ** 0.5))
    return model


def _models(world_group):
    cfg = _config()
    full = _scaled(NemotronHForCausalLM.random(cfg, seed=3))
    ep = _scaled(NemotronHForCausalLM.random(cfg, seed=3, ep_group=world_group))
    return cfg, full, ep


def _init(rank, world, port):
    torch.set_num_threads(1)           # the same kernels (and summation orders) as the single-process run
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _equal(a, b, what):
    assert a.shape == b.shape and torch.equal(a, b), (
        f"{what}: {(a != b).sum().item() if a.shape == b.shape else 'shape'} mismatches, "
        f"max |diff| {(a.float() - b.float()).abs().max().item() if a.shape == b.shape else ''}")


def _forward_checks(cfg, full, ep, res):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, cfg.vocab_size, (2, 12), generator=g)
    with torch.no_grad():
        _equal(ep(ids), full(ids), "prefill logits")
        caches = [m.new_cache(2, 32) for m in (full, ep)]
        outs = [m(ids[:, :8], cache=c) for m, c in zip((full, ep), caches)]
        _equal(outs[1], outs[0], "prefill logits with a cache")
        steps = []
        for t in range(8, 12):
            outs = [m(ids[:, t:t + 1], cache=c) for m, c in zip((full, ep), caches)]
            _equal(outs[1], outs[0], f"decode logits at position {t}")
            steps.append(distributed.comm_bytes(ep))
        res["decode_comm"] = steps
        # the fixed-capacity exchange ("auto" picks it for CUDA decode): the same logits
        for m in ep.modules():
            if hasattr(m, "ep_dispatch"):
                assert m.ep_dispatch == "auto" and not m.padded_dispatch(1, ids.device)    # CPU: exact
                m.ep_dispatch = "padded"
        outs = [m(ids[:, 11:12], cache=c) for m, c in zip((full, ep), caches)]
        _equal(outs[1], outs[0], "decode logits with the padded exchange")
        for m in ep.modules():
            if hasattr(m, "ep_dispatch"):
                m.ep_dispatch = "auto"
        hs = [m.hidden_states(ids) for m in (full, ep)]
        mtps = [m.mtp_step(ids[:, 1:], h[:, :-1])[1] for m, h in zip((full, ep), hs)]
        _equal(mtps[1], mtps[0], "MTP logits")
        prompt = ids[:1, :6]
        for k in (0, 2):
            want, got = (m.generate(prompt, max_new_tokens=10, mtp_draft_tokens=k) for m in (full, ep))
            _equal(got, want, f"greedy tokens with {k} MTP drafts")
        # sampling: the same seeded generator on every rank draws the same numbers
        want, got = (m.generate(prompt, max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(5))
                     for m in (full, ep))
        _equal(got, want, "sampled tokens")


def _worker(rank, world, port, out_dir):
    _init(rank, world, port)
    try:
        group = dist.group.WORLD
        res = {}
        cfg, full, ep = _models(group)
        _forward_checks(cfg, full, ep, res)
        res["bytes_full"], res["bytes_ep"] = distributed.param_bytes(full), distributed.param_bytes(ep)
        res["held"] = {n: (m.first, m.num_experts) for n, m in ep.named_modules() if type(m).__name__ == "MoEExperts"}

        # save under expert parallelism (rank 0 writes every rank's experts), then read it back partially
        ckpt = os.path.join(out_dir, "ckpt")
        ep.save_pretrained(ckpt)
        opened = []
        real = checkpoint._get_tensor

        def counting(handle, name, rows):
            opened.append((name, rows))
            return real(handle, name, rows)
        checkpoint._get_tensor = counting
        try:
            back = NemotronHForCausalLM.from_pretrained(ckpt, ep_group=group)
        finally:
            checkpoint._get_tensor = real
        res["opened"] = opened
        ids = torch.randint(3, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            _equal(back(ids), full(ids), "logits of the reloaded expert-parallel model")
        if rank == 0:              # the written checkpoint is the single-process model's, whole
            one = NemotronHForCausalLM.from_pretrained(ckpt)
            sd_full = full.state_dict()
            for k, v in one.state_dict().items():
                _equal(v, sd_full[k], f"saved tensor {k}")

        if world == 2:             # NVFP4 experts: built, saved (codes and scales travel as bytes), reloaded
            q_full = NemotronHForCausalLM.random(cfg, seed=4, recipe="nvfp4-experts")
            q_ep = NemotronHForCausalLM.random(cfg, seed=4, recipe="nvfp4-experts", ep_group=group)
            with torch.no_grad():
                _equal(q_ep(ids), q_full(ids), "NVFP4-expert logits")
            q_dir = os.path.join(out_dir, "q")
            q_ep.save_pretrained(q_dir, max_shard_bytes=20000)
            back = NemotronHForCausalLM.from_pretrained(q_dir, ep_group=group)
            with torch.no_grad():
                _equal(back(ids), q_full(ids), "logits of the reloaded NVFP4 expert-parallel model")
            if rank == 0:
                sd_full = q_full.state_dict()
                one = NemotronHForCausalLM.from_pretrained(q_dir).state_dict()
                assert one.keys() == sd_full.keys()
                for k, v in one.items():
                    _equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
                           sd_full[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else sd_full[k],
                           f"saved NVFP4 tensor {k}")
            res["nvfp4"] = True

        # a rank reading a different checkpoint is refused on every rank, naming it
        other = os.path.join(out_dir, f"other{rank}")
        shutil.copytree(ckpt, other)
        if rank == world - 1:
            with open(os.path.join(other, "config.json")) as f:
                c = json.load(f)
            c["layer_norm_epsilon"] = 1e-6
            with open(os.path.join(other, "config.json"), "w") as f:
                json.dump(c, f)
        try:
            NemotronHForCausalLM.from_pretrained(other, ep_group=group)
            res["mismatch"] = "no error"
        except ValueError as err:
            res["mismatch"] = str(err)
        publish(os.path.join(out_dir, f"rank{rank}.pt"), lambda f: torch.save(res, f))
    except BaseException:
        dist.destroy_process_group()
        raise
    distributed.exit_rank(dist.group.WORLD)      # a plain return can abort in gloo's teardown (see exit_rank)


def _spawn(fn, world, out_dir, done):
    ctx = mp.start_processes(fn, args=(world, free_port(), str(out_dir)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not done():
            if ctx.join(timeout=0.5) and done():
                break
            if time.monotonic() > deadline:
                pytest.fail(f"expert-parallel ranks did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_model_equals_single_process(world, tmp_path):
    files = [tmp_path / f"rank{r}.pt" for r in range(world)]
    _spawn(_worker, world, tmp_path, lambda: all(f.exists() for f in files))
    results = [torch.load(f, weights_only=False) for f in files]
    cfg = _config()
    e, local = cfg.n_routed_experts, cfg.n_routed_experts // world
    with open(tmp_path / "ckpt" / checkpoint.INDEX) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) == world          # rank 0's tensors, then one shard per other rank
    expert_key = distributed._EXPERT_KEY
    assert all(sum(r["decode_comm"][i]["dispatch"] for r in results) > 0 for i in range(4))
    for rank, res in enumerate(results):
        # MoE layers 1, 3, 6 of "ME*EM-E" and the MTP block's: each holds its rank's E / W experts
        assert sorted(res["held"]) == sorted([f"backbone.layers.{i}.mixer.experts" for i in (1, 3, 6)]
                                             + ["mtp.layers.1.mixer.experts"])
        assert all(v == (rank * local, local) for v in res["held"].values()), res["held"]
        full, mine = res["bytes_full"], res["bytes_ep"]
        assert mine["dense"] == full["dense"] and full["experts"] % world == 0
        assert mine["experts"] == full["experts"] // world, (mine, full)
        # each decode step (2 tokens) moves whole latent rows (l = 32 floats), and each of the 3 MoE
        # layers gathers this rank's share, ceil(2 / W) combined latent rows, to the W - 1 others
        for step in res["decode_comm"]:
            assert step["dispatch"] % (cfg.moe_latent_size * 4) == 0, step
            assert step["gather"] == 3 * (world - 1) * -(-2 // world) * cfg.moe_latent_size * 4, step
        # the partial read: every dense tensor and exactly this rank's experts, nothing else
        names = [n for n, _ in res["opened"]]
        assert len(names) == len(set(names))
        own = {k for k in weight_map if (m := expert_key.fullmatch(k)) and rank * local <= int(m["e"]) < (rank + 1) * local}
        dense = {k for k in weight_map if not expert_key.fullmatch(k)}
        assert set(names) == own | dense, sorted(set(names) ^ (own | dense))[:5]
        assert len(own) == len(weight_map) - len(dense) - (e - local) * len(res["held"]) * 2
        assert res.get("nvfp4") == (True if world == 2 else None)
        msg = res["mismatch"]
        assert f"rank(s) [{world - 1}] of {world}" in msg and "same checkpoint" in msg, msg


class _Group:
    """A stand-in for a process group of ``world`` ranks (the checks run before any collective)."""

    def __init__(self, world):
        self.world = world

    def size(self):
        return self.world

    def rank(self):
        return 0


def test_a_world_size_that_does_not_divide_the_experts_is_refused(tmp_path):
    cfg = _config()
    with pytest.raises(ValueError, match="8 routed experts per MoE layer do not divide evenly over a world size of 3"):
        NemotronHForCausalLM.random(cfg, ep_group=_Group(3))
    NemotronHForCausalLM.random(cfg).save_pretrained(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="world size of 5"):
        NemotronHForCausalLM.from_pretrained(str(tmp_path / "m"), ep_group=_Group(5))
    with pytest.raises(TypeError, match="ep_group: expected a torch.distributed ProcessGroup"):
        NemotronHForCausalLM.random(cfg, ep_group=2)


def _failing_worker(rank, world, port, out_dir):
    """Rank 1 raises in its third forward (mid-generation) and stays alive, as a caught error would
    leave it; rank 0 must fail within its ep_timeout, naming rank 1."""
    _init(rank, world, port)
    try:
        cfg = _config()
        model = _scaled(NemotronHForCausalLM.random(cfg, seed=3, ep_group=dist.group.WORLD, ep_timeout=EP_TIMEOUT_S))
        calls = [0]

        def boom(module, args):
            calls[0] += 1
            if rank == 1 and calls[0] == 3:
                raise RuntimeError("injected failure on rank 1")
        model.backbone.embeddings.register_forward_pre_hook(boom)
        t0 = time.monotonic()
        try:
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8)
            msg = "no error"
        except RuntimeError as err:
            msg = str(err)
        publish(os.path.join(out_dir, f"rank{rank}.txt"), lambda f: f.write(f"{time.monotonic() - t0:.1f}\n{msg}".encode()))
        if rank == 1:
            time.sleep(30)
    finally:
        os._exit(0)               # never wait for a failed peer in destroy_process_group


def test_a_failing_peer_does_not_hang_the_others(tmp_path):
    files = [tmp_path / f"rank{r}.txt" for r in range(2)]
    _spawn(_failing_worker, 2, tmp_path, lambda: all(f.exists() for f in files))
    elapsed, msg = files[0].read_text().split("\n", 1)
    assert "injected" in files[1].read_text()
    assert "rank 0 of 2" in msg and "peer rank(s) [1]" in msg and "ep_timeout" in msg, msg
    assert float(elapsed) < EP_TIMEOUT_S + 10, f"rank 0 waited {elapsed} s for a {EP_TIMEOUT_S} s ep_timeout"


class _Rank(_Group):
    def __init__(self, world, rank):
        super().__init__(world)
        self.r = rank

    def rank(self):
        return self.r


def test_a_rank_reads_only_its_rows_of_hf_stacked_experts(tmp_path):
    """HF's in-memory layout (``experts.up_proj [E, I, l]``): a rank reads only its rows (a slice of
    the stored tensor) and holds exactly the single-process model's rows (no collective involved)."""
    from safetensors.torch import save_file
    cfg = _config()
    full = NemotronHForCausalLM.random(cfg, seed=1)
    sd = {}
    for k, v in full.state_dict().items():
        m = distributed._EXPERT_KEY.fullmatch(k)
        if m is None:
            sd[k] = v.contiguous()
    for name, mod in full.named_modules():
        if type(mod).__name__ == "MoEExperts":
            sd[f"{name}.up_proj"], sd[f"{name}.down_proj"] = mod.up_proj.detach(), mod.down_proj.detach()
    os.makedirs(tmp_path / "m")
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    full.config.save_pretrained(str(tmp_path / "m"))
    world, rank, local = 4, 2, cfg.n_routed_experts // 4
    ep = checkpoint._skeleton(NemotronHForCausalLM, cfg, torch.device("cpu"), torch.float32, _Rank(world, rank))
    rows = []
    real = checkpoint._get_tensor

    def counting(handle, name, sl):
        t = real(handle, name, sl)
        rows.append((name, tuple(t.shape)))
        return t
    checkpoint._get_tensor = counting
    try:
        tensors = checkpoint._read_tensors(str(tmp_path / "m"), False, distributed.expert_selector(ep))
    finally:
        checkpoint._get_tensor = real
    stacked = [(n, s) for n, s in rows if distributed._STACKED_KEY.fullmatch(n)]
    assert len(stacked) == 8 and all(s[0] == local for _, s in stacked), stacked
    checkpoint._load(ep, tensors, "test")
    for name, mod in ep.named_modules():
        if type(mod).__name__ == "MoEExperts":
            want = full.get_submodule(name)
            assert mod.first == rank * local
            assert torch.equal(mod.up_proj, want.up_proj[rank * local:(rank + 1) * local])
            assert torch.equal(mod.down_proj, want.down_proj[rank * local:(rank + 1) * local])


def test_cli_generate_under_torchrun_prints_on_rank_0_only(tmp_path):
    """``torchrun --nproc-per-node 2 -m nemotron generate --ep``: the single-process tokens, printed once."""
    import subprocess
    import sys
    model = _scaled(NemotronHForCausalLM.random(_config(), seed=3))
    model.save_pretrained(str(tmp_path / "m"))
    want = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6)[0, 3:].tolist()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "nemotron", "generate", "--model", str(tmp_path / "m"), "--ids", "5,6,7", "--max-new-tokens", "6",
           "--ep", "--ep-timeout", "30"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if "," in ln and "loading" not in ln]
    assert lines == [",".join(map(str, want))], out.stdout
    assert out.stdout.count("rank 0 of 2: parameters") == 1 and "rank 1" not in out.stdout


def test_cli_ep_outside_torchrun_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from nemotron.__main__ import main
    NemotronHForCausalLM.random(_config()).save_pretrained(str(tmp_path / "m"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "--model", str(tmp_path / "m"), "--ids", "1,2", "--ep"]) == 2
    assert "--ep: launch under torchrun" in capsys.readouterr().err


_EXIT_SCRIPT = """
import sys, time
from nemotron.model import distributed
group, _ = distributed.init_from_env(timeout_s=120)
print("done on rank", group.rank(), end="")          # no newline: only a flush writes it
if group.rank() == 1 and sys.argv[1] == "stuck":
    time.sleep(60)
distributed.exit_rank(group, int(sys.argv[3]), timeout_s=float(sys.argv[2]))
print("after exit_rank")
"""


def _ranks(mode: str, timeout_s: float, code: int):
    import subprocess
    import sys
    port = free_port()
    return [subprocess.Popen([sys.executable, "-c", _EXIT_SCRIPT, mode, str(timeout_s), str(code)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]


def test_exit_rank_flushes_and_exits_with_the_code_on_every_rank():
    procs = _ranks("together", 30, 3)
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 3, err[-2000:]
        assert out == f"done on rank {r}", out


def test_exit_rank_fails_naming_a_peer_that_never_arrives():
    procs = _ranks("stuck", EP_TIMEOUT_S, 0)      # a rank that succeeded, then found its peer missing
    try:
        t0 = time.monotonic()
        out, err = procs[0].communicate(timeout=TIMEOUT_S)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err[-2000:]
    assert out == "done on rank 0"
    assert "final barrier" in err and "peer rank(s) [1]" in err and "rank 0 of 2" in err, err[-2000:]
    assert elapsed < 30, f"rank 0 waited {elapsed:.0f} s for a {EP_TIMEOUT_S} s timeout"
