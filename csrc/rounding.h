// Stochastic rounding of float to bfloat16 with the counter-based dither of NOTE [stochastic
// rounding] in largedet_kernels/rounding.py: the same hash, bit for bit, in the CUDA kernels and
// the CPU backend. Torch-free (NOTE [torch-free kernels] in csrc/pmd_lamb.cuh).
#pragma once

#include "tables.h"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define LARGEDET_ROUNDING_FN __host__ __device__ __forceinline__
#else
#include <string.h>
#define LARGEDET_ROUNDING_FN inline
#endif

namespace largedet {

constexpr int kDitherBits = 16;                  // the bits float has beyond bfloat16's mantissa
constexpr uint16_t kBFloat16QuietNaN = 0x7FC0;  // what rounding to nearest makes of a NaN

// A bijective 32-bit hash; its multipliers are rounding.py's MIX_MULTIPLIERS.
LARGEDET_ROUNDING_FN uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x1B873593u;
  return x ^ (x >> 16);
}

// The key of step t (the step being taken) under a seed.
LARGEDET_ROUNDING_FN uint32_t rounding_key(uint32_t seed, uint32_t t) { return mix32(mix32(seed) ^ t); }

// The dither of element `index` of a tensor (its position in memory) under a step key.
LARGEDET_ROUNDING_FN uint32_t dither(uint32_t key, uint64_t index) {
  return mix32(mix32(static_cast<uint32_t>(index) ^ key) ^ static_cast<uint32_t>(index >> 32)) >> (32 - kDitherBits);
}

// The bits of y rounded stochastically to bfloat16 with a given dither.
LARGEDET_ROUNDING_FN uint16_t stochastic_bf16_bits(float y, uint32_t dither_bits) {
  uint32_t bits;
  memcpy(&bits, &y, sizeof bits);  // NOTE [bit copies] in csrc/multi_tensor_apply.cuh
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return kBFloat16QuietNaN;
  return static_cast<uint16_t>((bits + dither_bits) >> kDitherBits);
}

}  // namespace largedet
