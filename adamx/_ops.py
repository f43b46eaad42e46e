"""Loads the compiled module and registers the fake (meta) kernels of its ops.

The ops themselves are defined in C++ (csrc/bindings.cpp) and live in ``torch.ops.adamx``;
their CPU and CUDA kernels register with the dispatcher when ``adamx._C`` is loaded.
"""

import torch

BUILD_HINT = (
    "adamx's compiled kernels are not available{why}. Build them against the torch you "
    "have: `pip install --no-build-isolation .` in the adamx source tree (or "
    "`python setup.py build_ext --inplace` for a development checkout). See README.md, Install."
)

try:
    from . import _C  # noqa: F401  (loading it registers the ops)
except ImportError as exc:  # keep `import adamx` working; say why when a kernel is used
    _C = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def is_compiled() -> bool:
    """Whether the compiled kernels loaded."""
    return _C is not None


def require_compiled():
    if _C is None:
        raise RuntimeError(BUILD_HINT.format(why=f" ({_IMPORT_ERROR})"))


def _check_one_device(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs):
    # The dispatcher picks a kernel from the devices of all tensors together: a stray meta
    # tensor among CPU ones would select this fake kernel, so it must refuse mixed devices.
    if not params:
        return
    device = params[0].device
    for name, tensors in (("params", params), ("grads", grads), ("exp_avgs", exp_avgs),
                          ("exp_avg_sqs", exp_avg_sqs), ("max_exp_avg_sqs", max_exp_avg_sqs)):
        for i, t in enumerate(tensors):
            if t.device != device:
                raise RuntimeError(
                    f"adamx: {name}[{i}] is on {t.device} but params[0] is on {device}; "
                    "one step takes the tensors of one device")


if _C is not None:

    @torch.library.register_fake("adamx::adam_")
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                   lr, lr_tensor=None, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                   decoupled_weight_decay, eps_inside_sqrt):
        # In place, no outputs: nothing to compute, but the device rule still holds.
        _check_one_device(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
