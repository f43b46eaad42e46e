"""adamx.Adam and adamx.AdamW: drop-in replacements for torch.optim.Adam / AdamW."""

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor
from torch.optim.optimizer import (Optimizer, _get_scalar_dtype, _global_optimizer_post_hooks,
                                   _global_optimizer_pre_hooks)

from . import _clip, _compact, _ops, _sharded, _state
from ._state import COMPACT_MIN_NUMEL, STATE_DTYPES
from .functional import _seed, op_kwargs

__all__ = ["Adam", "AdamW", "state_bytes", "to_torch_state_dict", "COMPACT_MIN_NUMEL"]

# torch.optim.Adam's group keys that adamx reads or keeps, and adamx's own, with their
# defaults (the switches, e.g. amsgrad, come from adamx._C.SWITCHES, default False; a
# group's "seed": see _SEED_DEFAULT).
_GROUP_DEFAULTS = dict(foreach=None, capturable=False, differentiable=False, fused=None,
                       master_weights=False, state_dtype="float32")
# The group key that records a seed nobody gave to a group that draws no random bits (the
# group's index when it was added): state_dict leaves such a seed out, and itself, so that
# its groups have torch's keys. A group that does draw them (stochastic_rounding, compact
# moments) and was given no seed gets one drawn from torch's default generator (_draw_seed),
# which state_dict keeps.
_SEED_DEFAULT = "_default_seed"


def _uses_noise(options):
    """Whether a group's step draws random bits: stochastic rounding of bfloat16 params, or
    compact moments (bfloat16 or 8-bit, rounded stochastically)."""
    return bool(options.get("stochastic_rounding")) or \
        options.get("state_dtype", "float32") != "float32"


def _group_seed(base, index):
    """The seed of group ``index`` of an optimizer given ``seed=base``: ``base`` itself for
    the first group, a hash of both for the others. (``base + index`` would give
    ``seed=s + 1``'s first group the stream of ``seed=s``'s second.)"""
    if index == 0:
        return base
    return _seed(_compact.mix64(base ^ _compact.mix64(index)))


def _draw_seed():
    """A seed from torch's default CPU generator (one draw): every run and optimizer gets
    a stream of its own, which torch.manual_seed reproduces."""
    return int(torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64))


# adamx's switches that torch.optim.Adam lacks, and its other group keys: state_dict leaves
# them out where they hold their defaults (see Adam.state_dict).
_ADAMX_ONLY_KEYS = tuple(sorted(set(_ops._C.SWITCHES if _ops._C else ())
                                - set(inspect.signature(torch.optim.Adam).parameters)))
# Every group key of adamx's own (those a torch.optim.Adam checkpoint lacks): the settings
# that every rank of a sharded model loads alike (load_state_dict).
_OWN_KEYS = _ADAMX_ONLY_KEYS + ("master_weights", "state_dtype", "seed", _SEED_DEFAULT)


def _moment_float(state, key):
    """Moment ``key`` ("exp_avg" or "exp_avg_sq") of ``state`` as float32, from any
    storage."""
    return _state.moment_float(state, _state.MOMENTS.index(key))


def _local(t):
    """A DTensor's local tensor (a sharded param's shard), else ``t``."""
    return getattr(t, "_local_tensor", t)


def _group_tensors(params):
    """The tensors among a group's ``params`` (a list; (name, tensor) pairs for named
    params); torch's add_param_group refuses anything else."""
    if not isinstance(params, list):
        return []
    items = (x[1] if isinstance(x, tuple) and len(x) == 2 else x for x in params)
    return [t for t in items if isinstance(t, Tensor)]


def _index(group, p):
    """The position of ``p`` among ``group``'s params (for messages)."""
    return next(i for i, t in enumerate(_group_tensors(group["params"])) if t is p)


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
      (the group's ``seed``, the param's index in the optimizer, its step count, the
      element's index in the whole param, also under FSDP2), so steps are reproducible on
      any thread count, CPU or GPU, and no two params share a stream. With ``seed``
      given here, the first group uses it and each other group a hash of it and the
      group's index. A group given no ``seed`` at all that draws random bits
      (``stochastic_rounding`` or a compact ``state_dtype``) gets one drawn from torch's
      default generator when it is added (with DTensor params, the first rank's draw on
      every rank of their meshes: a collective), so runs and optimizers draw streams of
      their own and ``torch.manual_seed`` reproduces them; ``state_dict`` keeps it, so a
      resumed run draws the same bits. Other groups draw nothing from torch's generator
      (as torch.optim.Adam) and their seed, the group's index, is left out of
      ``state_dict``, as torch has no such key.

    ``state_dtype`` (per group) stores the moments of float32 and bfloat16 params with at
    least COMPACT_MIN_NUMEL (4096) elements in fewer bytes, updated in the same one pass
    (see docs/lean-state.md): ``"float32"`` (default; torch's layout),
    ``"bfloat16"`` (4 bytes per param instead of 8; bfloat16 params need
    ``master_weights=True``) or ``"int8"`` (8-bit codes with a float32 scale per 256
    elements: 2.03 bytes per param). Both round stochastically (keyed by ``seed``), so the
    moments do not stall. Not with amsgrad. ``state_dict`` holds the compact tensors
    (int8: ``exp_avg_codes``, ``exp_avg_sq_codes`` and ``code_scales``, keys that
    torch.optim.Adam cannot mistake for moments); ``adamx.to_torch_state_dict`` converts
    one to torch's layout, and loading a torch checkpoint encodes it.
    ``adamx.state_bytes`` reports the memory.

    Every param's state is checked against one contract (adamx/_state.py) by the step,
    ``load_state_dict`` and ``add_param_group``: converted where that is exact or a
    documented re-encoding, else refused before anything changes.
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
        if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
            # As torch.optim.Adam; numbers of any type (ints, numpy scalars) stay numbers.
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, Tensor) and beta.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")
        # Tensor betas stay Tensors in the group, as torch keeps them (0-d, as its
        # _to_scalar makes them); the step reads them as numbers.
        betas = tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b
                      for b in betas)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, eps_inside_sqrt=eps_inside_sqrt,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding,
            seed=seed, state_dtype=_state.state_dtype_name(state_dtype),
        )
        # A switch of the module that has no keyword above yet (one being added) is a group
        # key too, False by default (a group may set it: add_param_group, param_groups).
        for name in _ops._C.SWITCHES if _ops._C else ():
            defaults.setdefault(name, False)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        """As torch.optim.Optimizer.add_param_group; the group's options and its params'
        state are checked against the state contract (adamx/_state.py) before the group is
        added: a group that raises leaves the optimizer as it was."""
        if isinstance(param_group, dict):
            param_group = dict(param_group)
            params = param_group.get("params")
            if isinstance(params, Tensor):
                param_group["params"] = [params]
            elif params is not None and not isinstance(params, set):
                param_group["params"] = list(params)  # (an iterator is read once, here)
            # Each group's own stream of stochastic-rounding bits: its seed, given, or the
            # optimizer's mixed with the group's index (_group_seed). A group given none
            # that draws random bits gets one drawn from torch's default generator (kept in
            # state_dict, so that a resumed run draws the same bits); one that draws none
            # gets its index, recorded as the default, which state_dict leaves out (torch's
            # layout exactly), and torch's random stream is left alone, as torch.optim.Adam
            # leaves it.
            options = {**self.defaults, **param_group}
            name = _state.check_group(options)
            if param_group.get("seed") is None:
                base = self.defaults.get("seed")
                if base is not None:
                    param_group["seed"] = _group_seed(base, len(self.param_groups))
                elif _uses_noise(dict(options, state_dtype=name)):
                    # (DTensor params: every rank takes the first rank's draw, so that
                    # replicas round alike whatever seed each rank's torch was given)
                    param_group["seed"] = _sharded.first_ranks_value(
                        _group_tensors(param_group.get("params")), _draw_seed())
                else:
                    param_group["seed"] = param_group[_SEED_DEFAULT] = len(self.param_groups)
            _seed(param_group["seed"])  # an int
            options = {**self.defaults, **param_group}
            for p in _group_tensors(param_group.get("params")):
                _state.spec(p, options, name)
                if self.state.get(p):
                    where = f"param {len(self.param_groups)}.{_index(param_group, p)}"
                    _state.conform(p, options, self.state[p], where)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["state_dtype"] = _state.state_dtype_name(group["state_dtype"])

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
                group["seed"] = group[_SEED_DEFAULT] = index
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and not torch.is_tensor(p_state.get("step", 0.0)):
                    p_state["step"] = _state.new_step(p, group, float(p_state["step"]))

    def state_dict(self):
        """torch's ``state_dict``, less adamx's own group keys where they hold their
        defaults (``eps_inside_sqrt``, ``stochastic_rounding``, ``master_weights``: False;
        ``state_dtype``: "float32"; ``seed``: when none was given): torch.optim.Adam's
        layout exactly, which torch.distributed.checkpoint needs to load a torch
        checkpoint into adamx (its load plan asks the checkpoint for every key the
        destination's state_dict has). Loading keeps the optimizer's own value of a key
        the checkpoint lacks (``load_state_dict``).
        """
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            for key in _ADAMX_ONLY_KEYS + ("master_weights",):
                if group.get(key, True) is False:
                    del group[key]
            if group.get("state_dtype") == "float32":
                del group["state_dtype"]
            default_seed = group.pop(_SEED_DEFAULT, None)
            if default_seed is not None and group.get("seed") == default_seed:
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
        every param's state is then made to fit the state contract (adamx/_state.py): laid
        out as its param, moments stored otherwise than the group's state_dtype asks
        converted (a torch.optim.Adam checkpoint loaded with state_dtype="int8" is
        encoded). Everything is checked before anything changes: a checkpoint that does not
        fit (a missing moment, a shape that is not the param's, 8-bit codes without their
        scales, an unknown state_dtype) raises a ValueError and leaves the optimizer as it
        was."""
        saved_groups = state_dict["param_groups"]
        saved_state = {key: _state.with_key_names(s) for key, s in state_dict["state"].items()}
        state_dict = dict(state_dict, state=saved_state)
        fits = len(saved_groups) == len(self.param_groups) and all(
            len(g["params"]) == len(s["params"]) for g, s in zip(self.param_groups, saved_groups))
        merged = [{**{k: v for k, v in group.items() if k != "params"}, **saved}
                  for group, saved in zip(self.param_groups, saved_groups)]
        if fits:
            self._drop_whole_masters(saved_state, saved_groups)

        def check(settings):
            # (as torch's load_state_dict would, but before anything changes)
            if len(saved_groups) != len(self.param_groups):
                raise ValueError("loaded state dict has a different number of parameter "
                                 "groups")
            if not fits:
                raise ValueError("loaded state dict contains a parameter group that doesn't "
                                 "match the size of optimizer's group")
            for saved, own in zip(merged, settings):
                for key in _OWN_KEYS:
                    saved.pop(key, None)
                saved.update(own)
            for group, saved in zip(self.param_groups, merged):
                name = _state.check_group(saved)
                for p, key in zip(group["params"], saved["params"]):
                    try:
                        _state.spec(p, saved, name)
                    except NotImplementedError as exc:
                        raise NotImplementedError(
                            f"{exc}; a checkpoint with compact moments loads into them "
                            "converted to torch's layout: adamx.to_torch_state_dict(state_dict)"
                        ) from None
                    _state.check_state(p, saved_state.get(key, {}), f"param {key}")

        # Every rank of a sharded model loads the same group settings, or every rank
        # raises (adamx/_sharded.py's agreed).
        _sharded.agreed([p for g in self.param_groups for p in g["params"]],
                        [{k: g[k] for k in _OWN_KEYS if k in g} for g in merged], check)
        state_dict["param_groups"] = merged
        before = self.__dict__.copy()
        try:
            super().load_state_dict(state_dict)
            self._conform_loaded(saved_state, state_dict["param_groups"])
        except BaseException:
            # (only what the checks above cannot foresee, e.g. a load hook raising)
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _drop_whole_masters(self, saved_state, saved_groups):
        """Leaves out (in ``saved_state``) a master copy that is a whole tensor for a
        DTensor param: what torch's broadcast load adds on rank 0 alone when the loading
        optimizer has no master copies. Every rank then starts the copies from the params
        (a loading optimizer built with master_weights=True receives them sharded)."""
        for group, saved in zip(self.param_groups, saved_groups):
            for p, key in zip(group["params"], saved["params"]):
                state = saved_state.get(key)
                master = state.get("master_param") if isinstance(state, dict) else None
                if torch.is_tensor(master) and _sharded.is_dtensor(p) \
                        and not _sharded.is_dtensor(master):
                    saved_state[key] = {k: v for k, v in state.items() if k != "master_param"}

    def _conform_loaded(self, saved_state, saved_groups):
        """After torch's load_state_dict: each loaded state in adamx's dtypes and made to
        fit the contract."""
        loaded = {}
        for group, saved in zip(self.param_groups, saved_groups):
            group["state_dtype"] = _state.state_dtype_name(group.get("state_dtype", "float32"))
            for p, key in zip(group["params"], saved["params"]):
                state = self.state.get(p)
                if not state:
                    continue
                original = saved_state.get(key, {})
                # Tensors to take from the checkpoint as they are (compact moments), or
                # as float32 (beside a master copy), rather than cast to the param's dtype.
                keep = {}
                if _state.CODES[0] in original:
                    keep = dict.fromkeys(_state.CODES + (_state.SCALES,))
                elif torch.is_tensor(original.get("exp_avg")) and \
                        _state.stored_moments(p, original) == "bfloat16":
                    keep = dict.fromkeys(_state.MOMENTS)
                if _state.has_master(p, group):
                    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
                        keep.setdefault(k, torch.float32)
                for k, dtype in keep.items():
                    if torch.is_tensor(original.get(k)):
                        state[k] = original[k].to(device=p.device, dtype=dtype, copy=True)
                if _state.has_master(p, group):
                    # A saved fp32 copy of the param's shape is kept whatever the param
                    # holds now: the model may be loaded next (torch's set_state_dict loads
                    # it after the optimizer), and the step restarts the copy from the
                    # param wherever the param is not its rounding then (master_to_update
                    # in csrc/math/update.h). Any other (one that torch.optim.Adam carried
                    # along and cast) starts from the param.
                    master = original.get("master_param")
                    if not (torch.is_tensor(master) and master.dtype == torch.float32
                            and master.shape == p.shape):
                        state.pop("master_param", None)
                loaded[p] = _state.conform(p, group, state, f"param {key}", param_id=key)
        self.state.update(loaded)

    def _gather(self, group, fresh, group_index=0, first_id=0):
        """The op calls for one group, as (tensor lists, master_params or None, code_scales
        or None, param_ids): one or two (params with master copies apart) per round. A
        param's id is its index in the optimizer (as state_dict numbers it; ``first_id`` is
        the group's first param's), which keys its random bits. A param listed
        k times in the group (torch warns) is stepped k times, in round 1, ..., k, as
        torch's loop steps it. Each param's state is checked against the state contract
        (adamx/_state.py); new or converted state goes into ``fresh``, which the step adds
        to ``self.state`` only once every update has succeeded. Complex params step as
        torch steps them: as real views of param, grad and state."""
        rounds = []
        seen = {}
        amsgrad = group["amsgrad"]
        state_dtype = _state.check_group(group)
        for index, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            k = seen[p] = seen.get(p, -1) + 1
            if k == len(rounds):
                rounds.append({})
            state = fresh.get(p) or self.state.get(p)
            fitted = _state.conform(p, group, state, f"param {group_index}.{index}",
                                    _state.spec(p, group, state_dtype), first_id + index)
            if fitted is not self.state.get(p):
                fresh[p] = fitted
            state = fitted
            master = "master_param" in state
            scale = state.get(_state.SCALES)
            moments = _state.CODES if scale is not None else _state.MOMENTS
            exp_avg, exp_avg_sq = state[moments[0]], state[moments[1]]
            max_exp_avg_sq = state["max_exp_avg_sq"] if amsgrad else None
            if p.is_complex():
                p, grad, exp_avg, exp_avg_sq = (torch.view_as_real(t) for t in
                                                (p, grad, exp_avg, exp_avg_sq))
                if amsgrad:
                    max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
            lists = rounds[k].setdefault(master, ([], [], [], [], [], [], [], [], []))
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masters, scales, \
                ids = lists
            params.append(p)
            grads.append(grad)
            exp_avgs.append(exp_avg)
            exp_avg_sqs.append(exp_avg_sq)
            if amsgrad:
                max_exp_avg_sqs.append(max_exp_avg_sq)
            steps.append(state["step"])
            if master:
                masters.append(state["master_param"])
            scales.append(scale)
            ids.append(first_id + index)
        return [(calls[master][:6], calls[master][6] if master else None,
                 self._code_scales(calls[master][7]), calls[master][8])
                for calls in rounds for master in (False, True) if master in calls]

    @staticmethod
    def _code_scales(scales):
        """The op's code_scales: None when no param has 8-bit moments, else one tensor per
        param (an empty one where a param has none)."""
        present = [s for s in scales if s is not None]
        if len(present) == 0:
            return None
        empty = _local(present[0]).new_empty(0)
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
        if found_inf is not None and not torch.is_tensor(found_inf):
            # GradScaler hands over the sum of its per-device found_inf tensors, which is
            # the number 0 when no param has a grad (there is nothing to step then). A
            # number is a host value: non-zero skips the step, as a tensor's would.
            if found_inf:
                return loss
            found_inf = None
        # a pending clip_grad_norm_ (getattr and no __dict__ methods: Dynamo traces them)
        clip = getattr(self, "_clip_divisor", None)
        if clip is not None:
            grad_scale = clip if grad_scale is None else grad_scale * clip
        # clip_grad_norm_(keep_grads=True): the step does not write the clipped grads back
        keep_grads = getattr(self, "_keep_grads", False)
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if (torch.compiler.is_compiling()
                    or not self._step_fast(grad_scale, found_inf, keep_grads)):
                self._step_lists(grad_scale, found_inf, keep_grads)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        if clip is not None:
            self._clip_divisor = None
        if keep_grads:
            self._keep_grads = False
        return loss

    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False,
                        foreach=None, *, grad_scaler=None, keep_grads=False):
        """Clips the grads of this optimizer's params by their global norm, as
        ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite,
        foreach)`` does, and returns the same total norm (a tensor), but without a pass
        over the grads to scale them: the next ``step()`` applies the clip factor
        ``min(max_norm / (norm + 1e-6), 1)`` in its own pass. Call it between
        ``backward()`` and ``step()``; until the step, ``.grad`` holds the unclipped grads,
        and after it the clipped ones (the step writes them back, as torch's clip leaves
        them). With ``keep_grads=True`` the step does not write them back: ``.grad`` keeps
        what backward left (unclipped, and still scaled under a GradScaler), which saves a
        write of every grad (4 of 36 bytes per float32 element).

        With ``torch.amp.GradScaler``, pass it as ``grad_scaler`` instead of calling
        ``scaler.unscale_(opt)`` first: the norm returned is the unscaled grads' (as
        torch's loop gives), and ``scaler.step(opt)`` then unscales and clips in the one
        pass, skipping the step if a grad is inf or NaN. DTensor (FSDP2) or multi-device
        grads take torch's own clip (see adamx/_clip.py)."""
        return _clip.clip_grad_norm_(self, max_norm, norm_type, error_if_nonfinite, foreach,
                                     grad_scaler, keep_grads)

    def _step_fast(self, grad_scale, found_inf, keep_grads=False):
        """The step through adamx._C.step_group, which reads each group's params, grads
        and state in C++. Returns False, having written nothing, when it leaves a group to
        _step_lists (a param needs its state made, is listed twice, or is a DTensor)."""
        step_group, groups, state = _ops._C.step_group, self.param_groups, self.state
        not_handled = _ops._C.NOT_HANDLED
        if len(groups) == 1:
            return step_group(groups[0], state, False, grad_scale, found_inf,
                              keep_grads) != not_handled
        first_ids = self._first_ids()
        for group, first in zip(groups, first_ids):  # check them all before updating any
            if step_group(group, state, True, grad_scale, found_inf, keep_grads,
                          first) == not_handled:
                return False
        for group, first in zip(groups, first_ids):
            step_group(group, state, False, grad_scale, found_inf, keep_grads, first)
        return True

    def _first_ids(self):
        """Per group, the id of its first param: its index in the optimizer (the op's
        param_ids, which key each param's random bits), as state_dict numbers params."""
        ids, first = [], 0
        for group in self.param_groups:
            ids.append(first)
            first += len(group["params"])
        return ids

    def _step_lists(self, grad_scale, found_inf, keep_grads=False):
        """The step through torch.ops.adamx.adam_ with explicit lists; makes new state."""
        fresh = {}
        calls = []
        sharded = []  # DTensors whose local tensors the step writes (adamx/_sharded.py)
        for group_index, (group, first) in enumerate(zip(self.param_groups, self._first_ids())):
            group_calls = self._gather(group, fresh, group_index, first)
            if len(group_calls) > 0:  # (len: Dynamo of torch 2.11 cannot trace bool(list))
                hyper = dict(self._hyper(group), grad_scale=grad_scale, found_inf=found_inf,
                             keep_grads=keep_grads)
                for lists, masters, scales, ids in group_calls:
                    lists, masters, scales, dtensors, offsets = _sharded.local_lists(
                        lists, masters, scales)
                    calls.append((lists, dict(hyper, master_params=masters, code_scales=scales,
                                              param_ids=ids, element_offsets=offsets)))
                    sharded += dtensors
        if len(calls) > 1:  # one call checks itself before writing; several check first
            for lists, hyper in calls:
                torch.ops.adamx.adam_check(*lists, **hyper)
        for lists, hyper in calls:
            torch.ops.adamx.adam_(*lists, **hyper)
            if lists[0][0].is_meta and hyper["found_inf"] is None:
                # On the meta device the op computes nothing, but step counts held on the
                # CPU are real: they advance, as torch.optim.Adam's do there.
                for step in lists[5]:
                    if not step.is_meta:
                        step.add_(1)
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
                if k in _state.MOMENTS + _state.CODES + (_state.SCALES,):
                    moments += size
    return dict(bytes=total, moment_bytes=moments, params=params,
                moment_bytes_per_param=moments / params if params else 0.0)


def to_torch_state_dict(state_dict):
    """An adamx ``state_dict`` in torch.optim.Adam's layout: compact moments decoded to
    float32 ``exp_avg``/``exp_avg_sq`` (8-bit codes and their ``code_scales`` dropped; an
    older adamx checkpoint's codes, kept under the moments' names, too), ``state_dtype``
    dropped from the groups; other entries as they are (a new dict; the tensors of
    float32 state are shared)."""
    state = {}
    for key, s in state_dict["state"].items():
        s = _state.with_key_names(s)
        m = s.get("exp_avg")
        # bfloat16 moments too (torch casts float32 moments back to a bfloat16 param's dtype
        # on loading).
        if _state.CODES[0] in s or (torch.is_tensor(m) and m.dtype == torch.bfloat16):
            moments = [_state.moment_float(s, which) for which in (0, 1)]
            s = {k: v for k, v in s.items() if k not in _state.CODES + (_state.SCALES,)}
            s["exp_avg"], s["exp_avg_sq"] = moments
        state[key] = dict(s)
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
