// The Python module adamx._C: loading it registers the op kernels with the dispatcher
// (the ops' schemas are defined in adamx/_ops.py); it also holds the few non-op helpers
// and the constants the Python side reads instead of repeating them.
#include <torch/extension.h>

#include "../backends/cpu/isa.h"
#include "../backends/cuda/block_body.h"
#include "../backends/cuda/norm_body.h"
#include "step_group.h"

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
  namespace cuda = adamx::cuda;
  m.doc() = "adamx compiled kernels (the ops live in torch.ops.adamx)";
  m.def("cpu_capability", [] { return std::string(isa_name(current_isa())); },
        "The SIMD instruction set the CPU kernel uses now.");
  m.def("set_cpu_capability", [](const std::string& name) { set_isa(isa_from_name(name)); },
        "Use the CPU kernel for this instruction set (one the machine supports).");
  m.def("supported_cpu_capabilities", &supported_isa_names,
        "The instruction sets this machine can run, narrowest first.");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("step_group", &adamx::step_group, pybind11::arg("group"), pybind11::arg("state"),
        pybind11::arg("check_only") = false, pybind11::arg("grad_scale") = pybind11::none(),
        pybind11::arg("found_inf") = pybind11::none(), pybind11::arg("keep_grads") = false,
        pybind11::arg("first_param_id") = 0,
        "adamx.Adam's fast path: adamx::adam_ on one param group, read from its dicts, with "
        "GradScaler's grad_scale and found_inf (keep_grads: the unscaled grads are not "
        "written back) and the op's param_ids from first_param_id (the group's first "
        "param's index in the optimizer) on. Returns the number of params stepped, or "
        "NOT_HANDLED.");
  m.attr("NOT_HANDLED") = adamx::kNotHandled;
  m.attr("COMPACT_MIN_NUMEL") = adamx::kCompactMinNumel;
  m.attr("GROUP_KEYS") = adamx::group_keys();
  std::vector<std::string> switches;
#define ADAMX_SWITCH_NAME(name) switches.push_back(#name);
  ADAMX_SWITCHES(ADAMX_SWITCH_NAME)
#undef ADAMX_SWITCH_NAME
  m.attr("SWITCHES") = pybind11::tuple(pybind11::cast(switches));
  std::vector<std::string> runtime_switches;
#define ADAMX_RUNTIME_SWITCH_NAME(name) runtime_switches.push_back(#name);
  ADAMX_SWITCH_LIST(ADAMX_SKIP_SWITCH, ADAMX_RUNTIME_SWITCH_NAME)
#undef ADAMX_RUNTIME_SWITCH_NAME
  // The switches every kernel reads at run time (no kernel of their own).
  m.attr("RUNTIME_SWITCHES") = pybind11::tuple(pybind11::cast(runtime_switches));
  // Kernels compiled per CPU instruction set and per CUDA architecture.
  m.attr("NUM_KERNELS") = adamx::kNumKernels;
  // Every kernel that exists, as a dict: param_dtype (a torch dtype name), state_dtype
  // (how its moments are stored, as a group's state_dtype names it: "float32" for torch's
  // layout), and its compile-time switches (the run-time ones are every kernel's).
  pybind11::list kernels;
  adamx::for_each_kernel([&](adamx::Dtype d, adamx::StateKind kind, const adamx::Switches& s) {
    static const char* const kDtypes[] = {"float32", "float64", "float16", "bfloat16"};
    static const char* const kKinds[] = {"float32", "bfloat16", "int8"};
    pybind11::dict k;
    k["param_dtype"] = kDtypes[int(d)];
    k["state_dtype"] = kKinds[int(kind)];
#define ADAMX_KERNEL_SWITCH_ITEM(name) k[#name] = bool(s.name);
    ADAMX_KERNEL_SWITCHES(ADAMX_KERNEL_SWITCH_ITEM)
#undef ADAMX_KERNEL_SWITCH_ITEM
    kernels.append(k);
  });
  m.attr("KERNEL_CASES") = pybind11::tuple(kernels);
  // The CUDA launch geometry, the defaults of the emulation's arguments.
  m.attr("CUDA_CHUNK_SIZE") = cuda::kDefaultChunkSize;
  m.attr("CUDA_BLOCK_DIM") = cuda::kBlockDim;
  m.attr("CUDA_MAX_TENSORS") = cuda::kMaxTensors;
  m.attr("CUDA_MAX_BLOCKS") = cuda::kMaxBlocks;
  m.attr("CUDA_MAX_SCALAR_SETS") = cuda::kMaxScalarSets;
  // The CUDA norm's (norm_accumulate), the defaults of its emulation's arguments.
  m.attr("CUDA_NORM_CHUNK_SIZE") = cuda::kNormChunkSize;
  m.attr("CUDA_NORM_MAX_TENSORS") = cuda::kNormMaxTensors;
  m.attr("CUDA_NORM_BLOCK_DIM") = cuda::kNormBlockDim;
}
