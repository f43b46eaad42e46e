// Test-only ops that run the CUDA step on the CPU, compiled in every build (their schemas
// are defined in adamx/_ops.py, the emulation's as adam_'s plus launch-geometry arguments):
//
// adamx::_adam_emulated_cuda_ takes adam_'s arguments (CPU tensors) and does what the
// CUDA backend does, with the same host code (check_args, the operands, the launch
// tables), except that instead of launching the kernel it calls the kernel body,
// adam_block_body, for every block and thread of every launch, one after the other.
// Extra arguments shrink the launch geometry so that small tensors exercise several
// chunks, blocks and tables, and force the capturable path (step counts, lr, grad_scale
// and found_inf read by the kernel body). Returns [launches, blocks that took the vector
// path, blocks].
//
// adamx::_cuda_launch_plan(numels, ...) returns the plan alone, for tensors of any size
// (nothing is allocated): per block, (launch, tensor index, chunk index).
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "launch_table.h"

namespace adamx::cuda {
namespace {

// A CUDA block of a Codes8 launch: kernel.cu's code_kernel, with its warp collective (the
// largest magnitude over the lanes) as a loop over the lanes between the two halves.
template <class Var, class P>
void run_code_block(const LaunchTable& tab, int block) {
  const CodeChunk<P> c = code_chunk<Var, P>(tab, block);
  if (c.skip) return;
  CodeLane lanes[kWarpSize];
  for (int64_t q = c.first; q < c.first + c.count; ++q) {
    float m_max = 0.0f, v_max = 0.0f;
    for (int lane = 0; lane < kWarpSize; ++lane) {
      code_lane_update<Var, P>(c, q, lane, lanes[lane]);
      m_max = absmax_of(m_max, lanes[lane].m_max);
      v_max = absmax_of(v_max, lanes[lane].v_max);
    }
    for (int lane = 0; lane < kWarpSize; ++lane)
      code_lane_store(c, q, lane, lanes[lane], m_max, v_max);
  }
}

template <class Var, class P, class S>
void run_tables(const std::vector<LaunchTable>& tables, int block_dim, bool edge_blocks_only,
                int64_t counts[3]) {
  for (const LaunchTable& tab : tables) {
    ++counts[0];
    for (int block = 0; block < tab.num_blocks; ++block) {
      if (edge_blocks_only) {
        const int64_t numel = tab.tensors[tab.block_tensor[block]].numel;
        const int64_t last = (numel - 1) / tab.chunk_size;
        const int64_t chunk = tab.block_chunk[block];
        if (chunk != 0 && chunk != last) continue;
      }
      counts[1] += block_is_vectorized<Var, P, S>(tab, block);
      ++counts[2];
      if constexpr (std::is_same_v<S, Codes8>) {
        run_code_block<Var, P>(tab, block);
      } else {
        for (int thread = 0; thread < block_dim; ++thread)
          adam_block_body<Var, P, S>(block, thread, block_dim, tab);
      }
    }
  }
}

// adam_'s arguments, then the emulation's own, in the order of its schema (adamx/_ops.py).
std::vector<int64_t> adam_emulated_cuda(ADAMX_OP_PARAMS, bool steps_in_kernel,
                                        bool lr_in_kernel, bool scaler_in_kernel,
                                        int64_t chunk_size, int64_t max_tensors,
                                        int64_t max_blocks, int64_t block_dim,
                                        int64_t max_scalar_sets, bool edge_blocks_only) {
  const AdamArgs a = make_adam_args(ADAMX_OP_ARGS);
  check_args(a, CheckContext{c10::DeviceType::CPU});
  TORCH_CHECK(block_dim >= 1, "adamx: block_dim must be positive");
  const PlanOptions options{chunk_size, int(max_tensors), int(max_blocks),
                            int(max_scalar_sets)};
  const StepOperands operands(a, InKernel{steps_in_kernel, lr_in_kernel, scaler_in_kernel});
  const std::vector<LaunchGroup> groups = plan_launches(operands, a, options);
  operands.increment_steps();
  int64_t counts[3] = {0, 0, 0};
  for (const LaunchGroup& group : groups)
    dispatch_kernel(group.dtype, group.kind, a.switches, [&]<class Var, class P, class S>() {
      run_tables<Var, P, S>(group.tables, int(block_dim), edge_blocks_only, counts);
    });
  operands.finish();
  return {counts[0], counts[1], counts[2]};
}

std::vector<int64_t> cuda_launch_plan(c10::IntArrayRef numels, int64_t chunk_size,
                                      int64_t max_tensors, int64_t max_blocks) {
  std::vector<TensorSlot> slots(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(numels[i] >= 0, "adamx: numels must not be negative");
    slots[i].pointers.numel = numels[i];
    slots[i].step = {1.0, nullptr, Dtype::Float32};
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

// Any key, so that an empty list (no tensor to dispatch on) works too; check_args
// refuses tensors that are not on the CPU.
TORCH_LIBRARY_IMPL(adamx, CompositeExplicitAutograd, m) {
  m.impl("_adam_emulated_cuda_", &adam_emulated_cuda);
  m.impl("_cuda_launch_plan", &cuda_launch_plan);
}

}  // namespace adamx::cuda
