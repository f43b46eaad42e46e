// See norm_plan.h. Compiled in every build: the CPU emulation uses it too.
#include "norm_plan.h"

#include <c10/util/Exception.h>

namespace adamx::cuda {

int64_t norm_chunks(const NormOperands& ops, const NormPlanOptions& options) {
  int64_t chunks = 0;
  for (int64_t numel : ops.numel) chunks += (numel + options.chunk_size - 1) / options.chunk_size;
  return chunks;
}

std::vector<NormTable> plan_norm(const NormOperands& ops, double* partials,
                                 const NormPlanOptions& options) {
  TORCH_CHECK(options.chunk_size >= 1 && options.max_tensors >= 1 &&
                  options.max_tensors <= kNormMaxTensors,
              "adamx: norm launch geometry out of range");
  std::vector<NormTable> tables;
  NormTable tab{};
  int64_t next_partial = 0;
  auto open = [&] {
    tab = NormTable{};
    tab.partials = partials;
    tab.first_partial = next_partial;
    tab.chunk_size = options.chunk_size;
    tab.p = ops.p;
    tab.order = ops.order;
  };
  auto close = [&] {
    if (tab.num_tensors > 0) tables.push_back(tab);
    next_partial += norm_num_blocks(tab);
    open();
  };
  open();
  for (size_t i = 0; i < ops.data.size(); ++i) {
    if (ops.numel[i] == 0) continue;
    if (tab.num_tensors == options.max_tensors) close();
    const int t = tab.num_tensors++;
    tab.data[t] = ops.data[i];
    tab.numel[t] = ops.numel[i];
    tab.dtype[t] = ops.dtype[i];
    tab.first_block[t + 1] =
        tab.first_block[t] + (ops.numel[i] + options.chunk_size - 1) / options.chunk_size;
  }
  close();
  return tables;
}

}  // namespace adamx::cuda
