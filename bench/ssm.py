"""Mamba-2 kernels against the torch references, Inductor, and mamba_ssm / fla-core when importable.

SSD traffic model (compulsory, one pass): x, z-less y (2 x B*T*H*P), dt (B*T*H), B and C
(2 x B*T*G*N), in the input dtype; work ~ 2*T*H*(Q*(N + P) + 2*N*P) FLOPs per sequence
(../shared/notes/ssd_kernels.md §4). Decode (state update): the fp32 state is read and written once.
"""
from __future__ import annotations

import torch

from nemotron.ssm_kernels import reference as ref
from nemotron.ssm_kernels.triton import state_update as ssu_kernels
from nemotron.ssm_kernels.triton import ssd as ssd_kernels

from .harness import BenchOp

# (batch, T, H, P, G, N, chunk)
SUPER = dict(h=128, p=64, g=8, n=128, q=128)
SSD_SHAPES = {
    "nemotron": [(b, t, *SUPER.values()) for t in (4096, 16384, 65536, 262144) for b in (1, 8) if b * t <= 262144],
    "smoke": [(1, 64, 4, 16, 2, 16, 32)],
}


def _ssd_inputs(shape, device, seed):
    b, t, h, p, g, n, q = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return (r(b, t, h, p).to(dtype), r(b, t, h).to(dtype), -torch.exp(r(h)), r(b, t, g, n).to(dtype),
            r(b, t, g, n).to(dtype), r(h), r(h), q)


def _ssd_impls() -> dict:
    def ours(x, dt, A, B, C, D, dtb, q):
        return ssd_kernels.ssd_scan(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=dtb, dt_softplus=True)

    def torch_ref(x, dt, A, B, C, D, dtb, q):
        return ref.ssd_chunked(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=dtb, dt_softplus=True)[0]

    compiled = torch.compile(ref.ssd_chunked, dynamic=False)
    impls = {"triton": ours, "torch": torch_ref,
             "inductor": lambda x, dt, A, B, C, D, dtb, q: compiled(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=dtb,
                                                                     dt_softplus=True)[0]}
    try:  # the upstream pure-Triton path, when the package is importable
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        impls["mamba_ssm"] = lambda x, dt, A, B, C, D, dtb, q: mamba_chunk_scan_combined(
            x, dt, A, B, C, q, D=D, dt_bias=dtb, dt_softplus=True)
    except ImportError:
        pass
    return impls


def _ssd_verify(args, outs):
    x, dt, A, B, C, D, dtb, q = args
    sl = slice(0, min(x.shape[1], 1024))            # the fp32 reference on the first tokens
    want, _ = ref.ssd_chunked(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], chunk_size=q, D=D, dt_bias=dtb,
                              dt_softplus=True)
    tol = 1e-4 if x.dtype == torch.float32 else 5e-2   # the tests' tolerances (tests/ssm_kernels)
    differ = []
    for name, y in outs.items():
        err = ((y[:, sl].double() - want.double()).abs().max() / want.double().pow(2).mean().sqrt()).item()
        if err > tol:
            if name == "triton":
                raise AssertionError(f"triton: relative error {err:.3g} > {tol}; not timing a wrong kernel")
            differ.append(name)
    return differ


def _ssd_bytes(s):
    b, t, h, p, g, n, q = s
    return 2 * (2 * b * t * h * p + b * t * h + 2 * b * t * g * n)


def _ssd_flops(s):
    b, t, h, p, g, n, q = s
    return 2 * b * t * h * (q * (n + p) + 2 * n * p)


# (batch, H, P, N, G): decode of Super's mixer
SSU_SHAPES = {"nemotron": [(b, 128, 64, 128, 8) for b in (1, 8, 64, 256)], "smoke": [(2, 4, 16, 16, 2)]}


def _ssu_inputs(shape, device, seed):
    b, h, p, n, g = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return (r(b, h, p, n), r(b, h, p).to(dtype), r(b, h).to(dtype), -torch.exp(r(h)), r(b, g, n).to(dtype),
            r(b, g, n).to(dtype), r(h), r(h))


def _ssu_impls() -> dict:
    def ours(s, x, dt, A, B, C, D, dtb):
        return ssu_kernels.selective_state_update(s, x, dt, A, B, C, D=D, dt_bias=dtb, dt_softplus=True)

    def torch_ref(s, x, dt, A, B, C, D, dtb):
        return ref.selective_state_update_reference(s, x, dt, A, B, C, D=D, dt_bias=dtb, dt_softplus=True,
                                                    dtype=torch.float32)[0]
    return {"triton": ours, "torch": torch_ref}


def ops() -> dict:
    ssd = BenchOp(name="ssd_scan", shapes=SSD_SHAPES, make_inputs=_ssd_inputs, impls=_ssd_impls(),
                  peers=("torch", "inductor", "mamba_ssm"), bytes=_ssd_bytes, flops=_ssd_flops, verify=_ssd_verify)
    ssu = BenchOp(name="selective_state_update", shapes=SSU_SHAPES, make_inputs=_ssu_inputs, impls=_ssu_impls(),
                  peers=("torch",), bytes=lambda s: 2 * 4 * s[0] * s[1] * s[2] * s[3])
    return {ssd.name: ssd, ssu.name: ssu}
