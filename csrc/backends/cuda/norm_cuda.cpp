// The CUDA kernel of adamx::norm_accumulate: operands, plan (norm_plan.cpp), the two
// kernels on the current stream of the tensors' device. Nothing is read back: the result
// stays on the device. In a build without CUDA this file is empty (norm_op.cpp registers
// a kernel that says so).
#ifdef ADAMX_WITH_CUDA

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "norm_kernel.h"
#include "norm_plan.h"

namespace adamx::cuda {
namespace {

at::Tensor norm_accumulate_cuda(at::TensorList tensors, double norm_type) {
  const NormOperands ops = norm_operands(tensors, norm_type, c10::DeviceType::CUDA);
  TORCH_CHECK(!tensors.empty(), "adamx: norm_accumulate needs at least one tensor");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const NormPlanOptions options{};
  const int64_t count = norm_chunks(ops, options);
  const auto like = tensors[0].options().dtype(at::kDouble);
  const at::Tensor partials = at::empty({count > 0 ? count : 1}, like);
  at::Tensor out = at::empty({}, like);
  const std::vector<NormTable> tables = plan_norm(ops, partials.data_ptr<double>(), options);
  for (const NormTable& tab : tables)
    TORCH_CHECK(norm_num_blocks(tab) <= std::numeric_limits<int32_t>::max(),
                "adamx: norm_accumulate: too many chunks for one launch");
  launch_norm(tables.data(), tables.size(), partials.data_ptr<double>(), count, ops.order,
              out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

TORCH_LIBRARY_IMPL(adamx, CUDA, m) {
  m.impl("norm_accumulate", &norm_accumulate_cuda);
}

}  // namespace
}  // namespace adamx::cuda

#endif  // ADAMX_WITH_CUDA
