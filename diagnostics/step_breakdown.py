"""Where the time of a small step goes: the MNIST MLP's step (159,010 params in 4 tensors),
layer by layer, for adamx and torch's fused Adam, in one process.

    python diagnostics/step_breakdown.py [--threads 1,2] [--isa avx512,avx2,default]

Rows, each the median of --repeats calls after --warmup:
    adamx opt.step()           the optimizer, as a training loop calls it
    adamx op (functional)      torch.ops.adamx.adam_ on prepared lists (no optimizer)
    torch fused opt.step()     torch.optim.Adam(fused=True).step()
    torch._fused_adam_         torch's raw kernel on prepared lists
    stream (p+=g, m+=g, v+=g)  three in-place torch ops over the step's buffers
The adamx rows are repeated for each SIMD set of --isa (adamx.set_cpu_capability) and each
thread count of --threads. A one-off diagnostic, used for the optimisation log in
benchmarks/HISTORY.md; needs adamx built.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import adamx

# bench_common lives with the benchmarks, one folder over.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_common as bc  # noqa: E402

SHAPES = [(200, 784), (200,), (10, 200), (10,)]


def median_us(fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return params


def lists(params):
    return ([p.detach() for p in params], [p.grad for p in params],
            [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros((), dtype=torch.float32) for _ in params])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--isa", default=",".join(adamx.supported_cpu_capabilities()[::-1]))
    ap.add_argument("--repeats", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    args = ap.parse_args()
    bc.prime_allocator()
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)

        def time_it(name, fn):
            rows.append((name, threads, median_us(fn, args.repeats, args.warmup)))

        for isa in args.isa.split(","):
            adamx.set_cpu_capability(isa)
            params = make()
            opt = adamx.Adam(params)
            time_it(f"adamx opt.step() [{isa}]", opt.step)
            p, g, m, v, s = lists(make())
            time_it(f"adamx op (functional) [{isa}]",
                    lambda: adamx.functional.adam(p, g, m, v, [], s, **hyper))
        adamx.set_cpu_capability(adamx.supported_cpu_capabilities()[-1])
        params = make()
        opt = torch.optim.Adam(params, fused=True)
        time_it("torch fused opt.step()", opt.step)
        p, g, m, v, s = lists(make())
        time_it("torch._fused_adam_", lambda: torch._fused_adam_(
            p, g, m, v, [], s, **hyper, amsgrad=False, maximize=False))

        def stream():
            for a, b, c, d in zip(p, m, v, g):
                a.add_(d)
                b.add_(d)
                c.add_(d)
        time_it("stream (p+=g, m+=g, v+=g)", stream)
    print(f"# MNIST MLP step breakdown, {sum(torch.Size(s).numel() for s in SHAPES):,} params; "
          f"median of {args.repeats} after {args.warmup} warm-up; torch {torch.__version__}")
    print(bc.format_table(["what", "threads", "median"],
                          [[n, str(t), f"{us:.1f} us"] for n, t, us in rows]))


if __name__ == "__main__":
    main()
