// Host side of the ops fastpref::native_forward / native_backward shared by every device's kernels
// (cpu/ops.cpp, cuda/ops.cpp): the argument checks, the accumulation dtype, the inputs as
// StridedRows, the outputs and the head's settings. ATen, host only (never included by a .cu).
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/SmallVector.h>

#include "common/grad_args.h"
#include "common/options.h"
#include "common/pair_head.h"
#include "common/strided.h"

namespace fastpref::op_args {

using at::Tensor;

// Shape facts of a checked call.
struct Shape {
  int64_t batch = 0;
  int64_t rows = 0;      // 2B
  int64_t features = 0;  // D
  bool shared_target = false;
};

inline DType dtype_of(const char* unit, const Tensor& tensor, const char* name) {
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
      TORCH_CHECK_TYPE(false, unit, ": ", name, " must be float16, bfloat16, float32 or float64; got ",
                       tensor.scalar_type());
  }
  return DType::F32;  // unreachable
}

// An [N, *S] tensor as StridedRows (common/strided.h), with S's dims coalesced. Layouts with more
// than MaxDims irreducible inner dims are read from a contiguous copy kept alive in `keep`.
template <int MaxDims>
StridedRows<MaxDims> describe(const char* unit, const Tensor& tensor, const char* name, std::vector<Tensor>& keep) {
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
  if (static_cast<int>(sizes.size()) > MaxDims) {
    src = tensor.contiguous();
    keep.push_back(src);
    sizes.assign(1, 1);
    strides.assign(1, 1);
  }
  StridedRows<MaxDims> out;
  out.data = src.const_data_ptr();
  out.dtype = dtype_of(unit, src, name);
  out.row_stride = src.stride(0);
  out.ndim = static_cast<int>(sizes.size());
  out.col_stride = sizes.size() == 1 ? strides[0] : 1;
  for (size_t k = 0; k < sizes.size(); ++k) {
    out.sizes[k] = sizes[k];
    out.strides[k] = strides[k];
  }
  return out;
}

// `tensor` is on `device` (model_pred's, of the device type `kind` whose kernel runs).
inline void check_device(const char* unit, const Tensor& tensor, const char* name, c10::Device device) {
  TORCH_CHECK(tensor.device() == device, unit, ": ", name, " must be on ", device, " (model_pred's device); got ",
              tensor.device());
}

inline void check_kind(const char* unit, const Tensor& model_pred, c10::DeviceType kind) {
  TORCH_CHECK(model_pred.device().type() == kind, unit, ": model_pred must be a ", c10::DeviceTypeName(kind),
              " tensor; got ", model_pred.device());
}

// model_pred [2B, *S] and target [2B, *S] or [B, *S].
inline Shape check_pred_and_target(const char* unit, const Tensor& model_pred, const Tensor& target) {
  TORCH_CHECK(model_pred.dim() >= 2, unit, ": model_pred must be [2B, *S]; got ", model_pred.sizes());
  Shape shape;
  shape.rows = model_pred.size(0);
  TORCH_CHECK(shape.rows > 0 && shape.rows % 2 == 0, unit, ": model_pred's batch 2B must be even and > 0; got ",
              shape.rows);
  shape.batch = shape.rows / 2;
  shape.features = model_pred.numel() / shape.rows;
  TORCH_CHECK(shape.features > 0, unit, ": model_pred must have D = prod(S) > 0");
  TORCH_CHECK(target.dim() == model_pred.dim() && target.sizes().slice(1) == model_pred.sizes().slice(1) &&
                  (target.size(0) == shape.batch || target.size(0) == shape.rows),
              unit, ": target must be [2B, *S] or [B, *S]; got ", target.sizes());
  shape.shared_target = target.size(0) == shape.batch;
  return shape;
}

// The forward op's arguments (schema in library.cpp), for the kernels of device type `kind`.
inline Shape check_forward(const char* unit, c10::DeviceType kind, const Tensor& model_pred, const Tensor& ref_pred,
                           const Tensor& target, at::TensorList ema_preds, at::ArrayRef<double> settings,
                           at::IntArrayRef modes) {
  TORCH_CHECK(settings.size() == kNumSettingSlots, unit, ": settings must be (beta, rho, k1, k2, c2, eps, tau); got ",
              settings.size(), " values");
  TORCH_CHECK(modes.size() == kNumModeSlots, unit,
              ": modes must be (preset, weighting, margin, loss_type, reduction); got ", modes.size(), " values");
  for (int slot = 0; slot < kNumModeSlots; ++slot) {
    TORCH_CHECK(is_option_code(slot, modes[slot]), unit, ": modes[", slot, "] = ", modes[slot], " is not a code of ",
                kModeOptionNames[slot]);
  }
  const Shape shape = check_pred_and_target(unit, model_pred, target);
  TORCH_CHECK(ref_pred.sizes() == model_pred.sizes(), unit, ": ref_pred must have model_pred's shape");
  check_kind(unit, model_pred, kind);
  check_device(unit, ref_pred, "ref_pred", model_pred.device());
  check_device(unit, target, "target", model_pred.device());
  for (const Tensor& ema : ema_preds) {
    TORCH_CHECK(ema.sizes() == model_pred.sizes(), unit, ": every ema_preds tensor must have model_pred's shape");
    check_device(unit, ema, "ema_preds", model_pred.device());
  }
  return shape;
}

// The backward op's arguments; returns the shape and the accumulation dtype (coef's).
inline Shape check_backward(const char* unit, c10::DeviceType kind, const Tensor& grad_loss, const Tensor& coef,
                            const Tensor& model_pred, const Tensor& target) {
  const Shape shape = check_pred_and_target(unit, model_pred, target);
  const at::ScalarType acc = coef.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, unit, ": coef must be float32 or float64; got ", acc);
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == shape.batch, unit, ": coef must be [B]; got ", coef.sizes());
  TORCH_CHECK(grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == shape.batch), unit,
              ": grad_loss must be [] or [B]; got ", grad_loss.sizes());
  check_kind(unit, model_pred, kind);
  check_device(unit, grad_loss, "grad_loss", model_pred.device());
  check_device(unit, coef, "coef", model_pred.device());
  check_device(unit, target, "target", model_pred.device());
  return shape;
}

// float64 when any input is float64, else float32 (docs/spec.md §1).
template <class Described>
at::ScalarType accumulation_dtype(const Described& target, const std::vector<Described>& preds) {
  bool any_f64 = target.dtype == DType::F64;
  for (const Described& p : preds) any_f64 = any_f64 || p.dtype == DType::F64;
  return any_f64 ? at::kDouble : at::kFloat;
}

// The backward op's call on any device: the gradient (contiguous, model_pred's dtype and device)
// and the gradient pass's arguments over it, with coef and grad_loss in the accumulation dtype
// (coef's), kept alive in `keep`.
template <int MaxDims>
struct GradCall {
  GradArgs<MaxDims> args;
  Tensor grad;
};

template <int MaxDims>
GradCall<MaxDims> grad_call(const char* unit, const Shape& shape, int64_t n_chunks, const Tensor& grad_loss,
                            const Tensor& coef, const Tensor& model_pred, const Tensor& target,
                            std::vector<Tensor>& keep) {
  const Tensor coef_acc = keep.emplace_back(coef.contiguous());
  const Tensor grad_acc = keep.emplace_back(grad_loss.to(coef.scalar_type()));
  GradCall<MaxDims> call;
  call.grad = at::empty(model_pred.sizes(), model_pred.options().memory_format(at::MemoryFormat::Contiguous));
  GradArgs<MaxDims>& args = call.args;
  args.pred = describe<MaxDims>(unit, model_pred, "model_pred", keep);
  args.target = describe<MaxDims>(unit, target, "target", keep);
  args.shared_target = shape.shared_target;
  args.batch = shape.batch;
  args.features = shape.features;
  args.n_chunks = n_chunks;
  args.coef = coef_acc.const_data_ptr();
  args.grad_loss = grad_acc.const_data_ptr();
  args.grad_stride = grad_acc.dim() == 1 ? grad_acc.stride(0) : 0;
  args.grad = call.grad.data_ptr();
  return call;
}

// The forward op's outputs, in the accumulation dtype on model_pred's device.
struct ForwardOutputs {
  Tensor loss;        // [] or [B] (reduction "none")
  Tensor coef;        // [B]
  Tensor pair_stats;  // [7, B]
  Tensor sample_err;  // [2, 2B]
  Tensor accuracy;    // []
};

inline ForwardOutputs empty_outputs(const Shape& shape, at::IntArrayRef modes, const at::TensorOptions& options) {
  const bool per_pair_loss = static_cast<Reduction>(modes[kReductionSlot]) == Reduction::kNone;
  ForwardOutputs out;
  out.loss = per_pair_loss ? at::empty({shape.batch}, options) : at::empty(at::IntArrayRef{}, options);
  out.coef = at::empty({shape.batch}, options);
  out.pair_stats = at::empty({7, shape.batch}, options);
  out.sample_err = at::empty({2, shape.rows}, options);
  out.accuracy = at::empty(at::IntArrayRef{}, options);
  return out;
}

// The soft label y~ in the accumulation dtype ([] or [B], any stride), defined for "dedpo" only.
inline Tensor soft_label_for(const char* unit, const std::optional<Tensor>& soft_label, at::IntArrayRef modes,
                             at::ScalarType acc, const Shape& shape, c10::Device device) {
  if (static_cast<LossType>(modes[kLossTypeSlot]) != LossType::kDedpo) return Tensor();
  TORCH_CHECK(soft_label.has_value(), unit, ": loss_type dedpo needs soft_label");
  Tensor soft = soft_label->to(acc);
  check_device(unit, soft, "soft_label", device);
  TORCH_CHECK(soft.dim() <= 1 && (soft.dim() == 0 || soft.size(0) == shape.batch), unit,
              ": soft_label must be [B]; got ", soft.sizes());
  return soft;
}

// The head's settings (common/pair_head.h) from the op's `settings` and `modes`.
template <class Acc>
head::HeadSettings<Acc> head_settings(at::ArrayRef<double> settings, at::IntArrayRef modes) {
  head::HeadSettings<Acc> out;
  out.beta = static_cast<Acc>(settings[kBetaSlot]);
  out.rho = static_cast<Acc>(settings[kRhoSlot]);
  out.k1 = static_cast<Acc>(settings[kK1Slot]);
  out.k2 = static_cast<Acc>(settings[kK2Slot]);
  out.has_c2 = !std::isnan(settings[kC2Slot]);
  out.c2 = out.has_c2 ? static_cast<Acc>(settings[kC2Slot]) : Acc(0);
  out.eps = static_cast<Acc>(settings[kEpsSlot]);
  out.tau = static_cast<Acc>(settings[kTauSlot]);
  out.preset = static_cast<Preset>(modes[kPresetSlot]);
  out.weighting = static_cast<Weighting>(modes[kWeightingSlot]);
  out.margin = static_cast<Margin>(modes[kMarginSlot]);
  out.loss_type = static_cast<LossType>(modes[kLossTypeSlot]);
  out.reduction = static_cast<Reduction>(modes[kReductionSlot]);
  return out;
}

// The head's buffers over the outputs (scratch still to set), reading `partial` and `soft`.
template <class Acc>
head::HeadBuffers<Acc> head_buffers(const Tensor& partial, int64_t models, const Shape& shape, int64_t n_chunks,
                                    const Tensor& soft, const ForwardOutputs& out) {
  head::HeadBuffers<Acc> buf{};
  buf.partial = partial.const_data_ptr<Acc>();
  buf.models = models;
  buf.batch = shape.batch;
  buf.n_chunks = n_chunks;
  buf.features = shape.features;
  buf.soft = soft.defined() ? soft.const_data_ptr<Acc>() : nullptr;
  buf.soft_stride = soft.defined() && soft.dim() == 1 ? soft.stride(0) : 0;
  buf.loss = out.loss.data_ptr<Acc>();
  buf.coef = out.coef.data_ptr<Acc>();
  buf.pair_stats = out.pair_stats.data_ptr<Acc>();
  buf.sample_err = out.sample_err.data_ptr<Acc>();
  buf.accuracy = out.accuracy.data_ptr<Acc>();
  return buf;
}

}  // namespace fastpref::op_args
