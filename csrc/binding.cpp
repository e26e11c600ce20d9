// The torch side of the CUDA backend: the CUDA implementation of the op family defined in
// largedet_kernels/backends/ops.py (schemas and fakes there), its argument checks, and the hand-off
// to the torch-free launchers of csrc/pmd_lamb_launch.cu.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

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

void check_table(const Tensor& t, const char* name, at::ScalarType dtype, int64_t numel, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "largedet: ", name, " is on ", t.device(), ", the parameters on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "largedet: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() >= numel, "largedet: ", name, " must be contiguous with at least ",
              numel, " elements, got ", t.sizes());
}

// The number of chunks of a packed chunk table for n tensors.
int64_t chunks_in(const Tensor& chunks, int64_t n) {
  TORCH_CHECK(chunks.numel() % 2 == 0, "largedet: chunks must hold 2 entries per chunk and per tensor");
  return chunks.numel() / 2 - n;
}

// The plan's tables (NOTE [packed chunk tables] in largedet_kernels/backends/tables.py), checked against
// each other and the device.
ChunkTable chunk_table(const Tensor& ptrs, const Tensor& numels, const Tensor& chunks, int64_t chunk_size) {
  const int64_t n = numels.numel();
  TORCH_CHECK(n > 0, "largedet: no tensors to step");
  const at::Device device = ptrs.device();
  TORCH_CHECK(device.is_cuda(), "largedet: the cuda backend needs CUDA tensors, got ", device);
  TORCH_CHECK(chunk_size > 0 && chunk_size % kILP == 0, "largedet: chunk_size must be a positive multiple of ",
              kILP, ", got ", chunk_size);
  check_table(ptrs, "ptrs", at::kLong, kPointerRows * n, device);
  check_table(numels, "numels", at::kLong, n, device);
  check_table(chunks, "chunks", at::kInt, 2 * n + 2, device);
  const int64_t n_chunks = chunks_in(chunks, n);
  const int32_t* c = chunks.data_ptr<int32_t>();
  return ChunkTable{ptrs.data_ptr<int64_t>(),
                    numels.data_ptr<int64_t>(),
                    c + part_offset(kChunkTensor, n_chunks, n),
                    c + part_offset(kChunkIndex, n_chunks, n),
                    c + part_offset(kFirstChunk, n_chunks, n),
                    c + part_offset(kChunkCount, n_chunks, n),
                    n,
                    chunk_size};
}

void check_list(TensorList list, const char* name, int64_t n, const at::Device& device, at::ScalarType dtype) {
  TORCH_CHECK(static_cast<int64_t>(list.size()) == n, "largedet: ", name, " has ", list.size(),
              " tensors, the tables address ", n);
  for (const Tensor& t : list) {
    TORCH_CHECK(t.device() == device, "largedet: every tensor of ", name, " must be on ", device, ", one is on ",
                t.device());
    TORCH_CHECK(t.scalar_type() == dtype, "largedet: ", name, " must be ", dtype, ", one is ", t.scalar_type());
  }
}

// The tensor-list form's tables (NOTE [tensor lists or tables] in largedet_kernels/backends/ops.py): every
// tensor checked (every list in `read` must be given; masters are optional), then the addresses uploaded.
struct ListTables {
  Tensor ptrs, numels;
  at::ScalarType x_dtype, g_dtype, m_dtype;
  bool has_masters;

  ListTables(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
             TensorList masters, const Tensor& chunks, std::initializer_list<PointerRow> read) {
    const int64_t n = params.size();
    TORCH_CHECK(n > 0, "largedet: no tensors to step");
    const at::Device device = chunks.device();
    x_dtype = params[0].scalar_type();
    g_dtype = grads.empty() ? x_dtype : grads[0].scalar_type();
    m_dtype = exp_avgs.empty() ? x_dtype : exp_avgs[0].scalar_type();
    has_masters = !masters.empty();
    const std::pair<TensorList, at::ScalarType> rows[kPointerRows] = {
        {params, x_dtype}, {grads, g_dtype}, {exp_avgs, m_dtype}, {exp_avg_sqs, m_dtype}, {steps, at::kFloat},
        {masters, at::kFloat}};
    static const char* const names[kPointerRows] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "masters"};
    std::vector<int64_t> addresses(kPointerRows * n, 0), sizes(n);
    for (int row = 0; row < kPointerRows; ++row) {
      const TensorList list = rows[row].first;
      if (list.empty()) {
        TORCH_CHECK(std::find(read.begin(), read.end(), row) == read.end(), "largedet: ", names[row], " is empty");
        continue;
      }
      check_list(list, names[row], n, device, rows[row].second);
      for (int64_t i = 0; i < n; ++i) addresses[row * n + i] = reinterpret_cast<int64_t>(list[i].data_ptr());
    }
    for (int64_t i = 0; i < n; ++i) sizes[i] = params[i].numel();
    const auto options = at::TensorOptions().dtype(at::kLong);
    ptrs = at::tensor(addresses, options).to(device);
    numels = at::tensor(sizes, options).to(device);
  }
};

// A step's launch, checked: every op of the step family takes the same arguments.
struct StepLaunch {
  ChunkTable table;
  StepScalars scalars;
  LaunchConfig config;
  at::Device device;
};

StepLaunch checked_step(const Tensor& ptrs, const Tensor& numels, const Tensor& chunks, const Tensor& workspace,
                        int64_t chunk_size, at::ScalarType x_type, at::ScalarType g_type, at::ScalarType m_type,
                        bool has_masters, const Tensor& hyper, const Tensor* grad_factor, const Tensor& found_inf,
                        const Tensor* sums, const c10::optional<Tensor>& records = c10::nullopt) {
  const ChunkTable table = chunk_table(ptrs, numels, chunks, chunk_size);
  const int64_t n = table.n_tensors, n_chunks = chunks_in(chunks, n);
  const at::Device device = ptrs.device();
  const at::ScalarType math = at::toOpMathType(x_type);
  check_table(hyper, "hyper", at::kDouble, n * kHyperColumns, device);  // NOTE [double coefficients]
  if (grad_factor != nullptr) check_table(*grad_factor, "grad_factor", math, 1, device);
  check_table(found_inf, "found_inf", at::kFloat, 1, device);
  check_table(workspace, "workspace", math, 2 * n_chunks + n, device);
  if (sums != nullptr) check_table(*sums, "sums", math, 2 * n, device);
  if (records) check_table(*records, "records", math, kRecordFields * n, device);  // NOTE [trust-ratio records]
  const Dtype x_dtype = to_dtype(x_type, "params"), g_dtype = to_dtype(g_type, "grads");
  const Dtype m_dtype = to_dtype(m_type, "exp_avgs");
  TORCH_CHECK(supported_dtypes(x_dtype, g_dtype), "largedet: no kernel for ", x_type, " parameters with ", g_type,
              " gradients");
  TORCH_CHECK(supported_moments(x_dtype, m_dtype), "largedet: no kernel for ", m_type, " moments of ", x_type,
              " parameters (they are stored as ", math, ", or bfloat16 beside float32 math)");
  TORCH_CHECK(!has_masters || supported_masters(x_dtype),
              "largedet: fp32 master weights are for float16 and bfloat16 parameters, not ", x_type);
  char* w = static_cast<char*>(workspace.data_ptr());
  const int64_t math_bytes = workspace.element_size();
  const StepScalars scalars{hyper.data_ptr<double>(), grad_factor ? grad_factor->data_ptr() : nullptr,
                            found_inf.data_ptr<float>(),
                            w + part_offset(kPartials, n_chunks) * math_bytes,
                            w + part_offset(kTNow, n_chunks) * math_bytes, records ? records->data_ptr() : nullptr};
  const LaunchConfig config{x_dtype, g_dtype, m_dtype, has_masters, n_chunks,
                            at::cuda::getCurrentCUDAStream(device.index())};
  return StepLaunch{table, scalars, config, device};
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "largedet: ", op, " launch failed: ", cudaGetErrorString(err));
}

// Both passes (NOTE [two passes] in largedet_kernels/triton_kernels.py): two launches.
void table_step_(const Tensor& ptrs, const Tensor& numels, const Tensor& chunks, const Tensor& workspace,
                 int64_t chunk_size, at::ScalarType x, at::ScalarType g, at::ScalarType m, bool has_masters,
                 const Tensor& hyper, const Tensor& grad_factor, const Tensor& found_inf,
                 const c10::optional<Tensor>& records) {
  const StepLaunch l = checked_step(ptrs, numels, chunks, workspace, chunk_size, x, g, m, has_masters, hyper,
                                    &grad_factor, found_inf, nullptr, records);
  const c10::cuda::CUDAGuard guard(l.device);
  check_launch(launch_pmd_lamb_step(l.table, l.scalars, l.config), "step_");
}

// Pass 1 and each tensor's local Σx², Σu² into sums (NOTE [sharded norms]): two launches.
void table_moments_(const Tensor& ptrs, const Tensor& numels, const Tensor& chunks, const Tensor& workspace,
                    int64_t chunk_size, at::ScalarType x, at::ScalarType g, at::ScalarType m, bool has_masters,
                    const Tensor& hyper, const Tensor& grad_factor, const Tensor& found_inf, const Tensor& sums) {
  const StepLaunch l =
      checked_step(ptrs, numels, chunks, workspace, chunk_size, x, g, m, has_masters, hyper, &grad_factor, found_inf,
                   &sums);
  const c10::cuda::CUDAGuard guard(l.device);
  check_launch(launch_pmd_lamb_moments(l.table, l.scalars, sums.data_ptr(), l.config), "moments_");
}

// Pass 2 with the norms read from sums through the chunk table's first_chunk/chunk_count, which under
// NOTE [sharded norms] point at one all-reduced pair per tensor: one launch.
void table_update_(const Tensor& ptrs, const Tensor& numels, const Tensor& chunks, const Tensor& workspace,
                   int64_t chunk_size, at::ScalarType x, at::ScalarType g, at::ScalarType m, bool has_masters,
                   const Tensor& hyper, const Tensor& found_inf, const Tensor& sums,
                   const c10::optional<Tensor>& records) {
  // Pass 2 does not read the factor.
  StepLaunch l = checked_step(ptrs, numels, chunks, workspace, chunk_size, x, g, m, has_masters, hyper, nullptr,
                              found_inf, &sums, records);
  l.scalars.partials = sums.data_ptr();
  const c10::cuda::CUDAGuard guard(l.device);
  check_launch(launch_pmd_lamb_update(l.table, l.scalars, l.config), "update_");
}

Tensor table_grad_sumsq(const Tensor& ptrs, const Tensor& numels, const Tensor& chunks, const Tensor& workspace,
                        int64_t chunk_size, at::ScalarType g_type) {
  const ChunkTable table = chunk_table(ptrs, numels, chunks, chunk_size);
  const int64_t n_chunks = chunks_in(chunks, table.n_tensors);
  const at::Device device = ptrs.device();
  const at::ScalarType math = at::toOpMathType(g_type);
  check_table(workspace, "workspace", math, 2 * n_chunks + table.n_tensors, device);
  const Dtype g_dtype = to_dtype(g_type, "grads");
  const c10::cuda::CUDAGuard guard(device);
  const LaunchConfig config{g_dtype, g_dtype, to_dtype(math, "workspace"), false, n_chunks,
                            at::cuda::getCurrentCUDAStream(device.index())};
  check_launch(launch_grad_sumsq(table, workspace.data_ptr(), config), "grad_sumsq");
  return workspace.narrow(0, 0, n_chunks).sum();
}

// The tensor-list form: the same work on tables made from the lists.
void step_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
           TensorList masters, const Tensor& chunks, const Tensor& workspace, int64_t chunk_size, const Tensor& hyper,
           const Tensor& grad_factor, const Tensor& found_inf, const c10::optional<Tensor>& records) {
  const ListTables t(params, grads, exp_avgs, exp_avg_sqs, steps, masters, chunks, {kX, kG, kM, kV, kStep});
  table_step_(t.ptrs, t.numels, chunks, workspace, chunk_size, t.x_dtype, t.g_dtype, t.m_dtype, t.has_masters, hyper,
              grad_factor, found_inf, records);
}

void moments_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
              TensorList masters, const Tensor& chunks, const Tensor& workspace, int64_t chunk_size,
              const Tensor& hyper, const Tensor& grad_factor, const Tensor& found_inf, const Tensor& sums) {
  const ListTables t(params, grads, exp_avgs, exp_avg_sqs, steps, masters, chunks, {kX, kG, kM, kV, kStep});
  table_moments_(t.ptrs, t.numels, chunks, workspace, chunk_size, t.x_dtype, t.g_dtype, t.m_dtype, t.has_masters,
                 hyper, grad_factor, found_inf, sums);
}

void update_(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps, TensorList masters,
             const Tensor& chunks, const Tensor& workspace, int64_t chunk_size, const Tensor& hyper,
             const Tensor& found_inf, const Tensor& sums, const c10::optional<Tensor>& records) {
  const ListTables t(params, {}, exp_avgs, exp_avg_sqs, steps, masters, chunks, {kX, kM, kV, kStep});
  table_update_(t.ptrs, t.numels, chunks, workspace, chunk_size, t.x_dtype, t.g_dtype, t.m_dtype, t.has_masters,
                hyper, found_inf, sums, records);
}

Tensor grad_sumsq(TensorList grads, const Tensor& chunks, const Tensor& workspace, int64_t chunk_size) {
  TORCH_CHECK(!grads.empty(), "largedet: no gradients");
  const ListTables t(grads, grads, {}, {}, {}, {}, chunks, {kG});  // x's row holds the gradients' addresses, unread
  return table_grad_sumsq(t.ptrs, t.numels, chunks, workspace, chunk_size, t.x_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(largedet, CUDA, m) {
  m.impl("step_", &step_);
  m.impl("moments_", &moments_);
  m.impl("update_", &update_);
  m.impl("grad_sumsq", &grad_sumsq);
  m.impl("table_step_", &table_step_);
  m.impl("table_moments_", &table_moments_);
  m.impl("table_update_", &table_update_);
  m.impl("table_grad_sumsq", &table_grad_sumsq);
}

}  // namespace largedet

// Importing the module runs the registrations above (python_module.h).
LARGEDET_PYTHON_MODULE(nullptr)
