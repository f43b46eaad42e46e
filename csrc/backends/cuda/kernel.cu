// The multi-tensor CUDA Adam kernel: a thin __global__ wrapper around adam_block_body
// (block_body.h), which holds all of its logic and which the CPU emulation runs too.
// Compiled by nvcc in CUDA builds only; deliberately free of ATen and torch headers.
#include <c10/cuda/CUDAException.h>

#include "kernel.h"

namespace adamx::cuda {
namespace {

// __grid_constant__: the body reads the table straight from kernel parameter memory
// (without it, taking the parameter's address would copy 4 KiB to each thread's stack).
template <class Var, class P, class S>
__global__ void __launch_bounds__(kBlockDim) adam_kernel(const __grid_constant__ LaunchTable tab) {
  adam_block_body<Var, P, S>(static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x),
                          static_cast<int>(blockDim.x), tab);
}

}  // namespace

void launch_adam_tables(Dtype dtype, const Switches& switches, const LaunchTable* tables,
                        size_t n, cudaStream_t stream) {
  dispatch_kernel(dtype, switches, [&]<class Var, class P, class S>() {
    for (size_t k = 0; k < n; ++k) {
      adam_kernel<Var, P, S><<<tables[k].num_blocks, kBlockDim, 0, stream>>>(tables[k]);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace adamx::cuda
