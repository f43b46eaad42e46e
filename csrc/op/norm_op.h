// adamx::norm_accumulate(Tensor[] tensors, float norm_type) -> Tensor: the accumulator of
// a norm over all elements of all tensors (csrc/math/norm.h), a float64 scalar tensor on
// their device: the sum of |x|^p (order 1, 2 or finite p > 0), or the largest |x| (order
// inf). Python takes the root (adamx/_clip.py). Deterministic: each backend splits the
// elements into chunks that do not depend on the thread count or the GPU, and joins their
// accumulators in one fixed order.
//
// The schema is defined in adamx/_ops.py; the CPU (backends/cpu/norm_cpu.cpp) and CUDA
// (backends/cuda/norm_cuda.cpp) kernels, and the CUDA body's emulation, share the checks
// and the operands here.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "../math/norm.h"
#include "../math/switches.h"

namespace adamx {

// The tensors as a norm kernel reads them: per tensor its first element in memory and its
// number of elements (dense tensors in any order of dimensions are read as they lie;
// other strided views through a contiguous copy, held here).
struct NormOperands {
  NormOrder order;
  double p;  // norm_type
  std::vector<const void*> data;
  std::vector<int64_t> numel;
  std::vector<Dtype> dtype;
  std::vector<at::Tensor> copies;
};

// Checks the op's arguments for a kernel of `device` (every tensor defined, dense
// strided, float32/float64/float16/bfloat16, on one device of that type; a norm_type the
// kernels take) and gathers the operands.
NormOperands norm_operands(at::TensorList tensors, double norm_type, c10::DeviceType device);

}  // namespace adamx
