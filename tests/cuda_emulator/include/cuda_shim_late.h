// The part of the shim that must follow the kernel headers: load16<Read::kWritten> of
// csrc/multi_tensor_apply.cuh is PTX, specialised here as a checked host load (NOTE [host
// accesses] in cuda_shim.h). The generated launch source includes this after pmd_lamb.cuh.
#pragma once

namespace largedet {

template <>
inline uint4 load16<Read::kWritten>(const uint4* p) {
  return largedet_emu::read16(p);
}

}  // namespace largedet
