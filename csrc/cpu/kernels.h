// Plain-C++ side of fastpref's CPU kernels: the arguments of the two parallel passes and the
// table of compiled instruction-set variants. No ATen here: kernels_impl.h is compiled once per
// instruction set from these.
#pragma once

#include <cstdint>
#include <vector>

#include "common/grad_args.h"
#include "common/strided.h"

namespace fastpref::cpu {

// Inner dims (S of [N, *S]) left after coalescing; more than this many (after merging contiguous
// runs and dropping size-1 dims) makes the host code pass a contiguous copy instead.
constexpr int kMaxDims = 16;
using Strided = StridedRows<kMaxDims>;  // common/strided.h

// Columns handled per inner step: the target block is converted once into an accumulator-typed
// buffer of this many elements (L1-resident) and then reused by every prediction.
constexpr int64_t kBlock = 1024;

// Columns per parallel task. A multiple of kBlock; the per-sample sums are computed per
// (row, chunk) and the chunk partial sums are added in chunk order afterwards, so the result does
// not depend on how tasks are spread over threads.
constexpr int64_t kChunk = 4 * kBlock;

// Error pass, one task per (pair, chunk): task t covers pair t / n_chunks, chunk t % n_chunks,
// and writes partial[(m * 2B + row) * n_chunks + chunk] (accumulator dtype) for both rows of
// the pair and every model m (0 = policy, 1 = reference, 2.. = EMA models).
struct ForwardArgs {
  const Strided* preds = nullptr;
  int64_t n_models = 0;
  Strided target;
  bool shared_target = false;  // target is [B, *S]: row j serves rows j and j + B
  int64_t batch = 0;
  int64_t features = 0;
  int64_t n_chunks = 0;
  void* partial = nullptr;
};

using BackwardArgs = GradArgs<kMaxDims>;  // common/grad_args.h

using ForwardFn = void (*)(const ForwardArgs&, int64_t, int64_t);
using BackwardFn = void (*)(const BackwardArgs&, int64_t, int64_t);

struct KernelTable {
  const char* name;
  ForwardFn forward_f32;
  ForwardFn forward_f64;
  BackwardFn backward_f32;
  BackwardFn backward_f64;
};

// The variants built into fastpref._C ("base", "avx2", "avx512"; ops.cpp). All give bitwise-identical
// results; the best one this CPU runs is used unless FASTPREF_CPU_ISA names another.
const char* active_isa();                   // the variant in use
std::vector<const char*> supported_isas();  // the built variants this CPU runs
bool use_isa(const char* name);             // switch to `name`; false if it is not built or not supported

}  // namespace fastpref::cpu
