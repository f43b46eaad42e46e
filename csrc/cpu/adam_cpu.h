// The contract between the CPU op (adam_cpu.cpp) and its per-ISA kernels
// (adam_cpu_kernel.cpp, compiled once per instruction set). Plain types only: the
// kernels never see an at::Tensor, so nothing but SIMD code differs between them.
#pragma once

#include <cstdint>

#include "../adam_math.h"

namespace adamx::cpu {

enum class Dtype { Float, Double, Half, BFloat16 };

// The instruction sets a kernel is compiled for, widest last.
enum class Isa { Default = 0, Avx2 = 1, Avx512 = 2 };

struct Flags {
  bool decoupled, amsgrad, maximize, eps_inside_sqrt;
};

// One tensor's buffers, laid out alike (same sizes and strides, dense).
struct Buffers {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // null unless amsgrad
};

// Updates elements [begin, end) of one tensor's buffers.
using RangeKernel = void (*)(const Buffers&, int64_t begin, int64_t end,
                             const StepScalars<double>&);

// Elements per SIMD step of the widest kernel for any dtype; a range that starts at a
// multiple of it never splits a vector, whatever the ISA.
constexpr int64_t kMaxVectorElems = 64;

RangeKernel range_kernel_default(Dtype, Flags);
RangeKernel range_kernel_avx2(Dtype, Flags);
RangeKernel range_kernel_avx512(Dtype, Flags);

}  // namespace adamx::cpu
