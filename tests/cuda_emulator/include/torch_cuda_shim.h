// What csrc/binding.cpp takes from torch's CUDA headers, for its emulated copy on CPU tensors:
// a stream (the emulator runs launches in order on the calling thread) and a device guard.
#pragma once

#include <c10/core/Device.h>

#include "cuda_runtime.h"

namespace at::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace at::cuda

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
