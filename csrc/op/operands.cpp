// The operand layer (see operands.h).
#include "operands.h"

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/empty_like.h>

namespace adamx {
namespace {

// `x` itself when it is laid out like `layout` (same sizes, checked before, and strides),
// else a dense copy that is.
at::Tensor alike(const at::Tensor& x, const at::Tensor& layout) {
  if (x.strides() == layout.strides()) return x;
  return at::empty_like(layout).copy_(x);
}

void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

}  // namespace

Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return Dtype::Float64;
    case at::kHalf: return Dtype::Float16;
    case at::kBFloat16: return Dtype::BFloat16;
    default: return Dtype::Float32;  // check_args admits nothing else
  }
}

StepOperands::StepOperands(const AdamArgs& a, InKernel in_kernel) : args_(a) {
  const size_t n = a.params.size();
  const bool amsgrad = a.switches.amsgrad;
  used_.resize(n);
  pointers_.resize(n);
  dtypes_.resize(n);
  steps_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    Used& u = used_[i];
    u.param = p.is_non_overlapping_and_dense() ? p : p.contiguous();
    u.grad = alike(a.grads[i], u.param);
    u.exp_avg = alike(a.exp_avgs[i], u.param);
    u.exp_avg_sq = alike(a.exp_avg_sqs[i], u.param);
    if (amsgrad) u.max_exp_avg_sq = alike(a.max_exp_avg_sqs[i], u.param);
    if (!u.param.is_same(p) || !u.exp_avg.is_same(a.exp_avgs[i]) ||
        !u.exp_avg_sq.is_same(a.exp_avg_sqs[i]) ||
        (amsgrad && !u.max_exp_avg_sq.is_same(a.max_exp_avg_sqs[i])))
      copied_.push_back(i);
    pointers_[i] = {u.param.data_ptr(), u.grad.const_data_ptr(), u.exp_avg.data_ptr(),
                    u.exp_avg_sq.data_ptr(), data_or_null(u.max_exp_avg_sq), u.param.numel()};
    dtypes_[i] = dtype_of(p.scalar_type());

    const at::Tensor& step = a.state_steps[i];
    StepCount& s = steps_[i];
    s.dtype = step.scalar_type() == at::kDouble ? Dtype::Float64 : Dtype::Float32;
    if (step.is_cpu() && !in_kernel.steps) {
      // The count after `++step`, rounded in the step's dtype.
      s.next = s.dtype == Dtype::Float64 ? *step.const_data_ptr<double>() + 1.0
                                         : double(*step.const_data_ptr<float>() + 1.0f);
      s.memory = nullptr;
    } else {
      s.next = 0;
      s.memory = step.const_data_ptr();
      kernel_steps_.push_back(step);
    }
  }
  lr_ = LrOperand{a.hyper.lr, nullptr, Dtype::Float32};
  if (a.lr_tensor) {
    const at::Tensor& lr = *a.lr_tensor;
    if (lr.is_cpu() && !in_kernel.lr) {
      lr_.value = lr.item<double>();
    } else {
      lr_.memory = lr.const_data_ptr();
      lr_.dtype = dtype_of(lr.scalar_type());
    }
  }
}

void StepOperands::increment_steps() const {
  for (size_t i = 0; i < steps_.size(); ++i) {
    const StepCount& s = steps_[i];
    if (s.memory) continue;
    const at::Tensor& step = args_.state_steps[i];
    if (s.dtype == Dtype::Float64) *step.data_ptr<double>() = s.next;
    else *step.data_ptr<float>() = static_cast<float>(s.next);
  }
  if (!kernel_steps_.empty()) at::_foreach_add_(kernel_steps_, 1);
}

void StepOperands::copy_back() const {
  auto back = [](const at::Tensor& original, const at::Tensor& used) {
    if (!used.is_same(original)) original.copy_(used);
  };
  for (size_t i : copied_) {
    const Used& u = used_[i];
    back(args_.params[i], u.param);
    back(args_.exp_avgs[i], u.exp_avg);
    back(args_.exp_avg_sqs[i], u.exp_avg_sq);
    if (args_.switches.amsgrad) back(args_.max_exp_avg_sqs[i], u.max_exp_avg_sq);
  }
}

}  // namespace adamx
