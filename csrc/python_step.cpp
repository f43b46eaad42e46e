// The eager fast path of adamx.Adam.step: one call per param group that reads the
// group's hyper-parameters, params, grads and state straight from the Python objects
// and calls adamx::adam_ through the dispatcher. It saves building six Python lists and
// parsing them against the op's schema at every step, which for a small model costs
// more than the kernel itself. The op does all the checking.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

#include "python_step.h"

namespace adamx {
namespace {

namespace py = pybind11;

PyObject* group_item(PyObject* group, const char* key) {
  PyObject* value = PyDict_GetItemString(group, key);  // borrowed
  TORCH_CHECK_VALUE(value, "adamx: param group has no '", key, "'");
  return value;
}

double group_number(PyObject* group, const char* key) {
  const double value = PyFloat_AsDouble(group_item(group, key));
  if (value == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return value;
}

bool group_flag(PyObject* group, const char* key) {
  const int value = PyObject_IsTrue(group_item(group, key));
  if (value < 0) throw py::error_already_set();
  return value;
}

// The tensor at state[key], or nullopt when the key is missing.
std::optional<at::Tensor> state_tensor(PyObject* state, const char* key) {
  PyObject* value = PyDict_GetItemString(state, key);
  if (!value) return std::nullopt;
  TORCH_CHECK_TYPE(THPVariable_Check(value), "adamx: optimizer state '", key,
                   "' is not a tensor");
  return THPVariable_Unpack(value);
}

}  // namespace

int64_t step_group(py::dict group_dict, py::dict state_dict, bool check_only) {
  PyObject* group = group_dict.ptr();
  PyObject* state = state_dict.ptr();
  const bool amsgrad = group_flag(group, "amsgrad");

  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  PyObject* group_params = group_item(group, "params");
  TORCH_CHECK_TYPE(PyList_Check(group_params), "adamx: group['params'] must be a list");
  const Py_ssize_t count = PyList_GET_SIZE(group_params);
  for (Py_ssize_t k = 0; k < count; ++k) {
    PyObject* obj = PyList_GET_ITEM(group_params, k);
    TORCH_CHECK_TYPE(THPVariable_Check(obj), "adamx: group['params'] holds a non-tensor");
    const at::Tensor& p = THPVariable_Unpack(obj);
    const at::Tensor& grad = p.grad();
    if (!grad.defined()) continue;
    PyObject* p_state = PyDict_GetItem(state, obj);  // no __missing__: nothing is created
    if (!p_state || !PyDict_Check(p_state) || PyDict_Size(p_state) == 0) return kNeedsState;
    auto exp_avg = state_tensor(p_state, "exp_avg");
    auto exp_avg_sq = state_tensor(p_state, "exp_avg_sq");
    auto step = state_tensor(p_state, "step");
    if (!exp_avg || !exp_avg_sq || !step) return kNeedsState;
    if (amsgrad) {
      auto max_exp_avg_sq = state_tensor(p_state, "max_exp_avg_sq");
      if (!max_exp_avg_sq) return kNeedsState;
      max_exp_avg_sqs.push_back(*max_exp_avg_sq);
    }
    params.push_back(p);
    grads.push_back(grad);
    exp_avgs.push_back(*exp_avg);
    exp_avg_sqs.push_back(*exp_avg_sq);
    steps.push_back(*step);
  }
  if (params.empty()) return 0;

  PyObject* lr_obj = group_item(group, "lr");
  std::optional<at::Tensor> lr_tensor;
  double lr = 0;
  if (THPVariable_Check(lr_obj)) lr_tensor = THPVariable_Unpack(lr_obj);
  else lr = group_number(group, "lr");
  PyObject* betas = group_item(group, "betas");
  TORCH_CHECK_TYPE(PySequence_Check(betas) && PySequence_Size(betas) == 2,
                   "adamx: group['betas'] must hold two numbers");
  double beta[2];
  for (int b = 0; b < 2; ++b) {
    py::object item = py::reinterpret_steal<py::object>(PySequence_GetItem(betas, b));
    if (!item) throw py::error_already_set();
    beta[b] = PyFloat_AsDouble(item.ptr());
    if (beta[b] == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  }
  const double weight_decay = group_number(group, "weight_decay");
  const double eps = group_number(group, "eps");
  const bool maximize = group_flag(group, "maximize");
  const bool decoupled = group_flag(group, "decoupled_weight_decay");
  const bool eps_inside = group_flag(group, "eps_inside_sqrt");

  static const auto adam = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("adamx::adam_", "")
                               .typed<AdamOpSignature>();
  static const auto check = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("adamx::adam_check", "")
                                .typed<AdamOpSignature>();
  {
    py::gil_scoped_release no_gil;
    (check_only ? check : adam)
        .call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor,
              beta[0], beta[1], weight_decay, eps, amsgrad, maximize, decoupled, eps_inside);
  }
  return static_cast<int64_t>(params.size());
}

}  // namespace adamx
