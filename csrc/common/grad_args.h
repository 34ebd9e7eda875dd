// The gradient pass's arguments, the same on every device. Plain C++ (no ATen), so that a CUDA
// kernel takes them as a launch argument; common/op_args.h fills them from the op's tensors.
#pragma once

#include <cstdint>

#include "common/strided.h"

namespace fastpref {

// Gradient pass, one task (CPU) or block (CUDA) per (row, chunk) of the [2B, D] output:
// grad[i, d] = -+ coef[j] * g[j] * (2 / D) * (pred[i, d] - target[i, d]), minus for i < B.
template <int MaxDims>
struct GradArgs {
  StridedRows<MaxDims> pred;
  StridedRows<MaxDims> target;
  bool shared_target = false;
  int64_t batch = 0;
  int64_t features = 0;
  int64_t n_chunks = 0;
  const void* coef = nullptr;       // [B], accumulator dtype
  const void* grad_loss = nullptr;  // [] or [B], accumulator dtype
  int64_t grad_stride = 0;          // element stride of grad_loss (0 for a scalar)
  void* grad = nullptr;             // contiguous [2B, D] in pred.dtype
};

}  // namespace fastpref
