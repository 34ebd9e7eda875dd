// The CPU implementations of the ops fastpref::cpp_forward and fastpref::cpp_backward (schemas in
// library.cpp) and the table of instruction-set variants of their two parallel passes.
//
// forward: one parallel pass over every prediction and the target (tasks = pairs x chunks of D,
//   per-task partial sums written to a small [M, 2B, n_chunks] buffer), then the per-pair head
//   (the steps of common/pair_head.h) on one thread.
// backward: one parallel pass (tasks = rows x chunks of D) writing the gradient.
// Both passes are bitwise reproducible: every partial sum has a fixed set of elements and a
// fixed order whatever the number of threads, and chunk partials are added in chunk order.
//
// Only ATen and torch/library.h headers: torch/extension.h (pybind11 and the whole torch API)
// would multiply the build time and memory.

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

#include "common/options.h"
#include "kernels.h"

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

#include "common/pair_head.h"  // after the pragma: the head's steps are compiled without contraction

namespace fastpref::cpu::base {
namespace {  // internal linkage: no PLT calls, free inlining
#define FASTPREF_ISA 0
#include "kernels_impl.h"
#undef FASTPREF_ISA
}  // namespace
}  // namespace fastpref::cpu::base

#if FASTPREF_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace fastpref::cpu::avx2 {
namespace {  // internal linkage: no PLT calls, free inlining
#define FASTPREF_ISA 1
#include "kernels_impl.h"
#undef FASTPREF_ISA
}  // namespace
}  // namespace fastpref::cpu::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
namespace fastpref::cpu::avx512 {
namespace {  // internal linkage: no PLT calls, free inlining
#define FASTPREF_ISA 2
#include "kernels_impl.h"
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
// Per-pair head (docs/spec.md §2-§5) on one thread, in the accumulation dtype Acc: the steps of
// common/pair_head.h, pair by pair.
// ---------------------------------------------------------------------------------------------

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
  const auto preset = static_cast<Preset>(modes[kPresetMode]);
  const auto weighting = static_cast<Weighting>(modes[kWeightingMode]);
  const auto margin_mode = static_cast<Margin>(modes[kMarginMode]);
  const auto loss_type = static_cast<LossType>(modes[kLossTypeMode]);
  const auto reduction = static_cast<Reduction>(modes[kReductionMode]);
  const int64_t rows = 2 * batch;

  // Per-sample errors of every model (m = 0 policy, 1 reference, 2.. EMA models).
  std::vector<Acc> err_w(static_cast<size_t>(models * batch));
  std::vector<Acc> err_l(static_cast<size_t>(models * batch));
  for (int64_t m = 0; m < models; ++m) {
    for (int64_t j = 0; j < batch; ++j) {
      err_w[m * batch + j] = head::sample_error(partial + (m * rows + j) * n_chunks, n_chunks, features);
      err_l[m * batch + j] = head::sample_error(partial + (m * rows + j + batch) * n_chunks, n_chunks, features);
    }
  }
  const Acc* ref_w = &err_w[batch];
  const Acc* ref_l = &err_l[batch];

  // l of the metric rows r: the policy (r = 0, model 0) and the EMA models (r >= 1, model r + 1).
  const int64_t n_rows = models - 1;
  std::vector<Acc> logit(static_cast<size_t>(n_rows * batch));
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t m = r == 0 ? 0 : r + 1;
    for (int64_t j = 0; j < batch; ++j) {
      logit[r * batch + j] = head::pair_logit(ref_w[j], ref_l[j], err_w[m * batch + j], err_l[m * batch + j]);
    }
  }
  const Acc* l_theta = &logit[0];

  // The metric's scaled l, per row; the margin offset.
  std::vector<Acc> scaled(logit.size());
  for (int64_t r = 0; r < n_rows; ++r) {
    const Acc* row = &logit[r * batch];
    const Acc norm = preset == Preset::kOfficial ? head::logit_norm(row, batch) : Acc(1);
    for (int64_t j = 0; j < batch; ++j) scaled[r * batch + j] = head::scaled_logit(preset, rho, row[j], norm);
  }
  const Acc c2 = has_c2 ? static_cast<Acc>(settings[4]) : head::batch_mean(l_theta, batch);

  // Pair by pair: u, W, Gamma, the loss and a_j, the stats.
  Acc loss_total = Acc(0);
  Acc wins = Acc(0), ties = Acc(0);
  Acc* stats = out.pair_stats;
  for (int64_t j = 0; j < batch; ++j) {
    const head::Metric<Acc> metric = head::pair_metric(preset, &scaled[j], &logit[j], n_rows, batch);
    const Acc weight = head::pair_weight(weighting, k1, metric.u);
    const Acc margin = head::pair_margin(margin_mode, k2, c2, metric.u);
    const Acc label = loss_type == LossType::kDedpo ? soft[j * soft_stride] : Acc(0);
    const head::PairLoss<Acc> pair = head::pair_loss(loss_type, beta, eps, tau, l_theta[j], weight, margin, label);
    if (reduction == Reduction::kNone) {
      out.loss[j] = pair.loss;
    } else {
      loss_total += pair.loss;
    }
    out.coef[j] = head::reduced_coef(reduction, pair.coef, batch);
    const Acc z = beta * l_theta[j];
    stats[0 * batch + j] = z;
    stats[1 * batch + j] = l_theta[j];
    stats[2 * batch + j] = metric.u;
    stats[3 * batch + j] = metric.confidence;
    stats[4 * batch + j] = metric.stability;
    stats[5 * batch + j] = weight;
    stats[6 * batch + j] = margin;
    wins += z > Acc(0) ? Acc(1) : Acc(0);
    ties += z == Acc(0) ? Acc(1) : Acc(0);
  }
  if (reduction != Reduction::kNone) {
    out.loss[0] = head::reduced_loss(reduction, loss_total, batch);
  }
  for (int64_t j = 0; j < batch; ++j) {
    out.sample_err[j] = err_w[j];
    out.sample_err[batch + j] = err_l[j];
    out.sample_err[2 * batch + j] = ref_w[j];
    out.sample_err[3 * batch + j] = ref_l[j];
  }
  out.accuracy[0] = head::implicit_accuracy(wins, ties, batch);
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
  TORCH_CHECK(modes.size() == kNumModes,
              "fastpref cpp: modes must be (preset, weighting, margin, loss_type, reduction); got ",
              modes.size(), " values");
  for (int i = 0; i < kNumModes; ++i) {
    TORCH_CHECK(is_option_code(i, modes[i]), "fastpref cpp: modes[", i, "] = ", modes[i], " is not a code of ",
                kModeNames[i]);
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
  const bool per_pair_loss = static_cast<Reduction>(modes[kReductionMode]) == Reduction::kNone;
  Tensor loss = per_pair_loss ? at::empty({batch}, options) : at::empty(at::IntArrayRef{}, options);
  Tensor coef = at::empty({batch}, options);
  Tensor pair_stats = at::empty({7, batch}, options);
  Tensor sample_err = at::empty({2, rows}, options);
  Tensor accuracy = at::empty(at::IntArrayRef{}, options);

  Tensor soft;
  int64_t soft_stride = 0;
  if (static_cast<LossType>(modes[kLossTypeMode]) == LossType::kDedpo) {
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

// The instruction-set variants, for the Python module (library.cpp).

const char* active_isa() { return kernels().name; }

std::vector<const char*> supported_isas() {
  std::vector<const char*> names;
  for (int i = 0; i < kNumTables; ++i) {
    if (table_supported(i)) names.push_back(kTables[i].name);
  }
  return names;
}

bool use_isa(const char* name) {
  const int index = find_table(name);
  if (index < 0 || !table_supported(index)) return false;
  active_table_slot().store(&kTables[index], std::memory_order_relaxed);
  return true;
}

}  // namespace fastpref::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

TORCH_LIBRARY_IMPL(fastpref, CPU, m) {
  m.impl("cpp_forward", &fastpref::cpu::cpp_forward);
  m.impl("cpp_backward", &fastpref::cpu::cpp_backward);
}
