"""The time of `adamx.Adam.step()` on the MNIST MLP's four tensors, in a tight loop: the
quickest way to compare two builds' per-step overhead (run it with each, alternating).

    python diagnostics/step_loop.py --threads 2 --steps 4000 --label new
"""

import argparse
import statistics
import time

import torch

import adamx

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--steps", type=int, default=4000, help="timed steps (after 200 untimed)")
parser.add_argument("--label", default="", help="printed in front of the result")
args = parser.parse_args()

torch.set_num_threads(args.threads)
params = [torch.randn(s) for s in [(200, 784), (200,), (10, 200), (10,)]]
for p in params:
    p.grad = torch.randn_like(p)
opt = adamx.Adam(params, lr=1e-3)
for _ in range(200):
    opt.step()
times = []
for _ in range(args.steps):
    start = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - start)
times.sort()
print(f"{args.label} threads={args.threads} median {statistics.median(times) * 1e6:.2f} us "
      f"p10 {times[len(times) // 10] * 1e6:.2f} us  ({adamx.__file__})")
