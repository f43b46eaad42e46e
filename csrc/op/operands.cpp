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
  return at::empty_like(layout, x.options()).copy_(x);
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

// Whether the kernel writes operand `k` of param `i` to a temporary (`used`), not to the
// user's own tensor: then it is copied back after the kernel.
bool on_temporary(const std::array<NamedList, kNumWritten>& written,
                  const std::array<at::Tensor, kStateSteps>& used, size_t i, size_t k) {
  return !written[k].tensors.empty() && used[k].defined() &&
         !used[k].is_same(written[k].tensors[i]);
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
  const bool master = a.switches.master_weights;
  const bool grads_out = grads_written(a);
  const auto written = written_lists(a);
  used_.resize(n);
  pointers_.resize(n);
  dtypes_.resize(n);
  kinds_.resize(n);
  steps_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    Used& u = used_[i];
    const at::Tensor& param = u[kParams] = p.is_non_overlapping_and_dense() ? p : p.contiguous();
    u[kGrads] = alike(a.grads[i], param);
    u[kExpAvgs] = alike(a.exp_avgs[i], param);
    u[kExpAvgSqs] = alike(a.exp_avg_sqs[i], param);
    if (amsgrad) u[kMaxExpAvgSqs] = alike(a.max_exp_avg_sqs[i], param);
    if (master) u[kMasterParams] = alike(a.master_params[i], param);
    kinds_[i] = state_kind(a, i);
    if (kinds_[i] == StateKind::Codes8) u[kCodeScales] = a.code_scales[i];  // contiguous
    for (size_t k = 0; k < u.size(); ++k)
      if (on_temporary(written, u, i, k)) {
        copied_.push_back(i);
        break;
      }
    pointers_[i] = {param.data_ptr(),           grad_data(u[kGrads], grads_out),
                    u[kExpAvgs].data_ptr(),     u[kExpAvgSqs].data_ptr(),
                    data_or_null(u[kMaxExpAvgSqs]), data_or_null(u[kMasterParams]),
                    static_cast<float*>(data_or_null(u[kCodeScales])), param.numel()};
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
  const auto written = written_lists(args_);
  for (size_t i : copied_) {
    const Used& u = used_[i];
    for (size_t k = 0; k < u.size(); ++k)
      if (on_temporary(written, u, i, k)) written[k].tensors[i].copy_(u[k]);
  }
}

}  // namespace adamx
