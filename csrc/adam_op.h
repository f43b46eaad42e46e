// The adamx::adam_ op as the backends see it: its arguments gathered in one struct,
// and the checks every backend runs before it writes anything.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "adam_math.h"

namespace adamx {

struct AdamArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps;
  Hyper hyper;                     // hyper.lr is ignored when lr_tensor is given
  const at::Tensor* lr_tensor;     // null, or a one-element tensor
  bool amsgrad, maximize, decoupled_weight_decay, eps_inside_sqrt;
};

// Throws a clear error for the first thing wrong with the inputs of a step on
// `device_type` tensors: list lengths, hyper-parameters, and each tensor's
// dtype/shape/device/layout against its param. Reads nothing but metadata (and a
// CPU lr tensor), writes nothing.
void check_args(const AdamArgs& a, c10::DeviceType device_type);

// The op's registered signature, forwarding to a backend that takes AdamArgs.
template <void (*Backend)(const AdamArgs&)>
void adam_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
             at::TensorList state_steps, double lr, const std::optional<at::Tensor>& lr_tensor,
             double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
             bool maximize, bool decoupled_weight_decay, bool eps_inside_sqrt) {
  Backend(AdamArgs{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                   Hyper{lr, beta1, beta2, eps, weight_decay},
                   lr_tensor ? &*lr_tensor : nullptr, amsgrad, maximize,
                   decoupled_weight_decay, eps_inside_sqrt});
}

// The C++ signature of adamx::adam_ (and adamx::adam_check).
using AdamOpSignature = decltype(adam_op<nullptr>);

}  // namespace adamx
