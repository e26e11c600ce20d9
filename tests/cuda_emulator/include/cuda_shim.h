// CUDA C++ as host C++: the qualifiers, built-in variables, types and primitives that the
// kernels of csrc/ use, so that g++ compiles those sources unmodified and the runtime of
// tests/cuda_emulator/runtime.cpp runs every thread of a block concurrently
// (NOTE [emulated execution] there). Torch-free, like the kernels.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime.h"

// ---- Qualifiers. One block runs at a time, so a block's shared memory is static storage.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ---- Built-in variables, set by the runtime for the CUDA thread that runs (a fiber or a std::thread).
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
};
extern thread_local uint3 threadIdx, blockIdx;
extern thread_local dim3 blockDim, gridDim;

namespace largedet_emu {

// Where a barrier or a shuffle is called from: the threads that meet there must all call the same one.
struct Site {
  const char* file;
  int line;
};

void syncthreads(Site site);
std::uint64_t shuffle_down(std::uint64_t bits, unsigned int delta, unsigned int mask, Site site);

// NOTE [checked accesses]: every 16-byte access lies inside one live CPU allocation, or the
// launch fails saying where; the accesses are counted (tests see which path ran).
void check_access(const void* p, std::size_t bytes, bool write);

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

inline uint4 read16(const uint4* p) {
  check_access(p, sizeof(uint4), false);
  uint4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// NOTE [host accesses]
//   csrc/multi_tensor_apply.cuh moves 16 bytes with PTX in two places. Its store16 takes a
//   const uint4&; this overload takes the non-const pack that store_group passes, so it is
//   the better match that argument-dependent lookup (uint4 lives here) finds in host C++,
//   and the PTX is never emitted. load16<Read::kWritten> is specialised in cuda_shim_late.h,
//   which the generated launch source includes after the kernels.
inline void store16(uint4* p, uint4& v) {
  check_access(p, sizeof(uint4), true);
  std::memcpy(p, &v, sizeof v);
}

template <typename T>
T shfl_down_sync(unsigned int mask, T value, unsigned int delta, Site site) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= sizeof(std::uint64_t),
                "the emulated shuffle moves up to 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle_down(bits, delta, mask, site);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// ---- Launches: kernel<<<grid, block, shared_bytes, stream>>>(args...) becomes launch(...),
// rewritten so by tests/cuda_emulator/__init__.py.

// Runs body(context) for every thread of every block; errors are read by cudaGetLastError.
void run_grid(long long grid, long long block, std::size_t shared_bytes, void (*body)(void*), void* context);

template <typename... Params, typename... Args>
void launch(long long grid, long long block, std::size_t shared_bytes, cudaStream_t /*stream*/,
            void (*kernel)(Params...), Args&&... args) {
  struct Call {
    void (*kernel)(Params...);
    std::tuple<Params...> params;  // a launch copies its arguments once; each thread gets its own copy
  } call{kernel, std::tuple<Params...>(std::forward<Args>(args)...)};
  auto body = [](void* c) { std::apply(static_cast<Call*>(c)->kernel, static_cast<Call*>(c)->params); };
  run_grid(grid, block, shared_bytes, body, &call);
}

// ---- 16-bit floats: storage types with round-to-nearest-even conversions (tests compare them
// with torch's bit for bit). A NaN becomes the canonical NaN, as the GPU's cvt makes it.
constexpr std::uint16_t kCanonicalNaN = 0x7fffu;

inline std::uint32_t float_bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
inline float bits_float(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu,
                      mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  const std::uint32_t biased = exponent == 0x1fu ? 0xffu : exponent + (127 - 15);  // inf/NaN keep their payload
  return bits_float(sign | biased << 23 | mantissa << 13);
}

inline std::uint16_t float_to_half(float f) {
  const std::uint32_t bits = float_bits(f), sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return kCanonicalNaN;
  if (magnitude >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // ≥ 65520 rounds to inf
  if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal half, round(|f| · 2^24) (exact scaling)
    const float units = std::nearbyint(bits_float(magnitude) * 0x1p24f);
    return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(units));
  }
  const std::uint32_t rebased = magnitude - ((127u - 15u) << 23);  // exponent bias 127 → 15
  return static_cast<std::uint16_t>(sign | (rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13);
}

inline float bfloat16_to_float(std::uint16_t b) { return bits_float(static_cast<std::uint32_t>(b) << 16); }

inline std::uint16_t float_to_bfloat16(float f) {
  const std::uint32_t bits = float_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return kCanonicalNaN;
  return static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace largedet_emu

using largedet_emu::uint4;

struct __half {
  std::uint16_t bits;
};
struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline float __half2float(__half h) { return largedet_emu::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {largedet_emu::float_to_half(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return largedet_emu::bfloat16_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {largedet_emu::float_to_bfloat16(f)}; }

// ---- Primitives.
inline uint4 __ldg(const uint4* p) { return largedet_emu::read16(p); }
inline uint4 __ldcs(const uint4* p) { return largedet_emu::read16(p); }
#define __syncthreads() ::largedet_emu::syncthreads({__FILE__, __LINE__})
#define __shfl_down_sync(mask, value, delta) \
  ::largedet_emu::shfl_down_sync((mask), (value), (delta), {__FILE__, __LINE__})
