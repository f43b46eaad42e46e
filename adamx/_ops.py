"""The ops of adamx: their schemas and fake kernels, defined here once; their CPU and CUDA
kernels are in the compiled module, which registers them when ``adamx._C`` is loaded.

Backends (csrc/backends/<device>/) register kernels for these schemas; the op-level
registrations every backend shares (autograd, sparse inputs, the input checks) are in
csrc/op/adam_op.cpp. The switches of the update (``amsgrad``, ``maximize``, ...) come from
the compiled module (``_C.SWITCHES``), so that adding one to the C++ list adds it to every
schema here.
"""

import torch

BUILD_HINT = (
    "adamx's compiled kernels are not available{why}. Build them against the torch you "
    "have: `pip install .` in the adamx source tree (or `python setup.py build_ext "
    "--inplace` for a development checkout). See docs/building.md."
)
MISMATCH_HINT = (
    "adamx was built for torch {built}, but torch {installed} is installed here, so its "
    "compiled kernels were not loaded (torch promises no C++ ABI across versions: a module "
    "built for another torch fails with undefined symbols, or worse). Rebuild adamx against "
    "this torch: `pip install .` in the adamx source tree (or `python setup.py build_ext "
    "--inplace` for a development checkout). See docs/building.md."
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
        from . import _C  # noqa: F401  (loading it registers the kernels)
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


def adam_arguments(mutable: bool) -> str:
    """The arguments of adamx::adam_ (``mutable``: with the marks of what it writes)."""
    mark = (lambda alias: f"({alias}!)") if mutable else (lambda alias: "")
    switches = "".join(f", bool {name}=False" for name in _C.SWITCHES)
    # grads: written (unscaled in place) when grad_scale is given, so marked as torch's
    # _fused_adam_ marks them.
    return (f"Tensor{mark('a')}[] params, Tensor{mark('f')}[] grads, "
            f"Tensor{mark('b')}[] exp_avgs, "
            f"Tensor{mark('c')}[] exp_avg_sqs, Tensor{mark('d')}[] max_exp_avg_sqs, "
            f"Tensor{mark('e')}[] state_steps, *, float lr, Tensor? lr_tensor=None, "
            f"float beta1, float beta2, float weight_decay, float eps{switches}, "
            f"Tensor? grad_scale=None, Tensor? found_inf=None, "
            f"Tensor{mark('g')}[]? master_params=None, "
            f"Tensor{mark('h')}[]? code_scales=None, int seed=0, int[]? param_ids=None, "
            f"int[]? element_offsets=None, bool keep_grads=False")


def _check_devices(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                   lr_tensor, grad_scale=None, found_inf=None, master_params=None,
                   code_scales=None):
    """The device rules of the op's checks (csrc/op/adam_op.cpp), for the fake kernel: the
    dispatcher picks a kernel from the devices of all tensors together, so a stray meta or
    CUDA tensor among CPU ones (the lr, a step count) routes the call here or elsewhere."""
    if not params:
        return
    device = params[0].device
    for name, tensors in (("params", params), ("grads", grads), ("exp_avgs", exp_avgs),
                          ("exp_avg_sqs", exp_avg_sqs), ("max_exp_avg_sqs", max_exp_avg_sqs),
                          ("master_params", master_params or ()),
                          ("code_scales", code_scales or ())):
        for i, t in enumerate(tensors):
            if t.device != device:
                raise RuntimeError(
                    f"adamx: {name}[{i}] is on {t.device} but params[0] is on {device}; "
                    "one step takes the tensors of one device")
    scalars = [(f"state_steps[{i}]", s) for i, s in enumerate(state_steps)]
    for name, t in scalars + [("the lr tensor", lr_tensor), ("grad_scale", grad_scale),
                              ("found_inf", found_inf)]:
        if t is not None and t.device.type != "cpu" and t.device != device:
            raise RuntimeError(f"adamx: {name} is on {t.device}; it must be on the CPU or on "
                               f"the params' device {device}")


if _C is not None:
    _lib = torch.library.Library("adamx", "DEF")

    # One Adam/AdamW step over lists of tensors of one device, in place. Increments each
    # state_steps[i] by one, then updates params, exp_avgs, exp_avg_sqs (and
    # max_exp_avg_sqs when amsgrad). lr_tensor, when given, replaces lr. grad_scale and
    # found_inf are GradScaler's, as torch._fused_adam_ takes them: the grads are divided by
    # grad_scale and the quotient written back to them (keep_grads: not written back, the
    # grads are left as they were, a write of each saved); a non-zero found_inf leaves every
    # tensor, step counts included, unchanged. master_params (fp32 copies of float16 /
    # bfloat16 params, whose state is then fp32) are updated, and each param set to its
    # master's rounding. Compact moments: bfloat16 exp_avgs/exp_avg_sqs beside float32
    # params or master copies, or uint8 ones (8-bit codes) with their block scales in
    # code_scales (float32, [2, blocks]: exp_avg's row, exp_avg_sq's row); both rounded
    # stochastically. seed keys stochastic rounding (bfloat16 params, compact moments), with
    # each param's identity (param_ids[i], default i) and its elements' indices counted from
    # element_offsets[i] (default 0; a shard's place in its whole param): csrc/math/random.h.
    # Checks all its inputs before it writes anything.
    _lib.define(f"adam_({adam_arguments(mutable=True)}) -> ()")
    # The same checks alone, writing nothing: lets a multi-group step check every group
    # before it updates the first.
    _lib.define(f"adam_check({adam_arguments(mutable=False)}) -> ()")

    @torch.library.register_fake("adamx::adam_", lib=_lib)
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                   lr_tensor=None, grad_scale=None, found_inf=None, master_params=None,
                   code_scales=None, **hyper):
        # In place, no outputs: nothing to compute, but the device rules still hold.
        _check_devices(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                       lr_tensor, grad_scale, found_inf, master_params, code_scales)

    # Test-only (csrc/backends/cuda/emulate.cpp): adam_ run as the CUDA backend runs it,
    # with the kernel body executed on the CPU for every block and thread; the extra
    # arguments shrink the launch geometry. Returns [launches, vectorized blocks, blocks].
    _geometry = (f"int chunk_size={_C.CUDA_CHUNK_SIZE}, int max_tensors={_C.CUDA_MAX_TENSORS}, "
                 f"int max_blocks={_C.CUDA_MAX_BLOCKS}")
    _lib.define(f"_adam_emulated_cuda_({adam_arguments(mutable=True)}, "
                f"bool steps_in_kernel=False, bool lr_in_kernel=False, "
                f"bool scaler_in_kernel=False, {_geometry}, "
                f"int block_dim={_C.CUDA_BLOCK_DIM}, "
                f"int max_scalar_sets={_C.CUDA_MAX_SCALAR_SETS}, "
                f"bool edge_blocks_only=False) -> int[]")
    # Test-only: the CUDA launch plan for tensors of these sizes (nothing is allocated).
    _lib.define(f"_cuda_launch_plan(int[] numels, {_geometry}) -> int[]")

    # The accumulator of a norm over every element of the tensors (one device, float32,
    # float64, float16 or bfloat16, any strides): a float64 scalar on their device, the
    # sum of |x|^norm_type (norm_type 1, 2 or finite p > 0) or the largest |x| (inf); the
    # caller takes the root (adamx/_clip.py). csrc/op/norm_op.h.
    _lib.define("norm_accumulate(Tensor[] tensors, float norm_type) -> Tensor")

    @torch.library.register_fake("adamx::norm_accumulate", lib=_lib)
    def _norm_accumulate_fake(tensors, norm_type):
        if not tensors:
            raise RuntimeError("adamx: norm_accumulate needs at least one tensor")
        for i, t in enumerate(tensors):
            if t.device != tensors[0].device:
                raise RuntimeError(f"adamx: norm_accumulate: tensors[{i}] is on {t.device} but "
                                   f"tensors[0] is on {tensors[0].device}; one call takes the "
                                   "tensors of one device")
        return tensors[0].new_empty((), dtype=torch.float64)

    # Test-only (csrc/backends/cuda/norm_emulate.cpp): norm_accumulate as the CUDA backend
    # runs it, its kernel bodies executed on the CPU for every block and thread.
    _lib.define(f"_norm_accumulate_emulated_cuda(Tensor[] tensors, float norm_type, "
                f"int chunk_size={_C.CUDA_NORM_CHUNK_SIZE}, "
                f"int max_tensors={_C.CUDA_NORM_MAX_TENSORS}, "
                f"int block_dim={_C.CUDA_NORM_BLOCK_DIM}) -> Tensor")
