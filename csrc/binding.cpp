// The torch side of the CUDA backend: op schemas (torch.library), argument checks, and
// the hand-off to the torch-free launchers of csrc/pmd_lamb_launch.cu. Fake (meta)
// implementations for torch.compile live in largedet_kernels/backends/cuda.py.
#include <ATen/cuda/CUDAContext.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "pmd_lamb_launch.h"
#include "python_module.h"

namespace largedet {
namespace {

using at::Tensor;
using at::TensorList;

Dtype to_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kDouble: return Dtype::kFloat64;
    default: TORCH_CHECK(false, "largedet: ", what, " must be float32, float16, bfloat16 or float64, got ", t);
  }
}

at::ScalarType math_dtype(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

void check_table(const Tensor& t, const char* name, at::ScalarType dtype, int64_t numel, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "largedet: ", name, " is on ", t.device(), ", the parameters on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "largedet: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() >= numel, "largedet: ", name, " must be contiguous with at least ",
              numel, " elements, got ", t.sizes());
}

// NOTE [tensor lists or tables]
//   The ops take the tensors twice: as tensor lists, which declare what they write, and as the
//   plan's pointer table (NOTE [pointer tables] in largedet_kernels/backends/chunk_plan.py), which
//   the kernels read. Given the lists, an op checks every tensor against the tables. Given empty
//   lists it takes the tables as they are: the optimizer's eager steps do, from tensors its step
//   cache checked and keeps alive (NOTE [step cache] in largedet_kernels/optimizer.py), because
//   converting six lists costs ~1.5 us per tensor at the call, more than the launches. So the
//   flags the tables cannot tell the host come as arguments: the moments' dtype, and whether
//   the bucket has fp32 masters (NOTE [master weights] there), which a master list then holds.

// The plan's tables, checked against each other and the device.
ChunkTable chunk_table(const Tensor& ptrs, const Tensor& numels, const Tensor& chunk_tensor, const Tensor& chunk_index,
                       const Tensor& first_chunk, const Tensor& chunk_count, int64_t chunk_size) {
  const int64_t n = numels.numel();
  TORCH_CHECK(n > 0, "largedet: no tensors to step");
  const at::Device device = ptrs.device();
  TORCH_CHECK(device.is_cuda(), "largedet: the cuda backend needs CUDA tensors, got ", device);
  TORCH_CHECK(chunk_size > 0 && chunk_size % kILP == 0, "largedet: chunk_size must be a positive multiple of ",
              kILP, ", got ", chunk_size);
  check_table(ptrs, "ptrs", at::kLong, kPointerRows * n, device);
  check_table(numels, "numels", at::kLong, n, device);
  check_table(chunk_tensor, "chunk_tensor", at::kInt, 0, device);
  check_table(chunk_index, "chunk_index", at::kInt, chunk_tensor.numel(), device);
  check_table(first_chunk, "first_chunk", at::kInt, n, device);
  check_table(chunk_count, "chunk_count", at::kInt, n, device);
  return ChunkTable{ptrs.data_ptr<int64_t>(),        numels.data_ptr<int64_t>(),
                    chunk_tensor.data_ptr<int32_t>(), chunk_index.data_ptr<int32_t>(),
                    first_chunk.data_ptr<int32_t>(),  chunk_count.data_ptr<int32_t>(),
                    n,                                chunk_size};
}

void check_list(TensorList list, const char* name, int64_t n, const at::Device& device,
                c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK(static_cast<int64_t>(list.size()) == n, "largedet: ", name, " has ", list.size(),
              " tensors, the tables address ", n);
  for (const Tensor& t : list) {
    TORCH_CHECK(t.device() == device, "largedet: every tensor of ", name, " must be on ", device, ", one is on ",
                t.device());
    TORCH_CHECK(!dtype || t.scalar_type() == *dtype, "largedet: ", name, " must be ", *dtype, ", one is ",
                t.scalar_type());
  }
}

// A step's launch, checked: every op of the step family takes the same arguments.
struct StepLaunch {
  ChunkTable table;
  StepScalars scalars;
  LaunchConfig config;
  at::Device device;
};

StepLaunch checked_step(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                        TensorList steps, TensorList masters, const Tensor& ptrs, const Tensor& numels,
                        const Tensor& chunk_tensor, const Tensor& chunk_index, const Tensor& first_chunk,
                        const Tensor& chunk_count, const Tensor& hyper, const Tensor& grad_factor,
                        const Tensor& found_inf, const Tensor& partials, int64_t partial_pairs, const Tensor& t_now,
                        int64_t chunk_size, at::ScalarType x_type, at::ScalarType g_type, at::ScalarType m_type,
                        bool has_masters) {
  const ChunkTable table = chunk_table(ptrs, numels, chunk_tensor, chunk_index, first_chunk, chunk_count, chunk_size);
  const int64_t n = table.n_tensors, n_chunks = chunk_tensor.numel();
  const at::Device device = ptrs.device();
  const at::ScalarType math = math_dtype(x_type);
  if (params.empty()) {  // NOTE [tensor lists or tables]
    TORCH_CHECK(grads.empty() && exp_avgs.empty() && exp_avg_sqs.empty() && steps.empty() && masters.empty(),
                "largedet: pass every tensor list, or none");
  } else {
    check_list(params, "params", n, device, x_type);
    check_list(grads, "grads", n, device, g_type);
    check_list(exp_avgs, "exp_avgs", n, device, m_type);
    check_list(exp_avg_sqs, "exp_avg_sqs", n, device, m_type);
    check_list(steps, "steps", n, device, at::kFloat);
    if (has_masters) {
      check_list(masters, "masters", n, device, at::kFloat);
    } else {
      TORCH_CHECK(masters.empty(), "largedet: ", masters.size(), " masters given, and has_masters is false");
    }
  }
  check_table(hyper, "hyper", at::kDouble, n * kHyperColumns, device);  // NOTE [double coefficients]
  check_table(grad_factor, "grad_factor", math, 1, device);
  check_table(found_inf, "found_inf", at::kFloat, 1, device);
  check_table(partials, "partials", math, 2 * partial_pairs, device);
  check_table(t_now, "t_now", math, n, device);
  const Dtype x_dtype = to_dtype(x_type, "params"), g_dtype = to_dtype(g_type, "grads");
  const Dtype m_dtype = to_dtype(m_type, "exp_avgs");
  TORCH_CHECK(supported_dtypes(x_dtype, g_dtype), "largedet: no kernel for ", x_type, " parameters with ", g_type,
              " gradients");
  TORCH_CHECK(supported_moments(x_dtype, m_dtype), "largedet: no kernel for ", m_type, " moments of ", x_type,
              " parameters (they are stored as ", math, ", or bfloat16 beside float32 math)");
  TORCH_CHECK(!has_masters || supported_masters(x_dtype),
              "largedet: fp32 master weights are for float16 and bfloat16 parameters, not ", x_type);
  const StepScalars scalars{hyper.data_ptr<double>(), grad_factor.data_ptr(), found_inf.data_ptr<float>(),
                            partials.data_ptr(), t_now.data_ptr()};
  const LaunchConfig config{x_dtype, g_dtype, m_dtype, has_masters, n_chunks,
                            at::cuda::getCurrentCUDAStream(device.index())};
  return StepLaunch{table, scalars, config, device};
}

// The argument list of the step family, in schema and C++ order.
#define LARGEDET_STEP_PARAMS                                                                                      \
  TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,             \
      TensorList masters, const Tensor &ptrs, const Tensor &numels, const Tensor &chunk_tensor,                   \
      const Tensor &chunk_index, const Tensor &first_chunk, const Tensor &chunk_count, const Tensor &hyper,       \
      const Tensor &grad_factor, const Tensor &found_inf, Tensor &partials, Tensor &t_now, int64_t chunk_size,    \
      at::ScalarType x_dtype, at::ScalarType g_dtype, at::ScalarType m_dtype, bool has_masters
#define LARGEDET_STEP_ARGS                                                                                        \
  params, grads, exp_avgs, exp_avg_sqs, steps, masters, ptrs, numels, chunk_tensor, chunk_index, first_chunk,     \
      chunk_count, hyper, grad_factor, found_inf, partials
#define LARGEDET_STEP_TYPES chunk_size, x_dtype, g_dtype, m_dtype, has_masters

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "largedet: ", op, " launch failed: ", cudaGetErrorString(err));
}

// Both passes (NOTE [two passes] in csrc/pmd_lamb.cuh): two launches.
void pmd_lamb_step_(LARGEDET_STEP_PARAMS) {
  const StepLaunch l = checked_step(LARGEDET_STEP_ARGS, chunk_tensor.numel(), t_now, LARGEDET_STEP_TYPES);
  const c10::cuda::CUDAGuard guard(l.device);
  check_launch(launch_pmd_lamb_step(l.table, l.scalars, l.config), "pmd_lamb_step_");
}

// Pass 1 and each tensor's local Σx², Σu² into sums (NOTE [sharded norms]): two launches.
void pmd_lamb_moments_(LARGEDET_STEP_PARAMS, Tensor& sums) {
  const StepLaunch l = checked_step(LARGEDET_STEP_ARGS, chunk_tensor.numel(), t_now, LARGEDET_STEP_TYPES);
  check_table(sums, "sums", partials.scalar_type(), 2 * l.table.n_tensors, l.device);
  const c10::cuda::CUDAGuard guard(l.device);
  check_launch(launch_pmd_lamb_moments(l.table, l.scalars, sums.data_ptr(), l.config), "pmd_lamb_moments_");
}

// Pass 2 with the norms read through first_chunk/chunk_count from partials, which under
// NOTE [sharded norms] hold one all-reduced pair per tensor: one launch.
void pmd_lamb_update_(LARGEDET_STEP_PARAMS) {
  const StepLaunch l = checked_step(LARGEDET_STEP_ARGS, numels.numel(), t_now, LARGEDET_STEP_TYPES);
  const c10::cuda::CUDAGuard guard(l.device);
  check_launch(launch_pmd_lamb_update(l.table, l.scalars, l.config), "pmd_lamb_update_");
}

#undef LARGEDET_STEP_PARAMS
#undef LARGEDET_STEP_ARGS
#undef LARGEDET_STEP_TYPES

Tensor grad_sumsq(TensorList grads, const Tensor& ptrs, const Tensor& numels, const Tensor& chunk_tensor,
                  const Tensor& chunk_index, const Tensor& first_chunk, const Tensor& chunk_count, Tensor& partials,
                  int64_t chunk_size, at::ScalarType g_type) {
  const ChunkTable table = chunk_table(ptrs, numels, chunk_tensor, chunk_index, first_chunk, chunk_count, chunk_size);
  const int64_t n_chunks = chunk_tensor.numel();
  const at::Device device = ptrs.device();
  if (!grads.empty()) check_list(grads, "grads", table.n_tensors, device, g_type);  // NOTE [tensor lists or tables]
  check_table(partials, "partials", math_dtype(g_type), n_chunks, device);
  const Dtype g_dtype = to_dtype(g_type, "grads");

  const c10::cuda::CUDAGuard guard(device);
  const Dtype math = to_dtype(math_dtype(g_type), "partials");
  const LaunchConfig config{g_dtype, g_dtype, math, false, n_chunks, at::cuda::getCurrentCUDAStream()};
  check_launch(launch_grad_sumsq(table, partials.data_ptr(), config), "grad_sumsq");
  return partials.narrow(0, 0, n_chunks).sum();
}

}  // namespace

TORCH_LIBRARY(largedet, m) {
  m.def(
      "pmd_lamb_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] steps, Tensor(e!)[] masters, Tensor ptrs, Tensor numels, Tensor chunk_tensor, "
      "Tensor chunk_index, Tensor first_chunk, Tensor chunk_count, Tensor hyper, Tensor grad_factor, "
      "Tensor found_inf, Tensor(f!) partials, Tensor(g!) t_now, int chunk_size, ScalarType x_dtype, "
      "ScalarType g_dtype, ScalarType m_dtype, bool has_masters) -> ()");
  m.def(
      "pmd_lamb_moments_(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, "
      "Tensor[] steps, Tensor[] masters, Tensor ptrs, Tensor numels, Tensor chunk_tensor, Tensor chunk_index, "
      "Tensor first_chunk, Tensor chunk_count, Tensor hyper, Tensor grad_factor, Tensor found_inf, "
      "Tensor(c!) partials, Tensor(d!) t_now, int chunk_size, ScalarType x_dtype, ScalarType g_dtype, "
      "ScalarType m_dtype, bool has_masters, Tensor(e!) sums) -> ()");
  m.def(
      "pmd_lamb_update_(Tensor(a!)[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor(b!)[] steps, Tensor(c!)[] masters, Tensor ptrs, Tensor numels, Tensor chunk_tensor, "
      "Tensor chunk_index, Tensor first_chunk, Tensor chunk_count, Tensor hyper, Tensor grad_factor, "
      "Tensor found_inf, Tensor partials, Tensor t_now, int chunk_size, ScalarType x_dtype, ScalarType g_dtype, "
      "ScalarType m_dtype, bool has_masters) -> ()");
  m.def(
      "grad_sumsq(Tensor[] grads, Tensor ptrs, Tensor numels, Tensor chunk_tensor, Tensor chunk_index, "
      "Tensor first_chunk, Tensor chunk_count, Tensor(a!) partials, int chunk_size, ScalarType g_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(largedet, CUDA, m) {
  m.impl("pmd_lamb_step_", &pmd_lamb_step_);
  m.impl("pmd_lamb_moments_", &pmd_lamb_moments_);
  m.impl("pmd_lamb_update_", &pmd_lamb_update_);
  m.impl("grad_sumsq", &grad_sumsq);
}

}  // namespace largedet

// Importing the module runs the registrations above (python_module.h).
LARGEDET_PYTHON_MODULE(nullptr)
