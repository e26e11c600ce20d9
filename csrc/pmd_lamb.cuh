// PMD-LAMB in CUDA C++: the kernels, built on the harness of csrc/multi_tensor_apply.cuh
// and the update rule of csrc/pmd_lamb_math.h.
//
// The two passes of NOTE [two passes] in largedet_kernels/triton_kernels.py, here:
//   pass 1, pmd_lamb_moments_kernel: read x, g, m, v; write m, v; write per-chunk
//     Σx², Σu² to `partials` (no atomics: deterministic norms).
//   pass 2, pmd_lamb_update_kernel: sum the partials of the chunk's tensor in a fixed
//     order, form the trust ratio, read x, m, v, recompute u with the same function as
//     pass 1 and write x. fp32: 24 + 16 = 40 bytes per element, gradients never written.
//     With fp32 masters (NOTE [master weights] in largedet_kernels/optimizer.py) x is the
//     master in both passes and the parameter is only written, rounded to nearest: bf16
//     parameters, fp32 gradients and moments read master 4 + g 4 + m 4 + v 4 and write m, v 8
//     in pass 1, read master, m, v 12 and write master 4 + x 2 in pass 2: 24 + 18 = 42 bytes.
//     Moments stored in bf16 take 2 bytes each where fp32 ones take 4.
//   Each block of pass 2 sums every partial of its tensor, so a tensor of n chunks costs n²
//   reads: cheap up to chunk_plan.MAX_CHUNKS_SUMMED_IN_PASS_2 chunks, where it saves a launch.
//   A plan with a larger tensor (decided when the host builds it) runs tensor_sums_kernel
//   between the passes instead, and pass 2 reads one reduced pair per tensor, as under
//   NOTE [sharded norms]: tensor_sums() sums in the same order either way, so the bits agree.
//
// NOTE [stored moments]
//   Moments stored in a narrower type S than the math type M (bf16 beside fp32) are rounded to
//   nearest on their store, and r is formed from the rounded values in both passes: pass 1
//   rounds m, v to S and back in registers before its Σu², so that pass 2, which reads them,
//   forms the same u, and the trust ratio is that of the update applied.
//
// Skipped steps (NOTE [skipped steps] in largedet_kernels/triton_kernels.py): when GradScaler's
// found_inf is non-zero no store happens and t does not advance.
//
// NOTE [torch-free kernels]
//   csrc/tables.h, multi_tensor_apply.cuh and this file include nothing from torch (nor
//   the C++ standard library under NVRTC), so NVRTC can compile them for sm_70 (V100),
//   which CUDA 13's nvcc no longer targets; csrc/binding.cpp is the only torch file.
#pragma once

#include "multi_tensor_apply.cuh"
#include "pmd_lamb_math.h"
#include "rounding.h"

namespace largedet {

// Pass 1 (NOTE [two passes]): m, v, and this chunk's Σx², Σu². x is read as X from pointer row
// kXRow: the parameter (kX), or its fp32 master (kMaster, X float; the parameter is then not
// read, so fp16 and bf16 parameters share these kernels). S is the moments' stored type (NOTE
// [stored moments]), M the math type.
template <typename X, typename G, typename S, typename M, PointerRow kXRow>
__global__ void __launch_bounds__(kBlockSize) pmd_lamb_moments_kernel(ChunkTable table, StepScalars s) {
  __shared__ M shared[kBlockSize / kWarpSize];
  const Chunk chunk = this_blocks_chunk(table);
  const X* x_ptr = tensor_address<X>(table, kXRow, chunk.tensor) + chunk.start;
  const G* g_ptr = tensor_address<G>(table, kG, chunk.tensor) + chunk.start;
  S* m_ptr = tensor_address<S>(table, kM, chunk.tensor) + chunk.start;
  S* v_ptr = tensor_address<S>(table, kV, chunk.tensor) + chunk.start;
  const float* step = tensor_address<float>(table, kStep, chunk.tensor);

  const bool keep = *s.found_inf == 0.0f;  // NOTE [skipped steps]
  const M t = static_cast<M>(*step) + (keep ? M(1) : M(0));
  if (chunk.start == 0 && threadIdx.x == 0) static_cast<M*>(s.t_now)[chunk.tensor] = t;  // pass 2 reads t here
  const StepCoefficients<M> c(s.hyper + chunk.tensor * kHyperColumns, t);
  const M factor = *static_cast<const M*>(s.grad_factor);

  M sum_x = 0, sum_u = 0;
  const bool aligned = vector_aligned<kXRow, kG, kM, kV>(table, chunk.tensor);
  for_each_group(chunk.length, aligned, [&](auto path, int64_t offset, int count) {
    constexpr bool kVector = decltype(path)::value;
    M x[kILP], g[kILP], m[kILP], v[kILP];
    load_group<kVector, Read::kReadOnly>(x, x_ptr + offset, count);
    load_group<kVector, Read::kStreaming>(g, g_ptr + offset, count);
    load_group<kVector, Read::kWritten>(m, m_ptr + offset, count);
    load_group<kVector, Read::kWritten>(v, v_ptr + offset, count);
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      update_moments(m[j], v[j], g[j], x[j], factor, c);
      m[j] = as_stored<S>(m[j]);  // NOTE [stored moments]
      v[j] = as_stored<S>(v[j]);
      const M u = j < count ? direction(m[j], v[j], x[j], c) : M(0);
      sum_x += x[j] * x[j];
      sum_u += u * u;
    }
    if (keep) {
      store_group<kVector>(m_ptr + offset, m, count);
      store_group<kVector>(v_ptr + offset, v, count);
    }
  });
  sum_x = block_sum(sum_x, shared);
  sum_u = block_sum(sum_u, shared);
  if (threadIdx.x == 0) {
    static_cast<M*>(s.partials)[2 * blockIdx.x] = sum_x;
    static_cast<M*>(s.partials)[2 * blockIdx.x + 1] = sum_u;
  }
}

// ‖x‖², ‖u‖² of one whole tensor: its chunks' partials summed in a fixed order, valid in
// thread 0. Pass 2 reads them through the chunk table; for a tensor of many chunks (NOTE [two
// passes]) and under NOTE [sharded norms] the table's first_chunk/chunk_count point at one
// already-reduced pair per tensor instead.
template <typename M>
__device__ __forceinline__ void tensor_sums(const ChunkTable& table, const M* partials, int64_t tensor, M* shared,
                                            M& sum_x, M& sum_u) {
  const int32_t first = table.first_chunk[tensor], count = table.chunk_count[tensor];
  sum_x = 0;
  sum_u = 0;
  for (int32_t k = threadIdx.x; k < count; k += blockDim.x) {
    sum_x += partials[2 * (first + k)];
    sum_u += partials[2 * (first + k) + 1];
  }
  sum_x = block_sum(sum_x, shared);
  sum_u = block_sum(sum_u, shared);
}

// Sharded norms (NOTE [sharded norms] in largedet_kernels/sharding.py)
//   A sharded parameter (FSDP2) has only a slice of x on each rank, so pass 1 is
//   followed by tensor_sums_kernel (one block per tensor: its local Σx², Σu²), the
//   caller all-reduces those sums over the ranks, and pass 2 runs on the global ones. An
//   unsharded step of a plan that reduces between the passes (NOTE [two passes]) is this
//   sequence with no all-reduce, so its norms are those of begin_step/finish bit for bit.
template <typename M>
__global__ void __launch_bounds__(kBlockSize) tensor_sums_kernel(ChunkTable table, const M* partials, M* sums) {
  __shared__ M shared[kBlockSize / kWarpSize];
  M sum_x, sum_u;
  tensor_sums(table, partials, blockIdx.x, shared, sum_x, sum_u);
  if (threadIdx.x == 0) {
    sums[2 * blockIdx.x] = sum_x;
    sums[2 * blockIdx.x + 1] = sum_u;
  }
}

template <typename T>
constexpr bool kIsBFloat16 = false;
template <>
constexpr bool kIsBFloat16<__nv_bfloat16> = true;

// NOTE [stochastic rounding] in largedet_kernels/rounding.py: the bf16 of element `first + j` of a tensor
// (its position in memory), j the place in a group of store_group, under the step's key.
struct StochasticBFloat16 {
  uint32_t key;
  int64_t first;

  __device__ __forceinline__ __nv_bfloat16 operator()(float y, int j) const {
    const uint16_t bits = stochastic_bf16_bits(y, dither(key, static_cast<uint64_t>(first + j)));
    __nv_bfloat16 value;
    memcpy(&value, &bits, sizeof value);  // NOTE [bit copies] in csrc/multi_tensor_apply.cuh
    return value;
  }
};

// Pass 2 (NOTE [two passes]): trust ratio from the partials (NaN for a non-finite norm: NOTE
// [non-finite gradients] in largedet_kernels/reference.py), then x ← x − η·α·ratio·u. With
// kHasMaster x is the fp32 master (row kMaster): the new value goes to it and, rounded to
// nearest, to the parameter, which is not read. Without, a bf16 parameter whose row asks for
// it is rounded stochastically. S is the moments' stored type, M the math type.
template <typename X, typename S, typename M, bool kHasMaster>
__global__ void __launch_bounds__(kBlockSize) pmd_lamb_update_kernel(ChunkTable table, StepScalars s) {
  __shared__ M shared[kBlockSize / kWarpSize];
  const Chunk chunk = this_blocks_chunk(table);
  X* x_ptr = tensor_address<X>(table, kX, chunk.tensor) + chunk.start;
  float* master_ptr = kHasMaster ? tensor_address<float>(table, kMaster, chunk.tensor) + chunk.start : nullptr;
  const S* m_ptr = tensor_address<S>(table, kM, chunk.tensor) + chunk.start;
  const S* v_ptr = tensor_address<S>(table, kV, chunk.tensor) + chunk.start;
  float* step = tensor_address<float>(table, kStep, chunk.tensor);

  const bool keep = *s.found_inf == 0.0f;
  const M t = static_cast<const M*>(s.t_now)[chunk.tensor];
  if (chunk.start == 0 && threadIdx.x == 0) *step = static_cast<float>(t);  // nobody in pass 2 reads step
  const double* row = s.hyper + chunk.tensor * kHyperColumns;
  const StepCoefficients<M> c(row, t);

  M sum_x, sum_u;
  tensor_sums(table, static_cast<const M*>(s.partials), chunk.tensor, shared, sum_x, sum_u);
  __shared__ M ratio_shared;
  if (threadIdx.x == 0) {
    const M applied = applied_ratio(row, sum_x, sum_u);
    ratio_shared = trust_ratio(row, applied);
    // NOTE [trust-ratio records]: null when telemetry is off, so nothing more is read or written.
    if (s.records != nullptr && keep && chunk.start == 0) {
      write_record(static_cast<M*>(s.records), chunk.tensor, t, sum_x, sum_u, applied);
    }
  }
  __syncthreads();
  const M ratio = ratio_shared;
  if (!keep) return;  // NOTE [skipped steps]: no store, to the master neither

  // Whether x is rounded stochastically is the tensor's, so the whole block's: no divergence.
  constexpr bool kMayRoundStochastically = !kHasMaster && kIsBFloat16<X>;
  const bool stochastic = kMayRoundStochastically && row[kStochasticRounding] != 0;
  [[maybe_unused]] const uint32_t key =  // unused where kMayRoundStochastically is false
      stochastic ? rounding_key(static_cast<uint32_t>(row[kSeed]), static_cast<uint32_t>(t)) : 0;
  const bool aligned = kHasMaster ? vector_aligned<kMaster, kM, kV, kX>(table, chunk.tensor)
                                  : vector_aligned<kX, kM, kV>(table, chunk.tensor);
  for_each_group(chunk.length, aligned, [&](auto path, int64_t offset, int n) {
    constexpr bool kVector = decltype(path)::value;
    M x[kILP], m[kILP], v[kILP];
    if constexpr (kHasMaster) {
      load_group<kVector, Read::kWritten>(x, master_ptr + offset, n);
    } else {
      load_group<kVector, Read::kWritten>(x, x_ptr + offset, n);
    }
    load_group<kVector, Read::kStreaming>(m, m_ptr + offset, n);
    load_group<kVector, Read::kStreaming>(v, v_ptr + offset, n);
#pragma unroll
    for (int j = 0; j < kILP; ++j) x[j] -= ratio * direction(m[j], v[j], x[j], c);
    if constexpr (kHasMaster) store_group<kVector>(master_ptr + offset, x, n);
    if constexpr (kMayRoundStochastically) {
      if (stochastic) {
        store_group<kVector>(x_ptr + offset, x, n, StochasticBFloat16{key, chunk.start + offset});
        return;
      }
    }
    store_group<kVector>(x_ptr + offset, x, n);
  });
}

// Σg² per chunk, for global-norm clipping (the extra pass when max_grad_norm is set).
template <typename G, typename M>
__global__ void __launch_bounds__(kBlockSize) grad_sumsq_kernel(ChunkTable table, M* partials) {
  __shared__ M shared[kBlockSize / kWarpSize];
  const Chunk chunk = this_blocks_chunk(table);
  const G* g_ptr = tensor_address<G>(table, kG, chunk.tensor) + chunk.start;
  M sum = 0;
  for_each_group(chunk.length, vector_aligned<kG>(table, chunk.tensor), [&](auto path, int64_t offset, int count) {
    M g[kILP];
    load_group<decltype(path)::value, Read::kStreaming>(g, g_ptr + offset, count);
#pragma unroll
    for (int j = 0; j < kILP; ++j) sum += g[j] * g[j];
  });
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

}  // namespace largedet
