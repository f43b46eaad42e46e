"""Gradient clipping plus the step, adamx against torch's loop, with and without GradScaler.

torch:  [scaler.unscale_(opt)]; torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True);
        step of torch.optim.Adam(fused=True) (through scaler.step with GradScaler)
adamx:  opt.clip_grad_norm_(1.0[, grad_scaler=scaler]); opt.step() (or scaler.step)
adamx keep_grads: the same with clip_grad_norm_(..., keep_grads=True) (no grad write-back)

Bytes per element the loop must move (float32): torch 4 (norm) + 8 (clip) + 28 (step) = 40,
plus 8 for GradScaler's unscale = 48; adamx 4 (norm) + 28 (step) + 4 (the clipped grad
written back by the step) = 36 with or without GradScaler, 32 with keep_grads. Each loop
is timed from the grads as backward leaves them (copied in before each timed call, outside
the timing), median of --repeats after --warmup; the loops take turns step by step.

    python benchmarks/clip_step.py --elements 25e6 --threads 2
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import adamx
import bench_common as bc


def loops(params, grads, scaler):
    """(name, optimizer, one clipped step) for torch's loop and adamx's."""
    torch_opt = torch.optim.Adam(params["torch"], lr=1e-3, fused=True)
    mine = adamx.Adam(params["adamx"], lr=1e-3)
    kept = adamx.Adam(params["adamx keep_grads"], lr=1e-3)

    def torch_loop():
        if scaler["torch"] is not None:
            scaler["torch"].unscale_(torch_opt)
        torch.nn.utils.clip_grad_norm_(params["torch"], 1.0, foreach=True)
        if scaler["torch"] is not None:
            scaler["torch"].step(torch_opt)
            scaler["torch"].update()
        else:
            torch_opt.step()

    def adamx_loop(opt, key, keep_grads):
        def loop():
            opt.clip_grad_norm_(1.0, grad_scaler=scaler[key], keep_grads=keep_grads)
            if scaler[key] is not None:
                scaler[key].step(opt)
                scaler[key].update()
            else:
                opt.step()
        return loop

    return [("torch clip + fused", "torch", torch_loop),
            ("adamx", "adamx", adamx_loop(mine, "adamx", False)),
            ("adamx keep_grads", "adamx keep_grads", adamx_loop(kept, "adamx keep_grads", True))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=float, default=25e6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="out/clip")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = bc.machine_facts()
    n = int(args.elements)
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g)
    records = []
    print(f"# {n:,} float32 elements, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; median of {args.repeats}")
    for with_scaler in (False, True):
        scale = 2.0 ** 10 if with_scaler else 1.0
        keys = ("torch", "adamx", "adamx keep_grads")
        params = {k: [p0.clone().requires_grad_()] for k in keys}
        scaler = {k: (torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=2**30)
                      if with_scaler else None) for k in keys}
        runs = loops(params, grad, scaler)
        for _, key, _ in runs:
            if scaler[key] is not None:
                scaler[key].scale(torch.ones(()))
        # The loops take turns, step by step, so that a drift of the machine's speed
        # reaches them all alike.
        ts = {name: [] for name, _, _ in runs}
        for k in range(args.warmup + args.repeats):
            for name, key, fn in runs:
                params[key][0].grad = grad * scale
                t0 = time.perf_counter()
                fn()
                if k >= args.warmup:
                    ts[name].append(time.perf_counter() - t0)
        times = {name: statistics.median(t) for name, t in ts.items()}
        ref = times["torch clip + fused"]
        for name, t in times.items():
            rec = dict(case="grad-scaler" if with_scaler else "plain", loop=name,
                       median_s=t, ratio=t / ref, elements=n,
                       threads=torch.get_num_threads())
            records.append(rec)
            print(f"{rec['case']:>12} {name:>20} {t * 1e3:8.2f} ms  {t / ref:.3f}x")
    bc.write_json(Path(args.out) / "clip_step.json", dict(
        benchmark="clip_step", machine=facts, config=vars(args), records=records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
