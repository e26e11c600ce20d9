"""Stochastic rounding of float32 values to bfloat16, with the counter-based dither every backend shares.

NOTE [stochastic rounding]
    A bf16 parameter without an fp32 master loses every update below half its rounding step
    (2⁻⁹ of its value) when rounded to nearest, and PMD-LAMB's updates are η·α of the tensor's
    norm: most round away. Stochastic rounding rounds y up with probability equal to the
    fraction of the bf16 step it has passed, so E[round(y)] = y: the updates survive on average.

    y's float32 bits get a 16-bit dither added, then their low 16 bits dropped. The dither of
    element i (its position in memory: what the kernels see) at step t comes from a hash of
    (seed, t, i) alone, so a step's bits are the same on every backend, for any thread count
    and any chunking, and two runs with one seed agree:

        key(seed, t) = mix32(mix32(seed) ^ t)
        dither(i)    = mix32(mix32(lo32(i) ^ key) ^ hi32(i)) >> 16

    mix32's multipliers are odd and below 2³¹, so the hash is exact in int64 tensor arithmetic
    as well as in uint32. Every tensor of a step shares the key: their dithers differ by index.
    NaN stays NaN; a value rounded past the largest bf16 becomes inf, as it would if it were
    the true sum.
"""

import torch

MASK32 = 0xFFFFFFFF
# mix32's shifts and multipliers; csrc/rounding.h and triton_kernels.py spell the same numbers.
MIX_SHIFTS = (16, 15, 16)
MIX_MULTIPLIERS = (0x7FEB352D, 0x1B873593)
DITHER_BITS = 16  # the bits float32 has beyond bfloat16's mantissa
SEED_LIMIT = 1 << 32
BFLOAT16_QUIET_NAN = 0x7FC0  # what a NaN becomes, as csrc/rounding.h makes it


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash of x (int64 values in [0, 2³²))."""
    x = x ^ (x >> MIX_SHIFTS[0])
    x = (x * MIX_MULTIPLIERS[0]) & MASK32
    x = x ^ (x >> MIX_SHIFTS[1])
    x = (x * MIX_MULTIPLIERS[1]) & MASK32
    return x ^ (x >> MIX_SHIFTS[2])


def step_key(seed: int, t: torch.Tensor) -> torch.Tensor:
    """The key of a step: t is the step count being taken (a 0-d tensor of any real dtype)."""
    seed_mix = mix32(torch.tensor(seed, dtype=torch.int64, device=t.device))
    return mix32(seed_mix ^ (t.to(torch.int64) & MASK32))


def memory_index(y: torch.Tensor) -> torch.Tensor:
    """Each element's position in memory, shaped like y: where the kernels count i from (contiguous and
    channels_last tensors); the logical order for any other layout."""
    index = torch.arange(y.numel(), dtype=torch.int64, device=y.device)
    if y.dim() != 4 or y.is_contiguous() or not y.is_contiguous(memory_format=torch.channels_last):
        return index.view(y.shape)
    return index.as_strided(y.shape, y.stride())


def dither(key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The 16-bit dither of each element index under a step key."""
    return mix32(mix32((index & MASK32) ^ key) ^ (index >> 32)) >> (32 - DITHER_BITS)


def stochastic_bf16(y: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """y (float32) rounded stochastically to bfloat16 under a step key, formed as bf16 bits."""
    bits = y.view(torch.int32).to(torch.int64) & MASK32
    kept = (bits + dither(key, memory_index(y))) >> DITHER_BITS
    kept = torch.where(torch.isnan(y), BFLOAT16_QUIET_NAN, kept)
    return torch.where(kept >= 1 << 15, kept - (1 << 16), kept).to(torch.int16).view(torch.bfloat16)
