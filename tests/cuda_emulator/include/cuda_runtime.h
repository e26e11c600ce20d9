// The CUDA runtime API as far as csrc/ uses it, for host C++ (NOTE [emulated execution] in
// tests/cuda_emulator/runtime.cpp). Launch errors are recorded by the runtime and read back
// through cudaGetLastError, as on a GPU.
#pragma once

#include <cstdint>

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

using cudaStream_t = struct CUstream_st*;

// The first error since the last call, then cudaSuccess (as CUDA's).
cudaError_t cudaGetLastError();
// For the error of a failed launch, what the emulator saw: where, which thread, why.
const char* cudaGetErrorString(cudaError_t error);
