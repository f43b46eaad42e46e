// The CUDA norm kernels: __global__ wrappers around norm_body.h, which holds their logic
// and which the CPU emulation (norm_emulate.cpp) runs too, step for step: each thread's
// accumulator, then the tree levels, a __syncthreads() between them.
#include <c10/cuda/CUDAException.h>

#include "norm_kernel.h"

namespace adamx::cuda {
namespace {

__device__ void join_block(double* shared, NormOrder order) {
  __syncthreads();
  for (int stride = int(blockDim.x) / 2; stride > 0; stride /= 2) {
    norm_tree_step(shared, order, int(threadIdx.x), stride);
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kNormBlockDim) norm_partial_kernel(const __grid_constant__ NormTable tab) {
  __shared__ double shared[kNormBlockDim];
  shared[threadIdx.x] = norm_thread_partial(tab, int64_t(blockIdx.x), int(threadIdx.x), int(blockDim.x));
  join_block(shared, tab.order);
  if (threadIdx.x == 0) tab.partials[tab.first_partial + blockIdx.x] = shared[0];
}

__global__ void __launch_bounds__(kNormBlockDim) norm_final_kernel(const double* partials, int64_t count,
                                                                    NormOrder order, double* out) {
  __shared__ double shared[kNormBlockDim];
  shared[threadIdx.x] = norm_final_thread(partials, count, order, int(threadIdx.x), int(blockDim.x));
  join_block(shared, order);
  if (threadIdx.x == 0) *out = shared[0];
}

}  // namespace

void launch_norm(const NormTable* tables, size_t n, const double* partials, int64_t count,
                 NormOrder order, double* out, cudaStream_t stream) {
  for (size_t k = 0; k < n; ++k) {
    const int64_t blocks = norm_num_blocks(tables[k]);
    norm_partial_kernel<<<static_cast<unsigned>(blocks), kNormBlockDim, 0, stream>>>(tables[k]);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  norm_final_kernel<<<1, kNormBlockDim, 0, stream>>>(partials, count, order, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace adamx::cuda
