// The emulator's torch side: the tracking CPU allocator of NOTE [checked accesses] and the ops
// with which Python steers and observes the runtime.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstring>
#include <stdexcept>

#include "cuda_shim.h"
#include "runtime.h"

namespace largedet_emu {
namespace {

constexpr unsigned char kPoison = 0xff;      // fresh memory reads as NaN
constexpr uint8_t kAllocatorPriority = 100;  // above c10's default CPU allocator (0)

// NOTE [checked accesses]
//   While the emulator is loaded, CPU tensors are allocated by c10's alloc_cpu as ever, but
//   each allocation is recorded while it lives, so the runtime can tell a 16-byte access
//   inside a tensor's storage from one past its end, and filled with NaN, so that reading
//   memory nobody wrote shows in the results.
class TrackingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* p = c10::alloc_cpu(bytes);
    if (p != nullptr) {
      std::memset(p, kPoison, bytes);
      track_allocation(p, bytes);
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* p) {
    if (p == nullptr) return;
    untrack_allocation(p);
    c10::free_cpu(p);
  }
};

TrackingAllocator tracking_allocator;
const bool tracking = [] {
  c10::SetCPUAllocator(&tracking_allocator, kAllocatorPriority);
  return true;
}();

void configure_op(c10::string_view schedule, int64_t seed) {
  try {
    configure(std::string(schedule), static_cast<std::uint64_t>(seed));
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, "largedet_emulator: ", e.what());
  }
}

std::vector<int64_t> counters_op() {
  const Counters c = counters();
  return {static_cast<int64_t>(c.launches), static_cast<int64_t>(c.blocks), static_cast<int64_t>(c.vector_loads),
          static_cast<int64_t>(c.vector_stores)};
}

// The shim's 16-bit conversions, for tests against torch's: float32 → float16/bfloat16 and back.
at::Tensor narrow_float(const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "narrow_float takes contiguous float32");
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "narrow_float makes float16 or bfloat16");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  const float* in = x.data_ptr<float>();
  auto* bits = static_cast<std::uint16_t*>(out.data_ptr());
  for (int64_t i = 0; i < x.numel(); ++i) {
    bits[i] = dtype == at::kHalf ? float_to_half(in[i]) : float_to_bfloat16(in[i]);
  }
  return out;
}

at::Tensor widen_float(const at::Tensor& x) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kHalf || dtype == at::kBFloat16) && x.is_contiguous(),
              "widen_float takes contiguous float16 or bfloat16");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const auto* bits = static_cast<const std::uint16_t*>(x.data_ptr());
  float* values = out.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    values[i] = dtype == at::kHalf ? half_to_float(bits[i]) : bfloat16_to_float(bits[i]);
  }
  return out;
}

}  // namespace
}  // namespace largedet_emu

TORCH_LIBRARY(largedet_emulator, m) {
  m.def("configure(str schedule, int seed) -> ()", &largedet_emu::configure_op);
  m.def("counters() -> int[]", &largedet_emu::counters_op);
  m.def("reset_counters() -> ()", &largedet_emu::reset_counters);
  m.def("narrow_float(Tensor x, ScalarType dtype) -> Tensor", &largedet_emu::narrow_float);
  m.def("widen_float(Tensor x) -> Tensor", &largedet_emu::widen_float);
}
