// Kernels that break CUDA's rules on purpose: tests/test_cuda_emulator.py shows that the
// emulator reports each, so that its silence about csrc/'s kernels means something.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_shim.h"

namespace largedet_emu {
namespace {

constexpr int kThreads = 64;

__global__ void divergent_barrier_kernel(float*, float) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void early_exit_kernel(float*, float) {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

__global__ void half_warp_shuffle_kernel(float* out, float value) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_down_sync(0xffffffffu, value, 1);
}

// Thread 0 publishes `value` through shared memory and every thread reads it back.
template <bool kBarrier>
__global__ void broadcast_kernel(float* out, float value) {
  __shared__ float published;
  if (threadIdx.x == 0) published = value;
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = published;
}

// Reads one element past the end of `out`: the planted bug that AddressSanitizer must report
// before sanitize.py trusts its silence (the emulator checks only 16-byte accesses itself).
__global__ void read_past_end_kernel(float* out, float) {
  if (threadIdx.x == 0) out[0] = out[kThreads];
}

// A 128-bit load 4 bytes into `out`: what a GPU faults on, and the emulator must report.
__global__ void misaligned_load_kernel(float* out, float) {
  if (threadIdx.x == 0) out[0] = static_cast<float>(__ldg(reinterpret_cast<const uint4*>(out + 1)).x);
}

// One block of kThreads threads running `kernel`; what each thread wrote, or the launch's error.
at::Tensor selftest(c10::string_view kernel, double value) {
  at::Tensor out = at::zeros({kThreads}, at::kFloat);
  void (*chosen)(float*, float) = kernel == "divergent_barrier"    ? &divergent_barrier_kernel
                                  : kernel == "early_exit"         ? &early_exit_kernel
                                  : kernel == "half_warp_shuffle"  ? &half_warp_shuffle_kernel
                                  : kernel == "broadcast"          ? &broadcast_kernel<true>
                                  : kernel == "broadcast_unsynced" ? &broadcast_kernel<false>
                                  : kernel == "read_past_end"      ? &read_past_end_kernel
                                  : kernel == "misaligned_load"    ? &misaligned_load_kernel
                                                                   : nullptr;
  TORCH_CHECK_VALUE(chosen != nullptr, "largedet_emulator: no self-test kernel ", kernel);
  launch(1, kThreads, 0, nullptr, chosen, out.data_ptr<float>(), static_cast<float>(value));
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "largedet_emulator: ", cudaGetErrorString(error));
  return out;
}

}  // namespace
}  // namespace largedet_emu

TORCH_LIBRARY_FRAGMENT(largedet_emulator, m) {
  m.def("selftest(str kernel, float value) -> Tensor", &largedet_emu::selftest);
}
