// The generic multi-tensor harness: which chunk a block owns, where its tensors live,
// the vector/scalar walk over the chunk, and a deterministic block reduction.
// Nothing here knows the update rule: that is csrc/pmd_lamb.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "tables.h"

namespace largedet {

constexpr int kWarpSize = 32;

struct Chunk {
  int32_t tensor;
  int64_t start;   // first element of the chunk in its tensor
  int64_t length;  // elements in the chunk (0 for an empty tensor)
};

__device__ __forceinline__ Chunk this_blocks_chunk(const ChunkTable& table) {
  const int32_t tensor = table.chunk_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.chunk_index[blockIdx.x]) * table.chunk_size;
  const int64_t left = table.numels[tensor] - start;
  return {tensor, start, left < table.chunk_size ? left : table.chunk_size};
}

template <typename T>
__device__ __forceinline__ T* tensor_address(const ChunkTable& table, PointerRow row, int32_t tensor) {
  return reinterpret_cast<T*>(table.ptrs[row * table.n_tensors + tensor]);
}

constexpr int64_t kVectorBytes = 16;  // one 128-bit access

// Whether the tensor's streams in kRows are all 16-byte aligned (NOTE [vector and scalar paths]).
template <PointerRow... kRows>
__device__ __forceinline__ bool vector_aligned(const ChunkTable& table, int32_t tensor) {
  return ((table.ptrs[kRows * table.n_tensors + tensor] % kVectorBytes == 0) && ...);
}

// NOTE [vector and scalar paths]
// A thread walks groups of kILP consecutive elements. Whole groups move as 128-bit accesses
// (kILP·sizeof(T) is a multiple of 16 for every supported T) when every stream the kernel
// reads or writes of the block's tensor is 16-byte aligned; the last, partial group of an
// odd-sized tensor, and every group of a tensor with a misaligned stream, move element by
// element. Each block tests its own tensor's addresses from the pointer table, so one
// misaligned tensor (a gradient viewing a DDP bucket) leaves the others on the vector path.
// A chunk starts at a multiple of chunk_size, itself a multiple of kILP (csrc/binding.cpp
// checks it), so whole groups of an aligned tensor stay aligned.
//
// NOTE [bit copies]
//   A pack is moved between its uint4 and its T values with a bit copy (memcpy, which nvcc,
//   NVRTC and host compilers all know), never by reading one through a pointer to the other:
//   that breaks strict aliasing, and g++ -O2 compiles such a pun of these very functions to
//   a vector path that returns zeros (the emulator of tests/cuda_emulator showed it). nvcc
//   turns the copy into register moves: the SASS keeps its 128-bit LDG/STG
//   (tests/test_cuda_kernels.py).
// Conversions spelt out: torch's build defines __CUDA_NO_HALF_CONVERSIONS__ and friends.
template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  return static_cast<To>(v);
}
template <>
__device__ __forceinline__ float convert<float, __half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float convert<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ __half convert<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 convert<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// v as a stream of T holds it: rounded to T (to nearest) and back. What a kernel that stores
// a value narrower than its math type reads back, without the load.
template <typename T, typename R>
__device__ __forceinline__ R as_stored(R v) {
  return convert<R>(convert<T>(v));
}

// How a stream is read. Addresses come from the pointer table as integers, so the
// compiler cannot tell they are global memory: these say it (LDG, not generic LD).
enum class Read {
  kReadOnly,   // never written by this kernel: the read-only data path
  kStreaming,  // never written by this kernel and not read again: evict first
  kWritten,    // written back by this kernel: a plain load
};

template <Read kRead>
__device__ __forceinline__ uint4 load16(const uint4* p) {
  if constexpr (kRead == Read::kStreaming) {
    return __ldcs(p);
  } else if constexpr (kRead == Read::kReadOnly) {
    return __ldg(p);
  } else {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
  }
}

// A plain (weak) 16-byte global store; __stwb/__stcg would make it a strong store.
__device__ __forceinline__ void store16(uint4* p, const uint4& v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

template <bool kVector, Read kRead, typename R, typename T>
__device__ __forceinline__ void load_group(R (&r)[kILP], const T* p, int count) {
  if constexpr (kVector) {
    constexpr int kPer = 16 / sizeof(T);
    static_assert(kILP % kPer == 0, "a group must be whole 128-bit packs");
#pragma unroll
    for (int k = 0; k < kILP / kPer; ++k) {
      // Through uint4, the one 16-byte type every compiler moves in one instruction, then
      // bit-copied (NOTE [bit copies]).
      const uint4 pack = load16<kRead>(reinterpret_cast<const uint4*>(p) + k);
      T values[kPer];
      memcpy(values, &pack, sizeof pack);
#pragma unroll
      for (int j = 0; j < kPer; ++j) r[k * kPer + j] = convert<R>(values[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j) r[j] = j < count ? convert<R>(p[j]) : R(0);
  }
}

// Stores a group, each value made a T by round(value, j), j its place in the group: a
// rounding that depends on where the element is (NOTE [stochastic rounding] in largedet_kernels/rounding.py).
template <bool kVector, typename T, typename R, typename Round>
__device__ __forceinline__ void store_group(T* p, const R (&r)[kILP], int count, const Round& round) {
  if constexpr (kVector) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int k = 0; k < kILP / kPer; ++k) {
      T values[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j) values[j] = round(r[k * kPer + j], k * kPer + j);
      uint4 pack;
      memcpy(&pack, values, sizeof pack);
      store16(reinterpret_cast<uint4*>(p) + k, pack);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      if (j < count) p[j] = round(r[j], j);
    }
  }
}

// Stores a group rounded to nearest.
template <bool kVector, typename T, typename R>
__device__ __forceinline__ void store_group(T* p, const R (&r)[kILP], int count) {
  store_group<kVector>(p, r, count, [](R v, int) { return convert<T>(v); });
}

template <bool kValue>
struct VectorPath {
  static constexpr bool value = kValue;
};

// Calls body(VectorPath<bool>, offset, count) for each group of this thread in a chunk
// of `length` elements; `aligned` is vector_aligned() of the streams body moves
// (NOTE [vector and scalar paths]). It is the same in every thread of a block: no divergence.
template <typename Body>
__device__ __forceinline__ void for_each_group(int64_t length, bool aligned, Body&& body) {
  const int64_t groups = (length + kILP - 1) / kILP;
  for (int64_t group = threadIdx.x; group < groups; group += blockDim.x) {
    const int64_t offset = group * kILP;
    const int count = length - offset < kILP ? static_cast<int>(length - offset) : kILP;
    if (aligned && count == kILP) {
      body(VectorPath<true>{}, offset, count);
    } else {
      body(VectorPath<false>{}, offset, count);
    }
  }
}

// Sum over the block in a fixed order (shuffles, then one warp over the warp sums):
// the same inputs give the same bits, run after run.
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* shared /* [kBlockSize / kWarpSize] */) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = threadIdx.x < kBlockSize / kWarpSize ? shared[threadIdx.x] : T(0);
  if (warp == 0) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();  // `shared` may be reused by the caller
  return value;     // valid in thread 0
}

}  // namespace largedet
