// The CPU implementations of the ops fastpref::native_forward and fastpref::native_backward
// (schemas in library.cpp) and the table of instruction-set variants of their two parallel passes.
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

// After the pragma: the head's steps (common/pair_head.h) are compiled without contraction.
#include "common/op_args.h"

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

constexpr const char* kUnit = "fastpref cpu";

Strided describe(const Tensor& tensor, const char* name, std::vector<Tensor>& keep) {
  return op_args::describe<kMaxDims>(kUnit, tensor, name, keep);
}

int64_t chunk_count(int64_t features) { return (features + kChunk - 1) / kChunk; }

// Tasks per thread at least: about 64K elements read or written, so small calls stay on one
// thread. Only the split of tasks over threads depends on this, never a result.
int64_t grain_for(int64_t features, int64_t elements_per_column) {
  const int64_t per_task = std::min<int64_t>(features, kChunk) * elements_per_column;
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, per_task));
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cpu_forward(const Tensor& model_pred, const Tensor& ref_pred,
                                                               const Tensor& target, at::TensorList ema_preds,
                                                               const std::optional<Tensor>& soft_label,
                                                               at::ArrayRef<double> settings, at::IntArrayRef modes) {
  const op_args::Shape shape =
      op_args::check_forward(kUnit, c10::DeviceType::CPU, model_pred, ref_pred, target, ema_preds, settings, modes);
  std::vector<Tensor> keep;
  std::vector<Strided> preds;
  preds.reserve(2 + ema_preds.size());
  preds.push_back(describe(model_pred, "model_pred", keep));
  preds.push_back(describe(ref_pred, "ref_pred", keep));
  for (const Tensor& ema : ema_preds) preds.push_back(describe(ema, "ema_preds", keep));
  ForwardArgs args;
  args.preds = preds.data();
  args.n_models = static_cast<int64_t>(preds.size());
  args.target = describe(target, "target", keep);
  args.shared_target = shape.shared_target;
  args.batch = shape.batch;
  args.features = shape.features;
  args.n_chunks = chunk_count(shape.features);

  const at::ScalarType acc = op_args::accumulation_dtype(args.target, preds);
  const op_args::ForwardOutputs out = op_args::empty_outputs(shape, modes, model_pred.options().dtype(acc));
  const Tensor soft = op_args::soft_label_for(kUnit, soft_label, modes, acc, shape, model_pred.device());
  const Tensor partial = at::empty({args.n_models, shape.rows, args.n_chunks}, model_pred.options().dtype(acc));
  args.partial = partial.data_ptr();

  // The error pass (parallel): tasks are (pair, chunk); per column of a task, 2 rows of every
  // model and 1-2 target rows.
  const ForwardFn fn = acc == at::kDouble ? kernels().forward_f64 : kernels().forward_f32;
  const int64_t grain = grain_for(args.features, 2 * (args.n_models + 1));
  at::parallel_for(0, args.batch * args.n_chunks, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });

  // The head (docs/spec.md §2-§5) on this thread, in the accumulation dtype.
  auto run_head = [&](auto zero) {
    using Acc = decltype(zero);
    head::HeadBuffers<Acc> buf = op_args::head_buffers<Acc>(partial, args.n_models, shape, args.n_chunks, soft, out);
    std::vector<Acc> scratch(static_cast<size_t>(head::HeadBuffers<Acc>::scratch_size(args.n_models, shape.batch)));
    buf.set_scratch(scratch.data());
    head::batch_head(head::SerialExec{}, op_args::head_settings<Acc>(settings, modes), buf);
  };
  if (acc == at::kDouble) {
    run_head(0.0);
  } else {
    run_head(0.0f);
  }
  return {out.loss, out.coef, out.pair_stats, out.sample_err, out.accuracy};
}

Tensor cpu_backward(const Tensor& grad_loss, const Tensor& coef, const Tensor& model_pred, const Tensor& target) {
  const op_args::Shape shape =
      op_args::check_backward(kUnit, c10::DeviceType::CPU, grad_loss, coef, model_pred, target);
  std::vector<Tensor> keep;
  const op_args::GradCall<kMaxDims> call = op_args::grad_call<kMaxDims>(
      kUnit, shape, chunk_count(shape.features), grad_loss, coef, model_pred, target, keep);
  const BackwardArgs& args = call.args;
  const BackwardFn fn = coef.scalar_type() == at::kDouble ? kernels().backward_f64 : kernels().backward_f32;
  const int64_t grain = grain_for(shape.features, 3);  // per column: pred, target, grad
  at::parallel_for(0, shape.rows * args.n_chunks, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  return call.grad;
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
  m.impl("native_forward", &fastpref::cpu::cpu_forward);
  m.impl("native_backward", &fastpref::cpu::cpu_backward);
}
