"""The GradScaler'd optimizer step on a CUDA GPU, eager and captured in a CUDA graph:
adamx against torch's fused Adam, with the device's copy rate measured in the same run.

A mixed-precision loop steps with ``scaler.step(opt); scaler.update()``. For an optimizer
that unscales in its own step (torch fused, adamx: ``_step_supports_amp_scaling``),
GradScaler first checks every grad for inf/NaN (one read of the grads), then hands the
step the scale and the inf flag as device tensors; ``update`` adjusts the scale on the
device. Nothing there needs the host, so the whole step can be captured once and
replayed (``capturable=True``): ``eager`` times the calls, ``graph`` times the replay.

Bytes per element counted as moved by the step itself: plain Adam's 7 x itemsize, plus
the grad GradScaler reads for its inf check (8 x itemsize; adamx also writes the unscaled
grad back: not counted, so its share is a lower bound). "% copy" is that rate over the
device-to-device copy rate (bytes read + written) measured here.

    python benchmarks/cuda_scaled_step.py --out out/cuda-scaled
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_bench import gpt2_small_shapes  # noqa: E402

import adamx  # noqa: E402
import bench_common as bc  # noqa: E402

CASES = {"1e8": [(100_000_000,)], "gpt2": None}
PEERS = {
    "torch-fused": lambda ps, cap: torch.optim.Adam(ps, lr=1e-3, fused=True, capturable=cap),
    "adamx": lambda ps, cap: adamx.Adam(ps, lr=1e-3, capturable=cap),
}


def cuda_time(fn, warmup, repeats):
    """Median seconds of ``fn`` timed with CUDA events, after ``warmup`` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_rate(nbytes, warmup, repeats):
    """Device-to-device copy rate, bytes read + written per second."""
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), warmup, repeats)
    return 2 * src.numel() * 4 / t


def make_params(shapes, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, device="cuda", generator=g).to(dtype).requires_grad_()
        p.grad = (torch.randn(shape, device="cuda", generator=g) * 1e-2).to(dtype)
        params.append(p)
    return params


def run(peer, params, graph, args):
    opt = PEERS[peer](params, graph)
    # scale 1: repeated unscaling leaves the grads as they are
    scaler = torch.amp.GradScaler("cuda", init_scale=1.0, growth_interval=2**30)
    scaler.scale(torch.ones((), device="cuda"))

    def step():
        scaler.step(opt)
        scaler.update()

    step()  # makes the state
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        fn = g.replay
    else:
        fn = step
    t = cuda_time(fn, args.warmup, args.repeats)
    del opt
    torch.cuda.synchronize()
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="1e8,gpt2")
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default="out/cuda-scaled")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("cuda_scaled_step: torch sees no CUDA device")
    dtype = getattr(torch, args.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    facts = bc.machine_facts()
    ceiling = copy_rate(2 * 2**30, args.warmup, args.repeats)
    records = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}; "
          f"copy rate {ceiling / 1e9:.0f} GB/s (read + write)")
    print(f"{'case':>5} {'peer':>12} {'mode':>6} {'median':>10} {'x torch':>8} {'% copy':>7}")
    for case in args.cases.split(","):
        shapes = CASES[case] or gpt2_small_shapes()
        params = make_params(shapes, dtype)
        n = sum(p.numel() for p in params)
        for graph in (False, True):
            mode = "graph" if graph else "eager"
            ref = None
            for peer in PEERS:
                rec = dict(case=case, peer=peer, mode=mode, dtype=args.dtype, elements=n)
                try:
                    t = run(peer, params, graph, args)
                except Exception as exc:  # noqa: BLE001 - reported, the others still run
                    rec["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    print(f"{case:>5} {peer:>12} {mode:>6} failed: {rec['error']}")
                    records.append(rec)
                    continue
                ref = t if peer == "torch-fused" else ref
                rec.update(median_s=t, bytes_moved=8 * itemsize * n,
                           ratio_to_torch_fused=t / ref if ref else None,
                           copy_share=8 * itemsize * n / t / ceiling)
                records.append(rec)
                ratio = f"{rec['ratio_to_torch_fused']:.3f}" if ref else "-"
                print(f"{case:>5} {peer:>12} {mode:>6} {t * 1e3:8.3f}ms {ratio:>8} "
                      f"{100 * rec['copy_share']:6.1f}%")
        del params
        torch.cuda.empty_cache()
    result = dict(benchmark="cuda_scaled_step", device=torch.cuda.get_device_name(),
                  machine=facts, config=vars(args), copy_rate_bytes_s=ceiling,
                  records=records)
    bc.write_json(Path(args.out) / "cuda_scaled_step.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
