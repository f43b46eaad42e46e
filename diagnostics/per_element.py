"""The kernel's cost per element against torch's own fused kernel, interleaved.

    python diagnostics/per_element.py [--sizes 65536,1048576] [--dtype float32,bfloat16] [--threads 1]

For each size and dtype: one param with its grad and state, stepped alternately by
torch.ops.adamx.adam_ and torch._fused_adam_ (the same lists), in rounds of calls; prints
the median time per element of each and their ratio. For bfloat16 also adamx's
stochastic rounding (the same lists), and for float16/bfloat16 its master weights (a
param of their own beside the fp32 master copy and state, so that the param stays its
copy's rounding: 30 bytes per element moved for bfloat16, 14 for the plain step), in the
same rounds. Sizes in cache show the arithmetic, large ones the memory. A one-off
diagnostic, used for the per-ISA notes in benchmarks/HISTORY.md; needs adamx built.
"""

import argparse
import statistics
import time

import torch

import adamx.functional as F

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="65536,262144,1048576,4194304")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=11)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ours_kw = F.op_kwargs(**HYPER)
    ours_kw_sr = F.op_kwargs(**HYPER, stochastic_rounding=True)
    print(f"# threads {args.threads}, median of {args.rounds} interleaved rounds, ns per element")
    for dtype in [getattr(torch, d) for d in args.dtype.split(",")]:
        for n in [int(s) for s in args.sizes.split(",")]:
            g = torch.Generator().manual_seed(0)
            p_, g_, m_, v_ = [torch.randn(n, generator=g).to(dtype) for _ in range(4)]
            v_.abs_()
            lists = ([p_], [g_], [m_], [v_], [], [torch.tensor(1.0)])
            f32 = [t.float() for t in (p_, m_, v_)]
            master_lists = ([p_.clone()], [g_], [f32[1]], [f32[2]], [], [torch.tensor(1.0)])

            def ours():
                torch.ops.adamx.adam_(*lists, **ours_kw)

            def theirs():
                torch._fused_adam_(*lists, **HYPER, amsgrad=False, maximize=False)

            def stochastic():
                torch.ops.adamx.adam_(*lists, **ours_kw_sr)

            def master():
                torch.ops.adamx.adam_(*master_lists, **ours_kw, master_params=[f32[0]])

            funcs = {"adamx": ours, "torch._fused_adam_": theirs}
            if dtype == torch.bfloat16:
                funcs["adamx stochastic"] = stochastic
            if dtype in (torch.float16, torch.bfloat16):
                funcs["adamx master"] = master
            times = {f: [] for f in funcs.values()}
            calls = max(1, int(2e7 // n))
            for f in times:
                for _ in range(3):
                    f()
            for _ in range(args.rounds):
                for f, ts in times.items():
                    t = time.perf_counter()
                    for _ in range(calls):
                        f()
                    ts.append((time.perf_counter() - t) / calls)
            per = {name: statistics.median(times[f]) / n * 1e9 for name, f in funcs.items()}
            ref = per["torch._fused_adam_"]
            print(f"{str(dtype):15s} {n:>11,d}  " + "  ".join(
                f"{name} {t:7.3f} ({t / ref:.3f})" for name, t in per.items()))


if __name__ == "__main__":
    main()
