// fastpref's native CPU backend: the ops fastpref::cpp_forward and fastpref::cpp_backward with
// the schemas documented in fastpref/fused.py, and the Python module fastpref._C that loads them
// (and fastpref::cpp_loss, the two ops with a C++ autograd kernel: fastpref_autograd.cpp).
//
// forward: one parallel pass over every prediction and the target (tasks = pairs x chunks of D,
//   per-task partial sums written to a small [M, 2B, n_chunks] buffer), then the per-pair head
//   (port of fastpref/triton_kernels.py::pair_head_kernel) on one thread.
// backward: one parallel pass (tasks = rows x chunks of D) writing the gradient.
// Both passes are bitwise reproducible: every partial sum has a fixed set of elements and a
// fixed order whatever the number of threads, and chunk partials are added in chunk order.
//
// Only ATen / torch/library.h / Python.h headers: torch/extension.h (pybind11 and the whole
// torch API) would multiply the build time and memory.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

// Compile the passes once per instruction set and pick one at run time (GCC on x86-64 only;
// elsewhere the baseline build, which the compiler still vectorizes for the target's SIMD).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTPREF_MULTI_ISA 1
#else
#define FASTPREF_MULTI_ISA 0
#endif

// No FMA contraction in fastpref's own code: every variant (and every machine with the same
// variant) rounds the same operations the same way.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

namespace fastpref::cpu::base {
namespace {  // internal linkage: no PLT calls, free inlining
#define FASTPREF_ISA 0
#include "cpu_kernels_impl.h"
#undef FASTPREF_ISA
}  // namespace
}  // namespace fastpref::cpu::base

#if FASTPREF_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace fastpref::cpu::avx2 {
namespace {  // internal linkage: no PLT calls, free inlining
#define FASTPREF_ISA 1
#include "cpu_kernels_impl.h"
#undef FASTPREF_ISA
}  // namespace
}  // namespace fastpref::cpu::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
namespace fastpref::cpu::avx512 {
namespace {  // internal linkage: no PLT calls, free inlining
#define FASTPREF_ISA 2
#include "cpu_kernels_impl.h"
#undef FASTPREF_ISA
}  // namespace
}  // namespace fastpref::cpu::avx512
#pragma GCC pop_options
#endif

namespace fastpref::cpu {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Instruction-set variants. The best one the CPU supports is used unless FASTPREF_CPU_ISA (or
// fastpref._C._set_cpu_isa) names another supported one. All give bitwise-identical results.
// ---------------------------------------------------------------------------------------------

const KernelTable kTables[] = {
    {"base", base::forward_f32, base::forward_f64, base::backward_f32, base::backward_f64},
#if FASTPREF_MULTI_ISA
    {"avx2", avx2::forward_f32, avx2::forward_f64, avx2::backward_f32, avx2::backward_f64},
    {"avx512", avx512::forward_f32, avx512::forward_f64, avx512::backward_f32, avx512::backward_f64},
#endif
};
constexpr int kNumTables = static_cast<int>(sizeof(kTables) / sizeof(kTables[0]));

bool table_supported(int index) {
#if FASTPREF_MULTI_ISA
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (index == 1) return avx2;
  if (index == 2) {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return index == 0;
}

int find_table(const char* name) {
  for (int i = 0; i < kNumTables; ++i) {
    if (std::strcmp(kTables[i].name, name) == 0) return i;
  }
  return -1;
}

int default_table() {
  const char* wanted = std::getenv("FASTPREF_CPU_ISA");
  if (wanted != nullptr && *wanted != '\0') {
    const int index = find_table(wanted);
    if (index >= 0 && table_supported(index)) return index;
  }
  int best = 0;
  for (int i = 0; i < kNumTables; ++i) {
    if (table_supported(i)) best = i;
  }
  return best;
}

std::atomic<const KernelTable*>& active_table_slot() {
  static std::atomic<const KernelTable*> slot{&kTables[default_table()]};
  return slot;
}

const KernelTable& kernels() { return *active_table_slot().load(std::memory_order_relaxed); }

// ---------------------------------------------------------------------------------------------
// Tensors -> Strided descriptions
// ---------------------------------------------------------------------------------------------

DType dtype_of(const Tensor& tensor, const char* name) {
  switch (tensor.scalar_type()) {
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    case at::kFloat:
      return DType::F32;
    case at::kDouble:
      return DType::F64;
    default:
      TORCH_CHECK_TYPE(false, "fastpref cpp: ", name, " must be float16, bfloat16, float32 or float64; got ",
                       tensor.scalar_type());
  }
  return DType::F32;  // unreachable
}

// An [N, *S] tensor as rows of D columns, with S's dims coalesced (size-1 dims dropped,
// contiguous runs merged). Layouts with more than kMaxDims irreducible inner dims are read from
// a contiguous copy kept alive in `keep` (no real input comes close).
Strided describe(const Tensor& tensor, const char* name, std::vector<Tensor>& keep) {
  Tensor src = tensor;
  c10::SmallVector<int64_t, 8> sizes;
  c10::SmallVector<int64_t, 8> strides;
  for (int64_t k = 1; k < src.dim(); ++k) {
    const int64_t size = src.size(k);
    const int64_t stride = src.stride(k);
    if (size == 1) continue;
    if (!sizes.empty() && strides.back() == size * stride) {
      sizes.back() *= size;
      strides.back() = stride;
    } else {
      sizes.push_back(size);
      strides.push_back(stride);
    }
  }
  if (static_cast<int>(sizes.size()) > kMaxDims) {
    src = tensor.contiguous();
    keep.push_back(src);
    sizes.assign(1, 1);
    strides.assign(1, 1);
  }
  Strided out;
  out.data = src.const_data_ptr();
  out.dtype = dtype_of(src, name);
  out.row_stride = src.stride(0);
  out.ndim = static_cast<int>(sizes.size());
  out.col_stride = sizes.size() == 1 ? strides[0] : 1;
  for (size_t k = 0; k < sizes.size(); ++k) {
    out.sizes[k] = sizes[k];
    out.strides[k] = strides[k];
  }
  return out;
}

void check_cpu(const Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu(), "fastpref cpp: ", name, " must be a CPU tensor; got ", tensor.device());
}

int64_t chunk_count(int64_t features) { return (features + kChunk - 1) / kChunk; }

// Tasks per thread at least: about 64K elements read or written, so small calls stay on one
// thread. Only the split of tasks over threads depends on this, never a result.
int64_t grain_for(int64_t features, int64_t elements_per_column) {
  const int64_t per_task = std::min<int64_t>(features, kChunk) * elements_per_column;
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, per_task));
}

// ---------------------------------------------------------------------------------------------
// Per-pair head (docs/spec.md §2-§5), a port of pair_head_kernel in the accumulation dtype Acc: the same
// formulas in the same association order, NaN-preserving min/max/relu, stable sigmoid/softplus.
// ---------------------------------------------------------------------------------------------

template <class Acc>
Acc stable_sigmoid(Acc x) {
  const Acc e = std::exp(-std::abs(x));
  return x >= Acc(0) ? Acc(1) / (Acc(1) + e) : e / (Acc(1) + e);
}

template <class Acc>
Acc stable_softplus(Acc x) {  // max(x, 0) + log1p(exp(-|x|)); NaN stays NaN
  return (x > Acc(0) ? x : Acc(0)) + std::log1p(std::exp(-std::abs(x)));
}

enum Mode { kPreset = 0, kWeighting = 1, kMargin = 2, kLossType = 3, kReduction = 4 };

template <class Acc>
struct HeadOut {
  Acc* loss;        // [] or [B]
  Acc* coef;        // [B]
  Acc* pair_stats;  // [7, B]: z, l_theta, u, c, s, W, Gamma
  Acc* sample_err;  // [2, 2B]: policy, reference
  Acc* accuracy;    // []
};

template <class Acc>
void pair_head(const Acc* partial, int64_t models, int64_t batch, int64_t n_chunks, int64_t features,
               at::ArrayRef<double> settings, at::IntArrayRef modes, const Acc* soft, int64_t soft_stride,
               const HeadOut<Acc>& out) {
  const Acc beta = static_cast<Acc>(settings[0]);
  const Acc rho = static_cast<Acc>(settings[1]);
  const Acc k1 = static_cast<Acc>(settings[2]);
  const Acc k2 = static_cast<Acc>(settings[3]);
  const bool has_c2 = !std::isnan(settings[4]);
  const Acc eps = static_cast<Acc>(settings[5]);
  const Acc tau = static_cast<Acc>(settings[6]);
  const int64_t preset = modes[kPreset], weighting = modes[kWeighting], margin_mode = modes[kMargin];
  const int64_t loss_type = modes[kLossType], reduction = modes[kReduction];
  const int64_t rows = 2 * batch;
  const Acc one = Acc(1);

  // Per-sample errors: chunk partial sums added in chunk order.
  std::vector<Acc> err_w(static_cast<size_t>(models * batch));
  std::vector<Acc> err_l(static_cast<size_t>(models * batch));
  for (int64_t m = 0; m < models; ++m) {
    for (int64_t j = 0; j < batch; ++j) {
      const Acc* pw = partial + (m * rows + j) * n_chunks;
      const Acc* pl = partial + (m * rows + j + batch) * n_chunks;
      Acc sum_w = Acc(0), sum_l = Acc(0);
      for (int64_t c = 0; c < n_chunks; ++c) {
        sum_w += pw[c];
        sum_l += pl[c];
      }
      err_w[m * batch + j] = sum_w / static_cast<Acc>(features);
      err_l[m * batch + j] = sum_l / static_cast<Acc>(features);
    }
  }
  const Acc* ref_w = &err_w[batch];
  const Acc* ref_l = &err_l[batch];

  // l_m = (e_ref - e_m)_w - (e_ref - e_m)_l for the metric rows: policy (m = 0) and EMAs (m >= 2).
  const int64_t n_rows = models - 1;
  std::vector<int64_t> metric_models;
  metric_models.push_back(0);
  for (int64_t m = 2; m < models; ++m) metric_models.push_back(m);
  std::vector<Acc> logit(static_cast<size_t>(n_rows * batch));
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t m = metric_models[r];
    for (int64_t j = 0; j < batch; ++j) {
      logit[r * batch + j] = (ref_w[j] - err_w[m * batch + j]) - (ref_l[j] - err_l[m * batch + j]);
    }
  }
  const Acc* l_theta = &logit[0];

  // Metric u (docs/spec.md §3).
  std::vector<Acc> scaled(logit.size());
  for (int64_t r = 0; r < n_rows; ++r) {
    Acc scale_div = one;
    if (preset == 0) {
      Acc sq = Acc(0);
      for (int64_t j = 0; j < batch; ++j) sq += logit[r * batch + j] * logit[r * batch + j];
      Acc norm = std::sqrt(sq);
      scale_div = norm < static_cast<Acc>(1e-12) ? static_cast<Acc>(1e-12) : norm;  // max(norm, 1e-12) keeping NaN
    }
    for (int64_t j = 0; j < batch; ++j) {
      scaled[r * batch + j] = preset == 0 ? rho * logit[r * batch + j] / scale_div : rho * logit[r * batch + j];
    }
  }
  std::vector<Acc> confidence(batch), stability(batch), u(batch), weight(batch), margin(batch);
  for (int64_t j = 0; j < batch; ++j) {
    Acc sig = Acc(0);
    for (int64_t r = 0; r < n_rows; ++r) sig += stable_sigmoid(scaled[r * batch + j]);
    confidence[j] = one - sig / static_cast<Acc>(n_rows);
    if (n_rows > 1) {
      const std::vector<Acc>& spread = preset == 0 ? scaled : logit;
      Acc total = Acc(0);
      for (int64_t r = 0; r < n_rows; ++r) total += spread[r * batch + j];
      const Acc mean = total / static_cast<Acc>(n_rows);
      Acc dev2 = Acc(0);
      for (int64_t r = 0; r < n_rows; ++r) {
        const Acc dev = spread[r * batch + j] - mean;
        dev2 += dev * dev;
      }
      const Acc var = dev2 / static_cast<Acc>(n_rows - 1);
      if (preset == 0) {
        const Acc std_dev = std::sqrt(var);
        stability[j] = std_dev > one ? one : std_dev;  // min(std, 1) keeping NaN
      } else {
        stability[j] = var;
      }
    } else {
      stability[j] = one;
    }
    u[j] = confidence[j] * stability[j];
  }

  // W and Gamma (docs/spec.md §4).
  Acc c2 = static_cast<Acc>(has_c2 ? settings[4] : 0.0);
  if (!has_c2) {
    Acc total = Acc(0);
    for (int64_t j = 0; j < batch; ++j) total += l_theta[j];
    c2 = total / static_cast<Acc>(batch);
  }
  for (int64_t j = 0; j < batch; ++j) {
    const Acc uj = u[j];
    switch (weighting) {
      case 0:
        weight[j] = one / (one + k1 * uj);
        break;
      case 1:
        weight[j] = one / (one + k1 * uj * uj);
        break;
      case 2:
        weight[j] = one / (one + k1 * std::sqrt(uj));
        break;
      case 3:
        weight[j] = one / (one + std::exp(k1 * uj));
        break;
      default:
        weight[j] = one;
    }
    switch (margin_mode) {
      case 0:
        margin[j] = k2 * uj * uj + c2;
        break;
      case 1:
        margin[j] = k2 * uj + c2;
        break;
      default:
        margin[j] = Acc(0);
    }
  }

  // Loss heads and a_j = dLoss/dl_theta[j] (docs/spec.md §5, §5b, §6).
  Acc loss_total = Acc(0);
  Acc wins = Acc(0), ties = Acc(0);
  for (int64_t j = 0; j < batch; ++j) {
    const Acc w = weight[j];
    const Acc z = beta * l_theta[j];
    const Acc y = z - margin[j];
    Acc per_pair, coef;
    switch (loss_type) {
      case 0:  // sigmoid (DPO)
        per_pair = w * stable_softplus(-y);
        coef = -w * beta * stable_sigmoid(-y);
        break;
      case 1: {  // ipo
        const Acc resid = l_theta[j] - margin[j] / beta - one / (Acc(2) * tau);
        per_pair = w * resid * resid;
        coef = Acc(2) * w * resid;
        break;
      }
      case 2: {  // hinge; relu written so that NaN propagates
        const Acc gap = one - y;
        per_pair = w * (gap < Acc(0) ? Acc(0) : gap);
        coef = -w * beta * (gap > Acc(0) ? one : Acc(0));
        break;
      }
      case 3:  // robust
        per_pair = w * ((one - eps) * stable_softplus(-y) - eps * stable_softplus(y)) / (one - Acc(2) * eps);
        coef = -w * beta * ((one - eps) * stable_sigmoid(-y) + eps * stable_sigmoid(y)) / (one - Acc(2) * eps);
        break;
      case 4:  // cdpo
        per_pair = w * ((one - eps) * stable_softplus(-y) + eps * stable_softplus(y));
        coef = w * beta * (eps * stable_sigmoid(y) - (one - eps) * stable_sigmoid(-y));
        break;
      default: {  // dedpo
        const Acc label = soft[j * soft_stride];
        per_pair = w * (stable_softplus(-y) + (one - label) * y);
        coef = w * beta * (stable_sigmoid(y) - label);
      }
    }
    if (reduction == 0) {
      coef = coef / static_cast<Acc>(batch);
    }
    if (reduction == 2) {
      out.loss[j] = per_pair;
    } else {
      loss_total += per_pair;
    }
    out.coef[j] = coef;
    Acc* stats = out.pair_stats;
    stats[0 * batch + j] = z;
    stats[1 * batch + j] = l_theta[j];
    stats[2 * batch + j] = u[j];
    stats[3 * batch + j] = confidence[j];
    stats[4 * batch + j] = stability[j];
    stats[5 * batch + j] = w;
    stats[6 * batch + j] = margin[j];
    wins += z > Acc(0) ? one : Acc(0);
    ties += z == Acc(0) ? one : Acc(0);
  }
  if (reduction == 0) {
    out.loss[0] = loss_total / static_cast<Acc>(batch);
  } else if (reduction == 1) {
    out.loss[0] = loss_total;
  }
  for (int64_t j = 0; j < batch; ++j) {
    out.sample_err[j] = err_w[j];
    out.sample_err[batch + j] = err_l[j];
    out.sample_err[2 * batch + j] = ref_w[j];
    out.sample_err[3 * batch + j] = ref_l[j];
  }
  out.accuracy[0] = (wins + Acc(0.5) * ties) / static_cast<Acc>(batch);
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

template <class Acc>
void run_forward(const ForwardArgs& base_args, const std::vector<Strided>& preds, at::ArrayRef<double> settings,
                 at::IntArrayRef modes, const Acc* soft, int64_t soft_stride, const HeadOut<Acc>& out) {
  ForwardArgs args = base_args;
  std::vector<Acc> partial(static_cast<size_t>(args.n_models * 2 * args.batch * args.n_chunks));
  args.preds = preds.data();
  args.partial = partial.data();
  const ForwardFn fn = std::is_same_v<Acc, float> ? kernels().forward_f32 : kernels().forward_f64;
  const int64_t tasks = args.batch * args.n_chunks;
  // Per column of a task: 2 rows of every model and 1-2 target rows.
  const int64_t grain = grain_for(args.features, 2 * (args.n_models + 1));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  pair_head<Acc>(partial.data(), args.n_models, args.batch, args.n_chunks, args.features, settings, modes, soft,
                 soft_stride, out);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cpp_forward(const Tensor& model_pred, const Tensor& ref_pred,
                                                               const Tensor& target, at::TensorList ema_preds,
                                                               const std::optional<Tensor>& soft_label,
                                                               at::ArrayRef<double> settings, at::IntArrayRef modes) {
  TORCH_CHECK(settings.size() == 7, "fastpref cpp: settings must be (beta, rho, k1, k2, c2, eps, tau); got ",
              settings.size(), " values");
  TORCH_CHECK(modes.size() == 5, "fastpref cpp: modes must be (preset, weighting, margin, loss_type, reduction); got ",
              modes.size(), " values");
  const int64_t limits[5] = {2, 5, 3, 6, 3};
  for (int i = 0; i < 5; ++i) {
    TORCH_CHECK(modes[i] >= 0 && modes[i] < limits[i], "fastpref cpp: modes[", i, "] = ", modes[i], " out of range");
  }
  TORCH_CHECK(model_pred.dim() >= 2, "fastpref cpp: model_pred must be [2B, *S]; got ", model_pred.sizes());
  const int64_t rows = model_pred.size(0);
  TORCH_CHECK(rows > 0 && rows % 2 == 0, "fastpref cpp: model_pred's batch 2B must be even and > 0; got ", rows);
  const int64_t batch = rows / 2;
  const int64_t features = model_pred.numel() / rows;
  TORCH_CHECK(features > 0, "fastpref cpp: model_pred must have D = prod(S) > 0");
  TORCH_CHECK(ref_pred.sizes() == model_pred.sizes(), "fastpref cpp: ref_pred must have model_pred's shape");
  TORCH_CHECK(target.dim() == model_pred.dim() && target.sizes().slice(1) == model_pred.sizes().slice(1) &&
                  (target.size(0) == batch || target.size(0) == rows),
              "fastpref cpp: target must be [2B, *S] or [B, *S]; got ", target.sizes());
  check_cpu(model_pred, "model_pred");
  check_cpu(ref_pred, "ref_pred");
  check_cpu(target, "target");
  for (const Tensor& ema : ema_preds) {
    TORCH_CHECK(ema.sizes() == model_pred.sizes(), "fastpref cpp: every ema_preds tensor must have model_pred's shape");
    check_cpu(ema, "ema_preds");
  }

  std::vector<Tensor> keep;
  std::vector<Strided> preds;
  preds.reserve(2 + ema_preds.size());
  preds.push_back(describe(model_pred, "model_pred", keep));
  preds.push_back(describe(ref_pred, "ref_pred", keep));
  for (const Tensor& ema : ema_preds) preds.push_back(describe(ema, "ema_preds", keep));
  ForwardArgs args;
  args.n_models = static_cast<int64_t>(preds.size());
  args.target = describe(target, "target", keep);
  args.shared_target = target.size(0) == batch;
  args.batch = batch;
  args.features = features;
  args.n_chunks = chunk_count(features);

  bool any_f64 = args.target.dtype == DType::F64;
  for (const Strided& p : preds) any_f64 = any_f64 || p.dtype == DType::F64;
  const at::ScalarType acc = any_f64 ? at::kDouble : at::kFloat;
  const auto options = model_pred.options().dtype(acc);
  const bool per_pair_loss = modes[kReduction] == 2;
  Tensor loss = per_pair_loss ? at::empty({batch}, options) : at::empty(at::IntArrayRef{}, options);
  Tensor coef = at::empty({batch}, options);
  Tensor pair_stats = at::empty({7, batch}, options);
  Tensor sample_err = at::empty({2, rows}, options);
  Tensor accuracy = at::empty(at::IntArrayRef{}, options);

  Tensor soft;
  int64_t soft_stride = 0;
  if (modes[kLossType] == 5) {
    TORCH_CHECK(soft_label.has_value(), "fastpref cpp: loss_type dedpo needs soft_label");
    soft = soft_label->to(acc);
    check_cpu(soft, "soft_label");
    TORCH_CHECK(soft.dim() <= 1 && (soft.dim() == 0 || soft.size(0) == batch),
                "fastpref cpp: soft_label must be [B]; got ", soft.sizes());
    soft_stride = soft.dim() == 1 ? soft.stride(0) : 0;
  }

  if (any_f64) {
    HeadOut<double> out{loss.data_ptr<double>(), coef.data_ptr<double>(), pair_stats.data_ptr<double>(),
                        sample_err.data_ptr<double>(), accuracy.data_ptr<double>()};
    run_forward<double>(args, preds, settings, modes, soft.defined() ? soft.const_data_ptr<double>() : nullptr,
                        soft_stride, out);
  } else {
    HeadOut<float> out{loss.data_ptr<float>(), coef.data_ptr<float>(), pair_stats.data_ptr<float>(),
                       sample_err.data_ptr<float>(), accuracy.data_ptr<float>()};
    run_forward<float>(args, preds, settings, modes, soft.defined() ? soft.const_data_ptr<float>() : nullptr,
                       soft_stride, out);
  }
  return {loss, coef, pair_stats, sample_err, accuracy};
}

Tensor cpp_backward(const Tensor& grad_loss, const Tensor& coef, const Tensor& model_pred, const Tensor& target) {
  TORCH_CHECK(model_pred.dim() >= 2, "fastpref cpp: model_pred must be [2B, *S]; got ", model_pred.sizes());
  const int64_t rows = model_pred.size(0);
  TORCH_CHECK(rows > 0 && rows % 2 == 0, "fastpref cpp: model_pred's batch 2B must be even and > 0; got ", rows);
  const int64_t batch = rows / 2;
  const int64_t features = model_pred.numel() / rows;
  TORCH_CHECK(features > 0, "fastpref cpp: model_pred must have D = prod(S) > 0");
  TORCH_CHECK(target.dim() == model_pred.dim() && target.sizes().slice(1) == model_pred.sizes().slice(1) &&
                  (target.size(0) == batch || target.size(0) == rows),
              "fastpref cpp: target must be [2B, *S] or [B, *S]; got ", target.sizes());
  const at::ScalarType acc = coef.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "fastpref cpp: coef must be float32 or float64; got ", acc);
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == batch, "fastpref cpp: coef must be [B]; got ", coef.sizes());
  TORCH_CHECK(grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == batch),
              "fastpref cpp: grad_loss must be [] or [B]; got ", grad_loss.sizes());
  check_cpu(grad_loss, "grad_loss");
  check_cpu(coef, "coef");
  check_cpu(model_pred, "model_pred");
  check_cpu(target, "target");

  const Tensor coef_acc = coef.contiguous();
  const Tensor grad_acc = grad_loss.to(acc);
  Tensor grad = at::empty(model_pred.sizes(), model_pred.options().memory_format(at::MemoryFormat::Contiguous));

  std::vector<Tensor> keep;
  BackwardArgs args;
  args.pred = describe(model_pred, "model_pred", keep);
  args.target = describe(target, "target", keep);
  args.shared_target = target.size(0) == batch;
  args.batch = batch;
  args.features = features;
  args.n_chunks = chunk_count(features);
  args.coef = coef_acc.const_data_ptr();
  args.grad_loss = grad_acc.const_data_ptr();
  args.grad_stride = grad_acc.dim() == 1 ? grad_acc.stride(0) : 0;
  args.grad = grad.data_ptr();
  const BackwardFn fn = acc == at::kDouble ? kernels().backward_f64 : kernels().backward_f32;
  const int64_t grain = grain_for(features, 3);  // per column: pred, target, grad
  at::parallel_for(0, rows * args.n_chunks, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  return grad;
}

}  // namespace
}  // namespace fastpref::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Other translation units of fastpref._C (fastpref_autograd.cpp, CUDA kernels) must use
// TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(fastpref, m) {
  m.set_python_module("fastpref.cpp_backend");  // where the fake (meta) implementations live
  m.def(
      "cpp_forward(Tensor model_pred, Tensor ref_pred, Tensor target, Tensor[] ema_preds, Tensor? soft_label, "
      "float[] settings, int[] modes) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def("cpp_backward(Tensor grad_loss, Tensor coef, Tensor model_pred, Tensor target) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fastpref, CPU, m) {
  m.impl("cpp_forward", &fastpref::cpu::cpp_forward);
  m.impl("cpp_backward", &fastpref::cpu::cpp_backward);
}

// ---------------------------------------------------------------------------------------------
// The Python module fastpref._C: importing it loads this library (and so registers the ops).
// ---------------------------------------------------------------------------------------------

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(fastpref::cpu::kernels().name); }

PyObject* py_cpu_isas(PyObject*, PyObject*) {
  PyObject* names = PyList_New(0);
  if (names == nullptr) return nullptr;
  for (int i = 0; i < fastpref::cpu::kNumTables; ++i) {
    if (!fastpref::cpu::table_supported(i)) continue;
    PyObject* name = PyUnicode_FromString(fastpref::cpu::kTables[i].name);
    if (name == nullptr || PyList_Append(names, name) != 0) {
      Py_XDECREF(name);
      Py_DECREF(names);
      return nullptr;
    }
    Py_DECREF(name);
  }
  return names;
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const int index = fastpref::cpu::find_table(name);
  if (index < 0 || !fastpref::cpu::table_supported(index)) {
    PyErr_Format(PyExc_ValueError, "instruction set %s is not built or not supported by this CPU", name);
    return nullptr;
  }
  fastpref::cpu::active_table_slot().store(&fastpref::cpu::kTables[index], std::memory_order_relaxed);
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels in use: 'base', 'avx2' or 'avx512'."},
    {"cpu_isas", py_cpu_isas, METH_NOARGS, "Instruction sets built into fastpref._C that this CPU supports."},
    {"_set_cpu_isa", py_set_cpu_isa, METH_O,
     "Use the kernels of another supported instruction set (for tests; results are bitwise identical)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    "fastpref._C",
    "fastpref's native CPU kernels: importing this module registers the ops fastpref::cpp_forward, "
    "fastpref::cpp_backward and fastpref::cpp_loss.",
    -1,
    kMethods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
