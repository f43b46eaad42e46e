// The checks and operands of adamx::norm_accumulate (see norm_op.h), and its kernel in
// builds without CUDA.
#include "norm_op.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "operands.h"

namespace adamx {

NormOperands norm_operands(at::TensorList tensors, double norm_type, c10::DeviceType device) {
  NormOperands out{};
  TORCH_CHECK_VALUE(norm_order_of(norm_type, &out.order), "adamx: norm_accumulate takes "
                    "norm_type 1, 2, inf or a finite p > 0, got ", norm_type,
                    " (torch.linalg.vector_norm computes the others)");
  out.p = norm_type;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), "adamx: norm_accumulate: tensors[", i, "] is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, "adamx: norm_accumulate: tensors[", i,
                "] has layout ", t.layout(), "; only dense (strided) tensors are supported");
    const at::ScalarType s = t.scalar_type();
    TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf ||
                         s == at::kBFloat16,
                     "adamx: norm_accumulate: tensors[", i, "] has dtype ", s,
                     "; expected float32, float64, float16 or bfloat16");
    TORCH_CHECK(t.device().type() == device && t.device() == tensors[0].device(),
                "adamx: norm_accumulate: tensors[", i, "] is on ", t.device(), " but tensors[0] "
                "is on ", tensors[0].device(), "; one call takes the tensors of one device");
  }
  for (const at::Tensor& t : tensors) {
    const at::Tensor& dense = t.is_non_overlapping_and_dense()
                                  ? t
                                  : out.copies.emplace_back(t.contiguous());
    // A dense tensor's elements fill numel() places from its lowest address, the
    // data pointer (torch has no negative strides).
    out.data.push_back(dense.const_data_ptr());
    out.numel.push_back(dense.numel());
    out.dtype.push_back(dtype_of(dense.scalar_type()));
  }
  return out;
}

namespace {

at::Tensor reject_sparse(at::TensorList tensors, double) {
  for (size_t i = 0; i < tensors.size(); ++i)
    TORCH_CHECK(tensors[i].layout() == at::kStrided, "adamx: norm_accumulate: tensors[", i,
                "] has layout ", tensors[i].layout(), "; only dense (strided) tensors are "
                "supported");
  TORCH_CHECK(false, "adamx: norm_accumulate: sparse tensors are not supported");
}

TORCH_LIBRARY_IMPL(adamx, SparseCPU, m) {
  m.impl("norm_accumulate", &reject_sparse);
}

TORCH_LIBRARY_IMPL(adamx, SparseCUDA, m) {
  m.impl("norm_accumulate", &reject_sparse);
}

#ifndef ADAMX_WITH_CUDA
at::Tensor no_cuda_kernels(at::TensorList, double) {
  TORCH_CHECK(false, "adamx: norm_accumulate got CUDA tensors, but adamx was built without "
              "its CUDA kernels (see docs/building.md)");
}

TORCH_LIBRARY_IMPL(adamx, CUDA, m) {
  m.impl("norm_accumulate", &no_cuda_kernels);
}
#endif

}  // namespace
}  // namespace adamx
