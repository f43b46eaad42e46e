// The contract between the CPU norm op (norm_cpu.cpp) and its per-ISA kernels
// (norm_kernel.cpp, compiled once per instruction set). Plain types only.
#pragma once

#include <cstdint>

#include "../../math/norm.h"
#include "../../math/switches.h"

namespace adamx::cpu {

// The accumulator (csrc/math/norm.h) of a norm of order `order` (p: order P's exponent)
// over elements [begin, end) of a dense tensor whose first element is at `data`.
using NormRangeKernel = double (*)(const void* data, int64_t begin, int64_t end, double p);

// The kernel for elements of one dtype and one order, per ISA.
NormRangeKernel norm_kernel_default(Dtype, NormOrder);
NormRangeKernel norm_kernel_avx2(Dtype, NormOrder);
NormRangeKernel norm_kernel_avx512(Dtype, NormOrder);

}  // namespace adamx::cpu
