// What host code (csrc/binding.cpp, csrc/cpu/) and device code share: the device tables' layout
// and the constants that shape the kernels. Plain C++, no CUDA or torch headers, so
// nvcc, g++ and NVRTC all take it (NOTE [torch-free kernels] in csrc/pmd_lamb.cuh).
#pragma once

#ifdef __CUDACC_RTC__
// NVRTC has no C++ standard library headers.
typedef long long int64_t;
typedef int int32_t;
typedef unsigned long long uint64_t;
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
#else
#include <cstdint>
#endif

namespace largedet {

constexpr int kBlockSize = 256;  // threads per block: one block per chunk
constexpr int kILP = 8;          // elements per thread per step of the walk (NOTE [vector and scalar paths])

// Rows of the pointer table (NOTE [pointer tables] in largedet_kernels/backends/chunk_plan.py):
// largedet_kernels/backends/tables.py's POINTER_ROWS, in order.
// The master row holds 0 in a bucket without fp32 master weights (NOTE [master weights] in
// largedet_kernels/optimizer.py).
enum PointerRow : int { kX = 0, kG = 1, kM = 2, kV = 3, kStep = 4, kMaster = 5, kPointerRows = 6 };

// Columns of the per-tensor hyper-parameter table: largedet_kernels/backends/tables.py's
// HYPER_COLUMNS, in order. The table is double whatever the math type
// (NOTE [double coefficients] there).
enum HyperColumn : int {
  kLrAlpha = 0,  // η·α
  kBeta1 = 1,
  kBeta2 = 2,
  kWeightG = 3,   // the weight of g in m: 1−β1, or 1 without grad averaging
  kWeightG2 = 4,  // the weight of g² in v: 1−β2
  kEps = 5,
  kWeightDecay = 6,
  kCycleLength = 7,     // T; 0 for no cycle (ξ ≡ 1)
  kBiasCorrection = 8,  // flags are 0 / 1
  kEpsInsideSqrt = 9,
  kAdamWMode = 10,
  kUseTrustRatio = 11,
  // bf16 parameters without masters (NOTE [stochastic rounding] in largedet_kernels/rounding.py)
  kStochasticRounding = 12,
  kSeed = 13,      // an integer below 2^32
  kMaximize = 14,       // gradient ascent: weight_g and λ in g negated (csrc/pmd_lamb_math.h)
  kTrustRatioMin = 15,  // the bounds of ‖x‖/‖u‖: 0 and +inf when unbounded
  kTrustRatioMax = 16,
  kHyperColumns = 17,
};

// The fields of a tensor's trust-ratio record, in the math type (NOTE [trust-ratio records] in
// largedet_kernels/backends/tables.py): tables.py's RECORD_FIELDS, in order.
enum RecordField : int { kRecordStep = 0, kRecordXNorm = 1, kRecordUNorm = 2, kRecordRatio = 3, kRecordFields = 4 };

// The math type of parameters (or gradients) of type X: float64 stays, the others compute in float32.
// ATen's at::opmath_type, which csrc/cpu/pmd_lamb_cpu.cpp checks this against, for torch-free code.
template <typename X>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};
template <typename X>
using MathOf = typename MathType<X>::type;

// NOTE [pointer tables]: the device tables of one bucket, built by the host once per parameter set.
struct ChunkTable {
  const int64_t* ptrs;          // [kPointerRows, n_tensors]: addresses of x, g, m, v, step, master
  const int64_t* numels;        // [n_tensors]
  const int32_t* chunk_tensor;  // [n_chunks]: tensor of each chunk
  const int32_t* chunk_index;   // [n_chunks]: position of the chunk in its tensor
  const int32_t* first_chunk;   // [n_tensors]
  const int32_t* chunk_count;   // [n_tensors]
  int64_t n_tensors;
  int64_t chunk_size;
};

// The parts of a plan's packed chunk table, and of its workspace, in order (NOTE [packed chunk tables] in
// largedet_kernels/backends/tables.py).
enum ChunkTablePart : int { kChunkTensor = 0, kChunkIndex = 1, kFirstChunk = 2, kChunkCount = 3, kChunkTableParts = 4 };
enum WorkspacePart : int { kPartials = 0, kTNow = 1, kWorkspaceParts = 2 };

// Where a part starts: the chunk parts hold n_chunks entries, the tensor parts n_tensors, the partials
// 2 · n_chunks.
constexpr int64_t part_offset(ChunkTablePart part, int64_t n_chunks, int64_t n_tensors) {
  return part <= kChunkIndex ? part * n_chunks : 2 * n_chunks + (part - kFirstChunk) * n_tensors;
}
constexpr int64_t part_offset(WorkspacePart part, int64_t n_chunks) { return part == kPartials ? 0 : 2 * n_chunks; }

// Per-step values the kernels read from device memory: nothing waits on the host.
struct StepScalars {
  const double* hyper;       // [n_tensors, kHyperColumns] (NOTE [double coefficients])
  const void* grad_factor;   // of M: GradScaler's 1/scale × the clip factor
  const float* found_inf;
  void* partials;            // [2 · n_chunks] of M: Σx², Σu² per chunk
  void* t_now;               // [n_tensors] of M: t of this step, from pass 1 to pass 2
  void* records;             // [n_tensors, kRecordFields] of M, or null: NOTE [trust-ratio records]
};

}  // namespace largedet
