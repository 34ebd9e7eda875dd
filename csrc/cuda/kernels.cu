// fastpref's CUDA kernels: the same three passes as the CPU kernels (cpu/kernels_impl.h).
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
// chunk order. The unit is compiled with --fmad=false (setup.py), as pair_head.h requires.
//
// Only CUDA's own headers: ATen stays in ops.cpp (host compiler), so this file compiles quickly
// for each architecture. The device code is in kernels.cuh; this file launches it.

#include "cuda/kernels.cuh"

namespace fastpref::cuda {
namespace {

unsigned int grid_size(int64_t blocks) { return static_cast<unsigned int>(blocks); }

}  // namespace

using device::error_kernel;
using device::grad_kernel;
using device::head_kernel;

void launch_errors(const ErrorArgs& args, bool f64, Stream stream) {
  const unsigned int blocks = grid_size(args.batch * args.n_chunks);
  if (f64) {
    error_kernel<double><<<blocks, kThreads, 0, stream>>>(args);
  } else {
    error_kernel<float><<<blocks, kThreads, 0, stream>>>(args);
  }
}

void launch_head(const head::HeadSettings<float>& settings, const head::HeadBuffers<float>& buffers, Stream stream) {
  head_kernel<float><<<1, kHeadThreads, 0, stream>>>(settings, buffers);
}

void launch_head(const head::HeadSettings<double>& settings, const head::HeadBuffers<double>& buffers, Stream stream) {
  head_kernel<double><<<1, kHeadThreads, 0, stream>>>(settings, buffers);
}

void launch_grad(const GradArgs& args, bool f64, Stream stream) {
  const unsigned int blocks = grid_size(2 * args.batch * args.n_chunks);
  if (f64) {
    grad_kernel<double><<<blocks, kThreads, 0, stream>>>(args);
  } else {
    grad_kernel<float><<<blocks, kThreads, 0, stream>>>(args);
  }
}

}  // namespace fastpref::cuda
