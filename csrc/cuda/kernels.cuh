// The device code of fastpref's CUDA kernels (launched by kernels.cu): the same three passes as
// the CPU kernels (cpu/kernels_impl.h).
//
//   error pass  one read of every prediction and the target: per (pair, chunk) block, the sums
//               of (pred - target)^2 over the chunk's columns for both rows of the pair and every
//               model, written to a small [M, 2B, n_chunks] buffer;
//   head        one block: common/pair_head.h's batch_head, the steps the CPU runs, on the
//               block's threads (chunk sums in chunk order -> errors -> l -> u -> W, Gamma -> loss,
//               a_j = dLoss/dl_theta[j], stats);
//   gradient    per (row, chunk) block: grad[i, d] = -+ a_j g_j (2/D) (pred[i, d] - target[i, d]).
//
// The gradient (docs/spec.md §6): e_m[i] = (1/D) sum_d (pred_m[i, d] - t[i, d])^2, and only the
// policy's errors enter l_theta[j] = (e_ref[j] - e_theta[j]) - (e_ref[j+B] - e_theta[j+B]),
// so dl_theta[j]/dpred[j, d] = -(2/D)(pred[j, d] - t[j, d]) and dl_theta[j]/dpred[j+B, d] =
// +(2/D)(pred[j+B, d] - t[j+B, d]); with a_j = dLoss/dl_theta[j] (from the head, u, W, Gamma and
// c2 held constant) and the incoming gradient g_j ([] or [B]) the chain rule gives the formula
// above. It is evaluated as ((+-(a_j g_j)) * 2) / D, then times the difference, as on the CPU.
//
// Determinism: no atomics. A thread sums its kVector columns in order, a warp adds its lanes by a
// shuffle tree, the block adds its warps by a fixed tree, and the head adds a row's chunk sums in
// chunk order. Its units compile with --fmad=false (setup.py), as pair_head.h requires.
//
// Only CUDA's own headers and builtins, so that it compiles quickly for each architecture (and
// tests/loss/cuda_emulator.cpp runs it on the CPU over emulated builtins).

#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/kernels.h"

namespace fastpref::cuda::device {


constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
static_assert(kThreads % kWarpSize == 0 && (kWarps & (kWarps - 1)) == 0, "whole warps, a power of two");

__device__ __forceinline__ int element_size(DType dtype) {
  return dtype == DType::F64 ? 8 : dtype == DType::F32 ? 4 : 2;
}

__device__ __forceinline__ const char* row_pointer(const Strided& src, int64_t row) {
  return static_cast<const char*>(src.data) + row * src.row_stride * element_size(src.dtype);
}

__device__ __forceinline__ bool aligned16(const void* pointer) {
  return (reinterpret_cast<uintptr_t>(pointer) & 15u) == 0;
}

// ---------------------------------------------------------------------------------------------
// Loads: kVector consecutive columns [col0, col0 + n) of one row as Acc, zero past n. 128-bit
// loads where the row is contiguous and 16-byte aligned (the column offset col0 * size always is),
// else one element at a time through the strides.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) { return __uint_as_float(bits << 16); }

__device__ __forceinline__ float f16_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

template <class Acc>
__device__ __forceinline__ Acc load_one(DType dtype, const char* base, int64_t offset) {
  switch (dtype) {
    case DType::F32:
      return static_cast<Acc>(__ldg(reinterpret_cast<const float*>(base) + offset));
    case DType::F64:
      return static_cast<Acc>(__ldg(reinterpret_cast<const double*>(base) + offset));
    case DType::BF16:
      return static_cast<Acc>(bf16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(base) + offset)));
    case DType::F16:
      break;
  }
  return static_cast<Acc>(f16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(base) + offset)));
}

// Eight 16-bit values packed in a uint4 (element 2k in the low half of word k).
template <class Acc, bool kBf16>
__device__ __forceinline__ void unpack16(const uint4 raw, Acc (&out)[kVector]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (kBf16) {
      out[2 * k] = static_cast<Acc>(bf16_bits_to_float(words[k] & 0xFFFFu));
      out[2 * k + 1] = static_cast<Acc>(__uint_as_float(words[k] & 0xFFFF0000u));
    } else {
      out[2 * k] = static_cast<Acc>(f16_bits_to_float(words[k] & 0xFFFFu));
      out[2 * k + 1] = static_cast<Acc>(f16_bits_to_float(words[k] >> 16));
    }
  }
}

template <class Acc>
__device__ __forceinline__ void load_vector(DType dtype, const char* p, Acc (&out)[kVector]) {
  switch (dtype) {
    case DType::F32: {
      const float4* v = reinterpret_cast<const float4*>(p);
#pragma unroll
      for (int k = 0; k < kVector / 4; ++k) {
        const float4 x = __ldg(v + k);
        out[4 * k] = static_cast<Acc>(x.x);
        out[4 * k + 1] = static_cast<Acc>(x.y);
        out[4 * k + 2] = static_cast<Acc>(x.z);
        out[4 * k + 3] = static_cast<Acc>(x.w);
      }
      break;
    }
    case DType::F64: {
      const double2* v = reinterpret_cast<const double2*>(p);
#pragma unroll
      for (int k = 0; k < kVector / 2; ++k) {
        const double2 x = __ldg(v + k);
        out[2 * k] = static_cast<Acc>(x.x);
        out[2 * k + 1] = static_cast<Acc>(x.y);
      }
      break;
    }
    case DType::BF16:
      unpack16<Acc, true>(__ldg(reinterpret_cast<const uint4*>(p)), out);
      break;
    case DType::F16:
      unpack16<Acc, false>(__ldg(reinterpret_cast<const uint4*>(p)), out);
      break;
  }
}

template <class Acc>
__device__ __forceinline__ void load_columns(const Strided& src, int64_t row, int64_t col0, int n,
                                             Acc (&out)[kVector]) {
  const char* base = row_pointer(src, row);
  if (src.ndim <= 1) {
    if (src.col_stride == 1 && n == kVector && aligned16(base)) {
      load_vector<Acc>(src.dtype, base + col0 * element_size(src.dtype), out);
      return;
    }
#pragma unroll
    for (int i = 0; i < kVector; ++i) {
      out[i] = i < n ? load_one<Acc>(src.dtype, base, (col0 + i) * src.col_stride) : Acc(0);
    }
    return;
  }
  // Several inner dims that no single stride describes (e.g. channels-last): the multi-index of
  // col0, then an odometer over the next columns; 32-bit index arithmetic (ops.cpp checks
  // D < 2^31), loops over kMaxDims unrolled so that the index stays in registers.
  const int nd = src.ndim;
  uint32_t index[kMaxDims];
  int64_t offset = 0;
  uint32_t rest = static_cast<uint32_t>(col0);
#pragma unroll
  for (int k = kMaxDims - 1; k >= 0; --k) {
    index[k] = 0;
    if (k < nd) {
      const uint32_t size = static_cast<uint32_t>(src.sizes[k]);
      index[k] = rest % size;
      rest /= size;
      offset += static_cast<int64_t>(index[k]) * src.strides[k];
    }
  }
#pragma unroll
  for (int i = 0; i < kVector; ++i) {
    out[i] = i < n ? load_one<Acc>(src.dtype, base, offset) : Acc(0);
    bool carry = i + 1 < kVector;  // step to the next column: the last dim, carrying outwards
#pragma unroll
    for (int k = kMaxDims - 1; k >= 0; --k) {
      if (k < nd && carry) {
        ++index[k];
        offset += src.strides[k];
        carry = index[k] == static_cast<uint32_t>(src.sizes[k]);
        if (carry) {
          index[k] = 0;
          offset -= src.sizes[k] * src.strides[k];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Stores: kVector columns [col0, col0 + n) of a contiguous output row, rounded to nearest even
// (a float64 value straight to its 16-bit format: one rounding).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned short to_bf16_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
__device__ __forceinline__ unsigned short to_bf16_bits(double v) { return __bfloat16_as_ushort(__double2bfloat16(v)); }
__device__ __forceinline__ unsigned short to_f16_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
__device__ __forceinline__ unsigned short to_f16_bits(double v) { return __half_as_ushort(__double2half(v)); }

template <class Acc>
__device__ __forceinline__ uint4 pack16(DType dtype, const Acc (&v)[kVector]) {
  uint32_t words[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t lo = dtype == DType::BF16 ? to_bf16_bits(v[2 * k]) : to_f16_bits(v[2 * k]);
    const uint32_t hi = dtype == DType::BF16 ? to_bf16_bits(v[2 * k + 1]) : to_f16_bits(v[2 * k + 1]);
    words[k] = lo | (hi << 16);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

template <class Acc>
__device__ __forceinline__ void store_one(DType dtype, char* base, int64_t i, Acc v) {
  switch (dtype) {
    case DType::F32:
      reinterpret_cast<float*>(base)[i] = static_cast<float>(v);
      break;
    case DType::F64:
      reinterpret_cast<double*>(base)[i] = static_cast<double>(v);
      break;
    case DType::BF16:
      reinterpret_cast<unsigned short*>(base)[i] = to_bf16_bits(v);
      break;
    case DType::F16:
      reinterpret_cast<unsigned short*>(base)[i] = to_f16_bits(v);
      break;
  }
}

template <class Acc>
__device__ __forceinline__ void store_columns(DType dtype, char* row, int64_t col0, int n, const Acc (&v)[kVector]) {
  const int size = element_size(dtype);
  char* p = row + col0 * size;
  if (n == kVector && aligned16(row)) {
    switch (dtype) {
      case DType::F32: {
        float4* out = reinterpret_cast<float4*>(p);
#pragma unroll
        for (int k = 0; k < kVector / 4; ++k) {
          out[k] = make_float4(static_cast<float>(v[4 * k]), static_cast<float>(v[4 * k + 1]),
                               static_cast<float>(v[4 * k + 2]), static_cast<float>(v[4 * k + 3]));
        }
        return;
      }
      case DType::F64: {
        double2* out = reinterpret_cast<double2*>(p);
#pragma unroll
        for (int k = 0; k < kVector / 2; ++k) {
          out[k] = make_double2(static_cast<double>(v[2 * k]), static_cast<double>(v[2 * k + 1]));
        }
        return;
      }
      case DType::BF16:
      case DType::F16:
        *reinterpret_cast<uint4*>(p) = pack16(dtype, v);
        return;
    }
  }
#pragma unroll
  for (int i = 0; i < kVector; ++i) {
    if (i < n) store_one(dtype, row, col0 + i, v[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Sums
// ---------------------------------------------------------------------------------------------

template <class Acc>
__device__ __forceinline__ Acc squared_distance(const Acc (&pred)[kVector], const Acc (&target)[kVector]) {
  Acc sum = Acc(0);
#pragma unroll
  for (int i = 0; i < kVector; ++i) {
    const Acc diff = pred[i] - target[i];
    sum += diff * diff;
  }
  return sum;
}

// Lane 0 gets the sum of the warp's values, as the pairwise tree v[l] += v[l + width].
template <class Acc>
__device__ __forceinline__ Acc warp_sum(Acc value) {
#pragma unroll
  for (int width = kWarpSize / 2; width >= 1; width /= 2) value += __shfl_down_sync(0xFFFFFFFFu, value, width);
  return value;
}

// The number of valid columns of this thread's run starting at col0.
__device__ __forceinline__ int run_length(int64_t col0, int64_t features) {
  const int64_t left = features - col0;
  return left <= 0 ? 0 : left >= kVector ? kVector : static_cast<int>(left);
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Blocks per SM that the error pass's registers must allow: 3 (768 threads) in float32, 2 in
// float64. Without the bound ptxas may aim at 4 blocks (64 registers) and spill.
template <class Acc>
constexpr int kErrorBlocksPerSM = sizeof(Acc) == 4 ? 3 : 2;

template <class Acc>
__global__ void __launch_bounds__(kThreads, kErrorBlocksPerSM<Acc>)
    error_kernel(const __grid_constant__ ErrorArgs args) {
  __shared__ Acc warp_sums[kMaxModels * 2 * kWarps];  // [model][row of the pair][warp]
  const int64_t pair = blockIdx.x / static_cast<uint32_t>(args.n_chunks);  // 32-bit: no division call
  const int64_t chunk = blockIdx.x % static_cast<uint32_t>(args.n_chunks);
  const int64_t col0 = chunk * kChunk + int64_t{threadIdx.x} * kVector;
  const int n = run_length(col0, args.features);
  const int64_t row_w = pair;
  const int64_t row_l = pair + args.batch;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  // The target's columns, read once for every model (and, shared, for both rows).
  Acc target_w[kVector];
  Acc target_l[kVector];
  load_columns<Acc>(args.target, row_w, col0, n, target_w);
  if (args.shared_target) {
#pragma unroll
    for (int i = 0; i < kVector; ++i) target_l[i] = target_w[i];
  } else {
    load_columns<Acc>(args.target, row_l, col0, n, target_l);
  }

  for (int m = 0; m < args.n_models; ++m) {
    Acc pred_w[kVector];
    Acc pred_l[kVector];
    load_columns<Acc>(args.preds[m], row_w, col0, n, pred_w);
    load_columns<Acc>(args.preds[m], row_l, col0, n, pred_l);
    const Acc sum_w = warp_sum(squared_distance(pred_w, target_w));
    const Acc sum_l = warp_sum(squared_distance(pred_l, target_l));
    if (lane == 0) {
      warp_sums[(2 * m) * kWarps + warp] = sum_w;
      warp_sums[(2 * m + 1) * kWarps + warp] = sum_l;
    }
  }
  __syncthreads();

  // One thread per (model, row): the warps' sums as a pairwise tree.
  if (threadIdx.x < 2 * args.n_models) {
    const int slot = threadIdx.x;
    Acc tree[kWarps];
#pragma unroll
    for (int w = 0; w < kWarps; ++w) tree[w] = warp_sums[slot * kWarps + w];
#pragma unroll
    for (int width = kWarps / 2; width >= 1; width /= 2) {
#pragma unroll
      for (int w = 0; w < width; ++w) tree[w] += tree[w + width];
    }
    const int64_t model = args.first_model + slot / 2;
    const int64_t row = slot % 2 == 0 ? row_w : row_l;
    static_cast<Acc*>(args.partial)[(model * 2 * args.batch + row) * args.n_chunks + chunk] = tree[0];
  }
}

// common/pair_head.h's executor on the threads of one block.
struct BlockExec {
  template <class F>
  __device__ void for_each(int64_t n, F&& f) const {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) f(i);
  }
  __device__ void sync() const { __syncthreads(); }
};

template <class Acc>
__global__ void __launch_bounds__(kHeadThreads) head_kernel(const __grid_constant__ head::HeadSettings<Acc> settings,
                                                            const __grid_constant__ head::HeadBuffers<Acc> buffers) {
  head::batch_head(BlockExec{}, settings, buffers);
}

template <class Acc>
__global__ void __launch_bounds__(kThreads) grad_kernel(const __grid_constant__ GradArgs args) {
  const int64_t row = blockIdx.x / static_cast<uint32_t>(args.n_chunks);  // 32-bit: no division call
  const int64_t chunk = blockIdx.x % static_cast<uint32_t>(args.n_chunks);
  const bool loser = row >= args.batch;
  const int64_t pair = loser ? row - args.batch : row;
  const int64_t target_row = args.shared_target ? pair : row;
  // Same operation order as the CPU and Triton kernels: (+-(a_j * g_j) * 2) / D.
  const Acc* coef = static_cast<const Acc*>(args.coef);
  const Acc* grad_loss = static_cast<const Acc*>(args.grad_loss);
  Acc scale = coef[pair] * grad_loss[pair * args.grad_stride];
  scale = loser ? scale : -scale;
  scale = scale * Acc(2);
  scale = scale / static_cast<Acc>(args.features);

  const int64_t col0 = chunk * kChunk + int64_t{threadIdx.x} * kVector;
  const int n = run_length(col0, args.features);
  if (n == 0) return;
  Acc pred[kVector];
  Acc target[kVector];
  load_columns<Acc>(args.pred, row, col0, n, pred);
  load_columns<Acc>(args.target, target_row, col0, n, target);
  Acc grad[kVector];
#pragma unroll
  for (int i = 0; i < kVector; ++i) grad[i] = scale * (pred[i] - target[i]);
  const int size = args.pred.dtype == DType::F64 ? 8 : args.pred.dtype == DType::F32 ? 4 : 2;
  store_columns<Acc>(args.pred.dtype, static_cast<char*>(args.grad) + row * args.features * size, col0, n, grad);
}

}  // namespace fastpref::cuda::device
