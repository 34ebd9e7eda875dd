// What library.cpp (the device-agnostic unit) gives the device units: the kernel of the op
// fastpref::native_loss for calls below autograd, which each device registers for its dispatch key.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastpref {

// native_forward's outputs without `coef`, through the dispatcher (the inputs' device); no graph.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> native_loss_below_autograd(
    const at::Tensor& model_pred, const at::Tensor& ref_pred, const at::Tensor& target, at::TensorList ema_preds,
    const std::optional<at::Tensor>& soft_label, at::ArrayRef<double> settings, at::IntArrayRef modes);

}  // namespace fastpref
