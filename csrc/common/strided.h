// How the kernels of every device see an input: an [N, *S] tensor as N rows of D = prod(S)
// columns, read in place whatever its float dtype and strides. Plain C++ (no ATen), so that CUDA
// kernels take it as a launch argument; common/op_args.h fills it from a tensor.
#pragma once

#include <cstdint>

namespace fastpref {

enum class DType : int32_t { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };

// Row r, column d (d in [0, D), the row-major flattening of S) of an [N, *S] tensor lives at
// element offset r * row_stride + offset(d), where offset(d) = d * col_stride when ndim <= 1 and
// the usual dot product of d's multi-index (over sizes) with strides otherwise. S's dims are
// coalesced first (size-1 dims dropped, contiguous runs merged); a layout that keeps more than
// MaxDims dims is described as a contiguous copy.
template <int MaxDims>
struct StridedRows {
  static constexpr int kMaxDims = MaxDims;
  const void* data = nullptr;  // element [0, 0, ...] (storage offset applied)
  DType dtype = DType::F32;
  int64_t row_stride = 0;
  int64_t col_stride = 1;
  int ndim = 0;
  int64_t sizes[MaxDims] = {};
  int64_t strides[MaxDims] = {};
};

}  // namespace fastpref
