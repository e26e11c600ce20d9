// Launchers: pick the kernel instantiation for the dtypes, launch, check. Alignment is the
// kernels' own test, per tensor (NOTE [vector and scalar paths] in csrc/multi_tensor_apply.cuh).
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

// The element types of one kernel instantiation, as values for dispatch().
template <typename X_, typename G_>
struct Instance {
  using X = X_;
  using G = G_;
  using M = MathOf<X_>;
};

// Calls f(Instance<X, G>{}) for the configuration's types; an unsupported pair gives
// cudaErrorInvalidValue.
template <typename F>
cudaError_t dispatch(const LaunchConfig& cfg, F&& f) {
  auto with_types = [&](auto x_tag, auto g_tag) {
    using X = typename decltype(x_tag)::type;
    using G = typename decltype(g_tag)::type;
    return f(Instance<X, G>{});
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

template <typename I>
cudaError_t moments(const ChunkTable& table, const StepScalars& s, const LaunchConfig& cfg) {
  pmd_lamb_moments_kernel<typename I::X, typename I::G, typename I::M><<<cfg.n_chunks, kBlockSize, 0, cfg.stream>>>(
      table, s);
  return cudaGetLastError();
}

template <typename I>
cudaError_t update(const ChunkTable& table, const StepScalars& s, const LaunchConfig& cfg) {
  pmd_lamb_update_kernel<typename I::X, typename I::M><<<cfg.n_chunks, kBlockSize, 0, cfg.stream>>>(table, s);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pmd_lamb_step(const ChunkTable& table, const StepScalars& scalars, const LaunchConfig& cfg) {
  if (cfg.n_chunks == 0) return cudaSuccess;
  return dispatch(cfg, [&](auto instance) {
    using I = decltype(instance);
    if (const cudaError_t err = moments<I>(table, scalars, cfg); err != cudaSuccess) return err;
    return update<I>(table, scalars, cfg);
  });
}

cudaError_t launch_pmd_lamb_moments(const ChunkTable& table, const StepScalars& scalars, void* sums,
                                    const LaunchConfig& cfg) {
  if (cfg.n_chunks == 0) return cudaSuccess;
  return dispatch(cfg, [&](auto instance) {
    using I = decltype(instance);
    using M = typename I::M;
    if (const cudaError_t err = moments<I>(table, scalars, cfg); err != cudaSuccess) return err;
    tensor_sums_kernel<M><<<table.n_tensors, kBlockSize, 0, cfg.stream>>>(
        table, static_cast<const M*>(scalars.partials), static_cast<M*>(sums));
    return cudaGetLastError();
  });
}

cudaError_t launch_pmd_lamb_update(const ChunkTable& table, const StepScalars& scalars, const LaunchConfig& cfg) {
  if (cfg.n_chunks == 0) return cudaSuccess;
  return dispatch(cfg, [&](auto instance) { return update<decltype(instance)>(table, scalars, cfg); });
}

cudaError_t launch_grad_sumsq(const ChunkTable& table, void* partials, const LaunchConfig& cfg) {
  if (cfg.n_chunks == 0) return cudaSuccess;
  return dispatch(cfg, [&](auto instance) {
    using I = decltype(instance);
    grad_sumsq_kernel<typename I::G, typename I::M><<<cfg.n_chunks, kBlockSize, 0, cfg.stream>>>(
        table, static_cast<typename I::M*>(partials));
    return cudaGetLastError();
  });
}

bool supported_dtypes(Dtype x, Dtype g) {
  return g == x || (g == Dtype::kFloat32 && (x == Dtype::kFloat16 || x == Dtype::kBFloat16));
}

}  // namespace largedet
