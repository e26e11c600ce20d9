// The CPU backend: PMD-LAMB over a bucket's tensors in two passes, vectorised with
// at::vec::Vectorized and parallel with at::parallel_for, for optimizer offload (FSDP2's
// CPUOffloadPolicy) where step() runs on the host over the whole model. The update rule
// is csrc/pmd_lamb_math.h's, shared with the CUDA kernels.
//
// NOTE [cpu passes]
//   As on the GPU (NOTE [two passes] in largedet_kernels/triton_kernels.py) the trust ratio needs a whole-
//   tensor reduction before x may change. Tensors are cut into chunks of kChunk elements
//   whatever the thread count, and a chunk sums x² and u² in a fixed order (vector lanes
//   over a tile, then the lanes in order into a double), the chunks of a tensor in order:
//   results are the same for 1 and N threads. A tensor of one chunk is one work item: one
//   thread runs both passes back to back while its x, m and v are still in cache (fp32:
//   28 B/elem from memory instead of 40). Larger tensors run pass 1 over all their chunks
//   in parallel, then pass 2. With fp32 masters (NOTE [master weights] in
//   largedet_kernels/optimizer.py) x is read from the master and written to both; moments
//   stored in bf16 are read back once stored, so that r is formed from the state.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../pmd_lamb_math.h"
#include "../rounding.h"

namespace largedet {

template <typename M>
struct Ops<at::vec::Vectorized<M>> {
  static at::vec::Vectorized<M> sqrt(at::vec::Vectorized<M> a) { return a.sqrt(); }
};

namespace {

using at::Tensor;
using at::TensorList;

constexpr int64_t kChunk = 1 << 16;  // elements per work item: x, g, m, v of fp32 fit a core's L2
constexpr int64_t kTile = 512;       // elements summed in vector lanes before the lanes go to a double

// The kernels' math type (csrc/tables.h) is ATen's.
template <typename... X>
constexpr bool kOpMath = (std::is_same_v<MathOf<X>, at::opmath_type<X>> && ...);
static_assert(kOpMath<float, double, at::Half, at::BFloat16>);

// Whether T is a 16-bit float that at::vec widens to, and narrows from, float vectors in registers.
template <typename M, typename T>
constexpr bool kWidened = std::is_same_v<M, float> && at::vec::is_reduced_floating_point_v<T>;

// n elements of p as a vector of M: full vectors of 16-bit floats convert in registers (most of the
// traffic of bf16 training: parameters, gradients, bf16 moments), the rest through a buffer.
template <typename M, typename T>
at::vec::Vectorized<M> load(const T* p, int64_t n) {
  using Vec = at::vec::Vectorized<M>;
  if constexpr (std::is_same_v<T, M>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    if constexpr (kWidened<M, T>) {
      if (n == Vec::size()) {
        Vec out;
        at::vec::load_to_float(p, out);
        return out;
      }
    }
    M buf[Vec::size()] = {};
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<M>(p[j]);
    return Vec::loadu(buf);
  }
}

// v's first n lanes to p, rounded to nearest.
template <typename M, typename T>
void store(const at::vec::Vectorized<M>& v, T* p, int64_t n) {
  using Vec = at::vec::Vectorized<M>;
  if constexpr (std::is_same_v<T, M>) {
    n == Vec::size() ? v.store(p) : v.store(p, n);
  } else {
    if constexpr (kWidened<M, T>) {
      if (n == Vec::size()) {
        at::vec::convert_from_float<T>(v, v).store(p, Vec::size());
        return;
      }
    }
    M buf[Vec::size()];
    v.store(buf);
    for (int64_t j = 0; j < n; ++j) p[j] = static_cast<T>(buf[j]);
  }
}

// v as it reads back once stored as T (rounded to nearest), without the round trip through memory.
template <typename T, typename M>
at::vec::Vectorized<M> rounded(const at::vec::Vectorized<M>& v) {
  if constexpr (kWidened<M, T>) {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  } else {
    static_assert(std::is_same_v<T, M>, "moments are stored in the math type or in a 16-bit float");
    return v;
  }
}

template <typename M>
double lanes_sum(const at::vec::Vectorized<M>& v) {
  M lanes[at::vec::Vectorized<M>::size()];
  v.store(lanes);
  double sum = 0;
  for (M lane : lanes) sum += lane;
  return sum;
}

// One tensor of a bucket: where it lives and what its update needs this step. X, G and S are
// the stored types of the parameter, its gradient and its moments.
template <typename X, typename G, typename S>
struct TensorStep {
  using M = MathOf<X>;
  X* x;
  const G* g;
  S* m;
  S* v;
  float* master;  // the fp32 master, or null
  int64_t numel;
  const double* row;  // its row of the hyper-parameter table, in double (NOTE [double coefficients]
                      // in largedet_kernels/backends/chunk_plan.py)
  double t;           // the step being taken
  bool stochastic;    // x rounded stochastically (NOTE [stochastic rounding] in largedet_kernels/rounding.py)
  uint32_t key;       // the rounding key of this step

  // x as the math sees it: the master when there is one.
  at::vec::Vectorized<M> load_x(int64_t i, int64_t n) const {
    if constexpr (std::is_same_v<M, float>) {
      if (master != nullptr) return load<M>(master + i, n);
    }
    return load<M>(x + i, n);
  }

  // The new x, to the master and the parameter.
  void store_x(const at::vec::Vectorized<M>& value, int64_t i, int64_t n) const {
    if constexpr (std::is_same_v<X, at::BFloat16>) {
      if (stochastic && master == nullptr) {
        M values[at::vec::Vectorized<M>::size()];
        value.store(values);
        for (int64_t j = 0; j < n; ++j) {
          x[i + j] = at::BFloat16(stochastic_bf16_bits(values[j], dither(key, i + j)), at::BFloat16::from_bits());
        }
        return;
      }
    }
    if constexpr (std::is_same_v<M, float>) {
      if (master != nullptr) store(value, master + i, n);
    }
    store(value, x + i, n);
  }
};

struct Sums {
  double x = 0, u = 0;
};

// Pass 1 over [begin, end) of one tensor: m, v in place; returns Σx², Σu² of the range.
template <typename X, typename G, typename S>
Sums moments_range(const TensorStep<X, G, S>& s, MathOf<X> factor, int64_t begin, int64_t end) {
  using M = MathOf<X>;
  using Vec = at::vec::Vectorized<M>;
  const StepCoefficients<Vec> c{StepCoefficients<M>(s.row, s.t)};
  const Vec f(factor);
  Sums sums;
  for (int64_t tile = begin; tile < end; tile += kTile) {
    const int64_t tile_end = std::min(tile + kTile, end);
    Vec acc_x(0), acc_u(0);
    for (int64_t i = tile; i < tile_end; i += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), tile_end - i);
      const Vec x = s.load_x(i, n);
      Vec m = load<M>(s.m + i, n), v = load<M>(s.v + i, n);
      update_moments(m, v, load<M>(s.g + i, n), x, f, c);
      m = rounded<S>(m);  // r from the moments as stored
      v = rounded<S>(v);
      store(m, s.m + i, n);
      store(v, s.v + i, n);
      const Vec u = Vec::set(Vec(0), direction(m, v, x, c), n);  // lanes past the end add nothing
      acc_x = acc_x + x * x;
      acc_u = acc_u + u * u;
    }
    sums.x += lanes_sum(acc_x);
    sums.u += lanes_sum(acc_u);
  }
  return sums;
}

// Pass 2 over [begin, end) of one tensor: x ← x − ratio·u, u recomputed from the new m, v.
template <typename X, typename G, typename S>
void update_range(const TensorStep<X, G, S>& s, MathOf<X> ratio, int64_t begin, int64_t end) {
  using M = MathOf<X>;
  using Vec = at::vec::Vectorized<M>;
  const StepCoefficients<Vec> c{StepCoefficients<M>(s.row, s.t)};
  const Vec r(ratio);
  for (int64_t i = begin; i < end; i += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), end - i);
    const Vec x = s.load_x(i, n);
    s.store_x(x - r * direction(load<M>(s.m + i, n), load<M>(s.v + i, n), x, c), i, n);
  }
}

struct Item {
  int64_t tensor, begin, end;
};

// NOTE [cpu passes]: the chunks of the tensors larger than one chunk, in tensor order.
std::vector<Item> chunks_of(const std::vector<int64_t>& numels, bool large) {
  std::vector<Item> items;
  for (int64_t i = 0; i < static_cast<int64_t>(numels.size()); ++i) {
    if ((numels[i] > kChunk) != large) continue;
    for (int64_t b = 0; b < numels[i] || b == 0; b += kChunk) items.push_back({i, b, std::min(b + kChunk, numels[i])});
  }
  return items;
}

// Each tensor's Σx², Σu²: its chunks' sums in order.
std::vector<Sums> per_tensor(const std::vector<Item>& items, const std::vector<Sums>& partials, size_t n) {
  std::vector<Sums> sums(n);
  for (size_t k = 0; k < items.size(); ++k) {
    sums[items[k].tensor].x += partials[k].x;
    sums[items[k].tensor].u += partials[k].u;
  }
  return sums;
}

// The pointer table's rows are tables.h's PointerRow; the table form takes the optimizer's table as it is
// (NOTE [tensor lists or tables] in largedet_kernels/backends/ops.py), the list form builds one.
// A bucket's addresses and sizes as the table form takes them, from its tensors for the list form.
struct Table {
  std::vector<int64_t> ptrs;  // [kPointerRows, n]
  std::vector<int64_t> numels;
  int64_t n = 0;

  Table(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
        TensorList masters)
      : ptrs(kPointerRows * params.size(), 0), n(static_cast<int64_t>(params.size())) {
    for (int64_t i = 0; i < n; ++i) {
      if (!masters.empty()) ptrs[kMaster * n + i] = reinterpret_cast<int64_t>(masters[i].data_ptr());
      ptrs[kX * n + i] = reinterpret_cast<int64_t>(params[i].data_ptr());
      if (!grads.empty()) ptrs[kG * n + i] = reinterpret_cast<int64_t>(grads[i].data_ptr());
      ptrs[kM * n + i] = reinterpret_cast<int64_t>(exp_avgs[i].data_ptr());
      ptrs[kV * n + i] = reinterpret_cast<int64_t>(exp_avg_sqs[i].data_ptr());
      ptrs[kStep * n + i] = reinterpret_cast<int64_t>(steps[i].data_ptr());
      numels.push_back(params[i].numel());
    }
  }

  Table(const Tensor& table, const Tensor& numels_) : n(numels_.numel()) {
    TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.is_contiguous() &&
                    table.numel() == kPointerRows * n,
                "largedet: the pointer table must be a contiguous CPU int64 tensor of ", kPointerRows, " x ", n,
                " addresses, got ", table.scalar_type(), " ", table.sizes());
    TORCH_CHECK(numels_.device().is_cpu() && numels_.scalar_type() == at::kLong && numels_.is_contiguous(),
                "largedet: numels must be a contiguous CPU int64 tensor");
    TORCH_CHECK(n > 0, "largedet: no tensors to step");
    ptrs.assign(table.data_ptr<int64_t>(), table.data_ptr<int64_t>() + kPointerRows * n);
    numels.assign(numels_.data_ptr<int64_t>(), numels_.data_ptr<int64_t>() + n);
  }

  // The table of a step, whose master row must agree with has_masters.
  Table(const Tensor& table, const Tensor& numels_, bool has_masters) : Table(table, numels_) {
    TORCH_CHECK(has_masters == (ptrs[kMaster * n] != 0), "largedet: has_masters is ", has_masters,
                ", and the pointer table's master row says otherwise");
  }

  // Only the gradient row filled: what Σg² reads.
  static Table of_gradients(TensorList grads) {
    Table table({}, {}, {}, {}, {}, {});
    table.n = static_cast<int64_t>(grads.size());
    table.ptrs.assign(kPointerRows * table.n, 0);
    for (int64_t i = 0; i < table.n; ++i) {
      table.ptrs[kG * table.n + i] = reinterpret_cast<int64_t>(grads[i].data_ptr());
      table.numels.push_back(grads[i].numel());
    }
    return table;
  }

  template <typename T>
  T* at(PointerRow row, int64_t i) const {
    return reinterpret_cast<T*>(ptrs[row * n + i]);
  }
};

template <typename X, typename G, typename S>
struct BucketStep {
  using M = MathOf<X>;
  std::vector<TensorStep<X, G, S>> tensors;
  const std::vector<int64_t>& numels;
  M factor = 1;
  M* records;  // NOTE [trust-ratio records], or null

  // Advances (or, when `advance` is false, only reads) every step count.
  BucketStep(const Table& table, const Tensor& hyper, const c10::optional<Tensor>& grad_factor, bool advance,
             const c10::optional<Tensor>& records_ = c10::nullopt)
      : numels(table.numels), records(records_ ? records_->data_ptr<M>() : nullptr) {
    const double* rows = hyper.data_ptr<double>();
    if (grad_factor) factor = static_cast<M>(grad_factor->item<double>());
    tensors.reserve(table.n);
    for (int64_t i = 0; i < table.n; ++i) {
      float* step = table.at<float>(kStep, i);
      if (advance) *step += 1.0f;
      const double* row = rows + i * kHyperColumns;
      const uint32_t key = rounding_key(static_cast<uint32_t>(row[kSeed]), static_cast<uint32_t>(*step));
      tensors.push_back({table.at<X>(kX, i), table.at<const G>(kG, i), table.at<S>(kM, i),
                         table.at<S>(kV, i), table.at<float>(kMaster, i), numels[i], row, *step,
                         row[kStochasticRounding] != 0, key});
    }
  }

  std::vector<Sums> moments(const std::vector<Item>& items) const {
    std::vector<Sums> partials(items.size());
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k)
        partials[k] = moments_range(tensors[items[k].tensor], factor, items[k].begin, items[k].end);
    });
    return partials;
  }

  void update(const std::vector<Item>& items, const std::vector<M>& ratios) const {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k)
        update_range(tensors[items[k].tensor], ratios[items[k].tensor], items[k].begin, items[k].end);
    });
  }

  // The trust ratio of csrc/pmd_lamb_math.h from tensor i's sums (NaN for a non-finite norm: NOTE
  // [non-finite gradients] in largedet_kernels/reference.py), recorded when records are kept.
  M ratio(int64_t i, const Sums& sums) const {
    const M sum_x = static_cast<M>(sums.x), sum_u = static_cast<M>(sums.u);
    const TensorStep<X, G, S>& s = tensors[i];
    const M applied = applied_ratio<M>(s.row, sum_x, sum_u);
    if (records != nullptr) write_record(records, i, static_cast<M>(s.t), sum_x, sum_u, applied);
    return trust_ratio<M>(s.row, applied);
  }

  // The ratios of the tensors that `items` cover, from their sums (a tensor's first item begins at 0).
  std::vector<M> ratios(const std::vector<Item>& items, const std::vector<Sums>& sums) const {
    std::vector<M> out(tensors.size());
    for (const Item& item : items) {
      if (item.begin == 0) out[item.tensor] = ratio(item.tensor, sums[item.tensor]);
    }
    return out;
  }
};

bool skipped(const c10::optional<Tensor>& found_inf) { return found_inf && found_inf->item<float>() != 0.0f; }

// Calls f(X{}, G{}) for the bucket's (parameter, gradient) dtypes.
template <typename F>
void dispatch_xg(at::ScalarType x, at::ScalarType g, F&& f) {
  using at::BFloat16;
  using at::Half;
  if (x == at::kFloat && g == at::kFloat) return f(float{}, float{});
  if (x == at::kDouble && g == at::kDouble) return f(double{}, double{});
  if (x == at::kHalf && g == at::kHalf) return f(Half{}, Half{});
  if (x == at::kHalf && g == at::kFloat) return f(Half{}, float{});
  if (x == at::kBFloat16 && g == at::kBFloat16) return f(BFloat16{}, BFloat16{});
  if (x == at::kBFloat16 && g == at::kFloat) return f(BFloat16{}, float{});
  TORCH_CHECK(false, "largedet: no kernel for ", x, " parameters with ", g, " gradients");
}

// Calls f(X{}, G{}, S{}) for the bucket's (parameter, gradient, moment) dtypes: moments are stored
// in the math type, or in bfloat16 beside float32 math.
template <typename F>
void dispatch(at::ScalarType x, at::ScalarType g, at::ScalarType m, F&& f) {
  dispatch_xg(x, g, [&](auto x_tag, auto g_tag) {
    using X = decltype(x_tag);
    using M = MathOf<X>;
    if (m == c10::CppTypeToScalarType<M>::value) return f(x_tag, g_tag, M{});
    if constexpr (std::is_same_v<M, float>) {
      if (m == at::kBFloat16) return f(x_tag, g_tag, at::BFloat16{});
    }
    TORCH_CHECK(false, "largedet: no kernel for ", m, " moments of ", x, " parameters");
  });
}

void check_bucket(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                  TensorList steps, TensorList masters) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "largedet: no tensors to step");
  TORCH_CHECK((grads.empty() || grads.size() == n) && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  steps.size() == n && (masters.empty() || masters.size() == n),
              "largedet: params, grads, exp_avgs, exp_avg_sqs, steps and masters (if any) must have one tensor "
              "each per parameter");
  const at::ScalarType moment = exp_avgs[0].scalar_type();
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_non_overlapping_and_dense(), "largedet: parameter ", i,
                " must be a dense CPU tensor");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "largedet: parameters of one bucket share a dtype");
    for (const Tensor* t : {&exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == moment && t->strides() == p.strides() &&
                      t->sizes() == p.sizes(),
                  "largedet: the moments of parameter ", i, " must be ", moment, " CPU tensors laid out like it");
    }
    if (!masters.empty()) {
      TORCH_CHECK(masters[i].device().is_cpu() && masters[i].scalar_type() == at::kFloat &&
                      masters[i].strides() == p.strides() && masters[i].sizes() == p.sizes(),
                  "largedet: the master of parameter ", i, " must be a float32 CPU tensor laid out like it");
    }
    if (!grads.empty()) {
      TORCH_CHECK(grads[i].device().is_cpu() && grads[i].strides() == p.strides() && grads[i].sizes() == p.sizes() &&
                      grads[i].scalar_type() == grads[0].scalar_type(),
                  "largedet: the gradient of parameter ", i, " must be a CPU tensor laid out like it");
    }
    TORCH_CHECK(steps[i].device().is_cpu() && steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1,
                "largedet: steps must be float32 CPU scalars");
  }
}

void check_hyper(const Tensor& hyper, int64_t n) {
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble && hyper.is_contiguous() &&
                  hyper.numel() == n * kHyperColumns,
              "largedet: hyper must be a contiguous CPU float64 tensor of ", n, " x ", kHyperColumns,
              " values, got ", hyper.scalar_type(), " ", hyper.sizes());
}

// NOTE [trust-ratio records] in largedet_kernels/backends/tables.py.
void check_records(const c10::optional<Tensor>& records, at::ScalarType x, int64_t n) {
  TORCH_CHECK(!records || (records->device().is_cpu() && records->scalar_type() == at::toOpMathType(x) &&
                           records->is_contiguous() && records->numel() == kRecordFields * n),
              "largedet: records must be a contiguous CPU tensor of the math dtype with ", kRecordFields,
              " values per tensor");
}

void check_sums(const Tensor& sums, at::ScalarType x, int64_t n) {
  TORCH_CHECK(sums.device().is_cpu() && sums.scalar_type() == at::toOpMathType(x) &&
                  sums.is_contiguous() && sums.numel() == 2 * n,
              "largedet: sums must be a contiguous CPU tensor of the math dtype with 2 values per tensor");
}

// Both passes (NOTE [cpu passes]).
void step(const Table& table, at::ScalarType x, at::ScalarType g, at::ScalarType m, const Tensor& hyper,
          const c10::optional<Tensor>& grad_factor, const c10::optional<Tensor>& found_inf,
          const c10::optional<Tensor>& records) {
  check_hyper(hyper, table.n);
  check_records(records, x, table.n);
  if (skipped(found_inf)) return;  // NOTE [skipped steps]: nothing changes
  dispatch(x, g, m, [&](auto x_tag, auto g_tag, auto s_tag) {
    const BucketStep<decltype(x_tag), decltype(g_tag), decltype(s_tag)> b(table, hyper, grad_factor, true, records);
    // Tensors of one chunk: both passes in one work item, while the tensor is in cache.
    const std::vector<Item> small = chunks_of(b.numels, false);
    at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const auto& s = b.tensors[small[k].tensor];
        update_range(s, b.ratio(small[k].tensor, moments_range(s, b.factor, 0, s.numel)), 0, s.numel);
      }
    });
    const std::vector<Item> large = chunks_of(b.numels, true);
    b.update(large, b.ratios(large, per_tensor(large, b.moments(large), b.tensors.size())));
  });
}

// Pass 1 and each tensor's local Σx², Σu² into sums [n, 2] (NOTE [sharded norms] in
// largedet_kernels/optimizer.py); the steps advance here.
void moments(const Table& table, at::ScalarType x, at::ScalarType g, at::ScalarType m, const Tensor& hyper,
             const c10::optional<Tensor>& grad_factor, const c10::optional<Tensor>& found_inf, const Tensor& sums) {
  check_hyper(hyper, table.n);
  check_sums(sums, x, table.n);
  sums.zero_();
  if (skipped(found_inf)) return;
  dispatch(x, g, m, [&](auto x_tag, auto g_tag, auto s_tag) {
    using M = MathOf<decltype(x_tag)>;
    const BucketStep<decltype(x_tag), decltype(g_tag), decltype(s_tag)> b(table, hyper, grad_factor, true);
    const std::vector<Item> small = chunks_of(b.numels, false), large = chunks_of(b.numels, true);
    const std::vector<Sums> of_small = per_tensor(small, b.moments(small), table.n);
    const std::vector<Sums> of_large = per_tensor(large, b.moments(large), table.n);
    M* out = sums.data_ptr<M>();
    for (int64_t i = 0; i < table.n; ++i) {
      out[2 * i] = static_cast<M>(of_small[i].x + of_large[i].x);
      out[2 * i + 1] = static_cast<M>(of_small[i].u + of_large[i].u);
    }
  });
}

// Pass 2 with the norms of sums [n, 2] (summed over the shards of each tensor).
void update(const Table& table, at::ScalarType x, at::ScalarType m, const Tensor& hyper,
            const c10::optional<Tensor>& found_inf, const Tensor& sums, const c10::optional<Tensor>& records) {
  check_hyper(hyper, table.n);
  check_records(records, x, table.n);
  TORCH_CHECK(sums.device().is_cpu() && sums.numel() == 2 * table.n,
              "largedet: sums must hold 2 values per tensor");
  if (skipped(found_inf)) return;
  const Tensor sums64 = sums.to(at::kDouble).contiguous();
  const double* s = sums64.data_ptr<double>();
  dispatch(x, x, m, [&](auto x_tag, auto, auto s_tag) {
    using X = decltype(x_tag);
    using M = MathOf<X>;
    // The gradient type does not matter to pass 2.
    const BucketStep<X, X, decltype(s_tag)> b(table, hyper, c10::nullopt, false, records);
    std::vector<M> ratios(table.n);
    for (int64_t i = 0; i < table.n; ++i) ratios[i] = b.ratio(i, Sums{s[2 * i], s[2 * i + 1]});
    std::vector<Item> items = chunks_of(b.numels, false), large = chunks_of(b.numels, true);
    items.insert(items.end(), large.begin(), large.end());
    b.update(items, ratios);
  });
}

// Σg² over the gradients, for global-norm clipping: float64 for float64 gradients, else float32.
Tensor grad_sumsq(const Table& table, at::ScalarType g_type) {
  std::vector<Item> items = chunks_of(table.numels, false), large = chunks_of(table.numels, true);
  items.insert(items.end(), large.begin(), large.end());
  std::vector<double> partials(items.size());
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g_type, "largedet_grad_sumsq", [&] {
    using M = MathOf<scalar_t>;
    using Vec = at::vec::Vectorized<M>;
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const scalar_t* g = table.at<const scalar_t>(kG, items[k].tensor);
        for (int64_t tile = items[k].begin; tile < items[k].end; tile += kTile) {
          Vec acc(0);
          for (int64_t i = tile; i < std::min(tile + kTile, items[k].end); i += Vec::size()) {
            const Vec v = load<M>(g + i, std::min<int64_t>(Vec::size(), items[k].end - i));
            acc = acc + v * v;
          }
          partials[k] += lanes_sum(acc);
        }
      }
    });
  });
  for (double p : partials) total += p;
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::toOpMathType(g_type)));
}

// The ops of largedet_kernels/backends/ops.py for CPU tensors. The chunk table and workspace stay unread
// (NOTE [tensor lists or tables] there); the chunk size must be kChunk, which the plan's tables assume.
void check_chunk_size(int64_t chunk_size) {
  TORCH_CHECK(chunk_size == kChunk, "largedet: the CPU kernels take chunks of ", kChunk, " elements, not ",
              chunk_size);
}

// The table form.
void table_step_(const Tensor& ptrs, const Tensor& numels, const Tensor&, const Tensor&, int64_t chunk_size,
                 at::ScalarType x, at::ScalarType g, at::ScalarType m, bool has_masters, const Tensor& hyper,
                 const Tensor& grad_factor, const Tensor& found_inf, const c10::optional<Tensor>& records) {
  check_chunk_size(chunk_size);
  step(Table(ptrs, numels, has_masters), x, g, m, hyper, grad_factor, found_inf, records);
}

void table_moments_(const Tensor& ptrs, const Tensor& numels, const Tensor&, const Tensor&, int64_t chunk_size,
                    at::ScalarType x, at::ScalarType g, at::ScalarType m, bool has_masters, const Tensor& hyper,
                    const Tensor& grad_factor, const Tensor& found_inf, const Tensor& sums) {
  check_chunk_size(chunk_size);
  moments(Table(ptrs, numels, has_masters), x, g, m, hyper, grad_factor, found_inf, sums);
}

void table_update_(const Tensor& ptrs, const Tensor& numels, const Tensor&, const Tensor&, int64_t chunk_size,
                   at::ScalarType x, at::ScalarType, at::ScalarType m, bool has_masters, const Tensor& hyper,
                   const Tensor& found_inf, const Tensor& sums, const c10::optional<Tensor>& records) {
  check_chunk_size(chunk_size);
  update(Table(ptrs, numels, has_masters), x, m, hyper, found_inf, sums, records);
}

Tensor table_grad_sumsq(const Tensor& ptrs, const Tensor& numels, const Tensor&, const Tensor&, int64_t chunk_size,
                        at::ScalarType g) {
  check_chunk_size(chunk_size);
  return grad_sumsq(Table(ptrs, numels), g);
}

// The tensor-list form: every tensor checked, then the same work.
void step_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
           TensorList masters, const Tensor&, const Tensor&, int64_t chunk_size, const Tensor& hyper,
           const Tensor& grad_factor, const Tensor& found_inf, const c10::optional<Tensor>& records) {
  check_chunk_size(chunk_size);
  check_bucket(params, grads, exp_avgs, exp_avg_sqs, steps, masters);
  step(Table(params, grads, exp_avgs, exp_avg_sqs, steps, masters), params[0].scalar_type(), grads[0].scalar_type(),
       exp_avgs[0].scalar_type(), hyper, grad_factor, found_inf, records);
}

void moments_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
              TensorList masters, const Tensor&, const Tensor&, int64_t chunk_size, const Tensor& hyper,
              const Tensor& grad_factor, const Tensor& found_inf, const Tensor& sums) {
  check_chunk_size(chunk_size);
  check_bucket(params, grads, exp_avgs, exp_avg_sqs, steps, masters);
  moments(Table(params, grads, exp_avgs, exp_avg_sqs, steps, masters), params[0].scalar_type(),
          grads[0].scalar_type(), exp_avgs[0].scalar_type(), hyper, grad_factor, found_inf, sums);
}

void update_(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps, TensorList masters,
             const Tensor&, const Tensor&, int64_t chunk_size, const Tensor& hyper, const Tensor& found_inf,
             const Tensor& sums, const c10::optional<Tensor>& records) {
  check_chunk_size(chunk_size);
  check_bucket(params, {}, exp_avgs, exp_avg_sqs, steps, masters);
  update(Table(params, {}, exp_avgs, exp_avg_sqs, steps, masters), params[0].scalar_type(),
         exp_avgs[0].scalar_type(), hyper, found_inf, sums, records);
}

Tensor grad_sumsq_(TensorList grads, const Tensor&, const Tensor&, int64_t chunk_size) {
  check_chunk_size(chunk_size);
  TORCH_CHECK(!grads.empty(), "largedet: no gradients");
  for (const Tensor& g : grads) {
    TORCH_CHECK(g.device().is_cpu() && g.is_non_overlapping_and_dense() && g.scalar_type() == grads[0].scalar_type(),
                "largedet: gradients must be dense CPU tensors of one dtype");
  }
  return grad_sumsq(Table::of_gradients(grads), grads[0].scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(largedet, CPU, m) {
  m.impl("step_", &step_);
  m.impl("moments_", &moments_);
  m.impl("update_", &update_);
  m.impl("grad_sumsq", &grad_sumsq_);
  m.impl("table_step_", &table_step_);
  m.impl("table_moments_", &table_moments_);
  m.impl("table_update_", &table_update_);
  m.impl("table_grad_sumsq", &table_grad_sumsq);
}

}  // namespace largedet
