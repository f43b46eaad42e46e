// The CPU kernel of adamx::norm_accumulate: the elements of all tensors cut into chunks of
// kNormChunk (per tensor), one accumulator per chunk computed in parallel by the ISA's
// kernel (norm_kernel.cpp), then joined in chunk order. The chunks do not depend on the
// thread count, so neither does the result.
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../../op/norm_op.h"
#include "isa.h"
#include "norm_kernel.h"

namespace adamx::cpu {
namespace {

constexpr int64_t kNormChunk = 16384;  // elements: 64 KiB of float32
constexpr int64_t kGrainChunks = 2;    // below 2 chunks, one thread

NormRangeKernel norm_kernel(Isa isa, Dtype dtype, NormOrder order) {
  switch (isa) {
    case Isa::Avx512: return norm_kernel_avx512(dtype, order);
    case Isa::Avx2: return norm_kernel_avx2(dtype, order);
    default: return norm_kernel_default(dtype, order);
  }
}

at::Tensor norm_accumulate_cpu(at::TensorList tensors, double norm_type) {
  const NormOperands ops = norm_operands(tensors, norm_type, c10::DeviceType::CPU);
  const size_t n = ops.data.size();
  const Isa isa = current_isa();
  std::vector<NormRangeKernel> kernels(n);
  std::vector<int64_t> first(n + 1, 0);  // each tensor's first chunk
  for (size_t i = 0; i < n; ++i) {
    kernels[i] = norm_kernel(isa, ops.dtype[i], ops.order);
    first[i + 1] = first[i] + (ops.numel[i] + kNormChunk - 1) / kNormChunk;
  }
  std::vector<double> partial(first[n], 0.0);
  at::parallel_for(0, first[n], kGrainChunks, [&](int64_t lo, int64_t hi) {
    size_t i = std::upper_bound(first.begin(), first.end(), lo) - first.begin() - 1;
    for (int64_t c = lo; c < hi; ++c) {
      while (c >= first[i + 1]) ++i;
      const int64_t begin = (c - first[i]) * kNormChunk;
      const int64_t end = std::min(begin + kNormChunk, ops.numel[i]);
      partial[c] = kernels[i](ops.data[i], begin, end, ops.p);
    }
  });
  double acc = 0.0;
  for (double x : partial) acc = norm_join(ops.order, acc, x);
  return at::scalar_tensor(acc, at::TensorOptions().dtype(at::kDouble));
}

TORCH_LIBRARY_IMPL(adamx, CPU, m) {
  m.impl("norm_accumulate", &norm_accumulate_cpu);
}

}  // namespace
}  // namespace adamx::cpu
