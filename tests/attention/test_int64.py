"""int64 address arithmetic of the decode attention kernels: batch row 2 of the KV cache (and of q) starts
past element 2^31 - 1.

Each input gets a dim-0 stride S < 2^31 (Triton passes it as a 32-bit integer) with 2 * S > 2^31 - 1, in an
untouched allocation of about 2^32 elements (address space only, a few pages written) starting at element
2^31, so a wrapped 32-bit offset lands inside the allocation, reading other values, instead of faulting.
The result on the wide views must equal the result on contiguous copies bit for bit."""
import math

import pytest
import torch

from nemotron.attention.triton import decode as kernels

from ..close import assert_equal

WRAP = 2 ** 31
STRIDE = WRAP // 2 + 64
B = 3


def _wide(t: torch.Tensor, device) -> torch.Tensor:
    inner = torch.empty(t.shape[1:]).stride()
    span = (B - 1) * STRIDE + math.prod(t.shape[1:])
    buf = torch.empty(WRAP + span, dtype=t.dtype, device=device)
    v = buf.as_strided(t.shape, (STRIDE, *inner), WRAP)
    v.copy_(t)
    assert v.stride(0) * (B - 1) > WRAP - 1 > v.stride(0)
    return v


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_decode_attention_rows_past_2_31(kernel_device, kv_dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 2, 4, 16, generator=g).to(torch.bfloat16)
    kc, vc = (torch.randn(B, 2, 24, 16, generator=g).to(kv_dtype) for _ in range(2))
    lengths = torch.tensor([24, 5, 19], dtype=torch.int32, device=kernel_device)
    scales = {}
    if kv_dtype == torch.float8_e4m3fn:
        scales = dict(k_scale=torch.tensor([0.5], device=kernel_device), v_scale=torch.tensor([2.0], device=kernel_device))
    outs = [kernels.decode_attention(move(q), move(kc), move(vc), lengths, scale=0.25, splits=2, block_n=16, **scales)
            for move in (lambda t: _wide(t, kernel_device), lambda t: t.to(kernel_device))]
    assert_equal(outs[0], outs[1], what=f"decode attention on rows past 2^31 ({kv_dtype})")
    assert outs[1][2].abs().sum() > 0
