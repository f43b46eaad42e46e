// The CUDA backend of adamx::adam_: check, operands, plan (launch_table.cpp), increment
// the step counts, launch one kernel per launch table on the current stream of the params'
// device, copy temporaries back. Host code compiled by the C++ compiler; in a build
// without CUDA this file is empty (adam_op.cpp registers a kernel that says so).
#ifdef ADAMX_WITH_CUDA

#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernel.h"
#include "launch_table.h"

namespace adamx::cuda {
namespace {

CheckContext cuda_context(const AdamArgs& a) {
  CheckContext context{c10::DeviceType::CUDA};
  if (!a.params.empty() && a.params[0].is_cuda()) {
    const c10::cuda::CUDAGuard guard(a.params[0].device());
    context.capturing_graph = c10::cuda::currentStreamCaptureStatusMayInitCtx() !=
                              c10::cuda::CaptureStatus::None;
  }
  return context;
}

void check_cuda(const AdamArgs& a) { check_args(a, cuda_context(a)); }

void adam_cuda(const AdamArgs& a) {
  check_cuda(a);
  if (a.params.empty()) return;
  // Launch on the params' device (and its current stream), whatever device is current.
  const c10::cuda::CUDAGuard guard(a.params[0].device());
  const StepOperands operands(a);  // empty when found_inf, read on the host, skips the step
  const std::vector<LaunchGroup> groups = plan_launches(operands, a, PlanOptions{});
  operands.increment_steps();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (const LaunchGroup& group : groups)
    launch_adam_tables(group.dtype, group.kind, a.switches, group.tables.data(),
                       group.tables.size(), stream);
  operands.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(adamx, CUDA, m) {
  register_backend<adam_cuda, check_cuda>(m);
}

}  // namespace adamx::cuda

#endif  // ADAMX_WITH_CUDA
