"""The functional Adam step, for people who keep their own optimizer state."""

from typing import List, Union

import torch
from torch import Tensor

from . import _ops


def op_kwargs(*, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
              decoupled_weight_decay, eps_inside_sqrt):
    """The keyword arguments of torch.ops.adamx.adam_ for these hyper-parameters."""
    if isinstance(lr, Tensor):
        lr, lr_tensor = 0.0, lr
    else:
        lr, lr_tensor = float(lr), None
    return dict(lr=lr, lr_tensor=lr_tensor, beta1=float(beta1), beta2=float(beta2),
                weight_decay=float(weight_decay), eps=float(eps), amsgrad=bool(amsgrad),
                maximize=bool(maximize), decoupled_weight_decay=bool(decoupled_weight_decay),
                eps_inside_sqrt=bool(eps_inside_sqrt))


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
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    eps_inside_sqrt: bool = False,
) -> None:
    """One fused Adam (or AdamW, with ``decoupled_weight_decay``) step, in place.

    Unlike ``torch.optim._functional``, this increments each ``state_steps[i]`` (a
    one-element float tensor) by one itself before updating. ``max_exp_avg_sqs`` may be
    empty unless ``amsgrad``. All params must be on one device (one kernel launch on a
    GPU). Every input is checked before anything is written.
    """
    _ops.require_compiled()
    if not params:
        return
    torch.ops.adamx.adam_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], state_steps,
        **op_kwargs(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                    amsgrad=amsgrad, maximize=maximize,
                    decoupled_weight_decay=decoupled_weight_decay,
                    eps_inside_sqrt=eps_inside_sqrt))
