// Host entry points of the kernels, torch-free: csrc/binding.cpp checks and forwards to them.
#pragma once

#include <cuda_runtime.h>

#include "tables.h"

namespace largedet {

// Element types a launcher takes, named as torch names them in csrc/binding.cpp.
enum class Dtype : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

struct LaunchConfig {
  Dtype x_dtype;       // parameters
  Dtype g_dtype;       // gradients: x_dtype, or float32 beside fp16/bf16 parameters
  Dtype m_dtype;       // moments: the math type, or bfloat16 beside float32 math
  bool masters;        // fp32 master weights in pointer row kMaster (fp16/bf16 parameters)
  int64_t n_chunks;    // one block per chunk
  cudaStream_t stream;
};

// Both passes of one step (NOTE [two passes] in largedet_kernels/triton_kernels.py). Returns the first
// CUDA error of the launches, or cudaErrorInvalidValue for a configuration without kernels
// (what the supported_* functions below refuse).
cudaError_t launch_pmd_lamb_step(const ChunkTable& table, const StepScalars& scalars, const LaunchConfig& config);

// The two halves of a step around a collective (NOTE [sharded norms] in largedet_kernels/sharding.py):
// pass 1 then each tensor's Σx², Σu² into sums[2 · n_tensors]; and pass 2 alone, reading
// the norms through the table's first_chunk/chunk_count from scalars.partials.
cudaError_t launch_pmd_lamb_moments(const ChunkTable& table, const StepScalars& scalars, void* sums,
                                    const LaunchConfig& config);
cudaError_t launch_pmd_lamb_update(const ChunkTable& table, const StepScalars& scalars, const LaunchConfig& config);

// Per-chunk Σg² into partials[0, n_chunks): only config.g_dtype matters.
cudaError_t launch_grad_sumsq(const ChunkTable& table, void* partials, const LaunchConfig& config);

// Whether a (parameter, gradient) dtype pair has kernels.
bool supported_dtypes(Dtype x_dtype, Dtype g_dtype);
// Whether moments of m_dtype beside x_dtype parameters have kernels (NOTE [stored moments]).
bool supported_moments(Dtype x_dtype, Dtype m_dtype);
// Whether x_dtype parameters may have fp32 masters (NOTE [master weights] in largedet_kernels/optimizer.py).
bool supported_masters(Dtype x_dtype);

}  // namespace largedet
