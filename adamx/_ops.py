"""Loads the compiled module and registers the fake (meta) kernels of its ops.

The ops themselves are defined in C++ (csrc/bindings.cpp) and live in ``torch.ops.adamx``;
their CPU and CUDA kernels register with the dispatcher when ``adamx._C`` is loaded.
"""

import torch

BUILD_HINT = (
    "adamx's compiled kernels are not available{why}. Build them against the torch you "
    "have: `pip install .` in the adamx source tree (or `python setup.py build_ext "
    "--inplace` for a development checkout). See README.md, Install."
)
MISMATCH_HINT = (
    "adamx was built for torch {built}, but torch {installed} is installed here, so its "
    "compiled kernels were not loaded (torch promises no C++ ABI across versions: a module "
    "built for another torch fails with undefined symbols, or worse). Rebuild adamx against "
    "this torch: `pip install .` in the adamx source tree (or `python setup.py build_ext "
    "--inplace` for a development checkout). See README.md, Install."
)
# Written beside _C by the build (setup.py, BUILD_RECORD): the torch it was compiled for.
BUILD_RECORD = "_C_build.json"


def _read_build_record():
    """The build's record (a dict, e.g. {"torch": "2.13.0+cpu", ...}), or None when there
    is none (a build older than the record) or it cannot be read. Does not load _C."""
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), BUILD_RECORD)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("torch"), str) else None


def _load_compiled(record):
    """(_C or None, the ImportError, the torch mismatch message or None). Beside a torch
    other than the one the build recorded, _C is not even loaded."""
    if record is not None and record["torch"] != torch.__version__:
        return None, None, MISMATCH_HINT.format(built=record["torch"],
                                                installed=torch.__version__)
    try:
        from . import _C  # noqa: F401  (loading it registers the ops)
    except ImportError as exc:  # keep `import adamx` working; say why when a kernel is used
        return None, exc, None
    return _C, None, None


BUILD_RECORD_INFO = _read_build_record()
_C, _IMPORT_ERROR, _TORCH_MISMATCH = _load_compiled(BUILD_RECORD_INFO)


def is_compiled() -> bool:
    """Whether the compiled kernels loaded."""
    return _C is not None


def built_for_torch():
    """The torch version the compiled module was built against (None: not recorded)."""
    return BUILD_RECORD_INFO["torch"] if BUILD_RECORD_INFO else None


def require_compiled():
    if _C is None:
        if _TORCH_MISMATCH:
            raise RuntimeError(_TORCH_MISMATCH)
        raise RuntimeError(BUILD_HINT.format(why=f" ({_IMPORT_ERROR})" if _IMPORT_ERROR else ""))


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
