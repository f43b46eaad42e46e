"""Reference implementations kept as baselines for tests and benchmarks.

``seed_adam`` is the hand-written Adam loop of the tutorial adamx grew from. It is kept
faithful to that formula, including where it differs from ``torch.optim.Adam``: eps sits
*inside* the square root::

    v     = beta1 * v + (1 - beta1) * g
    s     = beta2 * s + (1 - beta2) * g**2
    v_hat = v / (1 - beta1**t)
    s_hat = s / (1 - beta2**t)
    p    -= lr * v_hat / sqrt(s_hat + eps)          (eps = 1e-8)

``adamx.Adam(..., eps_inside_sqrt=True)`` reproduces it step for step.
"""

import torch

SEED_EPS = 1e-8


@torch.no_grad()
def seed_adam(parameters, vs, sqrs, lr, t, beta1=0.9, beta2=0.999):
    """One step of the tutorial's Adam on ``parameters`` (their ``.grad`` is read).

    ``vs`` and ``sqrs`` are the first and second moment buffers, one per parameter, updated
    in place; ``t`` is the 1-based step number.
    """
    for p, v, s in zip(parameters, vs, sqrs):
        g = p.grad
        v.mul_(beta1).add_((1 - beta1) * g)
        s.mul_(beta2).add_((1 - beta2) * g * g)
        v_hat = v / (1 - beta1**t)
        s_hat = s / (1 - beta2**t)
        p.sub_(lr * v_hat / torch.sqrt(s_hat + SEED_EPS))
