// The adamx::adam_ op's schema, and the Python module's few non-op helpers.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "python_step.h"

namespace {

// The arguments of adamx::adam_ and adamx::adam_check; `mut(x)` marks what adam_ writes.
std::string adam_schema(const std::string& name, bool mutates) {
  auto mut = [&](const char* alias) { return mutates ? std::string("(") + alias + "!)" : ""; };
  return name + "(Tensor" + mut("a") + "[] params, Tensor[] grads, Tensor" + mut("b") +
         "[] exp_avgs, Tensor" + mut("c") + "[] exp_avg_sqs, Tensor" + mut("d") +
         "[] max_exp_avg_sqs, Tensor" + mut("e") +
         "[] state_steps, *, float lr, Tensor? lr_tensor=None, float beta1, float beta2, "
         "float weight_decay, float eps, bool amsgrad, bool maximize, "
         "bool decoupled_weight_decay, bool eps_inside_sqrt) -> ()";
}

}  // namespace

TORCH_LIBRARY(adamx, m) {
  // One Adam/AdamW step over lists of tensors of one device, in place. Increments each
  // state_steps[i] by one, then updates params, exp_avgs, exp_avg_sqs (and
  // max_exp_avg_sqs when amsgrad). lr_tensor, when given, replaces lr. Checks all its
  // inputs before it writes anything.
  m.def(adam_schema("adam_", true).c_str());
  // The same checks alone, writing nothing: lets a multi-group step check every group
  // before it updates the first.
  m.def(adam_schema("adam_check", false).c_str());
}

namespace {

bool built_with_cuda() {
#ifdef ADAMX_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace adamx::cpu;
  m.doc() = "adamx compiled kernels (the ops live in torch.ops.adamx)";
  m.def("cpu_capability", [] { return std::string(isa_name(current_isa())); },
        "The SIMD instruction set the CPU kernel uses now.");
  m.def("set_cpu_capability", [](const std::string& name) { set_isa(isa_from_name(name)); },
        "Use the CPU kernel for this instruction set (one the machine supports).");
  m.def("supported_cpu_capabilities", &supported_isa_names,
        "The instruction sets this machine can run, narrowest first.");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("step_group", &adamx::step_group, pybind11::arg("group"), pybind11::arg("state"),
        pybind11::arg("check_only") = false,
        "adamx.Adam's fast path: adamx::adam_ on one param group, read from its dicts. "
        "Returns the number of params stepped, or -1 if one needs its state made first.");
  m.attr("NEEDS_STATE") = adamx::kNeedsState;
}
