// The CPU backend of adamx::adam_: checks, operands, then one parallel pass over the
// elements of all tensors.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../../op/operands.h"
#include "isa.h"
#include "kernel.h"

namespace adamx::cpu {
namespace {

// Threads split the step's elements evenly, across tensor boundaries: each tensor takes
// a span of the step's element space padded to whole vectors and blocks of codes, and
// thread ranges are cut at multiples of kCutElems, so no vector or block of 8-bit codes
// straddles two threads and the results are the same for any thread count. Below
// kGrainElems, one thread does all.
constexpr int64_t kGrainElems = 32 * 1024;

RangeKernel range_kernel(Isa isa, Dtype dtype, StateKind kind, const Switches& switches) {
  switch (isa) {
    case Isa::Avx512: return range_kernel_avx512(dtype, kind, switches);
    case Isa::Avx2: return range_kernel_avx2(dtype, kind, switches);
    default: return range_kernel_default(dtype, kind, switches);
  }
}

struct TensorWork {
  RangeKernel kernel;
  StepScalars<double> scalars;
  RoundingKeys keys;
};

void check_cpu(const AdamArgs& a) { check_args(a, CheckContext{c10::DeviceType::CPU}); }

void adam_cpu(const AdamArgs& a) {
  check_cpu(a);
  const StepOperands operands(a);  // empty when found_inf skips the step
  const size_t n = operands.size();
  const Isa isa = current_isa();
  std::vector<TensorWork> work(n);
  for (size_t i = 0; i < n; ++i) {
    // One kernel per dtype and variant, looked up once per tensor, not per chunk.
    work[i].kernel = range_kernel(isa, operands.dtype(i), operands.kind(i), a.switches);
    const double step = operands.step(i).next;
    work[i].scalars = step_scalars(step, operands.hyper().lr, operands.hyper(), a.switches);
    const bool random = a.switches.stochastic_rounding || operands.kind(i) != StateKind::Plain;
    if (random)
      work[i].keys = RoundingKeys(rounding_key(operands.hyper().seed, param_id(a, i), step),
                                  element_offset(a, i));
  }
  operands.increment_steps();

  // Where each tensor's span starts in the step's element space.
  std::vector<int64_t> start(n + 1, 0);
  for (size_t i = 0; i < n; ++i)
    start[i + 1] = start[i] + at::divup(operands.pointers(i).numel, kCutElems) * kCutElems;
  at::parallel_for(0, start[n], kGrainElems, [&](int64_t lo, int64_t hi) {
    auto cut = [&](int64_t x) { return x == start[n] ? x : x / kCutElems * kCutElems; };
    lo = cut(lo);
    hi = cut(hi);
    size_t i = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
    for (; i < n && start[i] < hi; ++i) {
      const TensorPointers& tensor = operands.pointers(i);
      const int64_t begin = std::max(lo, start[i]) - start[i];
      const int64_t end = std::min(hi - start[i], tensor.numel);
      if (begin < end) work[i].kernel(tensor, begin, end, work[i].scalars, work[i].keys);
    }
  });
  operands.finish();
}

TORCH_LIBRARY_IMPL(adamx, CPU, m) {
  register_backend<adam_cpu, check_cpu>(m);
}

}  // namespace
}  // namespace adamx::cpu
