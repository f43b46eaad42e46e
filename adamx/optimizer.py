"""adamx.Adam and adamx.AdamW: drop-in replacements for torch.optim.Adam / AdamW."""

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor
from torch.optim.optimizer import (Optimizer, _get_scalar_dtype, _global_optimizer_post_hooks,
                                   _global_optimizer_pre_hooks)

from . import _clip, _compact, _ops, _sharded
from .functional import _seed, op_kwargs

__all__ = ["Adam", "AdamW", "state_bytes", "to_torch_state_dict", "COMPACT_MIN_NUMEL"]

# torch.optim.Adam's group keys that adamx reads or keeps, and adamx's own, with their
# defaults (the switches, e.g. amsgrad, come from adamx._C.SWITCHES, default False; a
# group's "seed" defaults to its index).
_GROUP_DEFAULTS = dict(foreach=None, capturable=False, differentiable=False, fused=None,
                       master_weights=False, state_dtype="float32")
_REDUCED = (torch.float16, torch.bfloat16)
# adamx's switches that torch.optim.Adam lacks, and its other group keys: state_dict leaves
# them out where they hold their defaults (see Adam.state_dict).
_ADAMX_ONLY_KEYS = tuple(sorted(set(_ops._C.SWITCHES if _ops._C else ())
                                - set(inspect.signature(torch.optim.Adam).parameters)))


# How moments may be stored (a group's "state_dtype"), and the smallest param that gets
# compact moments: smaller ones keep float32 state (as bitsandbytes' 8-bit optimizers keep
# params under 4096 elements), where the savings are small and the precision is worth more.
STATE_DTYPES = ("float32", "bfloat16", "int8")
COMPACT_MIN_NUMEL = 4096
_STATE_DTYPE_ALIASES = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                        torch.int8: "int8", torch.uint8: "int8"}


def _state_dtype(value):
    """A group's state_dtype as one of STATE_DTYPES (a string, or a torch dtype)."""
    name = _STATE_DTYPE_ALIASES.get(value, value)
    if name not in STATE_DTYPES:
        raise ValueError(f"adamx: state_dtype must be one of {list(STATE_DTYPES)}, got "
                         f"{value!r}")
    return name


def _check_state_dtype(group):
    """The settings compact moments do not combine with, refused when a group is added."""
    name = group["state_dtype"] = _state_dtype(group.get("state_dtype", "float32"))
    if name == "float32":
        return
    if group.get("amsgrad"):
        raise ValueError(f"adamx: state_dtype={name!r} does not combine with amsgrad=True "
                         "(its running maximum needs float32 state)")
    for p in group["params"]:
        _moments_kind(p, group)


def _dense(t):
    """Whether ``t`` covers its memory without gaps or overlaps (any order of dims)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _moments_kind(p, group):
    """How param ``p`` of ``group`` stores its moments: "float32" (torch's layout: the
    param's dtype, or float32 beside a master copy), "bfloat16" or "int8". Params with
    fewer than COMPACT_MIN_NUMEL elements, float64/float16 params and DTensors keep
    torch's layout."""
    want = group["state_dtype"]
    if (want == "float32" or p.numel() < COMPACT_MIN_NUMEL
            or p.dtype not in (torch.float32, torch.bfloat16)):
        return "float32"
    if _sharded.is_dtensor(p):
        raise NotImplementedError(
            f"adamx: state_dtype={want!r} is not implemented for DTensor (FSDP2, tensor "
            "parallel) params yet; use state_dtype='float32' for them")
    if want == "bfloat16" and p.dtype == torch.bfloat16 and not _has_master(p, group):
        raise ValueError(
            "adamx: state_dtype='bfloat16' for bfloat16 params needs master_weights=True "
            "(bfloat16 moments beside fp32 master copies): without master copies, bfloat16 "
            "params keep torch's bfloat16 moments rounded to nearest. Or use "
            "state_dtype='int8'")
    if want == "int8" and not _dense(p):
        return "float32"  # 8-bit blocks are runs of memory: a strided view keeps float32
    return want


def _stored_kind(p, state):
    """How ``state`` holds its moments now (as _moments_kind names it)."""
    dtype = state["exp_avg"].dtype
    if dtype == torch.uint8:
        return "int8"
    if dtype == torch.bfloat16 and (p.dtype == torch.float32 or "master_param" in state):
        return "bfloat16"
    return "float32"


def _moment_float(state, key):
    """Moment ``key`` of ``state`` decoded to float32 (from any storage)."""
    value = _local(state[key])
    if value.dtype == torch.uint8:
        row = 0 if key == "exp_avg" else 1
        return _compact.decode_codes(value, state["code_scales"][row], signed=row == 0)
    return value.float()


def _saved_compact(p, saved):
    """Whether a checkpoint's state of param ``p`` holds compact moments."""
    return torch.is_tensor(saved.get("exp_avg")) and _stored_kind(p, saved) != "float32"


def _check_saved_moments(p, key, saved):
    """Refuses a checkpoint's compact moments that do not fit param ``p`` (before
    load_state_dict changes anything)."""
    if not _saved_compact(p, saved):
        return
    m, v = saved.get("exp_avg"), saved.get("exp_avg_sq")
    where = f"adamx: the checkpoint's state of param {key}"
    if not torch.is_tensor(v) or v.dtype != m.dtype:
        raise ValueError(f"{where} has exp_avg in {m.dtype} but exp_avg_sq in "
                         f"{getattr(v, 'dtype', type(v).__name__)}")
    for name, t in (("exp_avg", m), ("exp_avg_sq", v)):
        if t.shape != p.shape:
            raise ValueError(f"{where} has {name} of shape {tuple(t.shape)} but the param "
                             f"has shape {tuple(p.shape)}")
    if m.dtype == torch.uint8:
        scales = saved.get("code_scales")
        blocks = _compact.num_code_blocks(p.numel())
        if not (torch.is_tensor(scales) and scales.dtype == torch.float32
                and tuple(scales.shape) == (2, blocks)):
            raise ValueError(
                f"{where} holds 8-bit moments, whose code_scales must be a float32 tensor of "
                f"shape (2, {blocks}); got "
                f"{tuple(scales.shape) if torch.is_tensor(scales) else scales!r}")


def _has_master(p, group):
    """Whether param ``p`` of ``group`` steps with an fp32 master copy (and fp32 state)."""
    return group["master_weights"] and p.dtype in _REDUCED


def _local(t):
    """A DTensor's local tensor (a sharded param's shard), else ``t``."""
    return getattr(t, "_local_tensor", t)


def _zeros_like(p, dtype=None):
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def _fast_hooks(step):
    """Wraps ``step`` like torch.optim.Optimizer's profile_hook_step (step hooks and a
    profiler range) while any hook or the profiler is active, and calls it bare otherwise:
    the profiler range alone costs about as much as a small model's whole update."""
    hooked = Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _global_optimizer_pre_hooks or _global_optimizer_post_hooks
                or torch.autograd.profiler._is_profiler_enabled):
            return hooked(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        return out

    wrapper.hooked = True  # tells Optimizer.__init__ not to wrap it again
    return wrapper


class Adam(Optimizer):
    r"""Adam with a fused step: one compiled pass over memory per step (CPU: SIMD,
    multithreaded; CUDA: one launch per device and dtype).

    Same arguments, defaults, numbers and ``state_dict`` as ``torch.optim.Adam``, plus
    ``eps_inside_sqrt``: ``True`` puts eps inside the square root,
    ``p -= lr * m_hat / sqrt(v_hat + eps)``, as the tutorial loop
    ``adamx.reference.seed_adam`` does, instead of ``sqrt(v_hat) + eps``.

    ``foreach`` and ``fused`` are accepted for compatibility and ignored: every step is
    fused. ``differentiable=True`` is not supported. ``capturable`` keeps step counts on
    the params' device so that a CUDA step can be captured in a graph.

    With ``torch.amp.GradScaler`` the step unscales the grads itself, in the same pass, as
    torch's fused Adam does (``GradScaler.step`` hands it ``grad_scale`` and ``found_inf``;
    see docs/mixed-precision.md).

    For float16/bfloat16 params (see docs/mixed-precision.md):

    - ``master_weights=True`` keeps an fp32 copy of each such param in its state
      (``state[p]["master_param"]``, saved by ``state_dict``) with fp32 moments; the step
      updates the copy and sets the param to its rounding, in the same pass. The param is
      the truth: where it is not its copy's rounding at a step (written since: edited in
      place, loaded, cast to float32 and back), the copy restarts from it in that pass.
      Loading a checkpoint without master copies (e.g. torch.optim.Adam's) starts them
      from the params. Other params step as usual.
    - ``stochastic_rounding=True`` (bfloat16 params without master copies) rounds each new
      param to one of its two bfloat16 neighbours at random, in proportion to their
      nearness, so small updates are not lost on average. The random bits are a hash of
      (the group's ``seed``, the param's position among the group's params with grads,
      its step count, the element), so steps are reproducible on any thread count, CPU or
      GPU. ``seed`` defaults to the group's index.

    ``state_dtype`` (per group) stores the moments of float32 and bfloat16 params with at
    least COMPACT_MIN_NUMEL (4096) elements in fewer bytes, updated in the same one pass
    (see docs/lean-state.md): ``"float32"`` (default; torch's layout),
    ``"bfloat16"`` (4 bytes per param instead of 8; bfloat16 params need
    ``master_weights=True``) or ``"int8"`` (8-bit codes with a float32 scale per 256
    elements: 2.03 bytes per param). Both round stochastically (keyed by ``seed``), so the
    moments do not stall. Not with amsgrad. ``state_dict`` holds the compact tensors (and
    ``code_scales`` for int8); ``adamx.to_torch_state_dict`` converts one to torch's
    layout, and loading a torch checkpoint encodes it. ``adamx.state_bytes`` reports the
    memory.
    """

    # GradScaler.step sets self.grad_scale and self.found_inf for the step and deletes them
    # after; step() takes no grad_scaler argument (GradScaler would pass itself instead).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        eps_inside_sqrt: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        state_dtype="float32",
    ):
        # The checks and messages of torch.optim.Adam.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if differentiable:
            raise RuntimeError(
                "adamx does not support differentiable=True: its fused kernel updates params "
                "in place outside autograd. Use torch.optim.Adam(differentiable=True).")
        if master_weights and stochastic_rounding:
            raise ValueError(
                "adamx: master_weights=True and stochastic_rounding=True exclude each other: "
                "with a master copy each param is its master's rounding to nearest")
        betas = tuple(float(b) if isinstance(b, Tensor) else b for b in betas)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, eps_inside_sqrt=eps_inside_sqrt,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding,
            seed=seed, state_dtype=_state_dtype(state_dtype),
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        # Each group's own stream of stochastic-rounding bits: its seed (given, or the
        # optimizer's, else 0) plus its index.
        if param_group.get("seed") is None:
            base = self.defaults.get("seed") or 0
            param_group = dict(param_group, seed=base + len(self.param_groups))
        _seed(param_group["seed"])  # an int
        super().add_param_group(param_group)
        _check_state_dtype(self.param_groups[-1])

    def __setstate__(self, state):
        # Also what load_state_dict ends with: groups from a torch.optim.Adam checkpoint
        # lack adamx's own keys, and old checkpoints may hold steps as numbers.
        super().__setstate__(state)
        defaults = dict(_GROUP_DEFAULTS, **dict.fromkeys(_ops._C.SWITCHES if _ops._C else (),
                                                         False))
        for index, group in enumerate(self.param_groups):
            for key, value in defaults.items():
                group.setdefault(key, value)
            if group.get("seed") is None:
                group["seed"] = index
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = self._new_step(p, group, float(p_state["step"]))

    def state_dict(self):
        """torch's ``state_dict``, less adamx's own group keys where they hold their
        defaults (``eps_inside_sqrt``, ``stochastic_rounding``, ``master_weights``: False;
        ``seed``: the group's index): torch.optim.Adam's layout exactly, which
        torch.distributed.checkpoint needs to load a torch checkpoint into adamx (its load
        plan asks the checkpoint for every key the destination's state_dict has). Loading
        keeps the optimizer's own value of a key the checkpoint lacks (``load_state_dict``).
        """
        state_dict = super().state_dict()
        for index, group in enumerate(state_dict["param_groups"]):
            for key in _ADAMX_ONLY_KEYS + ("master_weights",):
                if group.get(key, True) is False:
                    del group[key]
            if group.get("state_dtype") == "float32":
                del group["state_dtype"]
            if group.get("seed") == index:
                del group["seed"]
        return state_dict

    def load_state_dict(self, state_dict):
        """As torch.optim.Optimizer.load_state_dict, and: a group setting the checkpoint
        lacks (adamx's own, e.g. ``master_weights``, in a torch.optim.Adam checkpoint) keeps
        this optimizer's value; master copies, fp32 moments of float16/bfloat16 params and
        compact moments keep their dtypes (torch casts every state tensor to its param's
        dtype); master copies missing from the checkpoint (or not fp32 copies of their
        param's shape) start from the params, and the others are kept even where they do
        not round to the param as it is now (the step decides: see the class docstring);
        moments stored otherwise than the group's state_dtype asks are converted (a torch.optim.Adam checkpoint loaded with
        state_dtype="int8" is encoded). A checkpoint whose compact moments do not fit their
        params is refused before anything changes."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            state_dict = dict(state_dict, param_groups=[
                {**{k: v for k, v in group.items() if k != "params"}, **saved}
                for group, saved in zip(self.param_groups, saved_groups)])
            for group, saved in zip(self.param_groups, state_dict["param_groups"]):
                for p, key in zip(group["params"], saved["params"]):
                    _check_saved_moments(p, key, state_dict["state"].get(key, {}))
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group["state_dtype"] = _state_dtype(group.get("state_dtype", "float32"))
            for p, key in zip(group["params"], saved["params"]):
                state = self.state.get(p)
                if not state:
                    continue
                original = saved_state.get(key, {})
                # Tensors to take from the checkpoint as they are (compact moments), or
                # as float32 (beside a master copy), rather than cast to the param's dtype.
                keep = dict.fromkeys(("exp_avg", "exp_avg_sq", "code_scales")) \
                    if _saved_compact(p, original) else {}
                if _has_master(p, group):
                    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
                        keep.setdefault(k, torch.float32)
                for k, dtype in keep.items():
                    if torch.is_tensor(original.get(k)):
                        state[k] = original[k].to(device=p.device, dtype=dtype, copy=True)
                if _has_master(p, group):
                    # A saved fp32 copy of the param's shape is kept whatever the param
                    # holds now: the model may be loaded next (torch's set_state_dict loads
                    # it after the optimizer), and the step restarts the copy from the
                    # param wherever the param is not its rounding then (master_to_update
                    # in csrc/adam_math.h). Any other (one that torch.optim.Adam carried
                    # along and cast) starts from the param.
                    master = original.get("master_param")
                    if not (torch.is_tensor(master) and master.dtype == torch.float32
                            and master.shape == p.shape):
                        state.pop("master_param", None)
                self.state[p] = self._conform(p, group, state)

    @staticmethod
    def _new_step(p, group, value=0.0):
        # As torch.optim.Adam: on the param's device when capturable (or fused), else CPU.
        if group["capturable"] or group["fused"]:
            return torch.tensor(value, dtype=torch.float32, device=p.device)
        return torch.tensor(value, dtype=_get_scalar_dtype())

    def _new_state(self, p, group):
        state = {"step": self._new_step(p, group)}
        return self._conform(p, group, state)

    @staticmethod
    def _conform(p, group, state):
        """``state`` itself when it fits the group's settings, else a new dict that does
        (state the step makes or converts lands in the optimizer only once the step has
        succeeded): the moments it lacks (all, or max_exp_avg_sq when amsgrad is switched
        on) as zeros; with master weights switched on, the moments widened to fp32 and a
        master copy that starts as the param; switched off, the moments in the param's
        dtype and no master copy; moments stored as the group's state_dtype asks (decoded
        and encoded again when it changed, e.g. after loading a torch.optim.Adam
        checkpoint into a compact optimizer)."""
        master = _has_master(p, group)
        kind = _moments_kind(p, group)
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        switched = master != ("master_param" in state)
        recoded = "exp_avg" in state and _stored_kind(p, state) != kind
        if not switched and not recoded and all(k in state for k in keys):
            return state
        state = dict(state)
        if master and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True,
                                                  memory_format=torch.preserve_format)
        elif not master:
            state.pop("master_param", None)
        moments = ("exp_avg", "exp_avg_sq")
        if kind == "int8":
            if recoded or not all(k in state for k in moments + ("code_scales",)):
                key = _compact.moment_key(_compact.rounding_key(
                    _seed(group["seed"]), 0, float(state["step"])))
                rows = []
                for which, k in enumerate(moments):
                    x = _zeros_like(p, torch.float32)
                    if k in state:
                        x.copy_(_moment_float(state, k))
                    state[k], row = _compact.encode_codes(x, which == 0, key)
                    rows.append(row)
                state["code_scales"] = torch.stack(rows)
            return state
        dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32 if master else p.dtype
        for k in keys:
            if k not in state:
                state[k] = _zeros_like(p, dtype)
            elif recoded and k in moments:
                state[k] = _zeros_like(p, dtype).copy_(_moment_float(state, k))
            elif switched or recoded:
                state[k] = state[k].to(dtype)
        state.pop("code_scales", None)
        return state

    def _gather(self, group, fresh):
        """The op calls for one group, as (tensor lists, master_params or None, code_scales
        or None): one or two (params with master copies apart) per round. A param listed
        k times in the group (torch warns) is stepped k times, in round 1, ..., k, as
        torch's loop steps it. New or converted state goes into ``fresh``, which the step
        adds to ``self.state`` only once every update has succeeded."""
        rounds = []
        seen = {}
        amsgrad = group["amsgrad"]
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            k = seen[p] = seen.get(p, -1) + 1
            if k == len(rounds):
                rounds.append({})
            state = fresh.get(p) or self.state.get(p)
            state = self._conform(p, group, state) if state else self._new_state(p, group)
            if state is not self.state.get(p):
                fresh[p] = state
            master = "master_param" in state
            lists = rounds[k].setdefault(master, ([], [], [], [], [], [], [], []))
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masters, scales = lists
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
            if master:
                masters.append(state["master_param"])
            scales.append(state.get("code_scales"))
        return [(calls[master][:6], calls[master][6] if master else None,
                 self._code_scales(calls[master][7]))
                for calls in rounds for master in (False, True) if master in calls]

    @staticmethod
    def _code_scales(scales):
        """The op's code_scales: None when no param has 8-bit moments, else one tensor per
        param (an empty one where a param has none)."""
        present = [s for s in scales if s is not None]
        if len(present) == 0:
            return None
        empty = present[0].new_empty(0)
        return [empty if s is None else s for s in scales]

    @staticmethod
    def _hyper(group):
        values = {key: group[key] for key in _ops._C.GROUP_KEYS}
        beta1, beta2 = values.pop("betas")
        return dict(op_kwargs(beta1=beta1, beta2=beta2, **values), seed=_seed(group["seed"]))

    def _check_capturable(self):
        """As torch.optim.Adam (but for fused=True): capturable=True needs params on a
        device whose steps can be captured in a graph, which the CPU is not. (Not checked
        while torch.compile traces a step: it sets capturable itself, as torch does.)"""
        if torch.compiler.is_compiling():
            return
        for group in self.param_groups:
            if not group["capturable"] or group["fused"]:
                continue
            for p in group["params"]:
                if p.grad is not None and p.device.type == "cpu":
                    raise AssertionError(
                        "adamx: If capturable=True, params and state_steps must be on "
                        "supported devices: ['cuda'] (a param is on the CPU; use "
                        "capturable=False there)")

    @_fast_hooks
    def step(self, closure=None):
        """Performs a single optimization step.

        Every group's inputs are checked before any tensor is written: a step that raises
        leaves params and state exactly as they were.
        """
        _ops.require_compiled()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_capturable()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        clip = self.__dict__.get("_clip_divisor")  # a pending clip_grad_norm_
        if clip is not None:
            grad_scale = clip if grad_scale is None else grad_scale * clip
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if torch.compiler.is_compiling() or not self._step_fast(grad_scale, found_inf):
                self._step_lists(grad_scale, found_inf)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        self.__dict__.pop("_clip_divisor", None)
        return loss

    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False,
                        foreach=None, *, grad_scaler=None):
        """Clips the grads of this optimizer's params by their global norm, as
        ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite,
        foreach)`` does, and returns the same total norm (a tensor), but without a pass
        over the grads to scale them: the next ``step()`` applies the clip factor
        ``min(max_norm / (norm + 1e-6), 1)`` in its own pass. Call it between
        ``backward()`` and ``step()``; until the step, ``.grad`` holds the unclipped grads,
        and after it the clipped ones (the step writes them back, as torch's clip leaves
        them).

        With ``torch.amp.GradScaler``, pass it as ``grad_scaler`` instead of calling
        ``scaler.unscale_(opt)`` first: the norm returned is the unscaled grads' (as
        torch's loop gives), and ``scaler.step(opt)`` then unscales and clips in the one
        pass, skipping the step if a grad is inf or NaN. DTensor (FSDP2) or multi-device
        grads take torch's own clip (see adamx/_clip.py)."""
        return _clip.clip_grad_norm_(self, max_norm, norm_type, error_if_nonfinite, foreach,
                                     grad_scaler)

    def _step_fast(self, grad_scale, found_inf):
        """The step through adamx._C.step_group, which reads each group's params, grads
        and state in C++. Returns False, having written nothing, when it leaves a group to
        _step_lists (a param needs its state made, is listed twice, or is a DTensor)."""
        step_group, groups, state = _ops._C.step_group, self.param_groups, self.state
        not_handled = _ops._C.NOT_HANDLED
        if len(groups) == 1:
            return step_group(groups[0], state, False, grad_scale, found_inf) != not_handled
        for group in groups:  # several groups: check them all before updating any
            if step_group(group, state, True, grad_scale, found_inf) == not_handled:
                return False
        for group in groups:
            step_group(group, state, False, grad_scale, found_inf)
        return True

    def _step_lists(self, grad_scale, found_inf):
        """The step through torch.ops.adamx.adam_ with explicit lists; makes new state."""
        fresh = {}
        calls = []
        sharded = []  # DTensors whose local tensors the step writes (adamx/_sharded.py)
        for group in self.param_groups:
            group_calls = self._gather(group, fresh)
            if len(group_calls) > 0:  # (len: Dynamo of torch 2.11 cannot trace bool(list))
                hyper = dict(self._hyper(group), grad_scale=grad_scale, found_inf=found_inf)
                for lists, masters, scales in group_calls:
                    lists, masters, dtensors = _sharded.local_lists(lists, masters)
                    calls.append((lists, dict(hyper, master_params=masters,
                                              code_scales=scales)))
                    sharded += dtensors
        if len(calls) > 1:  # one call checks itself before writing; several check first
            for lists, hyper in calls:
                torch.ops.adamx.adam_check(*lists, **hyper)
        for lists, hyper in calls:
            torch.ops.adamx.adam_(*lists, **hyper)
        if len(sharded) > 0:
            torch.autograd.graph.increment_version(sharded)
        self.state.update(fresh)


def state_bytes(optimizer):
    """The memory an optimizer's state takes, as a dict: ``bytes`` (every state tensor:
    moments, 8-bit codes' scales, master copies, amsgrad's maxima, step counts),
    ``moment_bytes`` (exp_avg and exp_avg_sq with their scales), ``params`` (elements of the
    params that have state) and ``moment_bytes_per_param``: 8 for float32 moments, 4 for
    bfloat16, 2 + 8/256 for 8-bit codes (less where small params keep float32)."""
    total = moments = params = 0
    for p, state in optimizer.state.items():
        params += p.numel()
        for k, t in state.items():
            if torch.is_tensor(t):
                size = t.numel() * t.element_size()
                total += size
                if k in ("exp_avg", "exp_avg_sq", "code_scales"):
                    moments += size
    return dict(bytes=total, moment_bytes=moments, params=params,
                moment_bytes_per_param=moments / params if params else 0.0)


def to_torch_state_dict(state_dict):
    """An adamx ``state_dict`` in torch.optim.Adam's layout: compact moments decoded to
    float32 (``code_scales`` dropped), ``state_dtype`` dropped from the groups; other
    entries as they are (a new dict; the tensors of float32 state are shared)."""
    state = {}
    for key, s in state_dict["state"].items():
        s = dict(s)
        m = s.get("exp_avg")
        # bfloat16 moments too (torch casts float32 moments back to a bfloat16 param's dtype
        # on loading).
        if torch.is_tensor(m) and m.dtype in (torch.uint8, torch.bfloat16):
            s["exp_avg"], s["exp_avg_sq"] = (_moment_float(s, k) for k in ("exp_avg", "exp_avg_sq"))
            s.pop("code_scales", None)
        state[key] = s
    groups = [{k: v for k, v in g.items() if k != "state_dtype"}
              for g in state_dict["param_groups"]]
    return dict(state_dict, state=state, param_groups=groups)


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay, defaults as ``torch.optim.AdamW``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize: bool = False, foreach: Optional[bool] = None,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, eps_inside_sqrt: bool = False,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 seed: Optional[int] = None, state_dtype="float32"):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, eps_inside_sqrt=eps_inside_sqrt,
                         master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, seed=seed,
                         state_dtype=state_dtype)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
