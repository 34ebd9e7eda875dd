// The CUDA implementations of the ops fastpref::native_forward, native_backward and native_loss
// (schemas and the autograd kernel in library.cpp): argument checks and layouts (common/op_args.h, shared
// with the CPU kernels), allocations on the inputs' device, and the launches of kernels.cu on the
// current stream. No host synchronization and no host-to-device copy: the settings travel as
// launch arguments, so that a call can be captured in a CUDA graph.
//
// Compiled by the host compiler (ATen headers); kernels.cu, which nvcc compiles per architecture,
// sees only the plain structs of kernels.h.

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/op_args.h"
#include "cuda/kernels.h"
#include "library.h"

namespace fastpref::cuda {
namespace {

using at::Tensor;

constexpr const char* kUnit = "fastpref cuda";

Strided describe(const Tensor& tensor, const char* name, std::vector<Tensor>& keep) {
  return op_args::describe<kMaxDims>(kUnit, tensor, name, keep);
}

// The kernels index columns in 32 bits and launch one block per (row or pair, chunk).
void check_launchable(const op_args::Shape& shape) {
  TORCH_CHECK(shape.features < (int64_t{1} << 31), kUnit, ": D = prod(S) must be below 2^31; got ", shape.features);
  TORCH_CHECK(shape.rows * chunk_count(shape.features) < (int64_t{1} << 31), kUnit, ": too many rows x chunks (",
              shape.rows, " x ", chunk_count(shape.features), ") for one launch");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cuda_forward(const Tensor& model_pred, const Tensor& ref_pred,
                                                                const Tensor& target, at::TensorList ema_preds,
                                                                const std::optional<Tensor>& soft_label,
                                                                at::ArrayRef<double> settings, at::IntArrayRef modes) {
  const op_args::Shape shape =
      op_args::check_forward(kUnit, c10::DeviceType::CUDA, model_pred, ref_pred, target, ema_preds, settings, modes);
  check_launchable(shape);
  const c10::cuda::CUDAGuard device_guard(model_pred.device());
  const Stream stream = c10::cuda::getCurrentCUDAStream().stream();

  std::vector<Tensor> keep;
  std::vector<Strided> preds;
  preds.reserve(2 + ema_preds.size());
  preds.push_back(describe(model_pred, "model_pred", keep));
  preds.push_back(describe(ref_pred, "ref_pred", keep));
  for (const Tensor& ema : ema_preds) preds.push_back(describe(ema, "ema_preds", keep));
  const Strided target_rows = describe(target, "target", keep);
  const at::ScalarType acc = op_args::accumulation_dtype(target_rows, preds);
  const bool f64 = acc == at::kDouble;
  const auto options = model_pred.options().dtype(acc);
  const int64_t models = static_cast<int64_t>(preds.size());
  const int64_t n_chunks = chunk_count(shape.features);

  // The error pass, kMaxModels predictions per launch.
  const Tensor partial = at::empty({models, shape.rows, n_chunks}, options);
  for (int64_t first = 0; first < models; first += kMaxModels) {
    ErrorArgs args;
    args.n_models = static_cast<int>(std::min<int64_t>(kMaxModels, models - first));
    for (int m = 0; m < args.n_models; ++m) args.preds[m] = preds[first + m];
    args.first_model = first;
    args.target = target_rows;
    args.shared_target = shape.shared_target;
    args.batch = shape.batch;
    args.features = shape.features;
    args.n_chunks = n_chunks;
    args.partial = partial.data_ptr();
    launch_errors(args, f64, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // The head, one block.
  const op_args::ForwardOutputs out = op_args::empty_outputs(shape, modes, options);
  const Tensor soft = op_args::soft_label_for(kUnit, soft_label, modes, acc, shape, model_pred.device());
  auto run_head = [&](auto zero) {
    using Acc = decltype(zero);
    const Tensor scratch = at::empty({head::HeadBuffers<Acc>::scratch_size(models, shape.batch)}, options);
    head::HeadBuffers<Acc> buffers = op_args::head_buffers<Acc>(partial, models, shape, n_chunks, soft, out);
    buffers.set_scratch(scratch.data_ptr<Acc>());
    launch_head(op_args::head_settings<Acc>(settings, modes), buffers, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (f64) {
    run_head(0.0);
  } else {
    run_head(0.0f);
  }
  return {out.loss, out.coef, out.pair_stats, out.sample_err, out.accuracy};
}

Tensor cuda_backward(const Tensor& grad_loss, const Tensor& coef, const Tensor& model_pred, const Tensor& target) {
  const op_args::Shape shape =
      op_args::check_backward(kUnit, c10::DeviceType::CUDA, grad_loss, coef, model_pred, target);
  check_launchable(shape);
  const c10::cuda::CUDAGuard device_guard(model_pred.device());
  const Stream stream = c10::cuda::getCurrentCUDAStream().stream();
  std::vector<Tensor> keep;
  const op_args::GradCall<kMaxDims> call = op_args::grad_call<kMaxDims>(
      kUnit, shape, chunk_count(shape.features), grad_loss, coef, model_pred, target, keep);
  launch_grad(call.args, coef.scalar_type() == at::kDouble, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return call.grad;
}

}  // namespace
}  // namespace fastpref::cuda

TORCH_LIBRARY_IMPL(fastpref, CUDA, m) {
  m.impl("native_forward", &fastpref::cuda::cuda_forward);
  m.impl("native_backward", &fastpref::cuda::cuda_backward);
  m.impl("native_loss", &fastpref::native_loss_below_autograd);
}
