// The launcher of the multi-tensor CUDA kernel (adam_cuda_kernel.cu), called by the CUDA
// backend (adam_cuda.cpp). Plain types only, so the .cu needs no ATen headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "multi_tensor.h"

namespace adamx::cuda {

struct KernelFlags {
  bool decoupled, amsgrad, maximize, eps_inside_sqrt;
};

// Launches one kernel per table on `stream` (the current device must be the tensors').
// `dtype` is a ScalarCode: kFloat32, kFloat64, kFloat16 or kBFloat16.
void launch_adam_tables(uint8_t dtype, KernelFlags flags, const LaunchTable* tables, size_t n,
                        cudaStream_t stream);

}  // namespace adamx::cuda
