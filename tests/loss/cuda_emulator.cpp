// Runs the device code of csrc/cuda/kernels.cuh on the CPU, for tests/loss/test_cuda_sources.py:
// the CUDA builtins the kernels use are emulated (a block is one OS thread per CUDA thread,
// __syncthreads and warp shuffles are barriers), so that the kernels' index arithmetic, layouts,
// dtype conversions and reductions are checked without a GPU. Per case it checks
//   - the error pass's per-sample errors against a float64 sum of the same (rounded) inputs;
//   - the head on one block (BlockExec) bitwise against the same head on one thread (SerialExec);
//   - the gradient against -+ a_j (2/D) (pred - target) in float64, rounded to the output dtype.
// Prints one line per case and exits 1 on any mismatch.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Emulated CUDA builtins
// ---------------------------------------------------------------------------------------------

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // blocks run one after another
#define __launch_bounds__(...)
#define __grid_constant__

struct Dim3 {
  unsigned int x = 0;
};
thread_local Dim3 threadIdx;
thread_local Dim3 blockIdx;
Dim3 blockDim;

struct BlockState {
  explicit BlockState(int threads) : block(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    slots.resize(threads);
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> slots;
};
thread_local BlockState* block_state = nullptr;

template <class T>
T __ldg(const T* p) {
  return *p;
}

inline float __uint_as_float(unsigned int bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

template <class T>
T __shfl_down_sync(unsigned int, T value, int delta) {
  BlockState& s = *block_state;
  const int t = static_cast<int>(threadIdx.x);
  s.slots[t] = static_cast<double>(value);  // exact for float and double
  s.warps[t / 32]->arrive_and_wait();
  const T out = t % 32 + delta < 32 ? static_cast<T>(s.slots[t + delta]) : value;
  s.warps[t / 32]->arrive_and_wait();
  return out;
}

inline void __syncthreads() { block_state->block.arrive_and_wait(); }

template <class Kernel>
void launch(unsigned int blocks, unsigned int threads, Kernel kernel) {
  blockDim.x = threads;
  for (unsigned int b = 0; b < blocks; ++b) {
    BlockState state(static_cast<int>(threads));
    std::vector<std::thread> pool;
    for (unsigned int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        block_state = &state;
        threadIdx.x = t;
        blockIdx.x = b;
        kernel();
      });
    }
    for (std::thread& thread : pool) thread.join();
  }
}

#include "cuda/kernels.cuh"

// ---------------------------------------------------------------------------------------------
// Host tensors
// ---------------------------------------------------------------------------------------------

using fastpref::DType;
using fastpref::cuda::Strided;
namespace cu = fastpref::cuda;
namespace head = fastpref::head;

int size_of(DType dtype) { return dtype == DType::F64 ? 8 : dtype == DType::F32 ? 4 : 2; }

double to_double(DType dtype, const unsigned char* p) {
  uint16_t half;
  switch (dtype) {
    case DType::F32: {
      float v;
      std::memcpy(&v, p, 4);
      return v;
    }
    case DType::F64: {
      double v;
      std::memcpy(&v, p, 8);
      return v;
    }
    case DType::BF16:
      std::memcpy(&half, p, 2);
      return __uint_as_float(static_cast<unsigned int>(half) << 16);
    case DType::F16:
      break;
  }
  std::memcpy(&half, p, 2);
  return __half2float(__ushort_as_half(half));
}

void from_double(DType dtype, double v, unsigned char* p) {
  switch (dtype) {
    case DType::F32: {
      const float f = static_cast<float>(v);
      std::memcpy(p, &f, 4);
      return;
    }
    case DType::F64:
      std::memcpy(p, &v, 8);
      return;
    case DType::BF16: {
      const uint16_t bits = __bfloat16_as_ushort(__double2bfloat16(v));
      std::memcpy(p, &bits, 2);
      return;
    }
    case DType::F16: {
      const uint16_t bits = __half_as_ushort(__double2half(v));
      std::memcpy(p, &bits, 2);
      return;
    }
  }
}

enum class Layout { kContiguous, kChannelsLast, kEveryOther, kMisaligned };

// An [N, C, H, W] tensor in one of the layouts, with random values; value(r, d) reads the
// logical element (row r, column d of the row-major flattening of C, H, W).
struct HostTensor {
  DType dtype;
  int64_t rows, c, h, w;
  std::vector<unsigned char> storage;
  int64_t offset = 0;  // elements
  int64_t strides[4];  // elements, of N, C, H, W

  HostTensor(DType dtype_, int64_t rows_, int64_t c_, int64_t h_, int64_t w_, Layout layout, std::mt19937& rng)
      : dtype(dtype_), rows(rows_), c(c_), h(h_), w(w_) {
    const int64_t d = c * h * w;
    int64_t elements = rows * d + 8;
    switch (layout) {
      case Layout::kContiguous:
      case Layout::kMisaligned:
        strides[0] = d, strides[1] = h * w, strides[2] = w, strides[3] = 1;
        offset = layout == Layout::kMisaligned ? 1 : 0;
        break;
      case Layout::kChannelsLast:
        strides[0] = d, strides[1] = 1, strides[2] = w * c, strides[3] = c;
        break;
      case Layout::kEveryOther:
        strides[0] = 2 * d, strides[1] = 2 * h * w, strides[2] = 2 * w, strides[3] = 2;
        elements = 2 * rows * d + 8;
        break;
    }
    storage.resize(static_cast<size_t>(elements * size_of(dtype)));
    std::normal_distribution<double> normal(0.0, 1.0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t col = 0; col < d; ++col) from_double(dtype, normal(rng), at(r, col));
    }
  }

  unsigned char* at(int64_t r, int64_t col) {
    const int64_t ci = col / (h * w), hi = col / w % h, wi = col % w;
    const int64_t e = offset + r * strides[0] + ci * strides[1] + hi * strides[2] + wi * strides[3];
    return storage.data() + e * size_of(dtype);
  }
  double value(int64_t r, int64_t col) { return to_double(dtype, at(r, col)); }

  // As the host code describes it (common/op_args.h's describe: size-1 dims dropped, contiguous
  // runs merged).
  Strided strided() {
    Strided out;
    out.data = storage.data() + offset * size_of(dtype);
    out.dtype = dtype;
    out.row_stride = strides[0];
    int64_t sizes[3] = {c, h, w};
    int nd = 0;
    for (int k = 0; k < 3; ++k) {
      if (sizes[k] == 1) continue;
      if (nd > 0 && out.strides[nd - 1] == sizes[k] * strides[k + 1]) {
        out.sizes[nd - 1] *= sizes[k];
        out.strides[nd - 1] = strides[k + 1];
      } else {
        out.sizes[nd] = sizes[k];
        out.strides[nd] = strides[k + 1];
        ++nd;
      }
    }
    out.ndim = nd;
    out.col_stride = nd == 1 ? out.strides[0] : 1;
    return out;
  }
};

// ---------------------------------------------------------------------------------------------
// One case
// ---------------------------------------------------------------------------------------------

struct Case {
  const char* name;
  int64_t batch, c, h, w;
  int k_ema;
  DType pred_dtype, target_dtype;
  Layout pred_layout, target_layout;
  bool shared_target;
};

bool close(double got, double want, double rel) {
  if (std::isnan(got) || std::isnan(want)) return std::isnan(got) && std::isnan(want);
  return std::abs(got - want) <= rel * std::max(1.0, std::abs(want));
}

template <class Acc>
bool run_case(const Case& cs, std::mt19937& rng) {
  const int64_t batch = cs.batch, rows = 2 * batch, features = cs.c * cs.h * cs.w;
  const int64_t models = 2 + cs.k_ema;
  std::vector<HostTensor> preds;
  for (int64_t m = 0; m < models; ++m) {
    // Mix layouts: the policy in the case's layout, the others alternate with contiguous.
    const Layout layout = m % 2 == 0 ? cs.pred_layout : Layout::kContiguous;
    preds.emplace_back(cs.pred_dtype, rows, cs.c, cs.h, cs.w, layout, rng);
  }
  HostTensor target(cs.target_dtype, cs.shared_target ? batch : rows, cs.c, cs.h, cs.w, cs.target_layout, rng);
  const double tol = sizeof(Acc) == 8 ? 1e-12 : 2e-5;
  bool ok = true;

  // Error pass.
  const int64_t n_chunks = cu::chunk_count(features);
  std::vector<Acc> partial(static_cast<size_t>(models * rows * n_chunks), Acc(-1));
  for (int64_t first = 0; first < models; first += cu::kMaxModels) {
    cu::ErrorArgs args;
    args.n_models = static_cast<int>(std::min<int64_t>(cu::kMaxModels, models - first));
    for (int m = 0; m < args.n_models; ++m) args.preds[m] = preds[first + m].strided();
    args.first_model = first;
    args.target = target.strided();
    args.shared_target = cs.shared_target;
    args.batch = batch;
    args.features = features;
    args.n_chunks = n_chunks;
    args.partial = partial.data();
    launch(static_cast<unsigned int>(batch * n_chunks), cu::kThreads,
           [&] { cu::device::error_kernel<Acc>(args); });
  }
  std::vector<double> errors(static_cast<size_t>(models * rows));
  for (int64_t m = 0; m < models; ++m) {
    for (int64_t i = 0; i < rows; ++i) {
      double want = 0.0, got = 0.0;
      const int64_t t_row = cs.shared_target ? i % batch : i;
      for (int64_t col = 0; col < features; ++col) {
        const double diff = preds[m].value(i, col) - target.value(t_row, col);
        want += diff * diff;
      }
      for (int64_t ch = 0; ch < n_chunks; ++ch) got += partial[(m * rows + i) * n_chunks + ch];
      errors[m * rows + i] = want / features;
      if (!close(got, want, tol)) {
        std::printf("  error sum of model %lld row %lld: got %.9g, want %.9g\n", (long long)m, (long long)i, got, want);
        ok = false;
      }
    }
  }

  // Head: one block against one thread, same partial sums.
  head::HeadSettings<Acc> settings{Acc(1000), Acc(15), Acc(10), Acc(-1e-3), Acc(0), false, Acc(0.1), Acc(1000),
                                   fastpref::Preset::kOfficial, fastpref::Weighting::kLinear,
                                   fastpref::Margin::kQuadratic, fastpref::LossType::kSigmoid,
                                   fastpref::Reduction::kMean};
  auto outputs = [&](std::vector<Acc>& store) {
    head::HeadBuffers<Acc> buf{};
    buf.partial = partial.data();
    buf.models = models;
    buf.batch = batch;
    buf.n_chunks = n_chunks;
    buf.features = features;
    const int64_t scratch = head::HeadBuffers<Acc>::scratch_size(models, batch);
    store.assign(static_cast<size_t>(scratch + 1 + batch + 7 * batch + 2 * rows + 1), Acc(-7));
    buf.set_scratch(store.data());
    buf.loss = store.data() + scratch;
    buf.coef = buf.loss + 1;
    buf.pair_stats = buf.coef + batch;
    buf.sample_err = buf.pair_stats + 7 * batch;
    buf.accuracy = buf.sample_err + 2 * rows;
    return buf;
  };
  std::vector<Acc> on_block, on_thread;
  const head::HeadBuffers<Acc> block_buf = outputs(on_block);
  const head::HeadBuffers<Acc> thread_buf = outputs(on_thread);
  launch(1, cu::kHeadThreads, [&] { cu::device::head_kernel<Acc>(settings, block_buf); });
  head::batch_head(head::SerialExec{}, settings, thread_buf);
  const int64_t scratch = head::HeadBuffers<Acc>::scratch_size(models, batch);
  if (std::memcmp(on_block.data() + scratch, on_thread.data() + scratch,
                  (on_block.size() - scratch) * sizeof(Acc)) != 0) {
    std::printf("  head on one block differs from the head on one thread\n");
    ok = false;
  }

  // Gradient, with the incoming gradient g = 1 + j / B.
  std::vector<Acc> grad_loss(static_cast<size_t>(batch));
  for (int64_t j = 0; j < batch; ++j) grad_loss[j] = Acc(1) + Acc(j) / Acc(batch);
  std::vector<unsigned char> grad(static_cast<size_t>(rows * features * size_of(cs.pred_dtype)) + 16);
  unsigned char* grad_data = grad.data() + (16 - reinterpret_cast<uintptr_t>(grad.data()) % 16) % 16;
  cu::GradArgs gargs;
  gargs.pred = preds[0].strided();
  gargs.target = target.strided();
  gargs.shared_target = cs.shared_target;
  gargs.batch = batch;
  gargs.features = features;
  gargs.n_chunks = n_chunks;
  gargs.coef = block_buf.coef;
  gargs.grad_loss = grad_loss.data();
  gargs.grad_stride = 1;
  gargs.grad = grad_data;
  launch(static_cast<unsigned int>(rows * n_chunks), cu::kThreads, [&] { cu::device::grad_kernel<Acc>(gargs); });
  const double grad_tol = cs.pred_dtype == DType::BF16 ? 1.0 / 128 : cs.pred_dtype == DType::F16 ? 1.0 / 1024 : tol;
  int bad = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t j = i % batch;
    const double sign = i < batch ? -1.0 : 1.0;
    const double scale = sign * double(block_buf.coef[j]) * double(grad_loss[j]) * 2.0 / features;
    for (int64_t col = 0; col < features; ++col) {
      const double want = scale * (preds[0].value(i, col) - target.value(cs.shared_target ? j : i, col));
      const double got = to_double(cs.pred_dtype, grad_data + (i * features + col) * size_of(cs.pred_dtype));
      const bool near = std::abs(got - want) <= grad_tol * (std::abs(want) + 1e-3 * std::abs(scale));
      if (!near && bad++ < 3) {
        std::printf("  grad[%lld, %lld]: got %.9g, want %.9g\n", (long long)i, (long long)col, got, want);
        ok = false;
      }
    }
  }
  std::printf("%s %s (B=%lld, D=%lld, K=%d)\n", ok ? "ok  " : "FAIL", cs.name, (long long)batch, (long long)features,
              cs.k_ema);
  return ok;
}

int main() {
  std::mt19937 rng(1234);
  const Case f32_cases[] = {
      {"fp32 contiguous, 3 chunks", 2, 3, 37, 41, 0, DType::F32, DType::F32, Layout::kContiguous,
       Layout::kContiguous, false},
      {"bf16 preds, fp32 shared target, K=2", 3, 4, 16, 40, 2, DType::BF16, DType::F32, Layout::kContiguous,
       Layout::kContiguous, true},
      {"fp16 channels-last, K=1", 2, 4, 20, 30, 1, DType::F16, DType::F16, Layout::kChannelsLast,
       Layout::kChannelsLast, false},
      {"fp32 every other column, misaligned target", 2, 1, 1, 2500, 0, DType::F32, DType::F32,
       Layout::kEveryOther, Layout::kMisaligned, false},
      {"bf16 misaligned rows, K=9 (two launches)", 2, 2, 9, 130, 9, DType::BF16, DType::BF16, Layout::kMisaligned,
       Layout::kContiguous, false},
      {"fp32 D=5", 4, 1, 1, 5, 1, DType::F32, DType::F32, Layout::kContiguous, Layout::kContiguous, true},
  };
  const Case f64_cases[] = {
      {"fp64 preds, bf16 target, channels-last", 2, 3, 30, 31, 2, DType::F64, DType::BF16, Layout::kChannelsLast,
       Layout::kContiguous, false},
  };
  bool ok = true;
  for (const Case& cs : f32_cases) ok = run_case<float>(cs, rng) && ok;
  for (const Case& cs : f64_cases) ok = run_case<double>(cs, rng) && ok;
  return ok ? 0 : 1;
}
