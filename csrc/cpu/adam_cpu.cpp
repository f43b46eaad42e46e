// The CPU backend of adamx::adam_: checks, then one parallel pass over all tensors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../adam_op.h"
#include "adam_cpu.h"
#include "isa.h"

namespace adamx::cpu {
namespace {

// Threads split the step's elements evenly, across tensor boundaries: each tensor takes
// a span of the step's element space padded to whole vectors, and thread ranges are
// cut at multiples of kMaxVectorElems, so no vector straddles two threads and the
// results are the same for any thread count. Below kGrainElems, one thread does all.
constexpr int64_t kGrainElems = 32 * 1024;

Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return Dtype::Double;
    case at::kHalf: return Dtype::Half;
    case at::kBFloat16: return Dtype::BFloat16;
    default: return Dtype::Float;  // check_args admits nothing else
  }
}

RangeKernel range_kernel(Isa isa, Dtype dtype, Flags flags) {
  switch (isa) {
    case Isa::Avx512: return range_kernel_avx512(dtype, flags);
    case Isa::Avx2: return range_kernel_avx2(dtype, flags);
    default: return range_kernel_default(dtype, flags);
  }
}

// Increments a step count in place and returns the new value.
double increment_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kDouble) return ++*step.data_ptr<double>();
  return ++*step.data_ptr<float>();
}

struct TensorWork {
  Buffers buffers;
  int64_t numel;
  StepScalars<double> scalars;
  RangeKernel kernel;
};

// The tensors the kernel runs on for one param: the user's own when they are all dense
// and laid out alike (the usual case), else dense temporaries copied back afterwards.
struct Operands {
  at::Tensor param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq;
};

at::Tensor alike(const at::Tensor& x, const at::Tensor& layout) {
  if (x.strides() == layout.strides()) return x;
  return at::empty_like(layout).copy_(x);
}

Operands operands_for(const AdamArgs& a, size_t i) {
  const at::Tensor& p = a.params[i];
  Operands o;
  o.param = p.is_non_overlapping_and_dense() ? p : p.contiguous();
  o.grad = alike(a.grads[i], o.param);
  o.exp_avg = alike(a.exp_avgs[i], o.param);
  o.exp_avg_sq = alike(a.exp_avg_sqs[i], o.param);
  if (a.amsgrad) o.max_exp_avg_sq = alike(a.max_exp_avg_sqs[i], o.param);
  return o;
}

void copy_back(const Operands& o, const AdamArgs& a, size_t i) {
  auto back = [](const at::Tensor& original, const at::Tensor& used) {
    if (!used.is_same(original)) original.copy_(used);
  };
  back(a.params[i], o.param);
  back(a.exp_avgs[i], o.exp_avg);
  back(a.exp_avg_sqs[i], o.exp_avg_sq);
  if (a.amsgrad) back(a.max_exp_avg_sqs[i], o.max_exp_avg_sq);
}

bool uses_temporaries(const Operands& o, const AdamArgs& a, size_t i) {
  return !o.param.is_same(a.params[i]) || !o.exp_avg.is_same(a.exp_avgs[i]) ||
         !o.exp_avg_sq.is_same(a.exp_avg_sqs[i]) ||
         (a.amsgrad && !o.max_exp_avg_sq.is_same(a.max_exp_avg_sqs[i]));
}

void adam_cpu(const AdamArgs& a) {
  check_args(a, c10::DeviceType::CPU);
  const size_t n = a.params.size();
  const double lr = a.lr_tensor ? a.lr_tensor->item<double>() : a.hyper.lr;
  const Flags flags{a.decoupled_weight_decay, a.amsgrad, a.maximize, a.eps_inside_sqrt};
  const Isa isa = current_isa();

  // Everything below happens after the checks: from here on nothing throws but an
  // allocation failure while making temporaries, before any user tensor is written.
  std::vector<Operands> operands(n);
  std::vector<TensorWork> work(n);
  std::vector<size_t> copied;  // params that run on temporaries
  for (size_t i = 0; i < n; ++i) {
    operands[i] = operands_for(a, i);
    if (uses_temporaries(operands[i], a, i)) copied.push_back(i);
    const Operands& o = operands[i];
    work[i].buffers = {o.param.data_ptr(), o.grad.const_data_ptr(), o.exp_avg.data_ptr(),
                       o.exp_avg_sq.data_ptr(),
                       a.amsgrad ? o.max_exp_avg_sq.data_ptr() : nullptr};
    work[i].numel = o.param.numel();
    // One kernel per dtype and variant, looked up once per tensor, not per chunk.
    work[i].kernel = range_kernel(isa, dtype_of(o.param.scalar_type()), flags);
  }
  for (size_t i = 0; i < n; ++i) {
    const double step = increment_step(a.state_steps[i]);
    work[i].scalars = a.eps_inside_sqrt ? step_scalars<double, true>(step, lr, a.hyper)
                                        : step_scalars<double, false>(step, lr, a.hyper);
  }

  // Where each tensor's span starts in the step's element space.
  std::vector<int64_t> start(n + 1, 0);
  for (size_t i = 0; i < n; ++i)
    start[i + 1] = start[i] + at::divup(work[i].numel, kMaxVectorElems) * kMaxVectorElems;
  at::parallel_for(0, start[n], kGrainElems, [&](int64_t lo, int64_t hi) {
    auto cut = [&](int64_t x) { return x == start[n] ? x : x / kMaxVectorElems * kMaxVectorElems; };
    lo = cut(lo);
    hi = cut(hi);
    size_t i = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
    for (; i < n && start[i] < hi; ++i) {
      const TensorWork& w = work[i];
      const int64_t begin = std::max(lo, start[i]) - start[i];
      const int64_t end = std::min(hi - start[i], w.numel);
      if (begin < end) w.kernel(w.buffers, begin, end, w.scalars);
    }
  });
  for (size_t i : copied) copy_back(operands[i], a, i);
}

}  // namespace

TORCH_LIBRARY_IMPL(adamx, CPU, m) {
  m.impl("adam_", &adam_op<adam_cpu>);
}

}  // namespace adamx::cpu
