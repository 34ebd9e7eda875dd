// The launchers of fastpref's CUDA kernels (kernels.cuh, where the passes and the gradient's
// derivation are described): one launch per pass on the caller's stream, no synchronization.
// Only CUDA's own headers: ATen stays in ops.cpp (host compiler), so this unit, which nvcc
// compiles once per architecture, builds quickly. Compiled with --fmad=false (setup.py), as
// common/pair_head.h requires.

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
