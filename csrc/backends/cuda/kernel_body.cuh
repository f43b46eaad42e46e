// The multi-tensor CUDA Adam kernels: thin __global__ wrappers around adam_block_body
// (block_body.h) and the code-block halves, which hold all of their logic and which the
// CPU emulation runs too; and launch_tables_of<P>, which launches those of params of type
// P. Included by one kernel_<dtype>.cu per param dtype, so that nvcc compiles the dtypes'
// kernels in parallel; kernel.cu picks the dtype. nvcc only; free of ATen and torch headers.
#pragma once

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

// Blocks of 8-bit codes: each warp takes the chunk's blocks of codes in turn; between the
// two halves of a block's update, the warp's largest magnitudes by shuffles (the loop over
// lanes that emulate.cpp runs instead).
template <class Var, class P>
__global__ void __launch_bounds__(kBlockDim) code_kernel(const __grid_constant__ LaunchTable tab) {
  const CodeChunk<P> c = code_chunk<Var, P>(tab, static_cast<int>(blockIdx.x));
  if (c.skip) return;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  for (int64_t q = threadIdx.x / kWarpSize; q < c.count; q += warps) {
    CodeLane r;
    code_lane_update<Var, P>(c, c.first + q, lane, r);
    float m_max = r.m_max, v_max = r.v_max;
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      m_max = absmax_of(m_max, __shfl_xor_sync(0xffffffffu, m_max, offset));
      v_max = absmax_of(v_max, __shfl_xor_sync(0xffffffffu, v_max, offset));
    }
    code_lane_store(c, c.first + q, lane, r, m_max, v_max);
  }
}

}  // namespace

template <class P>
void launch_tables_of(StateKind kind, const Switches& switches, const LaunchTable* tables,
                      size_t n, cudaStream_t stream) {
  dispatch_kernel_of<P>(kind, switches, [&]<class Var, class P_, class S>() {
    for (size_t k = 0; k < n; ++k) {
      if constexpr (std::is_same_v<S, Codes8>)
        code_kernel<Var, P_><<<tables[k].num_blocks, kBlockDim, 0, stream>>>(tables[k]);
      else
        adam_kernel<Var, P_, S><<<tables[k].num_blocks, kBlockDim, 0, stream>>>(tables[k]);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace adamx::cuda
