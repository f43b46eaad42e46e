// The launcher of the multi-tensor CUDA kernel (kernel.cu), called by the CUDA backend
// (adam_cuda.cpp). Plain types only, so the .cu needs no ATen headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "block_body.h"

namespace adamx::cuda {

// Launches one kernel per table on `stream` (the current device must be the tensors'):
// the kernel for params of `dtype`, moments stored as `kind`, and these switches.
void launch_adam_tables(Dtype dtype, StateKind kind, const Switches& switches,
                        const LaunchTable* tables, size_t n, cudaStream_t stream);

}  // namespace adamx::cuda
