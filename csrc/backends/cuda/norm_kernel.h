// The launcher of the CUDA norm kernels (norm_kernel.cu), called by norm_cuda.cpp. Plain
// types only, so the .cu needs no ATen headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "norm_body.h"

namespace adamx::cuda {

// On `stream`: the first kernel once per table (writing partials[0, count)), then the
// second, which joins them into *out.
void launch_norm(const NormTable* tables, size_t n, const double* partials, int64_t count,
                 NormOrder order, double* out, cudaStream_t stream);

}  // namespace adamx::cuda
