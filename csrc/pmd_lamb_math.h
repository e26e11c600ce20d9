// The update rule of PMD-LAMB in C++, once, for the CUDA kernels (csrc/pmd_lamb.cuh) and the
// CPU backend (csrc/cpu/pmd_lamb_cpu.cpp). V is a scalar (float, double) on the GPU and a
// SIMD vector (at::vec::Vectorized) on the CPU; Ops<V> holds what differs between them.
// Torch-free and standard-library-free under NVRTC (NOTE [torch-free kernels]).
#pragma once

#include "tables.h"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define LARGEDET_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <math.h>
#define LARGEDET_HOST_DEVICE inline
#endif

namespace largedet {

// The square root of V; the CPU backend specialises it for its vectors.
template <typename V>
struct Ops {
  static LARGEDET_HOST_DEVICE V sqrt(V a) { return ::sqrt(a); }
};
template <>
struct Ops<float> {
  static LARGEDET_HOST_DEVICE float sqrt(float a) { return ::sqrtf(a); }
};

constexpr double kHalfPi = 1.5707963267948966;

// What the update of one tensor needs at step t: ξ and everything derived from its row of
// the hyper-parameter table, formed in double and rounded to the scalar math type V once
// (NOTE [double coefficients] in largedet_kernels/backends/tables.py). A vector type
// takes them broadcast from its scalar type's.
template <typename V>
struct StepCoefficients {
  V decay_m, decay_v;                // ξβ1, ξβ2
  V weight_g, weight_g2;             // (1−β1) or 1, (1−β2)
  V correction_m, correction_v;      // 1−β1^t, 1−β2^t, or 1
  V eps_in, eps_out;                 // ε inside or outside the square root
  V decay_in_grad, decay_in_update;  // λ in g (L2 mode) or in u (decoupled)

  LARGEDET_HOST_DEVICE StepCoefficients(const double* row, double t) {
    const double beta1 = row[kBeta1], beta2 = row[kBeta2], cycle = row[kCycleLength];
    const double xi = cycle > 0 ? ::cos(kHalfPi * ::fmod(t, cycle) / cycle) : 1.0;  // ξ = cos(π/2·(t mod T)/T)
    const bool bias_correction = row[kBiasCorrection] != 0, inside = row[kEpsInsideSqrt] != 0;
    const bool adam_w = row[kAdamWMode] != 0;
    // Gradient ascent steps on −g: m takes −w·(g − λx) = w·(−g + λx), v the same square.
    const double sign = row[kMaximize] != 0 ? -1.0 : 1.0;
    const V eps = V(row[kEps]), lambda = V(row[kWeightDecay]);
    decay_m = V(xi * beta1);
    decay_v = V(xi * beta2);
    weight_g = V(sign * row[kWeightG]);
    weight_g2 = V(row[kWeightG2]);
    correction_m = V(bias_correction ? 1.0 - ::pow(beta1, t) : 1.0);
    correction_v = V(bias_correction ? 1.0 - ::pow(beta2, t) : 1.0);
    eps_in = inside ? eps : V(0);
    eps_out = inside ? V(0) : eps;
    decay_in_grad = adam_w ? V(0) : V(sign * row[kWeightDecay]);
    decay_in_update = adam_w ? lambda : V(0);
  }

  // The scalar coefficients broadcast to the lanes of a vector type.
  template <typename S>
  explicit StepCoefficients(const StepCoefficients<S>& s)
      : decay_m(s.decay_m), decay_v(s.decay_v), weight_g(s.weight_g), weight_g2(s.weight_g2),
        correction_m(s.correction_m), correction_v(s.correction_v), eps_in(s.eps_in), eps_out(s.eps_out),
        decay_in_grad(s.decay_in_grad), decay_in_update(s.decay_in_update) {}
};

// m = ξβ1·m + (1−β1)·g, v = ξβ2·v + (1−β2)·g², with g first scaled by GradScaler's 1/scale
// × the clip factor and, in L2 mode, given λx.
template <typename V>
LARGEDET_HOST_DEVICE void update_moments(V& m, V& v, V g, V x, V factor, const StepCoefficients<V>& c) {
  g = g * factor + c.decay_in_grad * x;
  m = c.decay_m * m + c.weight_g * g;
  v = c.decay_v * v + c.weight_g2 * g * g;
}

// u = r + λx, r = m̂/√(v̂ + ε) or m̂/(√v̂ + ε): the one place both passes get u from.
template <typename V>
LARGEDET_HOST_DEVICE V direction(V m, V v, V x, const StepCoefficients<V>& c) {
  const V denom = Ops<V>::sqrt(v / c.correction_v + c.eps_in) + c.eps_out;
  return m / c.correction_m / denom + c.decay_in_update * x;
}

// ‖x‖/‖u‖ from the squared norms, clamped to the row's bounds; 1 when a norm is 0 (zero-initialised
// biases still train) or the tensor takes no trust ratio; NaN when a norm is not finite, so that the
// whole tensor shows it (NOTE [non-finite gradients] in largedet_kernels/reference.py).
template <typename M>
LARGEDET_HOST_DEVICE M applied_ratio(const double* row, M sum_x, M sum_u) {
  const M x_norm = Ops<M>::sqrt(sum_x), u_norm = Ops<M>::sqrt(sum_u);
  if (!::isfinite(x_norm) || !::isfinite(u_norm)) return M(::nan(""));
  const bool trusted = row[kUseTrustRatio] != 0 && x_norm > M(0) && u_norm > M(0);
  const M lo = M(row[kTrustRatioMin]), hi = M(row[kTrustRatioMax]), ratio = x_norm / u_norm;
  return trusted ? (ratio < lo ? lo : (ratio > hi ? hi : ratio)) : M(1);
}

// η·α times the applied ratio: what u is scaled by.
template <typename M>
LARGEDET_HOST_DEVICE M trust_ratio(const double* row, M applied) {
  return M(row[kLrAlpha]) * applied;
}

// The tensor's record of this step (NOTE [trust-ratio records] in largedet_kernels/backends/tables.py).
template <typename M>
LARGEDET_HOST_DEVICE void write_record(M* records, int64_t tensor, M t, M sum_x, M sum_u, M applied) {
  M* record = records + tensor * kRecordFields;
  record[kRecordStep] = t;
  record[kRecordXNorm] = Ops<M>::sqrt(sum_x);
  record[kRecordUNorm] = Ops<M>::sqrt(sum_u);
  record[kRecordRatio] = applied;
}

}  // namespace largedet
