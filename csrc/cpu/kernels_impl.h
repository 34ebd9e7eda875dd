// The two parallel passes of fastpref's CPU backend (per-sample errors, gradient), written as
// plain loops that the compiler vectorizes. No include guard on purpose: ops.cpp
// includes this file once per instruction set, inside `namespace fastpref::cpu::<isa>` and under
// `#pragma GCC target(...)`, with FASTPREF_ISA set to
//   0  baseline of the build target (SSE2 on x86-64, NEON on aarch64),
//   1  AVX2 + FMA + F16C,
//   2  AVX-512 F/BW/VL/DQ (+ AVX2, F16C).
// FMA contraction is off in every variant, so all variants give bitwise-identical results: the
// per-lane sums see the same operations in the same order whatever the vector width.
//
// Prerequisites (included by the caller first): <algorithm>, <cmath>, <cstdint>, <cstring>,
// <type_traits>, <vector>, <c10/util/Half.h>, kernels.h and, for FASTPREF_ISA >= 1,
// <immintrin.h>.

// Accumulator lanes: 128 bytes (two AVX-512 or four AVX2 registers) of independent partial sums,
// enough to hide the add latency. Element d of a block always lands in lane d % kLanes.
template <class Acc>
struct Lanes {
  static constexpr int value = 128 / static_cast<int>(sizeof(Acc));
};

// ---------------------------------------------------------------------------------------------
// Scalar conversions. bfloat16 <-> float32 by bit manipulation (vectorizes everywhere); float16
// by F16C when available, else c10's exact software conversions. Narrowing rounds to nearest
// even. A float64 value bound for 16 bits is first rounded to float32 *to odd*, which makes the
// second rounding exact (no double rounding).
// ---------------------------------------------------------------------------------------------

inline float bits_to_f32(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t f32_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float bf16_to_f32(uint16_t half) { return bits_to_f32(static_cast<uint32_t>(half) << 16); }

inline uint16_t f32_to_bf16(float value) {
  const uint32_t bits = f32_to_bits(value);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return value != value ? static_cast<uint16_t>((bits >> 16) | 0x40u) : rounded;  // NaN stays (quiet) NaN
}

#if FASTPREF_ISA >= 1
inline float f16_to_f32(uint16_t half) { return _cvtsh_ss(half); }
inline uint16_t f32_to_f16(float value) { return _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT); }

inline void f16_run_to_f32(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

inline void f32_run_to_f16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}
#else
inline float f16_to_f32(uint16_t half) { return c10::detail::fp16_ieee_to_fp32_value(half); }
inline uint16_t f32_to_f16(float value) { return c10::detail::fp16_ieee_from_fp32_value(value); }
#endif

// float64 -> float32 rounded to odd: exact results stay, inexact ones take the neighbour whose
// last mantissa bit is 1. Rounding that to 8 or 11 bits then equals rounding the float64 directly.
inline float round_to_odd(double value) {
  float narrow = static_cast<float>(value);
  if (static_cast<double>(narrow) != value && value == value && (f32_to_bits(narrow) & 1u) == 0) {
    narrow = std::nextafter(narrow, static_cast<double>(narrow) < value ? INFINITY : -INFINITY);
  }
  return narrow;
}

// An accumulator value on its way to a 16-bit format: float as is, double rounded to odd.
inline float to_narrow(float value) { return value; }
inline float to_narrow(double value) { return round_to_odd(value); }

inline int64_t element_size(DType dtype) {
  return dtype == DType::F64 ? 8 : dtype == DType::F32 ? 4 : 2;
}

inline const char* row_pointer(const Strided& src, int64_t row) {
  return static_cast<const char*>(src.data) + row * src.row_stride * element_size(src.dtype);
}

inline bool unit_stride(const Strided& src) { return src.ndim <= 1 && src.col_stride == 1; }

// Calls f(load) with load(i) = element i of `base` (typed by dtype) as Acc.
template <class Acc, class F>
inline void visit_loader(DType dtype, const void* base, F&& f) {
  switch (dtype) {
    case DType::F32: {
      const float* p = static_cast<const float*>(base);
      f([p](int64_t i) { return static_cast<Acc>(p[i]); });
      break;
    }
    case DType::F64: {
      const double* p = static_cast<const double*>(base);
      f([p](int64_t i) { return static_cast<Acc>(p[i]); });
      break;
    }
    case DType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(base);
      f([p](int64_t i) { return static_cast<Acc>(bf16_to_f32(p[i])); });
      break;
    }
    case DType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(base);
      f([p](int64_t i) { return static_cast<Acc>(f16_to_f32(p[i])); });
      break;
    }
  }
}

// Calls f(load_w, load_l): two loaders of the same dtype (rows j and j + B of one tensor).
template <class Acc, class F>
inline void visit_pair_loader(DType dtype, const void* base_w, const void* base_l, F&& f) {
  switch (dtype) {
    case DType::F32: {
      const float* pw = static_cast<const float*>(base_w);
      const float* pl = static_cast<const float*>(base_l);
      f([pw](int64_t i) { return static_cast<Acc>(pw[i]); }, [pl](int64_t i) { return static_cast<Acc>(pl[i]); });
      break;
    }
    case DType::F64: {
      const double* pw = static_cast<const double*>(base_w);
      const double* pl = static_cast<const double*>(base_l);
      f([pw](int64_t i) { return static_cast<Acc>(pw[i]); }, [pl](int64_t i) { return static_cast<Acc>(pl[i]); });
      break;
    }
    case DType::BF16: {
      const uint16_t* pw = static_cast<const uint16_t*>(base_w);
      const uint16_t* pl = static_cast<const uint16_t*>(base_l);
      f([pw](int64_t i) { return static_cast<Acc>(bf16_to_f32(pw[i])); },
        [pl](int64_t i) { return static_cast<Acc>(bf16_to_f32(pl[i])); });
      break;
    }
    case DType::F16: {
      const uint16_t* pw = static_cast<const uint16_t*>(base_w);
      const uint16_t* pl = static_cast<const uint16_t*>(base_l);
      f([pw](int64_t i) { return static_cast<Acc>(f16_to_f32(pw[i])); },
        [pl](int64_t i) { return static_cast<Acc>(f16_to_f32(pl[i])); });
      break;
    }
  }
}

// n (<= kBlock) contiguous elements of dtype at src, as Acc.
template <class Acc>
inline void convert_run(DType dtype, const void* src, int64_t n, Acc* __restrict out) {
#if FASTPREF_ISA >= 1
  if (dtype == DType::F16) {
    const uint16_t* p = static_cast<const uint16_t*>(src);
    if constexpr (std::is_same_v<Acc, float>) {
      f16_run_to_f32(p, out, n);
    } else {
      alignas(64) float wide[kBlock];
      f16_run_to_f32(p, wide, n);
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Acc>(wide[i]);
    }
    return;
  }
#endif
  visit_loader<Acc>(dtype, src, [&](auto load) {
    for (int64_t i = 0; i < n; ++i) out[i] = load(i);
  });
}

// Columns [col0, col0 + n) of row `row` as Acc, for any layout (n <= kBlock).
template <class Acc>
void load_block(const Strided& src, int64_t row, int64_t col0, int64_t n, Acc* __restrict out) {
  const char* base = row_pointer(src, row);
  if (unit_stride(src)) {
    convert_run<Acc>(src.dtype, base + col0 * element_size(src.dtype), n, out);
    return;
  }
  visit_loader<Acc>(src.dtype, base, [&](auto load) {
    if (src.ndim <= 1) {
      const int64_t stride = src.col_stride;
      for (int64_t i = 0; i < n; ++i) out[i] = load((col0 + i) * stride);
      return;
    }
    // Several inner dims that no single stride describes (e.g. channels-last): walk the
    // multi-index of the flattened column like an odometer.
    const int nd = src.ndim;
    int64_t index[kMaxDims];
    int64_t offset = 0;
    int64_t rest = col0;
    for (int k = nd - 1; k >= 0; --k) {
      index[k] = rest % src.sizes[k];
      rest /= src.sizes[k];
      offset += index[k] * src.strides[k];
    }
    const int64_t inner_size = src.sizes[nd - 1];
    const int64_t inner_stride = src.strides[nd - 1];
    int64_t i = 0;
    while (i < n) {
      const int64_t run = std::min<int64_t>(n - i, inner_size - index[nd - 1]);
      for (int64_t r = 0; r < run; ++r) out[i + r] = load(offset + r * inner_stride);
      i += run;
      offset += run * inner_stride;
      index[nd - 1] += run;
      for (int k = nd - 1; k > 0 && index[k] == src.sizes[k]; --k) {  // carry
        offset -= src.sizes[k] * src.strides[k];
        index[k] = 0;
        ++index[k - 1];
        offset += src.strides[k - 1];
      }
    }
  });
}

// Columns [col0, col0 + n) of row `row` as Acc: a pointer into the tensor itself when it already
// holds contiguous Acc values, else `buf` filled by load_block.
template <class Acc>
inline const Acc* block_as_acc(const Strided& src, int64_t row, int64_t col0, int64_t n, Acc* buf) {
  constexpr DType acc_dtype = std::is_same_v<Acc, float> ? DType::F32 : DType::F64;
  if (src.dtype == acc_dtype && unit_stride(src)) {
    return reinterpret_cast<const Acc*>(row_pointer(src, row)) + col0;
  }
  load_block<Acc>(src, row, col0, n, buf);
  return buf;
}

// acc_w[d % L] += sum of (load_w(d) - tw[d])^2 over this block's d (in [0, n)), and likewise for
// the loser row. The block's sums start from zero and are added to acc at the end (blocked
// summation: each lane adds at most kBlock / L terms in sequence, then one per block).
template <class Acc, class LoadW, class LoadL>
inline void accumulate_squares(const LoadW& load_w, const LoadL& load_l, const Acc* __restrict tw,
                               const Acc* __restrict tl, int64_t n, Acc* __restrict acc_w, Acc* __restrict acc_l) {
  constexpr int L = Lanes<Acc>::value;
  Acc lanes_w[L];
  Acc lanes_l[L];
  for (int l = 0; l < L; ++l) {
    lanes_w[l] = Acc(0);
    lanes_l[l] = Acc(0);
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) {
      const Acc diff = load_w(i + l) - tw[i + l];
      lanes_w[l] += diff * diff;
    }
    for (int l = 0; l < L; ++l) {
      const Acc diff = load_l(i + l) - tl[i + l];
      lanes_l[l] += diff * diff;
    }
  }
  for (int l = 0; i + l < n; ++l) {
    const Acc diff_w = load_w(i + l) - tw[i + l];
    lanes_w[l] += diff_w * diff_w;
    const Acc diff_l = load_l(i + l) - tl[i + l];
    lanes_l[l] += diff_l * diff_l;
  }
  for (int l = 0; l < L; ++l) {
    acc_w[l] += lanes_w[l];
    acc_l[l] += lanes_l[l];
  }
}

// One block of one model: rows (row_w, row_l) against the target block (tw, tl).
template <class Acc>
inline void model_block(const Strided& src, int64_t row_w, int64_t row_l, int64_t col0, int64_t n, const Acc* tw,
                        const Acc* tl, Acc* buf_w, Acc* buf_l, Acc* acc_w, Acc* acc_l) {
  bool direct = unit_stride(src);
#if FASTPREF_ISA >= 1
  direct = direct && src.dtype != DType::F16;  // F16C converts 8 at a time into the buffers
#endif
  if (direct) {
    const int64_t offset = col0 * element_size(src.dtype);
    visit_pair_loader<Acc>(src.dtype, row_pointer(src, row_w) + offset, row_pointer(src, row_l) + offset,
                           [&](auto load_w, auto load_l) { accumulate_squares<Acc>(load_w, load_l, tw, tl, n, acc_w, acc_l); });
    return;
  }
  load_block<Acc>(src, row_w, col0, n, buf_w);
  load_block<Acc>(src, row_l, col0, n, buf_l);
  accumulate_squares<Acc>([buf_w](int64_t i) { return buf_w[i]; }, [buf_l](int64_t i) { return buf_l[i]; }, tw, tl, n,
                          acc_w, acc_l);
}

// Sum of the L lanes as a pairwise tree (fixed order).
template <class Acc>
inline Acc lane_sum(const Acc* lanes) {
  constexpr int L = Lanes<Acc>::value;
  Acc tree[L];
  for (int l = 0; l < L; ++l) tree[l] = lanes[l];
  for (int width = L / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) tree[l] += tree[l + width];
  }
  return tree[0];
}

// Error pass over tasks [begin, end) (see ForwardArgs).
template <class Acc>
void forward_tasks(const ForwardArgs& args, int64_t begin, int64_t end) {
  constexpr int L = Lanes<Acc>::value;
  alignas(64) Acc target_w[kBlock];
  alignas(64) Acc target_l[kBlock];
  alignas(64) Acc buf_w[kBlock];
  alignas(64) Acc buf_l[kBlock];
  const int64_t models = args.n_models;
  const int64_t batch = args.batch;
  const int64_t rows = 2 * batch;
  const int64_t n_chunks = args.n_chunks;
  std::vector<Acc> acc(static_cast<size_t>(models * 2 * L));
  Acc* partial = static_cast<Acc*>(args.partial);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t pair = task / n_chunks;
    const int64_t chunk = task % n_chunks;
    const int64_t c0 = chunk * kChunk;
    const int64_t c1 = std::min<int64_t>(args.features, c0 + kChunk);
    std::fill(acc.begin(), acc.end(), Acc(0));
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t n = std::min<int64_t>(kBlock, c1 - b0);
      // The target block is converted once and serves every model (and, shared, both rows).
      const Acc* tw = block_as_acc<Acc>(args.target, pair, b0, n, target_w);
      const Acc* tl = args.shared_target ? tw : block_as_acc<Acc>(args.target, pair + batch, b0, n, target_l);
      for (int64_t m = 0; m < models; ++m) {
        model_block<Acc>(args.preds[m], pair, pair + batch, b0, n, tw, tl, buf_w, buf_l, &acc[(2 * m) * L],
                         &acc[(2 * m + 1) * L]);
      }
    }
    for (int64_t m = 0; m < models; ++m) {
      partial[(m * rows + pair) * n_chunks + chunk] = lane_sum<Acc>(&acc[(2 * m) * L]);
      partial[(m * rows + pair + batch) * n_chunks + chunk] = lane_sum<Acc>(&acc[(2 * m + 1) * L]);
    }
  }
}

// out[i] = store(scale * (load(i) - target[i])), with store writing the output dtype.
template <class Acc, class Load, class Store>
inline void grad_run(const Load& load, const Store& store, const Acc* __restrict target, Acc scale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(i, scale * (load(i) - target[i]));
}

// One block of one gradient row: n columns from col0, written to out (the row's start + col0).
template <class Acc>
inline void grad_block(const Strided& pred, int64_t row, int64_t col0, int64_t n, const Acc* target, Acc* buf, Acc scale,
                       void* out) {
  bool direct = unit_stride(pred);
#if FASTPREF_ISA >= 1
  direct = direct && pred.dtype != DType::F16;
#endif
  const void* src = nullptr;
  if (direct) {
    src = row_pointer(pred, row) + col0 * element_size(pred.dtype);
  } else {
    load_block<Acc>(pred, row, col0, n, buf);
  }
  auto from_buffer = [buf](int64_t i) { return buf[i]; };
  switch (pred.dtype) {
    case DType::F32: {
      float* o = static_cast<float*>(out);
      auto store = [o](int64_t i, Acc v) { o[i] = static_cast<float>(v); };
      if (direct) {
        const float* p = static_cast<const float*>(src);
        grad_run<Acc>([p](int64_t i) { return static_cast<Acc>(p[i]); }, store, target, scale, n);
      } else {
        grad_run<Acc>(from_buffer, store, target, scale, n);
      }
      break;
    }
    case DType::F64: {
      double* o = static_cast<double*>(out);
      auto store = [o](int64_t i, Acc v) { o[i] = static_cast<double>(v); };
      if (direct) {
        const double* p = static_cast<const double*>(src);
        grad_run<Acc>([p](int64_t i) { return static_cast<Acc>(p[i]); }, store, target, scale, n);
      } else {
        grad_run<Acc>(from_buffer, store, target, scale, n);
      }
      break;
    }
    case DType::BF16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      auto store = [o](int64_t i, Acc v) { o[i] = f32_to_bf16(to_narrow(v)); };
      if (direct) {
        const uint16_t* p = static_cast<const uint16_t*>(src);
        grad_run<Acc>([p](int64_t i) { return static_cast<Acc>(bf16_to_f32(p[i])); }, store, target, scale, n);
      } else {
        grad_run<Acc>(from_buffer, store, target, scale, n);
      }
      break;
    }
    case DType::F16: {
      uint16_t* o = static_cast<uint16_t*>(out);
#if FASTPREF_ISA >= 1
      alignas(64) float narrow[kBlock];
      grad_run<Acc>(from_buffer, [&narrow](int64_t i, Acc v) { narrow[i] = to_narrow(v); }, target, scale, n);
      f32_run_to_f16(narrow, o, n);
#else
      auto store = [o](int64_t i, Acc v) { o[i] = f32_to_f16(to_narrow(v)); };
      if (direct) {
        const uint16_t* p = static_cast<const uint16_t*>(src);
        grad_run<Acc>([p](int64_t i) { return static_cast<Acc>(f16_to_f32(p[i])); }, store, target, scale, n);
      } else {
        grad_run<Acc>(from_buffer, store, target, scale, n);
      }
#endif
      break;
    }
  }
}

// Gradient pass over tasks [begin, end) (see BackwardArgs).
template <class Acc>
void backward_tasks(const BackwardArgs& args, int64_t begin, int64_t end) {
  alignas(64) Acc target[kBlock];
  alignas(64) Acc buf[kBlock];
  const Acc* coef = static_cast<const Acc*>(args.coef);
  const Acc* grad_loss = static_cast<const Acc*>(args.grad_loss);
  const int64_t batch = args.batch;
  const int64_t features = args.features;
  const int64_t n_chunks = args.n_chunks;
  const int64_t out_size = element_size(args.pred.dtype);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t row = task / n_chunks;
    const int64_t chunk = task % n_chunks;
    const bool loser = row >= batch;
    const int64_t pair = loser ? row - batch : row;
    const int64_t target_row = args.shared_target ? pair : row;
    // Same operation order as the Triton kernel: (+-(a_j * g_j) * 2) / D.
    Acc scale = coef[pair] * grad_loss[pair * args.grad_stride];
    scale = loser ? scale : -scale;
    scale = scale * Acc(2);
    scale = scale / static_cast<Acc>(features);
    char* out_row = static_cast<char*>(args.grad) + row * features * out_size;
    const int64_t c0 = chunk * kChunk;
    const int64_t c1 = std::min<int64_t>(features, c0 + kChunk);
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t n = std::min<int64_t>(kBlock, c1 - b0);
      const Acc* t = block_as_acc<Acc>(args.target, target_row, b0, n, target);
      grad_block<Acc>(args.pred, row, b0, n, t, buf, scale, out_row + b0 * out_size);
    }
  }
}

inline void forward_f32(const ForwardArgs& args, int64_t begin, int64_t end) { forward_tasks<float>(args, begin, end); }
inline void forward_f64(const ForwardArgs& args, int64_t begin, int64_t end) { forward_tasks<double>(args, begin, end); }
inline void backward_f32(const BackwardArgs& args, int64_t begin, int64_t end) { backward_tasks<float>(args, begin, end); }
inline void backward_f64(const BackwardArgs& args, int64_t begin, int64_t end) { backward_tasks<double>(args, begin, end); }
