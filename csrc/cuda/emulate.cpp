// Test-only ops that run the CUDA step on the CPU, compiled in every build:
//
// adamx::_adam_emulated_cuda_ takes adam_'s arguments (CPU tensors) and does what the
// CUDA backend does, with the same host code (check_args, prepare_step, the launch
// tables), except that instead of launching the kernel it calls the kernel body,
// adam_block_body, for every block and thread of every launch, one after the other.
// Extra arguments shrink the launch geometry so that small tensors exercise several
// chunks, blocks and tables, and force the capturable path (step counts and lr read by
// the kernel body). Returns [launches, blocks that took the vector path, blocks].
//
// adamx::_cuda_launch_plan(numels, ...) returns the plan alone, for tensors of any size
// (nothing is allocated): per block, (launch, tensor index, chunk index).
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#include "../adam_op.h"
#include "launch_table.h"
#include "multi_tensor.h"

namespace adamx::cuda {
namespace {

template <class Var, class T>
void run_tables(const std::vector<LaunchTable>& tables, int block_dim, bool edge_blocks_only,
                int64_t counts[3]) {
  for (const LaunchTable& tab : tables) {
    ++counts[0];
    for (int block = 0; block < tab.num_blocks; ++block) {
      if (edge_blocks_only) {
        const int64_t numel = tab.numel[tab.block_tensor[block]];
        const int64_t last = (numel - 1) / tab.chunk_size;
        const int64_t chunk = tab.block_chunk[block];
        if (chunk != 0 && chunk != last) continue;
      }
      counts[1] += block_is_vectorized<Var, T>(tab, block);
      ++counts[2];
      for (int thread = 0; thread < block_dim; ++thread)
        adam_block_body<Var, T>(block, thread, block_dim, tab);
    }
  }
}

std::vector<int64_t> adam_emulated_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
    double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
    double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
    bool eps_inside_sqrt, bool steps_in_kernel, bool lr_in_kernel, int64_t chunk_size,
    int64_t max_tensors, int64_t max_blocks, int64_t block_dim, int64_t max_scalar_sets,
    bool edge_blocks_only) {
  const AdamArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                   Hyper{lr, beta1, beta2, eps, weight_decay},
                   lr_tensor ? &*lr_tensor : nullptr, amsgrad, maximize,
                   decoupled_weight_decay, eps_inside_sqrt};
  check_args(a, c10::DeviceType::CPU);
  TORCH_CHECK(block_dim >= 1, "adamx: block_dim must be positive");
  const PlanOptions options{chunk_size, static_cast<int>(max_tensors),
                            static_cast<int>(max_blocks), static_cast<int>(max_scalar_sets)};
  const PreparedStep prep = prepare_step(a, options, steps_in_kernel, lr_in_kernel);
  increment_device_steps(prep);
  int64_t counts[3] = {0, 0, 0};
  for (const auto& group : prep.groups) {
    dispatch_variant(decoupled_weight_decay, amsgrad, maximize, eps_inside_sqrt,
                     [&]<class Var>() {
                       const int bd = static_cast<int>(block_dim);
                       switch (group.dtype) {
                         case at::kDouble:
                           run_tables<Var, double>(group.tables, bd, edge_blocks_only, counts);
                           break;
                         case at::kHalf:
                           run_tables<Var, c10::Half>(group.tables, bd, edge_blocks_only, counts);
                           break;
                         case at::kBFloat16:
                           run_tables<Var, c10::BFloat16>(group.tables, bd, edge_blocks_only,
                                                          counts);
                           break;
                         default:
                           run_tables<Var, float>(group.tables, bd, edge_blocks_only, counts);
                       }
                     });
  }
  copy_back(prep, a);
  return {counts[0], counts[1], counts[2]};
}

std::vector<int64_t> cuda_launch_plan(c10::IntArrayRef numels, int64_t chunk_size,
                                      int64_t max_tensors, int64_t max_blocks) {
  std::vector<TensorSlot> slots(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(numels[i] >= 0, "adamx: numels must not be negative");
    slots[i].numel = numels[i];
    slots[i].host_step = 1;
  }
  const PlanOptions options{chunk_size, static_cast<int>(max_tensors),
                            static_cast<int>(max_blocks), kMaxScalarSets};
  std::vector<std::vector<int64_t>> ids;
  const auto tables = build_tables(slots, LaunchScalars{Hyper{1e-3, 0.9, 0.999, 1e-8, 0}},
                                   options, &ids);
  std::vector<int64_t> out;
  for (size_t k = 0; k < tables.size(); ++k)
    for (int b = 0; b < tables[k].num_blocks; ++b) {
      out.push_back(static_cast<int64_t>(k));
      out.push_back(ids[k][tables[k].block_tensor[b]]);
      out.push_back(tables[k].block_chunk[b]);
    }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adamx, m) {
  const std::string geometry = "int chunk_size=" + std::to_string(kDefaultChunkSize) +
                               ", int max_tensors=" + std::to_string(kMaxTensors) +
                               ", int max_blocks=" + std::to_string(kMaxBlocks);
  m.def(("_adam_emulated_cuda_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
         "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, *, "
         "float lr, Tensor? lr_tensor=None, float beta1, float beta2, float weight_decay, "
         "float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
         "bool eps_inside_sqrt, bool steps_in_kernel=False, bool lr_in_kernel=False, " +
         geometry + ", int block_dim=" + std::to_string(kBlockDim) +
         ", int max_scalar_sets=" + std::to_string(kMaxScalarSets) +
         ", bool edge_blocks_only=False) -> int[]").c_str());
  m.def(("_cuda_launch_plan(int[] numels, " + geometry + ") -> int[]").c_str(),
        &cuda_launch_plan);
}

// Any key, so that an empty list (no tensor to dispatch on) works too; check_args
// refuses tensors that are not on the CPU.
TORCH_LIBRARY_IMPL(adamx, CompositeExplicitAutograd, m) {
  m.impl("_adam_emulated_cuda_", &adam_emulated_cuda);
}

}  // namespace adamx::cuda
