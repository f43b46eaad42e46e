"""The step's cost per element for each way of storing the moments: float32, bfloat16
and 8-bit codes, on every instruction set this CPU runs; 1 thread, a cache-resident
tensor (2^18 floats by default), torch.ops.adamx.adam_ called directly, median of
--repeats calls after 10 warm-up ones.

    PYTHONPATH=. python diagnostics/lean_per_element.py [--elements 262144] [--repeats 200]
"""

import argparse
import time

import torch

import adamx


def state(kind, n):
    if kind == "float32":
        return torch.zeros(n), torch.zeros(n), None
    if kind == "bfloat16":
        return torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16), None
    codes = [torch.zeros(n, dtype=torch.uint8) for _ in range(2)]
    return codes[0], codes[1], [torch.zeros(2, -(-n // 256))]


def ns_per_element(kind, n, repeats):
    p, g = torch.randn(n), torch.randn(n)
    m, v, scales = state(kind, n)
    steps = [torch.tensor(0.0)]
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                  code_scales=scales)
    for _ in range(10):
        torch.ops.adamx.adam_([p], [g], [m], [v], [], steps, **kwargs)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.ops.adamx.adam_([p], [g], [m], [v], [], steps, **kwargs)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] / n * 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 18)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    before = adamx.cpu_capability()
    try:
        for isa in adamx.supported_cpu_capabilities():
            adamx.set_cpu_capability(isa)
            row = {k: ns_per_element(k, args.elements, args.repeats)
                   for k in ("float32", "bfloat16", "int8")}
            print(f"{isa:8s} " + "  ".join(f"{k} {v:.3f} ns" for k, v in row.items()))
    finally:
        adamx.set_cpu_capability(before)


if __name__ == "__main__":
    main()
