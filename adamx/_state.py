"""The optimizer state contract: what state a param must have, defined once.

For a param and its group's options, ``spec`` names the state the step needs: its kind
(the moments in torch's layout, bfloat16 moments or 8-bit codes; with or without a float32
master copy), its keys, and the dtype, shape and layout of each tensor. ``conform`` checks
a param's state against that and returns the state the step uses: the same dict when it
fits; a new one when it can be made to fit exactly (a layout change copies the values; a
master copy switched on or off, amsgrad switched on) or by the documented re-encoding (a
change of ``state_dtype``, or the layout of 8-bit codes, decodes and encodes the moments
again); otherwise a ValueError that names the param and the key, raised before anything
changes. A state that is not empty is never re-initialized.

Every path goes through here: the Python step (``Adam._gather``), ``load_state_dict``
(every param's saved state is checked before the optimizer changes), ``add_param_group``
(checked before the group is added) and an option changed between steps (found at the
next step, before any write). The C++ fast path (``adamx._C.step_group``) steps only
groups of torch's layout whose state it can see fits (the param's dtype, shape and
strides, every key present) and declines everything else to the Python step, which
checks it here.

8-bit codes are stored under their own keys (``exp_avg_codes``, ``exp_avg_sq_codes``,
beside ``code_scales``), so that torch.optim.Adam, given such a state, fails on the
missing ``exp_avg`` instead of stepping the codes as moments. Older adamx checkpoints
kept the codes under ``exp_avg``/``exp_avg_sq``; they load as before.
"""

from typing import NamedTuple

import torch
from torch.optim.optimizer import _get_scalar_dtype

from . import _compact, _sharded
from .functional import _seed

__all__ = ["STATE_DTYPES", "COMPACT_MIN_NUMEL", "MOMENTS", "CODES", "Spec", "state_dtype_name",
           "check_group", "spec", "check_state", "conform", "moment_float", "with_key_names",
           "new_step", "code_rows", "scales_shape"]

# How moments may be stored (a group's "state_dtype"), and the smallest param that gets
# compact moments: smaller ones keep float32 state (as bitsandbytes' 8-bit optimizers keep
# params under 4096 elements), where the savings are small and the precision is worth more.
STATE_DTYPES = ("float32", "bfloat16", "int8")
COMPACT_MIN_NUMEL = 4096  # = adamx._C.COMPACT_MIN_NUMEL, the C++ fast path's (tested)
_STATE_DTYPE_ALIASES = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                        torch.int8: "int8", torch.uint8: "int8"}
_REDUCED = (torch.float16, torch.bfloat16)

MOMENTS = ("exp_avg", "exp_avg_sq")
CODES = ("exp_avg_codes", "exp_avg_sq_codes")
SCALES = "code_scales"


def state_dtype_name(value):
    """A group's state_dtype as one of STATE_DTYPES (a name, or a torch dtype naming one)."""
    name = _STATE_DTYPE_ALIASES.get(value, value) if isinstance(value, torch.dtype) else value
    if not isinstance(name, str) or name not in STATE_DTYPES:
        raise ValueError(f"adamx: state_dtype must be one of {list(STATE_DTYPES)} (or "
                         f"torch.float32, torch.bfloat16, torch.int8), got {value!r}")
    return name


def check_group(group):
    """The group's state_dtype, checked with the options it must combine with (before the
    group is added, loaded or stepped)."""
    name = state_dtype_name(group.get("state_dtype", "float32"))
    if name != "float32" and group.get("amsgrad"):
        raise ValueError(f"adamx: state_dtype={name!r} does not combine with amsgrad=True "
                         "(its running maximum needs float32 state); set amsgrad=False or "
                         "state_dtype='float32'")
    return name


def has_master(p, group):
    """Whether param ``p`` of ``group`` steps with an fp32 master copy (and fp32 state)."""
    return bool(group["master_weights"]) and p.dtype in _REDUCED


class Spec(NamedTuple):
    """The state one param must have. ``moments``: "float32" (torch's layout: the param's
    dtype, or float32 beside a master copy), "bfloat16" or "int8" (codes and scales);
    ``master``: a float32 master copy; ``amsgrad``: a running maximum (float moments
    only); ``dtype``: the moments' (uint8 for codes); ``keys``: the moments' keys, then the
    maximum's."""
    moments: str
    master: bool
    amsgrad: bool
    dtype: torch.dtype
    keys: tuple

    @property
    def moment_keys(self):
        return self.keys[:2]


_KEYS = {(False, False): MOMENTS, (False, True): MOMENTS + ("max_exp_avg_sq",),
         (True, False): CODES}


def spec(p, group, state_dtype=None):
    """The state param ``p`` of ``group`` must have. Params with fewer than
    COMPACT_MIN_NUMEL elements, float64/float16/complex params keep torch's layout; so do
    8-bit groups' params that are not dense (8-bit blocks are runs of memory), and DTensor
    params whose blocks cannot follow their rows (code_rows)."""
    want = state_dtype or check_group(group)
    master = has_master(p, group)
    moments = want
    if (want == "float32" or p.numel() < COMPACT_MIN_NUMEL
            or p.dtype not in (torch.float32, torch.bfloat16)):
        moments = "float32"
    elif want == "bfloat16" and p.dtype == torch.bfloat16 and not master:
        raise ValueError(
            "adamx: state_dtype='bfloat16' for bfloat16 params needs master_weights=True "
            "(bfloat16 moments beside fp32 master copies): without master copies, bfloat16 "
            "params keep torch's bfloat16 moments rounded to nearest. Or use "
            "state_dtype='int8'")
    elif want == "int8" and (not _compact.is_dense(p) or (_sharded.is_dtensor(p)
                                                and code_rows(p) is None)):
        moments = "float32"
    amsgrad = bool(group["amsgrad"])
    if moments == "int8":
        dtype = torch.uint8
    elif moments == "bfloat16":
        dtype = torch.bfloat16
    else:
        dtype = torch.float32 if master else p.dtype
    return Spec(moments, master, amsgrad, dtype, _KEYS[moments == "int8", amsgrad])


def with_key_names(state):
    """``state`` with 8-bit codes under their own keys: an older adamx checkpoint's codes
    (uint8 under ``exp_avg``/``exp_avg_sq``) renamed, in a new dict; else ``state``."""
    m = state.get("exp_avg") if isinstance(state, dict) else None
    if not (torch.is_tensor(m) and m.dtype == torch.uint8):
        return state
    state = dict(state)
    for old, new in zip(MOMENTS, CODES):
        if old in state:
            state[new] = state.pop(old)
    return state


def stored_moments(p, state):
    """How ``state`` (checked) holds its moments, as Spec.moments names it."""
    if CODES[0] in state:
        return "int8"
    dtype = state["exp_avg"].dtype
    if dtype == torch.bfloat16 and (p.dtype == torch.float32 or "master_param" in state):
        return "bfloat16"
    return "float32"


def moment_float(state, which):
    """Moment ``which`` (0: exp_avg, 1: exp_avg_sq) of ``state`` as float32, from any
    storage (as laid out in the state; a DTensor for a DTensor's state)."""
    if CODES[which] in state:
        codes = state[CODES[which]]
        scales = _local(state[SCALES]).reshape(2, -1)  # (a DTensor's: (2, rows, per row))
        values = _compact.decode_codes(_local(codes), scales[which], signed=which == 0)
        return _like(codes, values)
    return state[MOMENTS[which]].float()


def _local(t):
    """A DTensor's local tensor (a sharded param's shard), else ``t``."""
    return getattr(t, "_local_tensor", t)


def _like(t, local, shape=None, placements=None):
    """``local`` as a shard of a DTensor of ``t``'s mesh, placements, shape and strides
    (or the shape given, contiguous, and the placements given) when ``t`` is a DTensor,
    else ``local`` itself."""
    if not _sharded.is_dtensor(t):
        return local
    from torch.distributed.tensor import DTensor
    if shape is None:
        shape, stride = tuple(t.shape), tuple(t.stride())
    else:
        stride = [1] * len(shape)
        for d in reversed(range(len(shape) - 1)):
            stride[d] = stride[d + 1] * shape[d + 1]
    return DTensor.from_local(local, t.device_mesh, placements or t.placements,
                              run_check=False, shape=tuple(shape), stride=tuple(stride))


def code_rows(p):
    """For a DTensor param with 8-bit moments, (rows, blocks per row) when its blocks of
    256 elements can follow its rows: a row is a whole number of blocks and every shard is
    a run of whole rows (each sharded placement is Shard(0), as FSDP2's), so each rank's
    blocks are the unsharded param's and its code scales are a DTensor of shape (2, rows,
    blocks per row) sharded by rows, which checkpoints reshard as the codes; else None.
    (A row is a run of memory: dim 0 is the outermost, as in a contiguous or channels_last
    param.)"""
    from torch.distributed.tensor import Shard
    if p.dim() == 0 or p.shape[0] == 0:
        return None
    per_row = p.numel() // p.shape[0]
    by_rows = all(type(placement) is Shard and placement.dim == 0
                  for placement in p.placements if placement.is_shard())
    if per_row % _compact.KCODE_BLOCK != 0 or (p.shape[0] > 1 and p.stride(0) != per_row) \
            or not by_rows:
        return None
    return p.shape[0], per_row // _compact.KCODE_BLOCK


def scales_shape(p):
    """The shape of the code scales of param ``p`` with 8-bit moments: (2, blocks), or for
    a DTensor param (2, rows, blocks per row) (code_rows; None when it has none)."""
    if _sharded.is_dtensor(p):
        rows = code_rows(p)
        return None if rows is None else (2,) + rows
    return (2, _compact.num_code_blocks(p.numel()))


def _scales_like(p, local):
    """The code scales of param ``p`` from their local [2, blocks] tensor: itself, or for a
    DTensor param a DTensor sharded by rows as ``p`` is (scales_shape)."""
    if not _sharded.is_dtensor(p):
        return local
    from torch.distributed.tensor import Shard
    shape = scales_shape(p)
    placements = [Shard(1) if placement.is_shard() else placement for placement in p.placements]
    return _like(p, local.view(2, _local(p).shape[0], shape[2]), shape, placements)


def _describe(t):
    return (f"{t.dtype} tensor of shape {tuple(t.shape)}" if torch.is_tensor(t)
            else f"{type(t).__name__}")


def check_state(p, state, where):
    """Refuses a state of param ``p`` that no conversion can make fit (ValueError naming
    ``where`` and the key): not a dict; not empty but lacking the step, a moment or the
    codes' scales; a tensor whose shape is not the param's; 8-bit codes that are not uint8
    or scales not float32 of their shape (scales_shape); moments whose dtypes differ; a
    whole (not DTensor) tensor beside a DTensor param. ``state`` with its codes under
    their own keys (with_key_names)."""
    if not isinstance(state, dict):
        raise ValueError(f"adamx: the state of {where} must be a dict, got "
                         f"{type(state).__name__}")
    if len(state) == 0:
        return
    if _sharded.is_dtensor(p):
        for key in CODES + (SCALES,):
            t = state.get(key)
            if torch.is_tensor(t) and not _sharded.is_dtensor(t):
                raise ValueError(
                    f"adamx: the state of {where} has 8-bit codes ({key}) as a whole tensor, "
                    "but its param is a DTensor. Whole 8-bit moments cannot be sharded on "
                    "loading (torch's broadcast sends rank 0's keys that the loading "
                    "optimizer lacks to rank 0 alone, and a whole param's code scales are "
                    "laid out per 256 elements, not per row); convert the checkpoint to "
                    "torch's layout first, adamx.to_torch_state_dict(state_dict): its "
                    "float32 moments load into any state_dtype")
    codes = CODES[0] in state or CODES[1] in state
    for key in MOMENTS if codes else ():
        if key in state:
            raise ValueError(f"adamx: the state of {where} holds both 8-bit codes and "
                             f"{key}; a state stores its moments one way")
    required = ("step",) + (CODES + (SCALES,) if codes else MOMENTS)
    for key in required:
        if key not in state:
            raise ValueError(
                f"adamx: the state of {where} has no {key!r} (it holds {sorted(state)}); a "
                "param's state is either empty or complete, and adamx does not start "
                "moments over from zero in a state that has some (torch.optim.Adam "
                "refuses it too)")
    keys = CODES if codes else MOMENTS
    for key in keys + ("max_exp_avg_sq", "master_param"):
        t = state.get(key)
        if key not in keys and t is None:
            continue
        if not torch.is_tensor(t) or t.shape != p.shape:
            raise ValueError(f"adamx: the state of {where} has {key} as a {_describe(t)}, "
                             f"but the param has shape {tuple(p.shape)}: state must have "
                             "its param's shape")
    if _sharded.is_dtensor(p):
        for key, t in state.items():
            if key != "step" and torch.is_tensor(t) and not _sharded.is_dtensor(t):
                raise ValueError(
                    f"adamx: the state of {where} has {key} as a whole tensor, but its param "
                    "is a DTensor: state must be sharded as its param (load whole "
                    "checkpoints with torch.distributed.checkpoint.state_dict."
                    "set_optimizer_state_dict)")
    first, second = state[keys[0]], state[keys[1]]
    if first.dtype != second.dtype:
        raise ValueError(f"adamx: the state of {where} has {keys[0]} in {first.dtype} but "
                         f"{keys[1]} in {second.dtype}: both moments must have one dtype")
    if codes:
        if first.dtype != torch.uint8:
            raise ValueError(f"adamx: the state of {where} holds 8-bit codes in "
                             f"{first.dtype}; they must be uint8")
        scales = state[SCALES]
        shape = scales_shape(p)
        if shape is None:
            raise ValueError(
                f"adamx: the state of {where} holds 8-bit moments, but its param, a DTensor "
                f"of shape {tuple(p.shape)} with placements {tuple(p.placements)}, cannot "
                "have them: 8-bit blocks of a DTensor param follow its rows, so a row must "
                "be a multiple of 256 elements and the param sharded by rows (Shard(0))")
        if not (torch.is_tensor(scales) and scales.dtype == torch.float32
                and tuple(scales.shape) == shape):
            raise ValueError(
                f"adamx: the state of {where} holds 8-bit moments, whose code_scales must "
                f"be a float32 tensor of shape {shape}; got {_describe(scales)}")
    elif not (first.is_floating_point() or first.is_complex()):
        raise ValueError(f"adamx: the state of {where} has moments in {first.dtype}; they "
                         "must be floating point")


def new_step(p, group, value=0.0):
    """A step count as torch.optim.Adam keeps it: on the param's device when capturable
    (or fused), else a CPU scalar."""
    if group["capturable"] or group["fused"]:
        return torch.tensor(value, dtype=torch.float32, device=p.device)
    return torch.tensor(value, dtype=_get_scalar_dtype())


def _zeros_like(p, dtype=None):
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def _laid_out_like(t, p):
    """Whether state tensor ``t`` has the strides state made for ``p`` has (its own, when
    ``p`` is dense)."""
    if t.stride() == p.stride():
        return True
    return t.stride() == torch.empty_like(p, device="meta",
                                          memory_format=torch.preserve_format).stride()


def _fits(p, state, want):
    """Whether ``state`` visibly fits ``want`` as it is (every key, the dtype, shape and
    strides of each tensor, no moments stored another way): the step's check of a state
    it made or checked before, as cheap as the C++ fast path's (a false answer sends the
    state through check_state and the conversions)."""
    if "step" not in state or want.master != ("master_param" in state):
        return False
    other = MOMENTS[0] if want.moments == "int8" else CODES[0]
    if other in state:
        return False
    dtype, shape, stride = want.dtype, p.shape, p.stride()
    for key in want.keys:
        t = state.get(key)
        if not (isinstance(t, torch.Tensor) and t.dtype == dtype and t.shape == shape
                and t.stride() == stride):
            return False
    if want.master:
        t = state["master_param"]
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32
                and t.shape == shape and t.stride() == stride):
            return False
    if want.moments == "int8":
        scales = state.get(SCALES)
        if not (isinstance(scales, torch.Tensor) and scales.dtype == torch.float32
                and tuple(scales.shape) == scales_shape(p)):
            return False
    return True


def conform(p, group, state, where, want=None, param_id=0):
    """The state param ``p`` of ``group`` steps with: ``state`` itself when it fits the
    contract (spec); a new dict when it can be made to (state made here lands in the
    optimizer only once the step or load has succeeded): a new state when ``state`` is
    empty; with master weights switched on, the moments widened to fp32 and a master copy
    that starts as the param; switched off, the moments in the param's dtype and no master
    copy; amsgrad switched on, a running maximum from zero; tensors laid out unlike the
    param copied to its layout; moments stored otherwise than the group's state_dtype asks
    decoded and encoded again (so are 8-bit codes laid out unlike the param), with the
    random bits of ``param_id`` (the param's index in its optimizer, the op's param_ids).
    Raises ValueError (check_state), having changed nothing, for a state that cannot fit."""
    want = want or spec(p, group)
    if state and _fits(p, state, want):
        return state
    if not state:
        state = {"step": new_step(p, group)}
        have, fresh = None, True
    else:
        state = with_key_names(state)
        check_state(p, state, where)
        have, fresh = stored_moments(p, state), False
    sharded = _sharded.is_dtensor(p)
    tensor_keys = want.moment_keys + (("max_exp_avg_sq",) if want.amsgrad else ()) + (
        ("master_param",) if want.master else ())
    switched = want.master != ("master_param" in state)
    recoded = fresh or have != want.moments
    relaid = not sharded and any(
        k in state and not _laid_out_like(state[k], p)
        for k in tensor_keys + ((MOMENTS if have != "int8" else CODES) if have else ()))
    missing = any(k not in state for k in tensor_keys)
    retyped = False
    if not (switched or recoded) and want.moments == "float32":
        # Float moments in another dtype than the param's state (only a state edited by
        # hand has them: loading casts them): widened exactly, never narrowed silently.
        for key in want.keys:
            t = state.get(key)
            if t is not None and t.dtype != want.dtype:
                if torch.promote_types(t.dtype, want.dtype) != want.dtype:
                    raise ValueError(f"adamx: the state of {where} has {key} in {t.dtype}, "
                                     f"but this param's state is {want.dtype}; adamx widens "
                                     "moments, it does not narrow them")
                retyped = True
    if not (switched or recoded or relaid or missing or retyped):
        return state
    state = dict(state)
    if want.master and "master_param" not in state:
        state["master_param"] = p.detach().to(torch.float32, copy=True,
                                              memory_format=torch.preserve_format)
    elif not want.master:
        state.pop("master_param", None)
    if not sharded and "master_param" in state and not _laid_out_like(state["master_param"], p):
        state["master_param"] = _zeros_like(p, torch.float32).copy_(state["master_param"])
    codes_relaid = have == "int8" and any(not sharded and not _laid_out_like(state[k], p)
                                          for k in CODES)
    if want.moments == "int8":
        if recoded or codes_relaid:
            # Rounded with the random bits the step would draw for this param (its id,
            # param_id: its index in the optimizer).
            key = _compact.moment_key(_compact.rounding_key(
                _seed(group["seed"]), param_id, float(state["step"])))
            offset = _sharded.element_offset(p)
            rows = []
            for which, name in enumerate(CODES):
                x = _zeros_like(p, torch.float32)
                if not fresh:
                    x.copy_(moment_float(state, which))
                codes, row = _compact.encode_codes(_local(x), which == 0, key, offset)
                state[name] = _like(p, codes)
                rows.append(row)
            for name in MOMENTS:
                state.pop(name, None)
            state[SCALES] = _scales_like(p, torch.stack(rows))
        return state
    dtype = want.dtype
    for which, name in enumerate(MOMENTS):
        if fresh:
            state[name] = _zeros_like(p, dtype)
        elif recoded:
            state[name] = _zeros_like(p, dtype).copy_(moment_float(state, which))
        elif state[name].dtype != dtype:
            state[name] = state[name].to(dtype)
        if not sharded and not _laid_out_like(state[name], p):
            state[name] = _zeros_like(p, dtype).copy_(state[name])
    if want.amsgrad:
        if "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = _zeros_like(p, dtype)
        elif state["max_exp_avg_sq"].dtype != dtype:
            state["max_exp_avg_sq"] = state["max_exp_avg_sq"].to(dtype)
        if not sharded and not _laid_out_like(state["max_exp_avg_sq"], p):
            state["max_exp_avg_sq"] = _zeros_like(p, dtype).copy_(state["max_exp_avg_sq"])
    for name in CODES + (SCALES,):
        state.pop(name, None)
    return state
