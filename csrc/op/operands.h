// The operand layer: what one step's kernels run on, prepared the same way for every
// backend (the CPU kernel, the CUDA kernel and its CPU emulation) after check_args.
//
// Per param: the pointers the kernel updates (the user's own tensors when they are laid
// out alike, the usual case, else dense temporaries copied back after the kernel), its
// dtype, and its step count (a value computed on the host, or memory the kernel reads);
// per step: the lr (a value, or memory). The step's writes happen in a fixed order,
// after everything that can fail but an allocation: host step counts, step counts in
// kernel memory, the kernel (the backend's), then the copy-back of temporaries.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "adam_op.h"

namespace adamx {

Dtype dtype_of(at::ScalarType t);  // float32, float64, float16 or bfloat16

// A param's step count as its kernel gets it.
struct StepCount {
  double next;         // the count after this step's increment (host counts only)
  const void* memory;  // the count in memory the kernel reads, after its increment; or null
  Dtype dtype;         // the count's dtype: Float32 or Float64
};

// The step's lr as its kernels get it.
struct LrOperand {
  double value;         // the lr, unless `memory` is set
  const void* memory;   // a tensor lr the kernel reads (on the device); or null
  Dtype dtype;
};

// Which CPU scalars to hand to the kernel as memory to read, as device tensors are (the
// CUDA emulation's stand-in for device memory). Otherwise CPU ones are read on the host.
struct InKernel {
  bool steps = false;
  bool lr = false;
};

class StepOperands {
 public:
  explicit StepOperands(const AdamArgs& a, InKernel in_kernel = {});

  size_t size() const { return pointers_.size(); }
  const TensorPointers& pointers(size_t i) const { return pointers_[i]; }
  Dtype dtype(size_t i) const { return dtypes_[i]; }
  const StepCount& step(size_t i) const { return steps_[i]; }
  const LrOperand& lr() const { return lr_; }

  // The writes before the kernel runs: every step count gets its increment (those in
  // kernel memory with a foreach add on their device's current stream).
  void increment_steps() const;
  // The write after the kernel ran: temporaries into the user's tensors.
  void copy_back() const;

 private:
  struct Used {  // the tensors the kernel runs on for one param
    at::Tensor param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq;
  };
  const AdamArgs& args_;
  std::vector<Used> used_;
  std::vector<size_t> copied_;  // params that run on temporaries
  std::vector<TensorPointers> pointers_;
  std::vector<Dtype> dtypes_;
  std::vector<StepCount> steps_;
  std::vector<at::Tensor> kernel_steps_;  // incremented in place, before the kernel
  LrOperand lr_;
};

}  // namespace adamx
