// The CUDA backend of adamx::adam_: check, plan (launch_table.cpp), increment the device
// step counts, launch one kernel per launch table on the current stream of the params'
// device, copy temporaries back. Host code compiled by the C++ compiler; in a build
// without CUDA this file is empty (adam_op.cpp registers a kernel that says so).
#ifdef ADAMX_WITH_CUDA

#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../adam_op.h"
#include "adam_cuda.h"
#include "launch_table.h"

namespace adamx::cuda {
namespace {

void adam_cuda(const AdamArgs& a) {
  check_args(a, c10::DeviceType::CUDA);
  if (a.params.empty()) return;
  // Launch on the params' device (and its current stream), whatever device is current.
  const c10::cuda::CUDAGuard guard(a.params[0].device());
  // A graph replays the kernels, not this host code: step counts incremented here (CPU
  // tensors) would stay at their captured values, and a CPU lr tensor would be frozen.
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    for (const at::Tensor& step : a.state_steps)
      TORCH_CHECK(!step.is_cpu(), "adamx: capturing a CUDA graph of a step needs its step "
                  "counts on the GPU (capturable=True), but a state_steps tensor is on the CPU");
    TORCH_CHECK(!a.lr_tensor || !a.lr_tensor->is_cpu(), "adamx: capturing a CUDA graph of a "
                "step with a tensor lr needs the lr on the GPU, but it is on the CPU");
  }
  const PreparedStep prep = prepare_step(a, PlanOptions{});
  increment_device_steps(prep);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const KernelFlags flags{a.decoupled_weight_decay, a.amsgrad, a.maximize, a.eps_inside_sqrt};
  for (const auto& group : prep.groups)
    launch_adam_tables(scalar_code(group.dtype), flags, group.tables.data(), group.tables.size(),
                       stream);
  copy_back(prep, a);
}

}  // namespace

TORCH_LIBRARY_IMPL(adamx, CUDA, m) {
  m.impl("adam_", &adam_op<adam_cuda>);
}

}  // namespace adamx::cuda

#endif  // ADAMX_WITH_CUDA
