// Plain-C++ side of fastpref's CUDA kernels (kernels.cu): the tiling, the launch arguments and the
// launchers, shared by the kernels and the host code (ops.cpp). No ATen and no CUDA header here,
// so that kernels.cu, which nvcc compiles once per architecture, stays quick to build.
#pragma once

#include <cstdint>

#include "common/grad_args.h"
#include "common/pair_head.h"
#include "common/strided.h"

struct CUstream_st;

namespace fastpref::cuda {

using Stream = CUstream_st*;  // cudaStream_t

// Inner dims read in place (as the CPU kernels do, with a lower cap: each descriptor is a launch
// argument); a layout with more irreducible inner dims is read from a contiguous copy.
constexpr int kMaxDims = 6;
using Strided = StridedRows<kMaxDims>;

// Both passes: a block of kThreads threads covers one chunk of kChunk columns of a row (error
// pass: of a pair's two rows), each thread kVector consecutive columns (one 128-bit load of a
// 16-bit row, two of a float32 one). The chunk count, ceil(D / kChunk), depends on the shape
// only, and every partial sum adds a fixed set of columns in a fixed order: results are bitwise
// reproducible, with no atomics.
constexpr int kThreads = 256;
constexpr int kVector = 8;
constexpr int64_t kChunk = int64_t{kThreads} * kVector;

// Predictions per launch of the error pass (their descriptors are launch arguments); more models
// take more launches, each writing its own rows of the partial sums.
constexpr int kMaxModels = 8;

// Threads of the head's single block.
constexpr int kHeadThreads = 256;

inline int64_t chunk_count(int64_t features) { return (features + kChunk - 1) / kChunk; }

// Error pass, one block per (pair, chunk): block b covers pair b / n_chunks, chunk b % n_chunks,
// and writes partial[((first_model + m) * 2B + row) * n_chunks + chunk] (accumulator dtype) for
// both rows of the pair and the launch's models m (model 0 = policy, 1 = reference, 2.. = EMA).
struct ErrorArgs {
  Strided preds[kMaxModels];
  int n_models = 0;
  int64_t first_model = 0;
  Strided target;
  bool shared_target = false;  // target is [B, *S]: row j serves rows j and j + B
  int64_t batch = 0;
  int64_t features = 0;
  int64_t n_chunks = 0;
  void* partial = nullptr;
};

using GradArgs = fastpref::GradArgs<kMaxDims>;  // common/grad_args.h

// Launches on `stream` (no synchronization); the caller checks the launch. `f64`: the
// accumulator is float64, else float32.
void launch_errors(const ErrorArgs& args, bool f64, Stream stream);
void launch_head(const head::HeadSettings<float>& settings, const head::HeadBuffers<float>& buffers, Stream stream);
void launch_head(const head::HeadSettings<double>& settings, const head::HeadBuffers<double>& buffers, Stream stream);
void launch_grad(const GradArgs& args, bool f64, Stream stream);

}  // namespace fastpref::cuda
