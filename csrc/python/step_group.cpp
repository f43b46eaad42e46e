// The eager fast path of adamx.Adam.step: one call per param group that reads the
// group's hyper-parameters, params, grads and state straight from the Python objects
// and calls adamx::adam_ through the dispatcher. It saves building six Python lists and
// parsing them against the op's schema at every step, which for a small model costs
// more than the kernel itself. The op does all the checking of its arguments. The state
// contract (adamx/_state.py) is the Python step's: this path takes only groups whose every
// param's state already is what the contract asks (exactly its keys, the moments' storage
// for the group's state_dtype, the param's dtype, shape and strides) and declines
// everything else (NOT_HANDLED, having written nothing), as it does tensor subclasses
// (DTensor), complex and meta params; the Python step then makes, converts or refuses.
#include "step_group.h"

#include <torch/csrc/autograd/python_variable.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>  // (torch 2.11's headers above do not declare at::empty)

#include <algorithm>
#include <optional>
#include <vector>

namespace adamx {
namespace {

namespace py = pybind11;

// A dict key: its C string, and a Python string interned once (never freed). Looking a
// key up by the object spares making a Python string per lookup, as PyDict_GetItemString
// does: 20-odd lookups a step for a small model.
struct Key {
  explicit Key(const char* n) : name(n), object(PyUnicode_InternFromString(n)) {
    if (!object) throw py::error_already_set();
  }
  const char* name;
  PyObject* object;
};

struct Keys {
  Key lr{"lr"}, betas{"betas"}, weight_decay{"weight_decay"}, eps{"eps"}, params{"params"},
      master_weights{"master_weights"}, seed{"seed"}, exp_avg{"exp_avg"},
      exp_avg_sq{"exp_avg_sq"}, max_exp_avg_sq{"max_exp_avg_sq"}, step{"step"},
      master_param{"master_param"}, state_dtype{"state_dtype"}, float32{"float32"},
      bfloat16{"bfloat16"}, int8{"int8"}, exp_avg_codes{"exp_avg_codes"},
      exp_avg_sq_codes{"exp_avg_sq_codes"}, code_scales{"code_scales"};
  struct {
#define ADAMX_SWITCH_KEY_FIELD(name) Key name{#name};
    ADAMX_SWITCHES(ADAMX_SWITCH_KEY_FIELD)
#undef ADAMX_SWITCH_KEY_FIELD
  } switches;
};

// Made on first use, with the GIL held (module import or a step).
const Keys& keys() {
  static const Keys* k = new Keys;
  return *k;
}

PyObject* group_item(PyObject* group, const Key& key) {
  PyObject* value = PyDict_GetItem(group, key.object);  // borrowed
  TORCH_CHECK_VALUE(value, "adamx: param group has no '", key.name, "'");
  return value;
}

// A number as torch's step takes it (a float, int, numpy scalar or 0-d tensor); a string
// is a TypeError, as in torch.optim.Adam, on every step.
double as_number(PyObject* value, const char* key) {
  TORCH_CHECK_TYPE(PyNumber_Check(value) && !PyUnicode_Check(value), "adamx: group['", key,
                   "'] must be a number, got ", Py_TYPE(value)->tp_name);
  const double number = PyFloat_AsDouble(value);
  if (number == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return number;
}

// The seed of stochastic rounding: an integer (wrapped to 64 bits).
int64_t as_seed(PyObject* value) {
  TORCH_CHECK_TYPE(PyLong_Check(value), "adamx: group['seed'] must be an int, got ",
                   Py_TYPE(value)->tp_name);
  const unsigned long long bits = PyLong_AsUnsignedLongLongMask(value);
  if (bits == static_cast<unsigned long long>(-1) && PyErr_Occurred())
    throw py::error_already_set();
  return static_cast<int64_t>(bits);
}

bool group_flag(PyObject* group, const Key& key) {
  const int value = PyObject_IsTrue(group_item(group, key));
  if (value < 0) throw py::error_already_set();
  return value;
}

// The tensor at state[key], or nullopt when the key is missing.
std::optional<at::Tensor> state_tensor(PyObject* state, const Key& key) {
  PyObject* value = PyDict_GetItem(state, key.object);
  if (!value) return std::nullopt;
  TORCH_CHECK_TYPE(THPVariable_Check(value), "adamx: optimizer state '", key.name,
                   "' is not a tensor");
  return THPVariable_Unpack(value);
}

}  // namespace

py::tuple group_keys() {
  const Keys& k = keys();
  std::vector<std::string> names = {k.lr.name, k.betas.name, k.weight_decay.name, k.eps.name};
#define ADAMX_SWITCH_KEY(name) names.push_back(#name);
  ADAMX_SWITCHES(ADAMX_SWITCH_KEY)
#undef ADAMX_SWITCH_KEY
  return py::cast(names);
}

namespace {

// The op's tensor lists for one call.
struct CallLists {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
      master_params, code_scales;  // code_scales: one per param (empty: no codes), or none
  std::vector<int64_t> param_ids;
  bool any_codes = false;
};

// A group's state_dtype, as adamx/_state.py names them (anything else: the Python step,
// which refuses or canonicalises it).
enum class StateDtype { kFloat32, kBFloat16, kInt8, kOther };

StateDtype read_state_dtype(PyObject* group, const Keys& key) {
  PyObject* value = PyDict_GetItem(group, key.state_dtype.object);  // borrowed
  if (!value) return StateDtype::kFloat32;
  for (auto [name, kind] : {std::pair{&key.float32, StateDtype::kFloat32},
                            std::pair{&key.bfloat16, StateDtype::kBFloat16},
                            std::pair{&key.int8, StateDtype::kInt8}}) {
    const int same = PyObject_RichCompareBool(value, name->object, Py_EQ);
    if (same < 0) PyErr_Clear();
    if (same == 1) return kind;
  }
  return StateDtype::kOther;
}

bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

}  // namespace

int64_t step_group(py::dict group_dict, py::dict state_dict, bool check_only,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, bool keep_grads,
                   int64_t first_param_id) {
  PyObject* group = group_dict.ptr();
  PyObject* state = state_dict.ptr();
  const Keys& key = keys();
  Switches switches{};
#define ADAMX_SWITCH_READ(name) switches.name = group_flag(group, key.switches.name);
  ADAMX_SWITCHES(ADAMX_SWITCH_READ)
#undef ADAMX_SWITCH_READ
  // With master weights, float16/bfloat16 params go in a call of their own, with their
  // master copies; the others step as usual.
  const bool master_weights = group_flag(group, key.master_weights);
  // Compact moments (state_dtype "bfloat16" or "int8") step here when every param's state
  // already is what adamx/_state.py's spec() asks of it (the rule mirrored below); making
  // or converting state, and amsgrad with them (refused), are the Python step's.
  const StateDtype state_dtype = read_state_dtype(group, key);
  if (state_dtype == StateDtype::kOther) return kNotHandled;
  const bool compact_group = state_dtype != StateDtype::kFloat32;
  if (compact_group && switches.amsgrad) return kNotHandled;

  CallLists calls[2];  // [0]: without master copies, [1]: with
  std::vector<PyObject*> seen;  // the params with grads, to find one listed twice
  const py::object group_params = py::reinterpret_steal<py::object>(
      PySequence_Fast(group_item(group, key.params), "adamx: group['params'] must be a sequence"));
  if (!group_params) throw py::error_already_set();
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(group_params.ptr());
  PyObject** items = PySequence_Fast_ITEMS(group_params.ptr());
  for (Py_ssize_t k = 0; k < count; ++k) {
    PyObject* obj = items[k];
    TORCH_CHECK_TYPE(THPVariable_Check(obj), "adamx: group['params'] holds a non-tensor");
    const at::Tensor& p = THPVariable_Unpack(obj);
    const at::Tensor& grad = p.grad();
    if (!grad.defined()) continue;
    // A tensor subclass (a DTensor of FSDP2 or tensor parallel) takes the Python step,
    // which steps its local shard (adamx/_sharded.py); a bit test, free for plain tensors.
    if (p.key_set().has(c10::DispatchKey::Python)) return kNotHandled;
    // Complex params step as real views of param, grad and state, made by the Python step;
    // meta params step their (CPU) step counts there, as torch's loop does.
    if (p.is_complex() || p.is_meta()) return kNotHandled;
    PyObject* p_state = PyDict_GetItem(state, obj);  // no __missing__: nothing is created
    if (!p_state || !PyDict_Check(p_state) || PyDict_Size(p_state) == 0) return kNotHandled;
    // Master weights switched on (no master copy yet) or off (one left): the Python step
    // converts the state.
    // (Only float16/bfloat16 params have master copies.)
    const bool reduced = is_reduced_float(p);
    const bool master = master_weights && reduced;
    auto master_param = reduced ? state_tensor(p_state, key.master_param) : std::nullopt;
    if (master != master_param.has_value()) return kNotHandled;
    // How the moments are stored (adamx/_state.py's spec): compact in a compact group for
    // float32/bfloat16 params of at least kCompactMinNumel elements (8-bit ones dense),
    // else in torch's layout (the param's dtype, float32 beside a master copy).
    StateDtype moments = StateDtype::kFloat32;
    if (compact_group && p.numel() >= kCompactMinNumel &&
        (p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16) &&
        (state_dtype != StateDtype::kInt8 || p.is_non_overlapping_and_dense())) {
      moments = state_dtype;
      // bfloat16 moments for bfloat16 params need master copies: the Python step refuses.
      if (moments == StateDtype::kBFloat16 && p.scalar_type() == at::kBFloat16 && !master)
        return kNotHandled;
    }
    const bool codes = moments == StateDtype::kInt8;
    auto exp_avg = state_tensor(p_state, codes ? key.exp_avg_codes : key.exp_avg);
    auto exp_avg_sq = state_tensor(p_state, codes ? key.exp_avg_sq_codes : key.exp_avg_sq);
    auto step = state_tensor(p_state, key.step);
    auto code_scale = codes ? state_tensor(p_state, key.code_scales) : std::nullopt;
    if (!exp_avg || !exp_avg_sq || !step || codes != code_scale.has_value()) return kNotHandled;
    // Moments stored otherwise than the group asks (after its state_dtype changed): the
    // Python step converts them.
    const at::ScalarType moment_dtype = codes ? at::kByte
        : moments == StateDtype::kBFloat16 ? at::kBFloat16
        : master ? at::kFloat : p.scalar_type();
    if (exp_avg->scalar_type() != moment_dtype || exp_avg_sq->scalar_type() != moment_dtype)
      return kNotHandled;
    if (codes && !(code_scale->scalar_type() == at::kFloat && code_scale->dim() == 2 &&
                   code_scale->size(0) == 2 && code_scale->size(1) == code_blocks(p.numel())))
      return kNotHandled;
    // Exactly the keys this kind of state has (a `max_exp_avg_sq` left from amsgrad may
    // stay): anything else, such as 8-bit codes beside float moments in a hand-edited
    // state, goes to the Python step, which checks it against the state contract.
    const bool stale_max = !switches.amsgrad && PyDict_GetItem(p_state, key.max_exp_avg_sq.object);
    if (PyDict_Size(p_state) != 3 + codes + master + switches.amsgrad + stale_max)
      return kNotHandled;
    // State that is not shaped and laid out as its param (a checkpoint's, a param moved
    // to another memory format): the Python step checks it against the state contract,
    // refusing or re-laying it (adamx/_state.py). A param that is not dense has dense
    // state, whose strides cannot be its own.
    for (const at::Tensor* t : {&*exp_avg, &*exp_avg_sq}) {
      if (t->sizes() != p.sizes()) return kNotHandled;
      if (t->strides() != p.strides() && p.is_non_overlapping_and_dense()) return kNotHandled;
    }
    CallLists& call = calls[master];
    if (master) call.master_params.push_back(*master_param);
    if (switches.amsgrad) {
      auto max_exp_avg_sq = state_tensor(p_state, key.max_exp_avg_sq);
      if (!max_exp_avg_sq) return kNotHandled;
      call.max_exp_avg_sqs.push_back(*max_exp_avg_sq);
    }
    seen.push_back(obj);
    call.params.push_back(p);
    call.grads.push_back(grad);
    call.exp_avgs.push_back(*exp_avg);
    call.exp_avg_sqs.push_back(*exp_avg_sq);
    call.steps.push_back(*step);
    call.code_scales.push_back(codes ? *code_scale : at::Tensor());
    call.param_ids.push_back(first_param_id + k);
    call.any_codes = call.any_codes || codes;
  }
  if (seen.empty()) return 0;
  std::sort(seen.begin(), seen.end());
  if (std::adjacent_find(seen.begin(), seen.end()) != seen.end()) return kNotHandled;

  PyObject* lr_obj = group_item(group, key.lr);
  std::optional<at::Tensor> lr_tensor;
  double lr = 0;
  if (THPVariable_Check(lr_obj)) lr_tensor = THPVariable_Unpack(lr_obj);
  else lr = as_number(lr_obj, key.lr.name);
  PyObject* betas = group_item(group, key.betas);
  TORCH_CHECK_TYPE(PySequence_Check(betas) && PySequence_Size(betas) == 2,
                   "adamx: group['betas'] must hold two numbers");
  double beta[2];
  for (int b = 0; b < 2; ++b) {
    py::object item = py::reinterpret_steal<py::object>(PySequence_GetItem(betas, b));
    if (!item) throw py::error_already_set();
    beta[b] = as_number(item.ptr(), key.betas.name);
  }
  const double weight_decay = as_number(group_item(group, key.weight_decay), key.weight_decay.name);
  const double eps = as_number(group_item(group, key.eps), key.eps.name);
  // (compact moments are rounded stochastically too)
  const bool random = switches.stochastic_rounding || compact_group;
  const int64_t seed = random ? as_seed(group_item(group, key.seed)) : 0;

  static const auto adam = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("adamx::adam_", "")
                               .typed<AdamOpSignature>();
  static const auto check = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("adamx::adam_check", "")
                                .typed<AdamOpSignature>();
  {
    py::gil_scoped_release no_gil;
    auto run = [&](const auto& op, CallLists& c, bool master) {
      if (c.params.empty()) return;
      // The op's code_scales: none when no param has 8-bit moments, else one per param
      // (an empty tensor where a param has none), as adamx/optimizer.py's _code_scales.
      std::optional<at::TensorList> scales;
      if (c.any_codes) {
        for (at::Tensor& t : c.code_scales)
          if (!t.defined()) t = at::empty({0}, c.params[0].options().dtype(at::kFloat));
        scales = c.code_scales;
      }
#define ADAMX_SWITCH_ARG(name) , switches.name
      op.call(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs, c.steps, lr,
              lr_tensor, beta[0], beta[1], weight_decay, eps ADAMX_SWITCHES(ADAMX_SWITCH_ARG),
              grad_scale, found_inf,
              master ? std::optional<at::TensorList>(c.master_params) : std::nullopt,
              scales, seed, random ? at::OptionalIntArrayRef(c.param_ids) : std::nullopt,
              std::nullopt, keep_grads);
#undef ADAMX_SWITCH_ARG
    };
    // Two calls: both checked before either writes.
    const bool both = !calls[0].params.empty() && !calls[1].params.empty();
    if (check_only || both) {
      run(check, calls[0], false);
      run(check, calls[1], true);
    }
    if (!check_only) {
      run(adam, calls[0], false);
      run(adam, calls[1], true);
    }
  }
  return static_cast<int64_t>(seen.size());
}

}  // namespace adamx
