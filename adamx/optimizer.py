"""adamx.Adam and adamx.AdamW: drop-in replacements for torch.optim.Adam / AdamW."""

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor
from torch.optim.optimizer import (Optimizer, _get_scalar_dtype, _global_optimizer_post_hooks,
                                   _global_optimizer_pre_hooks)

from . import _ops, _sharded
from .functional import op_kwargs

__all__ = ["Adam", "AdamW"]

# torch.optim.Adam's group keys that adamx reads or keeps, with their defaults (the
# switches, e.g. amsgrad, come from adamx._C.SWITCHES, default False).
_TORCH_DEFAULTS = dict(foreach=None, capturable=False, differentiable=False, fused=None)
# adamx's switches that torch.optim.Adam lacks (state_dict leaves them out at False).
_ADAMX_ONLY_KEYS = tuple(sorted(set(_ops._C.SWITCHES if _ops._C else ())
                                - set(inspect.signature(torch.optim.Adam).parameters)))


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
    see README.md, Mixed precision).
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
        betas = tuple(float(b) if isinstance(b, Tensor) else b for b in betas)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, eps_inside_sqrt=eps_inside_sqrt,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state):
        # Also what load_state_dict ends with: groups from a torch.optim.Adam checkpoint
        # lack adamx's own keys, and old checkpoints may hold steps as numbers.
        super().__setstate__(state)
        defaults = dict(_TORCH_DEFAULTS, **dict.fromkeys(_ops._C.SWITCHES if _ops._C else (),
                                                         False))
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = self._new_step(p, group, float(p_state["step"]))

    def state_dict(self):
        """torch's ``state_dict``, less adamx's own group keys (``eps_inside_sqrt``) where
        they hold their defaults: torch.optim.Adam's layout exactly, which
        torch.distributed.checkpoint needs to load a torch checkpoint into adamx (its load
        plan asks the checkpoint for every key the destination's state_dict has). Loading
        restores the defaults (``__setstate__``)."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            for key in _ADAMX_ONLY_KEYS:
                if group.get(key, True) is False:
                    del group[key]
        return state_dict

    @staticmethod
    def _new_step(p, group, value=0.0):
        # As torch.optim.Adam: on the param's device when capturable (or fused), else CPU.
        if group["capturable"] or group["fused"]:
            return torch.tensor(value, dtype=torch.float32, device=p.device)
        return torch.tensor(value, dtype=_get_scalar_dtype())

    def _new_state(self, p, group):
        state = {
            "step": self._new_step(p, group),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _gather(self, group, fresh):
        """The op's tensor lists for one group, one set per round: a param listed k times
        in the group (torch warns) is stepped k times, in round 1, ..., k, as torch's loop
        steps it. New state goes into ``fresh``, which the step adds to ``self.state`` only
        once every update has succeeded."""
        rounds = []
        seen = {}
        amsgrad = group["amsgrad"]
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            k = seen[p] = seen.get(p, -1) + 1
            if k == len(rounds):
                rounds.append(([], [], [], [], [], []))
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = rounds[k]
            state = fresh.get(p) or self.state.get(p)
            if not state:
                state = fresh[p] = self._new_state(p, group)
            elif amsgrad and "max_exp_avg_sq" not in state:  # amsgrad switched on later
                state = fresh[p] = dict(
                    state, max_exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        return rounds

    @staticmethod
    def _hyper(group):
        values = {key: group[key] for key in _ops._C.GROUP_KEYS}
        beta1, beta2 = values.pop("betas")
        return op_kwargs(beta1=beta1, beta2=beta2, **values)

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
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if torch.compiler.is_compiling() or not self._step_fast(grad_scale, found_inf):
                self._step_lists(grad_scale, found_inf)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        return loss

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
            rounds = self._gather(group, fresh)
            if rounds:
                hyper = dict(self._hyper(group), grad_scale=grad_scale, found_inf=found_inf)
                for lists in rounds:
                    lists, dtensors = _sharded.local_lists(lists)
                    calls.append((lists, hyper))
                    sharded += dtensors
        if len(calls) > 1:  # one call checks itself before writing; several check first
            for lists, hyper in calls:
                torch.ops.adamx.adam_check(*lists, **hyper)
        for lists, hyper in calls:
            torch.ops.adamx.adam_(*lists, **hyper)
        if sharded:
            torch.autograd.graph.increment_version(sharded)
        self.state.update(fresh)


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay, defaults as ``torch.optim.AdamW``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize: bool = False, foreach: Optional[bool] = None,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, eps_inside_sqrt: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, eps_inside_sqrt=eps_inside_sqrt)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
