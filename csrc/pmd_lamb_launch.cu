// Launchers: pick the kernel instantiation for the dtypes and alignment, launch, check.
#include "pmd_lamb.cuh"
#include "pmd_lamb_launch.h"

namespace largedet {
namespace {

template <Dtype D>
struct TypeOf;
template <>
struct TypeOf<Dtype::kFloat32> {
  using type = float;
};
template <>
struct TypeOf<Dtype::kFloat16> {
  using type = __half;
};
template <>
struct TypeOf<Dtype::kBFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct TypeOf<Dtype::kFloat64> {
  using type = double;
};

// Moments and math in float32, or float64 for float64 parameters.
template <typename X>
using MathOf = typename std::conditional<std::is_same<X, double>::value, double, float>::type;

template <typename X, typename G, bool kAligned>
cudaError_t step(const ChunkTable& table, const StepScalars& s, const LaunchConfig& cfg) {
  using M = MathOf<X>;
  pmd_lamb_moments_kernel<X, G, M, kAligned><<<cfg.n_chunks, kBlockSize, 0, cfg.stream>>>(table, s);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  pmd_lamb_update_kernel<X, M, kAligned><<<cfg.n_chunks, kBlockSize, 0, cfg.stream>>>(table, s);
  return cudaGetLastError();
}

template <typename X, typename G, bool kAligned>
cudaError_t grad_sumsq(const ChunkTable& table, void* partials, const LaunchConfig& cfg) {
  using M = MathOf<X>;
  grad_sumsq_kernel<G, M, kAligned><<<cfg.n_chunks, kBlockSize, 0, cfg.stream>>>(table, static_cast<M*>(partials));
  return cudaGetLastError();
}

// Calls f.template operator()<X, G, kAligned>() for the configuration's types.
template <typename F>
cudaError_t dispatch(const LaunchConfig& cfg, F&& f) {
  auto with_types = [&](auto x_tag, auto g_tag) {
    using X = typename decltype(x_tag)::type;
    using G = typename decltype(g_tag)::type;
    return cfg.aligned ? f.template operator()<X, G, true>() : f.template operator()<X, G, false>();
  };
  const bool fp32_grads = cfg.g_dtype == Dtype::kFloat32;
  switch (cfg.x_dtype) {
    case Dtype::kFloat32:
      if (fp32_grads) return with_types(TypeOf<Dtype::kFloat32>{}, TypeOf<Dtype::kFloat32>{});
      break;
    case Dtype::kFloat64:
      if (cfg.g_dtype == Dtype::kFloat64) return with_types(TypeOf<Dtype::kFloat64>{}, TypeOf<Dtype::kFloat64>{});
      break;
    case Dtype::kFloat16:
      if (cfg.g_dtype == Dtype::kFloat16) return with_types(TypeOf<Dtype::kFloat16>{}, TypeOf<Dtype::kFloat16>{});
      if (fp32_grads) return with_types(TypeOf<Dtype::kFloat16>{}, TypeOf<Dtype::kFloat32>{});
      break;
    case Dtype::kBFloat16:
      if (cfg.g_dtype == Dtype::kBFloat16) return with_types(TypeOf<Dtype::kBFloat16>{}, TypeOf<Dtype::kBFloat16>{});
      if (fp32_grads) return with_types(TypeOf<Dtype::kBFloat16>{}, TypeOf<Dtype::kFloat32>{});
      break;
  }
  return cudaErrorInvalidValue;
}

struct StepLauncher {
  const ChunkTable& table;
  const StepScalars& scalars;
  const LaunchConfig& cfg;
  template <typename X, typename G, bool kAligned>
  cudaError_t operator()() const { return step<X, G, kAligned>(table, scalars, cfg); }
};

struct GradSumsqLauncher {
  const ChunkTable& table;
  void* partials;
  const LaunchConfig& cfg;
  template <typename X, typename G, bool kAligned>
  cudaError_t operator()() const { return grad_sumsq<X, G, kAligned>(table, partials, cfg); }
};

}  // namespace

cudaError_t launch_pmd_lamb_step(const ChunkTable& table, const StepScalars& scalars, const LaunchConfig& cfg) {
  if (cfg.n_chunks == 0) return cudaSuccess;
  return dispatch(cfg, StepLauncher{table, scalars, cfg});
}

cudaError_t launch_grad_sumsq(const ChunkTable& table, void* partials, const LaunchConfig& cfg) {
  if (cfg.n_chunks == 0) return cudaSuccess;
  return dispatch(cfg, GradSumsqLauncher{table, partials, cfg});
}

bool supported_dtypes(Dtype x, Dtype g) {
  return g == x || (g == Dtype::kFloat32 && (x == Dtype::kFloat16 || x == Dtype::kBFloat16));
}

}  // namespace largedet
