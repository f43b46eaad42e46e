// The checks every adamx::adam_ kernel runs before it writes, and the op's registrations
// that are not a backend's: autograd (version counters), sparse inputs, a build without
// CUDA kernels, adam_check.
#include "adam_op.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>

namespace adamx {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A state tensor (or grad) must look exactly like its param, in `dtype` (the param's, or
// float32 for the state of params with a master copy).
void check_like_param(const at::Tensor& x, const char* list, const at::Tensor& p, size_t i,
                      at::ScalarType dtype) {
  TORCH_CHECK(x.defined(), "adamx: ", list, "[", i, "] is undefined");
  TORCH_CHECK(x.layout() == at::kStrided, "adamx: ", list, "[", i, "] has layout ", x.layout(),
              "; only dense (strided) tensors are supported");
  TORCH_CHECK(x.sizes() == p.sizes(), "adamx: ", list, "[", i, "] has shape ", x.sizes(),
              " but params[", i, "] has shape ", p.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, "adamx: ", list, "[", i, "] has dtype ",
              x.scalar_type(), " but params[", i, "] has dtype ", p.scalar_type(),
              dtype == p.scalar_type() ? "" : " with a float32 master copy: its state, like "
              "the master copy, must be float32");
  TORCH_CHECK(x.device() == p.device(), "adamx: ", list, "[", i, "] is on ", x.device(),
              " but params[", i, "] is on ", p.device());
}

// A tensor the step writes must not have several elements in one memory location.
void check_no_self_overlap(const at::Tensor& x, const char* list, size_t i) {
  TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes, "adamx: ", list, "[", i,
              "] has overlapping memory (e.g. from expand()); it cannot be updated in place");
}

// Compact moments (bfloat16 or 8-bit codes, `kind`) of param i: which params and switches
// they combine with, and the block scales of codes.
void check_compact(const AdamArgs& a, size_t i, StateKind kind) {
  const at::Tensor& p = a.params[i];
  const char* what = kind == StateKind::Codes8 ? "8-bit codes (uint8)" : "bfloat16";
  TORCH_CHECK_TYPE(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16,
                   "adamx: exp_avgs[", i, "] holds compact moments in ", what, ", which are "
                   "implemented for float32 and bfloat16 params, but params[", i, "] is ",
                   p.scalar_type());
  TORCH_CHECK_VALUE(!a.switches.amsgrad, "adamx: compact moments (exp_avgs[", i, "] in ", what,
                    ") do not combine with amsgrad; keep float32 state for amsgrad");
  TORCH_CHECK_TYPE(a.exp_avg_sqs[i].defined() &&
                       a.exp_avg_sqs[i].scalar_type() == a.exp_avgs[i].scalar_type(),
                   "adamx: exp_avgs[", i, "] is ", a.exp_avgs[i].scalar_type(),
                   " but exp_avg_sqs[", i, "] is ",
                   a.exp_avg_sqs[i].defined() ? toString(a.exp_avg_sqs[i].scalar_type())
                                              : "undefined",
                   "; both moments are stored alike");
  if (kind != StateKind::Codes8) return;
  // Blocks are runs of the param's memory order, so codes share the param's layout.
  TORCH_CHECK(p.is_non_overlapping_and_dense(), "adamx: params[", i, "] is not dense in "
              "memory (a strided view); 8-bit moments need a dense param");
  for (const at::Tensor* m : {&a.exp_avgs[i], &a.exp_avg_sqs[i]})
    TORCH_CHECK(m->strides() == p.strides(), "adamx: the 8-bit moments of params[", i,
                "] have strides ", m->strides(), " but the param has ", p.strides(),
                "; codes are laid out like their param");
  TORCH_CHECK_VALUE(a.code_scales.size() == a.params.size(), "adamx: exp_avgs[", i, "] holds "
                    "8-bit codes, which need their block scales: code_scales, one tensor per "
                    "param, got ", a.code_scales.size(), " for ", a.params.size(), " params");
  const at::Tensor& s = a.code_scales[i];
  const int64_t blocks = code_blocks(p.numel());
  TORCH_CHECK(s.defined() && s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == 2 &&
                  s.size(1) == blocks && s.is_contiguous() && s.device() == p.device(),
              "adamx: code_scales[", i, "] must be a contiguous float32 tensor of shape [2, ",
              blocks, "] (a scale per ", kCodeBlock, " elements of exp_avg, then of "
              "exp_avg_sq) on ", p.device(), "; got ",
              s.defined() ? toString(s.scalar_type()) : "undefined", " ",
              s.defined() ? s.sizes() : at::IntArrayRef(),
              s.defined() && !s.is_contiguous() ? " (not contiguous)" : "");
}

void check_hyper(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value), "adamx: ", name, " must be a finite number, got ",
                    value);
}

// The lr, grad_scale, found_inf and step tensors are scalars: on the CPU (read on the
// host) or on the params' device (read by the kernel). Anywhere else they would route the
// op to another device's kernel.
// (`name`, or else state_steps[index]. Formatted only on failure.)
struct ScalarName {
  const char* name;
  int64_t index;
};
std::ostream& operator<<(std::ostream& out, ScalarName n) {
  if (n.name) return out << n.name;
  return out << "state_steps[" << n.index << "]";
}

void check_scalar_device(const at::Tensor& t, ScalarName what, const at::Device& params,
                         const CheckContext& context) {
  TORCH_CHECK(t.is_cpu() || t.device() == params, "adamx: ", what, " is on ", t.device(),
              "; it must be on the CPU or on the params' device ", params);
  TORCH_CHECK(!(context.capturing_graph && t.is_cpu()), "adamx: capturing a CUDA graph of a "
              "step needs ", what, " on the GPU (capturable=True for step counts, CUDA "
              "tensors for the lr, grad_scale and found_inf), but it is on the CPU");
}

// A one-element floating-point tensor (the lr, grad_scale, found_inf) where scalars go.
void check_scalar_tensor(const at::Tensor& t, const char* name, const at::Device& params,
                         const CheckContext& context) {
  TORCH_CHECK_VALUE(t.defined() && t.numel() == 1 && at::isFloatingType(t.scalar_type()),
                    "adamx: ", name, " must hold one floating-point value, got shape ",
                    t.sizes(), " and dtype ", t.scalar_type());
  check_scalar_device(t, ScalarName{name, 0}, params, context);
}

// The tensors a step writes must not share memory with each other: a param listed twice,
// or one state or step tensor used for two params, would be updated twice in one pass (in
// an order that depends on threads). Sorted by start address, each tensor is compared with
// those whose memory range it overlaps; tensors whose layouts make the test too hard for
// at::get_overlap_status (interleaved strided views) are let through.
void check_no_shared_memory(const AdamArgs& a) {
  struct Span {
    uintptr_t begin, end;
    const char* list;
    size_t index;
    const at::Tensor* tensor;
  };
  std::vector<Span> spans;
  auto add = [&](at::TensorList list, const char* name) {
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& t = list[i];
      if (t.numel() == 0 || t.is_meta() || !t.has_storage()) continue;
      int64_t last = 0;  // offset of the last element, in elements
      for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
      const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      spans.push_back({begin, begin + uintptr_t(last + 1) * t.element_size(), name, i, &t});
    }
  };
  for (const NamedList& written : written_lists(a)) add(written.tensors, written.name);
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) {
    return x.begin < y.begin;
  });
  std::vector<const Span*> open;  // spans that may still overlap later ones
  for (const Span& s : spans) {
    std::erase_if(open, [&](const Span* o) { return o->end <= s.begin; });
    for (const Span* o : open) {
      const at::MemOverlapStatus status = at::get_overlap_status(*o->tensor, *s.tensor);
      if (status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial)
        continue;
      const bool same_list = o->list == s.list;
      TORCH_CHECK(false, "adamx: ", o->list, "[", std::min(o->index, s.index), "] and ",
                  s.list, "[", same_list ? std::max(o->index, s.index) : s.index,
                  "] share memory; a step writes each element once",
                  same_list && o->list == std::string("params")
                      ? " (is a param listed twice?)"
                      : ", so each param needs state tensors of its own");
    }
    open.push_back(&s);
  }
}

}  // namespace

void check_args(const AdamArgs& a, const CheckContext& context) {
  const size_t n = a.params.size();
  auto check_len = [&](at::TensorList l, const char* name) {
    TORCH_CHECK_VALUE(l.size() == n, "adamx: got ", n, " params but ", l.size(), " ", name);
  };
  check_len(a.grads, "grads");
  check_len(a.exp_avgs, "exp_avgs");
  check_len(a.exp_avg_sqs, "exp_avg_sqs");
  check_len(a.state_steps, "state_steps");
  if (a.switches.amsgrad) check_len(a.max_exp_avg_sqs, "max_exp_avg_sqs (amsgrad=True)");
  if (a.switches.master_weights) check_len(a.master_params, "master_params");
  for (const auto& [ids, name] : {std::pair{a.param_ids, "param_ids"},
                                  std::pair{a.element_offsets, "element_offsets"}})
    TORCH_CHECK_VALUE(!ids || ids->size() == n, "adamx: got ", n, " params but ",
                      ids ? ids->size() : 0, " ", name);
  if (a.param_ids)
    for (size_t i = 0; i < n; ++i)
      TORCH_CHECK_VALUE((*a.param_ids)[i] >= 0 && (*a.param_ids)[i] <= int64_t(UINT32_MAX),
                        "adamx: param_ids[", i, "] is ", (*a.param_ids)[i],
                        "; a param's id (which keys its random bits) is in [0, 2^32)");
  TORCH_CHECK_VALUE(!(a.switches.master_weights && a.switches.stochastic_rounding),
                    "adamx: stochastic_rounding rounds bfloat16 params that have no master "
                    "copy; with master_params each param is its master's rounding to nearest. "
                    "Choose one of them");

  check_hyper(a.hyper.beta1, "beta1");
  check_hyper(a.hyper.beta2, "beta2");
  check_hyper(a.hyper.eps, "eps");
  check_hyper(a.hyper.weight_decay, "weight_decay");
  if (!a.lr_tensor) check_hyper(a.hyper.lr, "lr");
  if (n == 0) return;
  const at::Device device = a.params[0].device();

  if (a.lr_tensor) {
    const at::Tensor& lr = *a.lr_tensor;
    check_scalar_tensor(lr, "the lr tensor", device, context);
    // A device lr is not read here: that would synchronize (and break graph capture).
    if (lr.is_cpu()) check_hyper(lr.item<double>(), "lr");
  }
  if (a.grad_scale) check_scalar_tensor(*a.grad_scale, "grad_scale", device, context);
  if (a.found_inf) check_scalar_tensor(*a.found_inf, "found_inf", device, context);

  if (!c10::InferenceMode::is_enabled()) {
    const at::TensorList written_grads = grads_written(a) ? a.grads : at::TensorList();
    for (at::TensorList list : {a.params, written_grads, a.exp_avgs, a.exp_avg_sqs,
                                a.max_exp_avg_sqs, a.master_params, a.code_scales,
                                a.state_steps})
      for (const at::Tensor& t : list)
        TORCH_CHECK(!t.defined() || !t.is_inference(),
                    "adamx: an in-place update of an inference tensor outside InferenceMode "
                    "is not allowed (a param or state tensor was made under "
                    "torch.inference_mode())");
  }

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    TORCH_CHECK(p.defined(), "adamx: params[", i, "] is undefined");
    TORCH_CHECK(p.layout() == at::kStrided, "adamx: params[", i, "] has layout ", p.layout(),
                "; only dense (strided) tensors are supported");
    TORCH_CHECK_TYPE(is_supported_dtype(p.scalar_type()), "adamx: params[", i, "] has dtype ",
                     p.scalar_type(), "; supported: float32, float64, float16, bfloat16");
    TORCH_CHECK(p.device() == device, "adamx: params[", i, "] is on ", p.device(),
                " but params[0] is on ", device, "; one step takes the params of one device");
    check_no_self_overlap(p, "params", i);
    TORCH_CHECK_VALUE(element_offset(a, i) >= 0 &&
                          element_offset(a, i) <= std::numeric_limits<int64_t>::max() - p.numel(),
                      "adamx: element_offsets[", i, "] is ", element_offset(a, i),
                      "; the index of a param's first element in its whole param is at least 0 "
                      "and leaves room for its ", p.numel(), " elements below 2^63");
    const bool reduced = p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16;
    TORCH_CHECK_TYPE(!a.switches.stochastic_rounding || p.scalar_type() != at::kHalf,
                     "adamx: stochastic_rounding is implemented for bfloat16 params, but "
                     "params[", i, "] is float16 (use master weights for float16 params)");
    TORCH_CHECK_TYPE(!a.switches.master_weights || reduced, "adamx: master_params are fp32 "
                     "copies of float16 or bfloat16 params, but params[", i, "] is ",
                     p.scalar_type(), "; step it in a call without master_params");
    const StateKind kind = state_kind(a, i);
    if (kind != StateKind::Plain) check_compact(a, i, kind);
    const at::ScalarType state_dtype = kind == StateKind::Codes8 ? at::kByte
                                       : kind == StateKind::Bf16 ? at::kBFloat16
                                       : a.switches.master_weights ? at::kFloat
                                                                   : p.scalar_type();

    const at::Tensor& g = a.grads[i];
    TORCH_CHECK(g.defined(), "adamx: params[", i, "] has no grad");
    TORCH_CHECK(!g.is_sparse(),
                "adamx: Adam does not support sparse gradients, please consider SparseAdam "
                "instead (grads[", i, "] is sparse)");
    check_like_param(g, "grads", p, i, p.scalar_type());
    if (grads_written(a)) check_no_self_overlap(g, "grads", i);
    check_like_param(a.exp_avgs[i], "exp_avgs", p, i, state_dtype);
    check_like_param(a.exp_avg_sqs[i], "exp_avg_sqs", p, i, state_dtype);
    check_no_self_overlap(a.exp_avgs[i], "exp_avgs", i);
    check_no_self_overlap(a.exp_avg_sqs[i], "exp_avg_sqs", i);
    if (a.switches.amsgrad) {
      check_like_param(a.max_exp_avg_sqs[i], "max_exp_avg_sqs", p, i, state_dtype);
      check_no_self_overlap(a.max_exp_avg_sqs[i], "max_exp_avg_sqs", i);
    }
    if (a.switches.master_weights) {
      check_like_param(a.master_params[i], "master_params", p, i, at::kFloat);
      check_no_self_overlap(a.master_params[i], "master_params", i);
    }

    const at::Tensor& step = a.state_steps[i];
    TORCH_CHECK(step.defined() && step.numel() == 1 &&
                    (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble),
                "adamx: state_steps[", i, "] must be a one-element float32 or float64 tensor");
    check_scalar_device(step, ScalarName{nullptr, int64_t(i)}, device, context);
  }
  // Last among the device checks, so that a stray tensor is named rather than the kernel.
  TORCH_CHECK(device.type() == context.device_type, "adamx: the params are on ", device,
              " but this kernel runs on ", context.device_type, " tensors");
  check_no_shared_memory(a);
}

namespace {

// adam_check's kernel where no backend registers its own: the checks of the params'
// device, writing nothing. Lets a multi-group step check every group before it updates
// the first.
void check_only(const AdamArgs& a) {
  if (!a.params.empty()) check_args(a, CheckContext{a.params[0].device().type()});
}

// adam_'s Autograd kernel. An optimizer step is not differentiable, so it records
// nothing; what it does is what ATen's in-place ops get from their ADInplaceOrView
// kernels: it bumps the version counter of every tensor the step writes, so autograd
// notices a param that changed after it was saved for backward (check_args has refused
// inference tensors outside inference mode, which have no counter). Being an unboxed
// kernel, it also spares each call the boxing that the generic autograd fallback would do.
template <class Signature>
struct AutogradKernel;

template <class... Args>
struct AutogradKernel<void(Args...)> {
  static void call(c10::DispatchKeySet keys, Args... args) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("adamx::adam_", "")
                               .typed<AdamOpSignature>();
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, args...);
    for (const NamedList& written : written_lists(make_adam_args(args...)))
      for (const at::Tensor& t : written.tensors)
        if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
};

// Sparse tensors dispatch to their own keys; these kernels make that the same clear
// error as any other bad input (check_args rejects every sparse tensor).
void reject_sparse(const AdamArgs& a) {
  check_only(a);
  TORCH_CHECK(false, "adamx: sparse tensors are not supported");
}

#ifndef ADAMX_WITH_CUDA
void no_cuda_kernels(const AdamArgs& a) {
  check_args(a, CheckContext{c10::DeviceType::CUDA});  // names a stray CUDA lr or step first
  TORCH_CHECK(false,
              "adamx was built without its CUDA kernels (the torch it was built against was a "
              "CPU-only build, no nvcc was found, or ADAMX_CUDA=0). Rebuild it with a CUDA "
              "build of torch installed: pip install . (see README.md)");
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(adamx, SparseCPU, m) {
  m.impl("adam_", &adam_op<reject_sparse>);
}

TORCH_LIBRARY_IMPL(adamx, SparseCUDA, m) {
  m.impl("adam_", &adam_op<reject_sparse>);
}

#ifndef ADAMX_WITH_CUDA
TORCH_LIBRARY_IMPL(adamx, CUDA, m) {
  m.impl("adam_", &adam_op<no_cuda_kernels>);
}
#endif

TORCH_LIBRARY_IMPL(adamx, CompositeExplicitAutograd, m) {
  m.impl("adam_check", &adam_op<check_only>);
}

TORCH_LIBRARY_IMPL(adamx, Autograd, m) {
  m.impl("adam_", &AutogradKernel<AdamOpSignature>::call);
}

}  // namespace adamx
