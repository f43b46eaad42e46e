"""What a switch costs as a run-time flag instead of a kernel template parameter: two
builds of adamx, the CPU kernel's time per element on every instruction set, interleaved.

    python diagnostics/switch_cost.py --builds BEFORE,AFTER [--switch maximize] [--rounds 7]

BEFORE and AFTER are folders that each hold an `adamx` package with its compiled `_C`
(for example a copy of `adamx/` taken before a rebuild in place). Two builds' ops cannot
share a process, so each round runs each build in a child process of its own, in turn;
a child times torch.ops.adamx.adam_ on one tensor per case (1 thread, median of
--repeats calls after warm-up), with the switch off and on, on every instruction set
this CPU runs. Cases: float32 (in cache, 2^16 elements, where the arithmetic shows, and
2^22, where memory does), float32 with an L2 penalty, bfloat16 params with fp32 master
weights, and float32 params with 8-bit or bfloat16 moments (in cache and not). Prints, per
case, each build's ns per element (the least of the rounds' medians: on a shared machine a
round is slowed by others' work, never sped up) and AFTER / BEFORE.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ["float32 2^16", "float32 2^22", "float32 L2 2^16", "bf16 master 2^16",
         "float32 int8 2^16", "float32 int8 2^22", "float32 bf16-state 2^16",
         "float32 bf16-state 2^22"]


def child(switch, repeats, isas):
    import torch

    import adamx

    torch.set_num_threads(1)
    out = {}

    def lists(case):
        n = 1 << int(case.rsplit("^", 1)[1])
        g = torch.Generator().manual_seed(0)
        p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
        m, v = torch.zeros(n), torch.zeros(n)
        extra = {}
        if "master" in case:
            extra["master_params"] = [p]
            p = p.bfloat16()
            grad = grad.bfloat16()
        if "bf16-state" in case:
            m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
        if "int8" in case:
            m, v = (torch.zeros(n, dtype=torch.uint8) for _ in range(2))
            extra["code_scales"] = [torch.zeros(2, -(-n // 256))]
        wd = 1e-2 if "L2" in case else 0.0
        return ([p], [grad], [m], [v], [], [torch.tensor(0.0)]), dict(
            lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=wd, eps=1e-8, **extra)

    for isa in adamx.supported_cpu_capabilities():
        if isas and isa not in isas:
            continue
        adamx.set_cpu_capability(isa)
        for case in CASES:
            args, kw = lists(case)
            n = args[0][0].numel()
            for on in (False, True):
                kw[switch] = on
                for _ in range(10):
                    torch.ops.adamx.adam_(*args, **kw)
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    torch.ops.adamx.adam_(*args, **kw)
                    times.append(time.perf_counter() - t)
                out[f"{isa} {case} {switch}={on}"] = statistics.median(times) / n * 1e9
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--builds", required=True, help="BEFORE,AFTER: folders holding adamx")
    p.add_argument("--switch", default="maximize")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--isas", default="", help="comma-separated ISAs to time (default: all)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.switch, args.repeats, [i for i in args.isas.split(",") if i])
    builds = args.builds.split(",")
    runs = {b: [] for b in builds}
    for _ in range(args.rounds):
        for b in builds:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(b))
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--builds", b,
                                  "--switch", args.switch, "--repeats", str(args.repeats),
                                  "--isas", args.isas, "--child"], env=env,
                                 capture_output=True, text=True, check=True, cwd="/")
            runs[b].append(json.loads(res.stdout.strip().splitlines()[-1]))
    before, after = builds
    print(f"# least of {args.rounds} interleaved rounds' medians (a process per build and "
          f"round), 1 thread, ns per element")
    print(f"| ISA, case | {before} | {after} | after / before |")
    print("|---|---:|---:|---:|")
    for key in runs[before][0]:
        b = min(r[key] for r in runs[before])
        a = min(r[key] for r in runs[after])
        print(f"| {key} | {b:.3f} | {a:.3f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
