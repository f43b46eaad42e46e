// Test-only: adamx::_norm_accumulate_emulated_cuda runs norm_accumulate as the CUDA
// backend does (the same operands and plan, norm_plan.cpp), calling the kernel bodies
// (norm_body.h) for every block and thread of every launch on the CPU, the tree levels
// in the order the GPU's __syncthreads() separates them. Extra arguments shrink the
// geometry, so small tensors make many chunks and launches. Compiled in every build.
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "norm_plan.h"

namespace adamx::cuda {
namespace {

void join_block(std::vector<double>& shared, NormOrder order) {
  const int block_dim = static_cast<int>(shared.size());
  for (int stride = block_dim / 2; stride > 0; stride /= 2)
    for (int thread = 0; thread < block_dim; ++thread)
      norm_tree_step(shared.data(), order, thread, stride);
}

at::Tensor norm_emulated_cuda(at::TensorList tensors, double norm_type, int64_t chunk_size,
                              int64_t max_tensors, int64_t block_dim) {
  const NormOperands ops = norm_operands(tensors, norm_type, c10::DeviceType::CPU);
  TORCH_CHECK(block_dim >= 1 && block_dim <= kNormBlockDim && (block_dim & (block_dim - 1)) == 0,
              "adamx: block_dim must be a power of two up to ", kNormBlockDim);
  const NormPlanOptions options{chunk_size, static_cast<int>(max_tensors)};
  const int64_t count = norm_chunks(ops, options);
  std::vector<double> partials(count > 0 ? count : 1);
  std::vector<double> shared(block_dim);
  for (const NormTable& tab : plan_norm(ops, partials.data(), options))
    for (int64_t block = 0; block < norm_num_blocks(tab); ++block) {
      for (int thread = 0; thread < block_dim; ++thread)
        shared[thread] = norm_thread_partial(tab, block, thread, int(block_dim));
      join_block(shared, ops.order);
      tab.partials[tab.first_partial + block] = shared[0];
    }
  for (int thread = 0; thread < block_dim; ++thread)
    shared[thread] = norm_final_thread(partials.data(), count, ops.order, thread, int(block_dim));
  join_block(shared, ops.order);
  return at::scalar_tensor(shared[0], at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(adamx, CompositeExplicitAutograd, m) {
  m.impl("_norm_accumulate_emulated_cuda", &norm_emulated_cuda);
}

}  // namespace adamx::cuda
