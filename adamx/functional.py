"""The functional Adam step, for people who keep their own optimizer state."""

from typing import List, Optional, Union

import torch
from torch import Tensor

from . import _ops


def _number(value, name):
    """``value`` as a float, if it is a number as torch's step takes one (float, int, numpy
    scalar, one-element tensor); a string is a TypeError, as in torch.optim.Adam."""
    kind = type(value)
    if isinstance(value, (str, bytes)) or not (hasattr(kind, "__float__")
                                               or hasattr(kind, "__index__")):
        raise TypeError(f"adamx: {name} must be a number, got {kind.__name__}")
    return float(value)


def _seed(value):
    """The op's int64 seed for any Python int (wrapped to 64 bits)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"adamx: seed must be an int, got {type(value).__name__}")
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def op_kwargs(*, lr, beta1, beta2, weight_decay, eps, **switches):
    """The keyword arguments of torch.ops.adamx.adam_ for these hyper-parameters and
    switches (``amsgrad``, ``maximize``, ... : ``adamx._C.SWITCHES``, default False)."""
    _ops.require_compiled()
    unknown = set(switches) - set(_ops._C.SWITCHES)
    if unknown:
        raise TypeError(f"adamx: unknown argument(s) {sorted(unknown)}; the switches are "
                        f"{list(_ops._C.SWITCHES)}")
    if isinstance(lr, Tensor):
        lr, lr_tensor = 0.0, lr
    else:
        lr, lr_tensor = _number(lr, "lr"), None
    return dict(lr=lr, lr_tensor=lr_tensor, beta1=_number(beta1, "beta1"),
                beta2=_number(beta2, "beta2"), weight_decay=_number(weight_decay, "weight_decay"),
                eps=_number(eps, "eps"),
                **{name: bool(switches.get(name, False)) for name in _ops._C.SWITCHES})


@torch.no_grad()
def adam(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    max_exp_avg_sqs: List[Tensor],
    state_steps: List[Tensor],
    *,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    master_params: Optional[List[Tensor]] = None,
    code_scales: Optional[List[Tensor]] = None,
    seed: int = 0,
    param_ids: Optional[List[int]] = None,
    element_offsets: Optional[List[int]] = None,
    keep_grads: bool = False,
    **switches: bool,
) -> None:
    """One fused Adam step, in place.

    The switches, all False by default, are those of ``adamx.Adam``: ``amsgrad``,
    ``maximize``, ``decoupled_weight_decay`` (AdamW), ``eps_inside_sqrt`` and
    ``stochastic_rounding`` (bfloat16 params: the new param is rounded stochastically,
    with random bits that are a hash of (``seed``, the param's id, its step count, the
    element's index), so a step is reproducible on any thread count, CPU or GPU).
    ``param_ids[i]`` (in [0, 2^32); default: i, the position in ``params``) is param i's
    identity: give each param an id of its own, stable across calls (``adamx.Adam`` gives
    its index in the optimizer), or two params may draw the same bits. Element j of
    ``params[i]`` draws the bits of element ``element_offsets[i] + j`` (default 0): with
    ``params[i]`` a shard of a larger param, its offset there makes the shard round as the
    whole param would.

    Unlike ``torch.optim._functional``, this increments each ``state_steps[i]`` (a
    one-element float tensor, one per param) by one itself before updating.
    ``max_exp_avg_sqs`` may be empty unless ``amsgrad``. All params must be on one device
    (one kernel launch on a GPU), and no two of the tensors a step writes may share memory.
    Every input is checked before anything is written.

    ``grad_scale`` and ``found_inf`` (one-element float tensors, on the CPU or the params'
    device) are ``torch.amp.GradScaler``'s, as torch's fused Adam takes them: the grads are
    divided by ``grad_scale`` (before ``maximize`` and weight decay) and the quotient is
    written back to them (``keep_grads=True``: not written back, the grads are left as
    they were, which saves a write of each); a non-zero ``found_inf`` makes the step write
    nothing, step counts included.

    ``master_params``: fp32 master copies of float16/bfloat16 ``params`` (one each); their
    state (``exp_avgs``, ...) is then float32 too. The update runs on the master copy, and
    each param is set to its master's rounding to nearest.

    Compact moments (see ``adamx.Adam``'s ``state_dtype``): ``exp_avgs[i]`` and
    ``exp_avg_sqs[i]`` in bfloat16 beside a float32 param or a master copy, or uint8 8-bit
    codes beside a float32 or bfloat16 param, with ``code_scales[i]`` its block scales
    (float32, shape ``[2, ceil(numel / 256)]``; any tensor for params without codes; the
    format is mirrored in torch by ``adamx._compact``). Both are rounded stochastically
    with random bits keyed by ``seed``.
    """
    kwargs = op_kwargs(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                       **switches)
    if not params:
        return
    torch.ops.adamx.adam_(params, grads, exp_avgs, exp_avg_sqs,
                          max_exp_avg_sqs if kwargs["amsgrad"] else [], state_steps, **kwargs,
                          grad_scale=grad_scale, found_inf=found_inf,
                          master_params=master_params, code_scales=code_scales,
                          seed=_seed(seed), param_ids=param_ids,
                          element_offsets=element_offsets, keep_grads=bool(keep_grads))
