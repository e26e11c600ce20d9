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

template <typename T>
constexpr bool kLowPrecision = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;

// The element types of one step's kernels, as values for dispatch(): parameters X, gradients G,
// moments stored as S (NOTE [stored moments] in csrc/pmd_lamb.cuh), math M, and whether x is
// an fp32 master.
template <typename X_, typename G_, typename S_, bool kHasMaster_>
struct Instance {
  using X = X_;
  using G = G_;
  using S = S_;
  using M = MathOf<X_>;
  static constexpr bool kHasMaster = kHasMaster_;
  // What pass 1 reads x as, and from where: the master, when there is one, and not the parameter.
  using XRead = typename std::conditional<kHasMaster, float, X>::type;
  static constexpr PointerRow kXRow = kHasMaster ? kMaster : kX;
};

// Calls f(TypeOf<x>{}, TypeOf<g>{}) for a supported (parameter, gradient) pair; any other
// gives cudaErrorInvalidValue.
template <typename F>
cudaError_t dispatch_pair(Dtype x, Dtype g, F&& f) {
  const bool fp32_grads = g == Dtype::kFloat32;
  switch (x) {
    case Dtype::kFloat32:
      if (fp32_grads) return f(TypeOf<Dtype::kFloat32>{}, TypeOf<Dtype::kFloat32>{});
      break;
    case Dtype::kFloat64:
      if (g == Dtype::kFloat64) return f(TypeOf<Dtype::kFloat64>{}, TypeOf<Dtype::kFloat64>{});
      break;
    case Dtype::kFloat16:
      if (g == Dtype::kFloat16) return f(TypeOf<Dtype::kFloat16>{}, TypeOf<Dtype::kFloat16>{});
      if (fp32_grads) return f(TypeOf<Dtype::kFloat16>{}, TypeOf<Dtype::kFloat32>{});
      break;
    case Dtype::kBFloat16:
      if (g == Dtype::kBFloat16) return f(TypeOf<Dtype::kBFloat16>{}, TypeOf<Dtype::kBFloat16>{});
      if (fp32_grads) return f(TypeOf<Dtype::kBFloat16>{}, TypeOf<Dtype::kFloat32>{});
      break;
  }
  return cudaErrorInvalidValue;
}

// Calls f(Instance<X, G, S, kHasMaster>{}) for the configuration; one without kernels gives
// cudaErrorInvalidValue. Only meaningful combinations are instantiated: bf16 moments beside
// float32 math, masters beside fp16/bf16 parameters.
template <typename F>
cudaError_t dispatch(const LaunchConfig& cfg, F&& f) {
  return dispatch_pair(cfg.x_dtype, cfg.g_dtype, [&](auto x_tag, auto g_tag) {
    using X = typename decltype(x_tag)::type;
    using G = typename decltype(g_tag)::type;
    using M = MathOf<X>;
    auto with_moments = [&](auto s_tag) -> cudaError_t {
      using S = typename decltype(s_tag)::type;
      if constexpr (kLowPrecision<X>) {
        if (cfg.masters) return f(Instance<X, G, S, true>{});
      } else if (cfg.masters) {
        return cudaErrorInvalidValue;
      }
      return f(Instance<X, G, S, false>{});
    };
    constexpr Dtype kMath = std::is_same<M, double>::value ? Dtype::kFloat64 : Dtype::kFloat32;
    if (cfg.m_dtype == kMath) return with_moments(TypeOf<kMath>{});
    if constexpr (std::is_same<M, float>::value) {
      if (cfg.m_dtype == Dtype::kBFloat16) return with_moments(TypeOf<Dtype::kBFloat16>{});
    }
    return cudaErrorInvalidValue;
  });
}

template <typename I>
cudaError_t moments(const ChunkTable& table, const StepScalars& s, const LaunchConfig& cfg) {
  pmd_lamb_moments_kernel<typename I::XRead, typename I::G, typename I::S, typename I::M, I::kXRow>
      <<<cfg.n_chunks, kBlockSize, 0, cfg.stream>>>(table, s);
  return cudaGetLastError();
}

template <typename I>
cudaError_t update(const ChunkTable& table, const StepScalars& s, const LaunchConfig& cfg) {
  pmd_lamb_update_kernel<typename I::X, typename I::S, typename I::M, I::kHasMaster>
      <<<cfg.n_chunks, kBlockSize, 0, cfg.stream>>>(table, s);
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
  return dispatch_pair(cfg.g_dtype, cfg.g_dtype, [&](auto g_tag, auto) {
    using G = typename decltype(g_tag)::type;
    using M = MathOf<G>;
    grad_sumsq_kernel<G, M><<<cfg.n_chunks, kBlockSize, 0, cfg.stream>>>(table, static_cast<M*>(partials));
    return cudaGetLastError();
  });
}

bool supported_dtypes(Dtype x, Dtype g) {
  return g == x || (g == Dtype::kFloat32 && (x == Dtype::kFloat16 || x == Dtype::kBFloat16));
}

bool supported_moments(Dtype x, Dtype m) {
  const Dtype math = x == Dtype::kFloat64 ? Dtype::kFloat64 : Dtype::kFloat32;
  return m == math || (m == Dtype::kBFloat16 && math == Dtype::kFloat32);
}

bool supported_masters(Dtype x) { return x == Dtype::kFloat16 || x == Dtype::kBFloat16; }

}  // namespace largedet
