"""Hypothesis strategies shared by the tests: shapes, dtypes, seeds and NVFP4-hostile tensors."""
import torch
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(FLOAT_DTYPES)
# rows not powers of two; K a multiple of 16 only (16 x 1..13 blocks)
rows = st.integers(1, 70)
ks = st.integers(1, 13).map(lambda b: 16 * b)


@st.composite
def nvfp4_inputs(draw, *, min_dim=1):
    """(x, description): a tensor [.., R, K] whose magnitudes span many binades, with zero blocks,
    tiny blocks and an outlier, drawn from a seed so any failure reproduces."""
    dtype = draw(dtypes)
    lead = draw(st.sampled_from([(), (2,)] if min_dim >= 2 else [None, (), (3,), (2, 2)]))
    r, k, seed = draw(rows), draw(ks), draw(seeds)
    spread = draw(st.sampled_from([0.0, 4.0, 12.0]))           # binades of per-element scale
    shape = (k,) if lead is None else (*lead, r, k)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(spread * (2 * torch.rand(shape, generator=g) - 1))
    flat = x.view(-1, k // 16, 16)
    if draw(st.booleans()):                                    # an all-zero block
        flat[torch.randint(flat.shape[0], (1,), generator=g), torch.randint(k // 16, (1,), generator=g)] = 0
    if draw(st.booleans()):                                    # a block far below the rest (E4M3 subnormal scales)
        flat[0, 0] *= 2.0 ** -draw(st.integers(6, 20))
    if draw(st.booleans()):                                    # an outlier sets the global amax
        flat.view(-1)[torch.randint(flat.numel(), (1,), generator=g)] *= 2.0 ** draw(st.integers(1, 10))
    x = x * 2.0 ** draw(st.integers(-20, 20))                  # overall magnitude
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    return x.to(dtype), dict(dtype=dtype, shape=shape, seed=seed, spread=spread)
