// Host side of the multi-tensor CUDA step (see launch_table.h). Compiled in every build:
// the CPU emulation uses it too.
#include "launch_table.h"

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace adamx::cuda {

uint8_t scalar_code(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: return kFloat32;
  }
}

namespace {

StepScalars<double> host_scalars(double step, const LaunchScalars& ls) {
  return ls.eps_inside_sqrt ? step_scalars<double, true>(step, ls.hyper.lr, ls.hyper)
                            : step_scalars<double, false>(step, ls.hyper.lr, ls.hyper);
}

class TableBuilder {
 public:
  TableBuilder(const LaunchScalars& ls, const PlanOptions& o,
               std::vector<std::vector<int64_t>>* ids)
      : ls_(ls), o_(o), ids_(ids) {
    reset();
  }

  void add(const TensorSlot& s, int64_t id) {
    if (s.numel == 0) return;
    const int64_t chunks = (s.numel - 1) / o_.chunk_size + 1;
    TORCH_CHECK(chunks - 1 <= std::numeric_limits<int32_t>::max(), "adamx: a tensor of ",
                s.numel, " elements has more chunks of ", o_.chunk_size,
                " elements than a launch table can index");
    int local = -1;
    for (int64_t c = 0; c < chunks; ++c) {
      if (tab_.num_blocks == o_.max_blocks) {
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
    int set = s.step_source == kHostScalars ? find_set(s.host_step) : 0;
    if (tab_.num_tensors == o_.max_tensors || set < 0) {
      flush();
      set = s.step_source == kHostScalars ? find_set(s.host_step) : 0;
    }
    const int t = tab_.num_tensors++;
    tab_.param[t] = s.param;
    tab_.grad[t] = s.grad;
    tab_.exp_avg[t] = s.exp_avg;
    tab_.exp_avg_sq[t] = s.exp_avg_sq;
    tab_.max_exp_avg_sq[t] = s.max_exp_avg_sq;
    tab_.numel[t] = s.numel;
    tab_.step[t] = s.step;
    tab_.step_source[t] = s.step_source;
    tab_.scalar_set[t] = static_cast<uint8_t>(set);
    ids_now_.push_back(id);
    return t;
  }

  // The index of the scalar set for this host step count, adding it if there is room;
  // -1 when the table's sets are full.
  int find_set(double step) {
    for (int i = 0; i < num_sets_; ++i)
      if (set_steps_[i] == step) return i;
    if (num_sets_ == o_.max_scalar_sets) return -1;
    set_steps_[num_sets_] = step;
    tab_.sets[num_sets_] = host_scalars(step, ls_);
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
    tab_.hyper = ls_.hyper;
    tab_.lr_ptr = ls_.lr_ptr;
    tab_.lr_dtype = ls_.lr_dtype;
    tab_.chunk_size = o_.chunk_size;
    num_sets_ = 0;
    ids_now_.clear();
  }

  const LaunchScalars& ls_;
  const PlanOptions& o_;
  std::vector<std::vector<int64_t>>* ids_;
  std::vector<LaunchTable> tables_;
  std::vector<int64_t> ids_now_;
  LaunchTable tab_;
  double set_steps_[kMaxScalarSets];
  int num_sets_ = 0;
};

at::Tensor alike(const at::Tensor& x, const at::Tensor& layout) {
  if (x.strides() == layout.strides()) return x;
  return at::empty_like(layout).copy_(x);
}

// The step count after its increment, computed in the step's dtype (as `++step`).
double next_host_step(const at::Tensor& step) {
  return step.scalar_type() == at::kDouble ? *step.const_data_ptr<double>() + 1.0
                                           : double(*step.const_data_ptr<float>() + 1.0f);
}

void write_host_step(const at::Tensor& step, double value) {
  if (step.scalar_type() == at::kDouble) *step.data_ptr<double>() = value;
  else *step.data_ptr<float>() = static_cast<float>(value);
}

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

PreparedStep prepare_step(const AdamArgs& a, const PlanOptions& options, bool steps_in_kernel,
                          bool lr_in_kernel) {
  const size_t n = a.params.size();
  PreparedStep prep;
  if (n == 0) return prep;
  const at::Device device = a.params[0].device();

  LaunchScalars ls;
  ls.hyper = a.hyper;
  ls.eps_inside_sqrt = a.eps_inside_sqrt;
  if (a.lr_tensor) {
    const at::Tensor& lr = *a.lr_tensor;
    if (lr.is_cpu() && !lr_in_kernel) {
      ls.hyper.lr = lr.item<double>();
    } else {
      TORCH_CHECK(lr.is_cpu() || lr.device() == device, "adamx: lr_tensor is on ",
                  lr.device(), "; it must be on the CPU or on the params' device ", device);
      ls.lr_ptr = lr.const_data_ptr();
      ls.lr_dtype = scalar_code(lr.scalar_type());
    }
  }

  // The tensors the kernel runs on: the user's own when they are dense and laid out
  // alike (the usual case), else dense temporaries, copied back by copy_back().
  prep.operands.resize(n);
  for (size_t i = 0; i < n; ++i) {
    auto& o = prep.operands[i];
    const at::Tensor& p = a.params[i];
    o.param = p.is_non_overlapping_and_dense() ? p : p.contiguous();
    o.grad = alike(a.grads[i], o.param);
    o.exp_avg = alike(a.exp_avgs[i], o.param);
    o.exp_avg_sq = alike(a.exp_avg_sqs[i], o.param);
    if (a.amsgrad) o.max_exp_avg_sq = alike(a.max_exp_avg_sqs[i], o.param);
    if (!o.param.is_same(p) || !o.exp_avg.is_same(a.exp_avgs[i]) ||
        !o.exp_avg_sq.is_same(a.exp_avg_sqs[i]) ||
        (a.amsgrad && !o.max_exp_avg_sq.is_same(a.max_exp_avg_sqs[i])))
      prep.copied.push_back(i);
  }

  // Slots, grouped by dtype in order of first appearance.
  std::vector<at::ScalarType> dtypes;
  std::vector<std::vector<TensorSlot>> slots;
  std::vector<std::pair<size_t, double>> host_steps;  // (param, incremented count)
  for (size_t i = 0; i < n; ++i) {
    const auto& o = prep.operands[i];
    const at::Tensor& step = a.state_steps[i];
    TensorSlot s{};
    s.param = o.param.data_ptr();
    s.grad = o.grad.const_data_ptr();
    s.exp_avg = o.exp_avg.data_ptr();
    s.exp_avg_sq = o.exp_avg_sq.data_ptr();
    s.max_exp_avg_sq = a.amsgrad ? o.max_exp_avg_sq.data_ptr() : nullptr;
    s.numel = o.param.numel();
    if (step.is_cpu() && !steps_in_kernel) {
      const double next = next_host_step(step);
      host_steps.emplace_back(i, next);
      if (ls.lr_dtype == kNone) {
        s.step_source = kHostScalars;
        s.host_step = next;
      } else {  // the lr lives on the device: the kernel computes the scalars
        s.step_source = kStepValue;
        s.step.value = next;
      }
    } else {
      prep.device_steps.push_back(step);
      s.step_source = step.scalar_type() == at::kDouble ? kStepDouble : kStepFloat;
      s.step.ptr = step.const_data_ptr();
    }
    const at::ScalarType dtype = o.param.scalar_type();
    auto it = std::find(dtypes.begin(), dtypes.end(), dtype);
    if (it == dtypes.end()) {
      dtypes.push_back(dtype);
      slots.emplace_back();
      it = dtypes.end() - 1;
    }
    slots[it - dtypes.begin()].push_back(s);
  }
  for (size_t d = 0; d < dtypes.size(); ++d)
    prep.groups.push_back({dtypes[d], build_tables(slots[d], ls, options)});

  // Nothing throws from here on (but the device-side increment, which the caller runs).
  for (const auto& [i, value] : host_steps) write_host_step(a.state_steps[i], value);
  return prep;
}

void increment_device_steps(const PreparedStep& prep) {
  if (!prep.device_steps.empty()) at::_foreach_add_(prep.device_steps, 1);
}

void copy_back(const PreparedStep& prep, const AdamArgs& a) {
  auto back = [](const at::Tensor& original, const at::Tensor& used) {
    if (!used.is_same(original)) original.copy_(used);
  };
  for (size_t i : prep.copied) {
    const auto& o = prep.operands[i];
    back(a.params[i], o.param);
    back(a.exp_avgs[i], o.exp_avg);
    back(a.exp_avg_sqs[i], o.exp_avg_sq);
    if (a.amsgrad) back(a.max_exp_avg_sqs[i], o.max_exp_avg_sq);
  }
}

}  // namespace adamx::cuda
