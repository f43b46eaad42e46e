"""adamx.Adam.step() on the MNIST MLP's 4 tensors with float32, bfloat16 and 8-bit moments
(state_dtype), through the C++ fast path and through the Python step (the fast path
switched off on that optimizer): median of --steps steps after 50, best of --rounds.

    python diagnostics/lean_fast_path.py --threads 2
"""

import argparse
import statistics
import time

import torch

import adamx

SHAPES = [(200, 784), (200,), (10, 200), (10,)]


def median_step_us(state_dtype, fast, steps):
    torch.manual_seed(0)
    params = [torch.randn(s).requires_grad_() for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape) * 1e-2
    opt = adamx.Adam(params, lr=1e-3, state_dtype=state_dtype, seed=1)
    if not fast:
        opt._step_fast = lambda *args: False
    for _ in range(50):
        opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| state_dtype | fast path | Python step |  ({args.threads} threads)")
    print("| --- | ---: | ---: |")
    for state_dtype in adamx.optimizer.STATE_DTYPES:
        fast = min(median_step_us(state_dtype, True, args.steps) for _ in range(args.rounds))
        slow = min(median_step_us(state_dtype, False, args.steps) for _ in range(args.rounds))
        print(f"| {state_dtype} | {fast:.1f} us | {slow:.1f} us |")


if __name__ == "__main__":
    main()
