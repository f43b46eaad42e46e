// The contract between the CPU op (adam_cpu.cpp) and its per-ISA kernels (kernel.cpp,
// compiled once per instruction set). Plain types only: the kernels never see an
// at::Tensor, so nothing but SIMD code differs between them.
#pragma once

#include <cstdint>

#include "../../math/codes8.h"
#include "../../math/random.h"
#include "../../math/update.h"

namespace adamx::cpu {

// The instruction sets a kernel is compiled for, widest last.
enum class Isa { Default = 0, Avx2 = 1, Avx512 = 2 };

// Updates elements [begin, end) of one tensor; `keys` (stochastic rounding) are its
// random streams: RoundingKeys(rounding_key(seed, param, step), offset).
using RangeKernel = void (*)(const TensorPointers&, int64_t begin, int64_t end,
                             const StepScalars<double>&, const RoundingKeys& keys);

// Elements per SIMD step of the widest kernel for any dtype; a range that starts at a
// multiple of it never splits a vector, whatever the ISA.
constexpr int64_t kMaxVectorElems = 64;
// Where thread ranges may be cut: whole vectors of any ISA, and whole blocks of 8-bit codes.
constexpr int64_t kCutElems = kCodeBlock > kMaxVectorElems ? kCodeBlock : kMaxVectorElems;

// The kernel for params of one dtype, moments stored as `kind`, and a set of switches, per
// ISA.
RangeKernel range_kernel_default(Dtype, StateKind, Switches);
RangeKernel range_kernel_avx2(Dtype, StateKind, Switches);
RangeKernel range_kernel_avx512(Dtype, StateKind, Switches);

}  // namespace adamx::cpu
