#include "adam_op.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>

#include <cmath>

namespace adamx {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A state tensor (or grad) must look exactly like its param.
void check_like_param(const at::Tensor& x, const char* list, const at::Tensor& p, size_t i) {
  TORCH_CHECK(x.defined(), "adamx: ", list, "[", i, "] is undefined");
  TORCH_CHECK(x.layout() == at::kStrided, "adamx: ", list, "[", i, "] has layout ", x.layout(),
              "; only dense (strided) tensors are supported");
  TORCH_CHECK(x.sizes() == p.sizes(), "adamx: ", list, "[", i, "] has shape ", x.sizes(),
              " but params[", i, "] has shape ", p.sizes());
  TORCH_CHECK(x.scalar_type() == p.scalar_type(), "adamx: ", list, "[", i, "] has dtype ",
              x.scalar_type(), " but params[", i, "] has dtype ", p.scalar_type());
  TORCH_CHECK(x.device() == p.device(), "adamx: ", list, "[", i, "] is on ", x.device(),
              " but params[", i, "] is on ", p.device());
}

void check_hyper(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value), "adamx: ", name, " must be a finite number, got ",
                    value);
}

}  // namespace

void check_args(const AdamArgs& a, c10::DeviceType device_type) {
  const size_t n = a.params.size();
  auto check_len = [&](at::TensorList l, const char* name) {
    TORCH_CHECK_VALUE(l.size() == n, "adamx: got ", n, " params but ", l.size(), " ", name);
  };
  check_len(a.grads, "grads");
  check_len(a.exp_avgs, "exp_avgs");
  check_len(a.exp_avg_sqs, "exp_avg_sqs");
  check_len(a.state_steps, "state_steps");
  if (a.amsgrad) check_len(a.max_exp_avg_sqs, "max_exp_avg_sqs (amsgrad=True)");

  check_hyper(a.hyper.beta1, "beta1");
  check_hyper(a.hyper.beta2, "beta2");
  check_hyper(a.hyper.eps, "eps");
  check_hyper(a.hyper.weight_decay, "weight_decay");
  if (a.lr_tensor) {
    const at::Tensor& lr = *a.lr_tensor;
    TORCH_CHECK_VALUE(lr.numel() == 1 && at::isFloatingType(lr.scalar_type()),
                      "adamx: a tensor lr must hold one floating-point value, got shape ",
                      lr.sizes(), " and dtype ", lr.scalar_type());
    // A device lr is not read here: that would synchronize (and break graph capture).
    if (lr.is_cpu()) check_hyper(lr.item<double>(), "lr");
  } else {
    check_hyper(a.hyper.lr, "lr");
  }

  if (!c10::InferenceMode::is_enabled()) {
    for (at::TensorList list : {a.params, a.exp_avgs, a.exp_avg_sqs, a.max_exp_avg_sqs,
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
    TORCH_CHECK(p.device().type() == device_type, "adamx: params[", i, "] is on ", p.device(),
                " but this kernel runs on ", device_type, " tensors");
    TORCH_CHECK(p.device() == a.params[0].device(), "adamx: params[", i, "] is on ", p.device(),
                " but params[0] is on ", a.params[0].device(),
                "; one step takes the params of one device");
    TORCH_CHECK(at::has_internal_overlap(p) != at::MemOverlap::Yes, "adamx: params[", i,
                "] has overlapping memory (e.g. from expand()); it cannot be updated in place");

    const at::Tensor& g = a.grads[i];
    TORCH_CHECK(g.defined(), "adamx: params[", i, "] has no grad");
    TORCH_CHECK(!g.is_sparse(),
                "adamx: Adam does not support sparse gradients, please consider SparseAdam "
                "instead (grads[", i, "] is sparse)");
    check_like_param(g, "grads", p, i);
    check_like_param(a.exp_avgs[i], "exp_avgs", p, i);
    check_like_param(a.exp_avg_sqs[i], "exp_avg_sqs", p, i);
    if (a.amsgrad) check_like_param(a.max_exp_avg_sqs[i], "max_exp_avg_sqs", p, i);

    const at::Tensor& step = a.state_steps[i];
    TORCH_CHECK(step.defined() && step.numel() == 1 &&
                    (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble),
                "adamx: state_steps[", i, "] must be a one-element float32 or float64 tensor");
    TORCH_CHECK(step.is_cpu() || step.device() == p.device(), "adamx: state_steps[", i,
                "] is on ", step.device(), "; it must be on the CPU or on params[", i,
                "]'s device ", p.device());
  }
}

namespace {

void check_only(const AdamArgs& a) {
  if (!a.params.empty()) check_args(a, a.params[0].device().type());
}

// adam_'s Autograd kernel. An optimizer step is not differentiable, so it records
// nothing; what it does is what ATen's in-place ops get from their ADInplaceOrView
// kernels: it bumps the version counter of every tensor the step writes, so autograd
// notices a param that changed after it was saved for backward (check_args has refused
// inference tensors outside inference mode, which have no counter). Being an unboxed kernel,
// it also spares each call the boxing that the generic autograd fallback would do.
template <class Signature>
struct AutogradKernel;

template <class... Args>
struct AutogradKernel<void(Args...)> {
  static void call(c10::DispatchKeySet keys, Args... args) {
    auto all = std::forward_as_tuple(args...);
    // params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps (grads is read-only).
    const at::TensorList written[] = {std::get<0>(all), std::get<2>(all), std::get<3>(all),
                                      std::get<4>(all), std::get<5>(all)};
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("adamx::adam_", "")
                               .typed<AdamOpSignature>();
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, args...);
    for (at::TensorList list : written)
      for (const at::Tensor& t : list)
        if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
};

// Sparse tensors dispatch to their own keys; these kernels make that the same clear
// error as any other bad input (check_args rejects every sparse tensor).
void reject_sparse(const AdamArgs& a) {
  check_args(a, a.params.empty() ? c10::DeviceType::CPU : a.params[0].device().type());
  TORCH_CHECK(false, "adamx: sparse tensors are not supported");
}

#ifndef ADAMX_WITH_CUDA
void no_cuda_kernels(const AdamArgs&) {
  TORCH_CHECK(false,
              "adamx was built without its CUDA kernels (the torch it was built against was a "
              "CPU-only build, no nvcc was found, or ADAMX_CUDA=0). Rebuild it with a CUDA "
              "build of torch installed: pip install --no-build-isolation . (see README.md)");
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
