// The adamx::adam_ op as its kernels see it: its arguments gathered in one struct, the
// C++ signature every backend registers (generated from the switch list), and the checks
// every kernel runs before it writes anything.
//
// The schema itself is defined in Python (adamx/_ops.py), beside the op's fake kernel, from
// the same switch list (exported as adamx._C.SWITCHES). Kernels register per backend:
// backends/cpu/adam_cpu.cpp, backends/cuda/adam_cuda.cpp; adam_op.cpp registers the rest.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

#include "../adam_math.h"

namespace adamx {

struct AdamArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps;
  Hyper hyper;                     // hyper.lr is ignored when lr_tensor is given
  const at::Tensor* lr_tensor;     // null, or a one-element tensor
  Switches switches;               // switches.unscale_grad: grad_scale is given
  // GradScaler's (null, or one-element tensors): the grads are divided by grad_scale and
  // the quotient written back; a non-zero found_inf makes the step write nothing.
  const at::Tensor* grad_scale;
  const at::Tensor* found_inf;
};

// The tensor lists a step writes, in this order, with their names; a list this step does
// not write (the grads unless a grad_scale has them unscaled in place, max_exp_avg_sqs
// unless amsgrad) is empty. The one table the shared-memory check, the operand layer's
// temporaries and their copy-back read.
enum WrittenList { kParams, kGrads, kExpAvgs, kExpAvgSqs, kMaxExpAvgSqs, kStateSteps, kNumWritten };
struct NamedList {
  at::TensorList tensors;
  const char* name;
};
inline std::array<NamedList, kNumWritten> written_lists(const AdamArgs& a) {
  const at::TensorList none;
  return {{{a.params, "params"},
           {a.switches.unscale_grad ? a.grads : none, "grads"},
           {a.exp_avgs, "exp_avgs"},
           {a.exp_avg_sqs, "exp_avg_sqs"},
           {a.switches.amsgrad ? a.max_exp_avg_sqs : none, "max_exp_avg_sqs"},
           {a.state_steps, "state_steps"}}};
}

// What a backend knows about where its kernel runs, for the checks that depend on it.
struct CheckContext {
  c10::DeviceType device_type;
  // A CUDA graph is being captured on the current stream: the step's host-side work (CPU
  // step counts, a CPU lr) would be frozen into the graph, so they must live on the GPU.
  bool capturing_graph = false;
};

// Throws a clear error for the first thing wrong with the inputs of a step: list lengths,
// hyper-parameters, each tensor's dtype/shape/device/layout against its param, devices of
// the lr and step tensors, tensors the step writes that overlap themselves or each other.
// Reads nothing but metadata (and a CPU lr tensor), writes nothing.
void check_args(const AdamArgs& a, const CheckContext& context);

// The switches of a call: the op's bools, and unscale_grad when it has a grad_scale.
inline Switches call_switches(Switches s, const std::optional<at::Tensor>& grad_scale) {
  s.unscale_grad = grad_scale.has_value();
  return s;
}

inline const at::Tensor* or_null(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

// The op's C++ signature: the tensor lists, then lr, lr_tensor, beta1, beta2, weight_decay,
// eps, one bool per switch in ADAMX_SWITCHES order, grad_scale, found_inf (as the schema).
#define ADAMX_SWITCH_PARAM(name) bool name,
#define ADAMX_SWITCH_VALUE(name) name,
template <void (*Backend)(const AdamArgs&)>
void adam_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
             at::TensorList state_steps, double lr, const std::optional<at::Tensor>& lr_tensor,
             double beta1, double beta2, double weight_decay, double eps,
             ADAMX_SWITCHES(ADAMX_SWITCH_PARAM) const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf) {
  Backend(AdamArgs{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                   Hyper{lr, beta1, beta2, eps, weight_decay}, or_null(lr_tensor),
                   call_switches(Switches{ADAMX_SWITCHES(ADAMX_SWITCH_VALUE)}, grad_scale),
                   or_null(grad_scale), or_null(found_inf)});
}
#undef ADAMX_SWITCH_PARAM
#undef ADAMX_SWITCH_VALUE

using AdamOpSignature = decltype(adam_op<nullptr>);

// What a backend registers for its dispatch key: its step as adam_, its checks alone (with
// the context only it knows) as adam_check.
template <void (*Step)(const AdamArgs&), void (*Check)(const AdamArgs&)>
void register_backend(torch::Library& m) {
  m.impl("adam_", &adam_op<Step>);
  m.impl("adam_check", &adam_op<Check>);
}

// The op's arguments read from a boxed call's stack (for test ops whose schema extends
// adam_'s): owns the tensor lists that the AdamArgs it makes refers to.
class BoxedAdamArgs {
 public:
  explicit BoxedAdamArgs(const c10::IValue* args);
  const AdamArgs& args() const { return args_; }
  // Number of stack entries the op's own arguments take.
  static constexpr size_t kNumArgs = 14 + kNumSwitches;

 private:
  std::vector<at::Tensor> lists_[6];
  std::optional<at::Tensor> lr_tensor_, grad_scale_, found_inf_;
  AdamArgs args_;
};

}  // namespace adamx
