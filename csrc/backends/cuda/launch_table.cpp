// Host side of the multi-tensor CUDA step (see launch_table.h). Compiled in every build:
// the CPU emulation uses it too.
#include "launch_table.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace adamx::cuda {
namespace {

class TableBuilder {
 public:
  TableBuilder(const LaunchScalars& scalars, const PlanOptions& options,
               std::vector<std::vector<int64_t>>* ids)
      : scalars_(scalars), options_(options), ids_(ids) {
    reset();
  }

  void add(const TensorSlot& s, int64_t id) {
    const int64_t numel = s.pointers.numel;
    if (numel == 0) return;
    const int64_t chunks = (numel - 1) / options_.chunk_size + 1;
    TORCH_CHECK(chunks - 1 <= std::numeric_limits<int32_t>::max(), "adamx: a tensor of ",
                numel, " elements has more chunks of ", options_.chunk_size,
                " elements than a launch table can index");
    int local = -1;
    for (int64_t c = 0; c < chunks; ++c) {
      if (tab_.num_blocks == options_.max_blocks) {
        flush();
        local = -1;
      }
      if (local < 0) local = place(s, id);
      tab_.block_tensor[tab_.num_blocks] = static_cast<uint8_t>(local);
      tab_.block_chunk[tab_.num_blocks] = static_cast<int32_t>(c);
      ++tab_.num_blocks;
    }
  }

  std::vector<LaunchTable> finish() {
    flush();
    return std::move(tables_);
  }

 private:
  // Puts tensor `s` into the current table (opening a new one when it has no room for
  // the tensor or its scalar set) and returns its index there.
  int place(const TensorSlot& s, int64_t id) {
    // Where the kernel gets the tensor's step scalars: a count in memory, read there; a
    // host count with an lr in memory, computed there; else computed here, once per count.
    const StepSource source = s.step.memory ? (s.step.dtype == Dtype::Float64 ? kStepDouble
                                                                              : kStepFloat)
                              : scalars_.lr.memory ? kStepValue
                                                   : kHostScalars;
    int set = source == kHostScalars ? find_set(s.step.next) : 0;
    if (tab_.num_tensors == options_.max_tensors || set < 0) {
      flush();
      set = source == kHostScalars ? find_set(s.step.next) : 0;
    }
    const int t = tab_.num_tensors++;
    tab_.tensors[t] = s.pointers;
    if (s.step.memory) tab_.step[t].ptr = s.step.memory;
    else tab_.step[t].value = s.step.next;
    tab_.step_source[t] = source;
    tab_.param_id[t] = s.param_id;
    tab_.element_offset[t] = s.element_offset;
    tab_.scalar_set[t] = static_cast<uint8_t>(set);
    ids_now_.push_back(id);
    return t;
  }

  // The index of the scalar set for this host step count, adding it if there is room;
  // -1 when the table's sets are full.
  int find_set(double step) {
    for (int i = 0; i < num_sets_; ++i)
      if (set_steps_[i] == step) return i;
    if (num_sets_ == options_.max_scalar_sets) return -1;
    set_steps_[num_sets_] = step;
    tab_.sets[num_sets_] =
        step_scalars(step, scalars_.lr.value, scalars_.hyper, scalars_.switches);
    return num_sets_++;
  }

  void flush() {
    if (tab_.num_blocks > 0) {
      tables_.push_back(tab_);
      if (ids_) ids_->push_back(std::move(ids_now_));
    }
    reset();
  }

  void reset() {
    std::memset(&tab_, 0, sizeof(tab_));
    tab_.hyper = scalars_.hyper;
    tab_.switches = scalars_.switches;
    tab_.lr = scalars_.lr;
    tab_.grad_scale = scalars_.grad_scale;
    tab_.found_inf = scalars_.found_inf;
    tab_.chunk_size = options_.chunk_size;
    num_sets_ = 0;
    ids_now_.clear();
  }

  const LaunchScalars& scalars_;
  const PlanOptions& options_;
  std::vector<std::vector<int64_t>>* ids_;
  std::vector<LaunchTable> tables_;
  std::vector<int64_t> ids_now_;
  LaunchTable tab_;
  double set_steps_[kMaxScalarSets];
  int num_sets_ = 0;
};

}  // namespace

std::vector<LaunchTable> build_tables(const std::vector<TensorSlot>& slots,
                                      const LaunchScalars& scalars, const PlanOptions& options,
                                      std::vector<std::vector<int64_t>>* tensor_ids) {
  TORCH_CHECK(options.chunk_size >= 1, "adamx: chunk_size must be positive");
  TORCH_CHECK(options.max_tensors >= 1 && options.max_tensors <= kMaxTensors,
              "adamx: max_tensors must be in [1, ", kMaxTensors, "]");
  TORCH_CHECK(options.max_blocks >= 1 && options.max_blocks <= kMaxBlocks,
              "adamx: max_blocks must be in [1, ", kMaxBlocks, "]");
  TORCH_CHECK(options.max_scalar_sets >= 1 && options.max_scalar_sets <= kMaxScalarSets,
              "adamx: max_scalar_sets must be in [1, ", kMaxScalarSets, "]");
  if (tensor_ids) tensor_ids->clear();
  TableBuilder builder(scalars, options, tensor_ids);
  for (size_t i = 0; i < slots.size(); ++i) builder.add(slots[i], static_cast<int64_t>(i));
  return builder.finish();
}

std::vector<LaunchGroup> plan_launches(const StepOperands& operands, const AdamArgs& a,
                                       const PlanOptions& options) {
  LaunchScalars ls;
  ls.hyper = operands.hyper();
  ls.lr = operands.lr();
  ls.grad_scale = operands.grad_scale();
  ls.found_inf = operands.found_inf();
  ls.switches = a.switches;

  // Slots, grouped by dtype and kind of moments in order of first appearance.
  std::vector<LaunchGroup> groups;
  std::vector<std::vector<TensorSlot>> slots;
  for (size_t i = 0; i < operands.size(); ++i) {
    const TensorSlot s{operands.pointers(i), operands.step(i), param_id(a, i),
                       element_offset(a, i)};
    auto it = std::find_if(groups.begin(), groups.end(), [&](const LaunchGroup& g) {
      return g.dtype == operands.dtype(i) && g.kind == operands.kind(i);
    });
    if (it == groups.end()) {
      groups.push_back({operands.dtype(i), operands.kind(i), {}});
      slots.emplace_back();
      it = groups.end() - 1;
    }
    slots[it - groups.begin()].push_back(s);
  }
  for (size_t d = 0; d < groups.size(); ++d) {
    PlanOptions o = options;
    if (groups[d].kind == StateKind::Codes8)
      o.chunk_size = (o.chunk_size + kCodeBlock - 1) / kCodeBlock * kCodeBlock;
    groups[d].tables = build_tables(slots[d], ls, o);
  }
  return groups;
}

}  // namespace adamx::cuda
