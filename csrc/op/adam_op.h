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

#include "../math/codes8.h"
#include "../math/pointers.h"
#include "../math/switches.h"

namespace adamx {

struct AdamArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps;
  Hyper hyper;                     // hyper.lr is ignored when lr_tensor is given
  const at::Tensor* lr_tensor;     // null, or a one-element tensor
  // switches.unscale_grad: grad_scale is given; switches.master_weights: master_params are.
  Switches switches;
  // GradScaler's (null, or one-element tensors): the grads are divided by grad_scale and
  // the quotient written back (unless hyper.keep_grads); a non-zero found_inf makes the
  // step write nothing.
  const at::Tensor* grad_scale;
  const at::Tensor* found_inf;
  // fp32 master copies of float16/bfloat16 params (empty unless master_weights): the
  // update runs on them (with fp32 state), and each param gets its master's rounding.
  at::TensorList master_params;
  // Block scales of 8-bit moments (StateKind::Codes8): per param a float32 [2, blocks]
  // tensor (exp_avg's, exp_avg_sq's), read and written where the param's moments are uint8
  // codes, ignored (may be empty) elsewhere. Empty when no param has codes.
  at::TensorList code_scales;
  // The random streams of stochastic rounding (bfloat16 params, compact moments), per param
  // (absent: the defaults). param_ids[i] (default i) is the param's identity, which keys its
  // stream with the seed and the step (rounding_key); element j of params[i] draws element
  // element_offsets[i] + j of that stream (default 0: a shard's offset in its whole param).
  at::OptionalIntArrayRef param_ids, element_offsets;
};

inline uint32_t param_id(const AdamArgs& a, size_t i) {
  return a.param_ids ? static_cast<uint32_t>((*a.param_ids)[i]) : static_cast<uint32_t>(i);
}
inline int64_t element_offset(const AdamArgs& a, size_t i) {
  return a.element_offsets ? (*a.element_offsets)[i] : 0;
}

// Whether the step writes the grads: it unscales them (a grad_scale) and does not keep them.
inline bool grads_written(const AdamArgs& a) {
  return a.switches.unscale_grad && !a.hyper.keep_grads;
}

// The tensor lists a step writes, in this order, with their names; a list this step does
// not write (the grads unless grads_written, max_exp_avg_sqs unless amsgrad) is empty. The
// one table the shared-memory check, the operand layer's temporaries and their copy-back
// read.
enum WrittenList {
  kParams, kGrads, kExpAvgs, kExpAvgSqs, kMaxExpAvgSqs, kMasterParams, kCodeScales, kStateSteps,
  kNumWritten
};
struct NamedList {
  at::TensorList tensors;
  const char* name;
};
inline std::array<NamedList, kNumWritten> written_lists(const AdamArgs& a) {
  const at::TensorList none;
  return {{{a.params, "params"},
           {grads_written(a) ? a.grads : none, "grads"},
           {a.exp_avgs, "exp_avgs"},
           {a.exp_avg_sqs, "exp_avg_sqs"},
           {a.switches.amsgrad ? a.max_exp_avg_sqs : none, "max_exp_avg_sqs"},
           {a.master_params, "master_params"},
           {a.code_scales, "code_scales"},
           {a.state_steps, "state_steps"}}};
}

// How param i's moments are stored (see StateKind), read from its exp_avg's dtype: uint8
// codes; bfloat16 beside a float32 param or a master copy (a bfloat16 param's own state
// in bfloat16 is torch's, rounded to nearest: Plain); else Plain.
inline StateKind state_kind(const AdamArgs& a, size_t i) {
  const at::Tensor& m = a.exp_avgs[i];
  if (!m.defined()) return StateKind::Plain;
  if (m.scalar_type() == at::kByte) return StateKind::Codes8;
  if (m.scalar_type() == at::kBFloat16 &&
      (a.params[i].scalar_type() == at::kFloat || a.switches.master_weights))
    return StateKind::Bf16;
  return StateKind::Plain;
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

inline const at::Tensor* or_null(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

// The op's C++ signature: the tensor lists, then lr, lr_tensor, beta1, beta2, weight_decay,
// eps, one bool per switch in ADAMX_SWITCHES order, grad_scale, found_inf, master_params,
// code_scales, seed, param_ids, element_offsets, keep_grads (as the schema; ADAMX_OP_ARGS
// names them in that order), and
// the AdamArgs of a call. The operand switches are set by the operands given: unscale_grad
// by a grad_scale, master_weights by master_params. A test op whose schema extends adam_'s
// (csrc/backends/cuda/emulate.cpp) declares ADAMX_OP_PARAMS, then its own.
#define ADAMX_SWITCH_PARAM(name) bool name,
#define ADAMX_SWITCH_VALUE(name) name,
#define ADAMX_OP_PARAMS                                                                    \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,                    \
      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps, \
      double lr, const std::optional<at::Tensor>&lr_tensor, double beta1, double beta2,     \
      double weight_decay, double eps, ADAMX_SWITCHES(ADAMX_SWITCH_PARAM)                   \
      const std::optional<at::Tensor>&grad_scale, const std::optional<at::Tensor>&found_inf, \
      const std::optional<at::TensorList>&master_params,                                  \
      const std::optional<at::TensorList>&code_scales, int64_t seed,                      \
      at::OptionalIntArrayRef param_ids, at::OptionalIntArrayRef element_offsets, bool keep_grads
#define ADAMX_OP_ARGS                                                                       \
  params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, lr_tensor, beta1,  \
      beta2, weight_decay, eps, ADAMX_SWITCHES(ADAMX_SWITCH_VALUE) grad_scale, found_inf,    \
      master_params, code_scales, seed, param_ids, element_offsets, keep_grads

inline AdamArgs make_adam_args(ADAMX_OP_PARAMS) {
  Switches switches{ADAMX_SWITCHES(ADAMX_SWITCH_VALUE)};
  switches.unscale_grad = grad_scale.has_value();
  switches.master_weights = master_params.has_value();
  return AdamArgs{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                  Hyper{lr, beta1, beta2, eps, weight_decay, 1.0, seed, keep_grads},
                  or_null(lr_tensor),
                  switches, or_null(grad_scale), or_null(found_inf),
                  master_params.value_or(at::TensorList()), code_scales.value_or(at::TensorList()),
                  param_ids, element_offsets};
}

template <void (*Backend)(const AdamArgs&)>
void adam_op(ADAMX_OP_PARAMS) {
  Backend(make_adam_args(ADAMX_OP_ARGS));
}

using AdamOpSignature = decltype(adam_op<nullptr>);

// What a backend registers for its dispatch key: its step as adam_, its checks alone (with
// the context only it knows) as adam_check.
template <void (*Step)(const AdamArgs&), void (*Check)(const AdamArgs&)>
void register_backend(torch::Library& m) {
  m.impl("adam_", &adam_op<Step>);
  m.impl("adam_check", &adam_op<Check>);
}

}  // namespace adamx
