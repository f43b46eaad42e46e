// The operand layer (see operands.h).
#include "operands.h"

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_sub.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>

namespace adamx {
namespace {

// `x` itself when it is laid out like `layout` (same sizes, checked before, and strides),
// else a dense copy that is.
at::Tensor alike(const at::Tensor& x, const at::Tensor& layout) {
  if (x.strides() == layout.strides()) return x;
  return at::empty_like(layout).copy_(x);
}

void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// The grad's pointer: written only when it is unscaled in place.
void* grad_data(const at::Tensor& g, bool written) {
  return written ? g.data_ptr() : const_cast<void*>(g.const_data_ptr());
}

// `t`'s value read on the host (a CPU tensor, unless the kernel is to read it), else its
// memory; `absent` when there is no tensor.
ScalarOperand scalar_operand(const at::Tensor* t, double absent, bool in_kernel) {
  if (!t) return {absent, nullptr, Dtype::Float32};
  if (t->is_cpu() && !in_kernel) return {t->item<double>(), nullptr, Dtype::Float32};
  return {0.0, t->const_data_ptr(), dtype_of(t->scalar_type())};
}

bool host_step(const at::Tensor& step, InKernel in_kernel) {
  return step.is_cpu() && !in_kernel.steps;
}

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
  found_inf_ = scalar_operand(a.found_inf, 0.0, in_kernel.scaler);
  const auto on_host = [&](const at::Tensor& step) { return host_step(step, in_kernel); };
  if (found_inf_.memory && std::any_of(a.state_steps.begin(), a.state_steps.end(), on_host))
    found_inf_ = {a.found_inf->item<double>(), nullptr, Dtype::Float32};  // see operands.h
  if (skipped()) return;
  lr_ = scalar_operand(a.lr_tensor, a.hyper.lr, in_kernel.lr);
  grad_scale_ = scalar_operand(a.grad_scale, 1.0, in_kernel.scaler);
  hyper_ = a.hyper;
  hyper_.lr = lr_.value;
  hyper_.grad_scale = grad_scale_.value;

  const size_t n = a.params.size();
  const bool amsgrad = a.switches.amsgrad;
  const bool unscale = a.switches.unscale_grad;
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
    if (!u.param.is_same(p) || (unscale && !u.grad.is_same(a.grads[i])) ||
        !u.exp_avg.is_same(a.exp_avgs[i]) ||
        !u.exp_avg_sq.is_same(a.exp_avg_sqs[i]) ||
        (amsgrad && !u.max_exp_avg_sq.is_same(a.max_exp_avg_sqs[i])))
      copied_.push_back(i);
    pointers_[i] = {u.param.data_ptr(), grad_data(u.grad, unscale), u.exp_avg.data_ptr(),
                    u.exp_avg_sq.data_ptr(), data_or_null(u.max_exp_avg_sq), u.param.numel()};
    dtypes_[i] = dtype_of(p.scalar_type());

    const at::Tensor& step = a.state_steps[i];
    StepCount& s = steps_[i];
    s.dtype = step.scalar_type() == at::kDouble ? Dtype::Float64 : Dtype::Float32;
    if (host_step(step, in_kernel)) {
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

void StepOperands::finish() const {
  if (found_inf_.memory && !kernel_steps_.empty()) {
    // Any non-zero found_inf skips the step (torch subtracts found_inf itself, which a
    // sum over devices may make 2).
    const at::Tensor skipped = args_.found_inf->ne(0).to(at::kFloat);
    at::_foreach_sub_(kernel_steps_, std::vector<at::Tensor>(kernel_steps_.size(), skipped));
  }
  auto back = [](const at::Tensor& original, const at::Tensor& used) {
    if (!used.is_same(original)) original.copy_(used);
  };
  for (size_t i : copied_) {
    const Used& u = used_[i];
    back(args_.params[i], u.param);
    if (args_.switches.unscale_grad) back(args_.grads[i], u.grad);
    back(args_.exp_avgs[i], u.exp_avg);
    back(args_.exp_avg_sqs[i], u.exp_avg_sq);
    if (args_.switches.amsgrad) back(args_.max_exp_avg_sqs[i], u.max_exp_avg_sq);
  }
}

}  // namespace adamx
