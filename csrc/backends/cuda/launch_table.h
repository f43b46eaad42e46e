// Host side of the multi-tensor CUDA step, shared by the CUDA backend (adam_cuda.cpp)
// and its CPU emulation (emulate.cpp): both turn the step's operands into the same launch
// tables with this code, so what the emulation tests is what a GPU runs.
#pragma once

#include <cstdint>
#include <vector>

#include "../../op/operands.h"
#include "block_body.h"

namespace adamx::cuda {

struct PlanOptions {
  int64_t chunk_size = kDefaultChunkSize;
  int max_tensors = kMaxTensors;
  int max_blocks = kMaxBlocks;
  int max_scalar_sets = kMaxScalarSets;
};

// One tensor as the planner sees it.
struct TensorSlot {
  TensorPointers pointers;
  StepCount step;
  uint32_t param_id;       // its random streams (see AdamArgs::param_ids, element_offsets)
  int64_t element_offset;
};

// Launch-wide inputs of the planner.
struct LaunchScalars {
  Hyper hyper;
  // The step's scalars: values, or device memory the kernel reads (the defaults: no
  // grad_scale, no found_inf).
  ScalarOperand lr{hyper.lr, nullptr, Dtype::Float32};
  ScalarOperand grad_scale{1.0, nullptr, Dtype::Float32};
  ScalarOperand found_inf{0.0, nullptr, Dtype::Float32};
  Switches switches{};
};

// The launch tables for `slots` (all of one param dtype), in order: each tensor's chunks go to
// consecutive blocks; a table is closed when it has max_blocks blocks, max_tensors
// tensors or max_scalar_sets distinct host step counts. Empty tensors get no block.
// `tensor_ids`, when given, receives per table the index in `slots` of each table tensor.
std::vector<LaunchTable> build_tables(const std::vector<TensorSlot>& slots,
                                      const LaunchScalars& scalars, const PlanOptions& options,
                                      std::vector<std::vector<int64_t>>* tensor_ids = nullptr);

// The launches of one step: per param dtype and kind of moments, in order of first
// appearance, its launch tables (for 8-bit moments, with chunks of whole blocks of codes:
// the chunk size rounded up to a multiple of kCodeBlock).
struct LaunchGroup {
  Dtype dtype;
  StateKind kind;
  std::vector<LaunchTable> tables;
};
std::vector<LaunchGroup> plan_launches(const StepOperands& operands, const AdamArgs& a,
                                       const PlanOptions& options);

}  // namespace adamx::cuda
