// Host side of the multi-tensor CUDA step, shared by the CUDA backend (adam_cuda.cpp)
// and its CPU emulation (emulate.cpp): both turn the op's arguments into the same launch
// tables with this code, so what the emulation tests is what a GPU runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../adam_op.h"
#include "multi_tensor.h"

namespace adamx::cuda {

// The ScalarCode of a floating-point dtype.
uint8_t scalar_code(at::ScalarType t);

struct PlanOptions {
  int64_t chunk_size = kDefaultChunkSize;
  int max_tensors = kMaxTensors;
  int max_blocks = kMaxBlocks;
  int max_scalar_sets = kMaxScalarSets;
};

// One tensor's buffers and step, as the planner sees them.
struct TensorSlot {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  int64_t numel;
  uint8_t step_source;  // StepSource
  StepRef step;         // unused for kHostScalars
  double host_step;     // kHostScalars: the step count, after its increment
};

// Launch-wide inputs of the planner.
struct LaunchScalars {
  Hyper hyper;                // hyper.lr: the lr, unless lr_dtype != kNone
  const void* lr_ptr = nullptr;
  uint8_t lr_dtype = kNone;
  bool eps_inside_sqrt = false;
};

// The launch tables for `slots` (all of one dtype), in order: each tensor's chunks go to
// consecutive blocks; a table is closed when it has max_blocks blocks, max_tensors
// tensors or max_scalar_sets distinct host step counts. Empty tensors get no block.
// `tensor_ids`, when given, receives per table the index in `slots` of each table tensor.
std::vector<LaunchTable> build_tables(const std::vector<TensorSlot>& slots,
                                      const LaunchScalars& scalars, const PlanOptions& options,
                                      std::vector<std::vector<int64_t>>* tensor_ids = nullptr);

// Everything a step needs after check_args: the tensors the kernel runs on (dense
// temporaries where a user tensor is not laid out like its param), the launch tables of
// each dtype, and the step counts still to be incremented on the device.
struct PreparedStep {
  struct Operands {
    at::Tensor param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq;
  };
  struct Group {
    at::ScalarType dtype;
    std::vector<LaunchTable> tables;
  };
  std::vector<Operands> operands;
  std::vector<size_t> copied;              // params that run on temporaries
  std::vector<at::Tensor> device_steps;    // incremented by the caller's stream
  std::vector<Group> groups;               // one per dtype, in order of first appearance
};

// Plans a step whose arguments passed check_args. Step counts in host memory are
// incremented here (last, once nothing can throw); the others are returned in
// device_steps: the caller must add 1 to them before it runs the tables.
// `steps_in_kernel` and `lr_in_kernel` (the emulation's switches) treat CPU step counts
// and a CPU tensor lr as device memory: the kernel body reads them, as it reads CUDA ones.
PreparedStep prepare_step(const AdamArgs& a, const PlanOptions& options,
                          bool steps_in_kernel = false, bool lr_in_kernel = false);

// Adds 1 to prep.device_steps (on the current stream for CUDA tensors).
void increment_device_steps(const PreparedStep& prep);

// Copies temporaries back into the user's tensors (after the kernels ran).
void copy_back(const PreparedStep& prep, const AdamArgs& a);

}  // namespace adamx::cuda
