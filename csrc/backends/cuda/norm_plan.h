// Host side of the CUDA norm, shared by the CUDA backend (norm_cuda.cpp) and its CPU
// emulation (norm_emulate.cpp): the same launch tables from the same code.
#pragma once

#include <vector>

#include "../../op/norm_op.h"
#include "norm_body.h"

namespace adamx::cuda {

struct NormPlanOptions {
  int64_t chunk_size = kNormChunkSize;
  int max_tensors = kNormMaxTensors;
};

// The number of chunks (blocks of the first kernel, partials) of the call.
int64_t norm_chunks(const NormOperands& ops, const NormPlanOptions& options);

// The first kernel's launches over the tensors, in order, up to max_tensors tensors each;
// their blocks write partials[0, norm_chunks) in chunk order. Empty tensors get no block.
std::vector<NormTable> plan_norm(const NormOperands& ops, double* partials,
                                 const NormPlanOptions& options);

}  // namespace adamx::cuda
