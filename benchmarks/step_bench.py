"""optimizer.step() latency and effective bandwidth, adamx against its peers.

Cases (``--cases``):
    mnist   the tutorial's MLP: 159,010 params in 4 tensors
    25m     one tensor of 25,000,000 elements
    gpt2    GPT-2 small's parameter shapes: 124,439,808 elements in 148 tensors
    sweep   one tensor per size of --sweep-sizes (default 1e3 ... 1e8)

Peers (``--peers``), each on the same params and grads, one at a time (the previous one's
state is freed first): the tutorial's Python loop (adamx.reference.seed_adam),
torch.optim.Adam with foreach=False / foreach=True / fused=True, and adamx.Adam. On CUDA
the capturable variants of torch fused, torch foreach and adamx are also timed replaying a
captured CUDA graph (``+graph``).

With ``--grad-scaler`` every peer's timed step is a mixed-precision step,
``scaler.step(opt); scaler.update()`` with a ``torch.amp.GradScaler`` (scale 1, so that
repeated unscaling leaves the grads as they are): torch fused and adamx unscale inside
their step (GradScaler hands them the scale and the inf flag); the other peers get
GradScaler's own pass first (a non-finite check and unscale over every grad, then a host
sync on the flag). Such a step also writes the grads back: 8 * itemsize bytes per element
count as moved. No graph variants (GradScaler.step is not capturable).

With ``--clip`` every peer's timed step also clips the grads by their global 2-norm
(max norm 1): torch's peers after ``torch.nn.utils.clip_grad_norm_(params, 1.0,
foreach=True)`` (which reads every grad for the norm, then reads and writes it to scale
it; with --grad-scaler after ``scaler.unscale_(opt)``, a read and write more, and their
step then has nothing left to unscale), adamx's after ``opt.clip_grad_norm_(1.0[,
grad_scaler=scaler])``, which reads the grads once for the norm and folds the clip (and
the unscale) into the step, which writes the grads back. Bytes counted per element: torch
3 * itemsize more than its step (the norm's read, the clip's read and write), plus 2 *
itemsize with GradScaler (the unscale), over a plain step's 7: 40 and 48 B in float32;
adamx 9 * itemsize with or without GradScaler (the norm's read and the step's 8): 36 B.
Peers: torch-forloop, torch-foreach, torch-fused and adamx. No graph variants.

Each peer: one step to create its state, --warmup more, then up to --repeats timed steps
(time.perf_counter around step() on the CPU, CUDA events on the GPU); the median is
reported. A peer whose steps are slow stops after --max-seconds of timed steps (at least
--min-repeats); the table's ``n`` column says how many were timed.

Effective bandwidth = bytes the step must move / median time, where plain Adam moves
7 * itemsize bytes per element (reads param, grad, exp_avg, exp_avg_sq; writes param,
exp_avg, exp_avg_sq): 28 B for float32, 14 B for bfloat16. ``adamx-master``
(``master_weights=True``, float16/bfloat16 params) reads the grad and writes the param in
their dtype and reads and writes the fp32 master copy and moments: 2 * itemsize + 24 B,
28 B for bfloat16. ``adamx-stochastic`` (``stochastic_rounding=True``, bfloat16 params)
moves what plain Adam moves. ``adamx-bf16-state`` / ``adamx-int8-state``
(``state_dtype``; bfloat16 params: with master weights) move the param or master copy and
the grad as above and their moments in 2 or 1 bytes: 20 and 16.06 B for float32 params.

The ceiling: the best rate this machine reaches on simple in-place torch streams over
four buffers p, m, v, g with the case's byte footprint each (so the whole working set is
Adam's), measured in the same run with the same timer:
    adam-like   p += g; m += g; v += g   Adam's buffers touched Adam's way (3 read-write,
                                         1 read-only), in 3 passes: 36 B/element moved
    rmw         p += m; v += g           read-modify-write, 2 reads : 1 write, 24 B/element
    scale       p *= c; m *= c; v *= c; g *= c   1 read : 1 write, 32 B/element
Each stream's rate counts the bytes it really moves; the ceiling is the fastest of the
three (Adam's own mix, 4 reads : 3 writes, lies between rmw's and scale's), and
"% ceiling" is a peer's effective bandwidth as a share of it. Streams run in float32 over
the same number of bytes as the case (memory does not care about the dtype). For cases
that fit in cache the ceiling is a cache (and per-op overhead) figure.

Before timing, the process allocates and frees a 30 MiB buffer, as a training process has
by the time it steps (see bench_common.prime_allocator: without it glibc mmaps and
page-faults every temporary of the unfused peers, and the Python loop measures ~4x slower
than in training).

Runs: the default (about a minute on a 2-core CPU) times mnist, 25m and a 1e3 ... 1e6
sweep with at most 1 s of timed steps per peer; ``--full`` adds gpt2 and the sweep to 1e8
with 3 s per peer (minutes on a CPU); ``--quick`` is a seconds-long run for tests. Any
option given explicitly overrides the run's. Each dtype gets the peers that are for it
(``adamx-master`` for float16/bfloat16 params, ``adamx-stochastic`` for bfloat16 ones).

Prints a summary table per device and dtype (case, peer, median time, ratio to torch
fused, % of the ceiling, bytes per element; ``--detail`` adds the full tables) and writes
step_bench.json (every record, the ceiling streams, the step targets) and a PNG per
device/dtype into --out. ``--targets`` also prints the CPU step targets the kernel is
tuned against (2 threads: see targets()) as met / not met.
"""

import argparse
import gc
import math
import sys
import time

import torch

import bench_common as bc

ALL_CASES = ["mnist", "25m", "gpt2", "sweep"]
ALL_PEERS = ["python-loop", "torch-forloop", "torch-foreach", "torch-fused", "adamx",
             "adamx-master", "adamx-stochastic", "adamx-bf16-state", "adamx-int8-state"]
GRAPH_PEERS = ["torch-foreach", "torch-fused", "adamx"]  # capturable, CUDA graph replay
CLIP_PEERS = ["torch-forloop", "torch-foreach", "torch-fused", "adamx"]  # --clip
CLIP_MAX_NORM = 1.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
FULL_SWEEP = "1e3,1e4,1e5,1e6,1e7,1e8"
# What each run times unless an option says otherwise: cases, sweep sizes, repeats (max),
# warm-up steps, min repeats, max seconds of timed steps per peer.
RUNS = {
    "default": dict(cases="mnist,25m,sweep", sweep_sizes="1e3,1e4,1e5,1e6", repeats=50,
                    warmup=5, min_repeats=5, max_seconds=1.0),
    "full": dict(cases=",".join(ALL_CASES), sweep_sizes=FULL_SWEEP, repeats=50, warmup=5,
                 min_repeats=5, max_seconds=3.0),
    "quick": dict(cases="mnist,sweep", sweep_sizes="1e3,1e5", repeats=5, warmup=1,
                  min_repeats=3, max_seconds=3.0),
}
LEAN_PEERS = ("adamx-bf16-state", "adamx-int8-state")

MNIST_SHAPES = [(200, 784), (200,), (10, 200), (10,)]


def gpt2_small_shapes(n_layer=12, d=768, vocab=50257, ctx=1024):
    """GPT-2 small's parameters (Hugging Face layout, lm_head tied to wte)."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,),                    # ln_1
                   (d, 3 * d), (3 * d,),          # attn.c_attn
                   (d, d), (d,),                  # attn.c_proj
                   (d,), (d,),                    # ln_2
                   (d, 4 * d), (4 * d,),          # mlp.c_fc
                   (4 * d, d), (d,)]              # mlp.c_proj
    shapes += [(d,), (d,)]                        # ln_f
    return shapes


def numel(shape):
    return math.prod(shape)


def build_cases(names, sweep_sizes):
    cases = []
    for name in names:
        if name == "mnist":
            cases.append(("mnist", "MNIST MLP (784-200-10)", MNIST_SHAPES))
        elif name == "25m":
            cases.append(("25m", "one 25M-element tensor", [(25_000_000,)]))
        elif name == "gpt2":
            cases.append(("gpt2", "GPT-2 small shapes", gpt2_small_shapes()))
        elif name == "sweep":
            for n in sweep_sizes:
                cases.append((f"sweep-{n:.0e}".replace("+0", "").replace("+", ""),
                              f"one tensor of {n} elements", [(n,)]))
    return cases


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
class Timer:
    """Times one call of ``fn``: perf_counter on the CPU, CUDA events on the GPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn):
        if self.cuda:
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def measure(fn, device, args, already_warm=0):
    """Median-ready list of times of ``fn`` after warm-up, bounded by --max-seconds."""
    timer = Timer(device)
    spent = 0.0
    for _ in range(max(args.warmup - already_warm, 0)):
        spent += timer(fn)
        if spent > args.max_seconds / 2:
            break
    times = []
    t_begin = time.perf_counter()
    while len(times) < args.repeats:
        times.append(timer(fn))
        if (time.perf_counter() - t_begin > args.max_seconds
                and len(times) >= args.min_repeats):
            break
    return times


def summarize(times):
    s = sorted(times)
    return {"n": len(s), "median_s": bc.median(s), "min_s": s[0],
            "p10_s": s[len(s) // 10], "p90_s": s[(9 * len(s)) // 10]}


def make_params(shapes, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        p = p.to(device).requires_grad_()
        p.grad = (torch.randn(shape, generator=g, dtype=torch.float32) * 1e-2).to(dtype).to(device)
        params.append(p)
    return params


def scaled_step(opt, device):
    """``opt``'s step as a GradScaler'd training loop takes it (see the module doc)."""
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)
    scaler.scale(torch.ones((), device=device))  # makes the scale, as scaling a loss does

    def step():
        scaler.step(opt)
        scaler.update()
    return step


def clipped_step(opt, params, device, args):
    """Clip + ``opt``'s step (see the module doc: --clip)."""
    scaler = None
    if args.grad_scaler:
        scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)
        scaler.scale(torch.ones((), device=device))
    folded = hasattr(opt, "clip_grad_norm_")  # adamx's (the script runs without adamx too)

    def step():
        if folded:
            opt.clip_grad_norm_(CLIP_MAX_NORM, grad_scaler=scaler)
        else:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, CLIP_MAX_NORM, foreach=True)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return step


def run_peer(name, params, device, args, graph=False):
    """Times ``name``'s step on ``params``; returns a summary or raises PeerUnavailable."""
    opt = bc.make_optimizer(name, params, lr=1e-3, capturable=graph)
    if args.grad_scaler and not isinstance(opt, torch.optim.Optimizer):
        raise bc.PeerUnavailable("GradScaler drives torch.optim.Optimizers only")
    if args.clip:
        step = clipped_step(opt, params, device, args)
    elif args.grad_scaler:
        step = scaled_step(opt, device)
    else:
        step = opt.step
    try:
        first = Timer(device)(step)  # creates the state
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    opt.step()
            torch.cuda.current_stream().wait_stream(side)
            cuda_graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(cuda_graph):
                    opt.step()
            except Exception as exc:  # noqa: BLE001
                raise bc.PeerUnavailable(f"graph capture failed: {type(exc).__name__}: {exc}")
            fn = cuda_graph.replay
        else:
            fn = step
        times = measure(fn, device, args, already_warm=0)
    except bc.PeerUnavailable:
        raise
    except (RuntimeError, ValueError) as exc:  # ValueError: GradScaler refuses float16
        raise bc.PeerUnavailable(f"step failed: {exc}") from exc
    finally:
        del opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    out = summarize(times)
    out["first_step_s"] = first
    return out


def bytes_per_element(args, peer, itemsize):
    """Bytes a step must move per element: 4 reads and 3 writes of the param's dtype, and
    the grad written back when scaled. With master weights the state and the master copy
    are fp32: the grad and the param read (the param to see whether it was written since
    the last step), the param written (and the grad written back when scaled) in the
    param's dtype, master copy and moments read and written in fp32. With --clip see the
    module doc."""
    if args.clip:
        if peer.startswith("adamx"):
            return 9 * itemsize
        return (12 if args.grad_scaler else 10) * itemsize
    if peer.startswith("adamx-master"):
        return (4 if args.grad_scaler else 3) * itemsize + 6 * 4
    if peer in ("adamx-bf16-state", "adamx-int8-state"):
        # param read and written, grad read (with master weights: the master copy read and
        # written in fp32 besides), moments read and written in 2 or 1 bytes (8-bit codes'
        # scales: 2 x 2 x 4 B per 256 elements)
        params = 3 * itemsize + 8 if itemsize == 2 else 3 * itemsize
        grads = itemsize if args.grad_scaler else 0
        moments = 8 if peer == "adamx-bf16-state" else 4 + 16 / 256
        return params + grads + moments
    return (8 if args.grad_scaler else 7) * itemsize


def run_ceiling(n_elements, itemsize, device, args):
    """The in-place stream rates over the case's byte footprint (see the module doc)."""
    m = max(1, math.ceil(n_elements * itemsize / 4))
    results = {}
    bufs = [torch.rand(m, device=device) for _ in range(4)]
    p, m_, v, g = bufs

    def adam_like():
        p.add_(g)
        m_.add_(g)
        v.add_(g)

    def rmw():
        p.add_(m_)
        v.add_(g)

    def scale():
        for b in bufs:
            b.mul_(1.0000001)

    for name, fn, bytes_per in (("adam-like", adam_like, 36), ("rmw", rmw, 24),
                                ("scale", scale, 32)):
        s = summarize(measure(fn, device, args))
        s["bytes"] = bytes_per * m
        s["gb_s"] = s["bytes"] / s["median_s"] / 1e9
        results[name] = s
    best = max(results, key=lambda k: results[k]["gb_s"])
    return {"streams": results, "best": best, "gb_s": results[best]["gb_s"],
            "float32_elements": m}


# --------------------------------------------------------------------------------------
# The CPU step targets
# --------------------------------------------------------------------------------------
def targets(records, dtype_name, device):
    """Met or not, per CPU step target whose peers were measured. The targets are set for
    the CPU kernel with 2 threads (ratios of median step times, and a share of the RMW
    ceiling); none are checked on CUDA."""
    by = {(r["case"], r["peer"]): r for r in records}
    out = []
    if device != "cpu":
        return out

    def ratio(case, a, b):
        ra, rb = by.get((case, a)), by.get((case, b))
        if ra and rb:
            return ra["median_s"] / rb["median_s"]
        return None

    def add(what, value, limit, sense="<="):
        if value is None:
            return
        ok = value <= limit if sense == "<=" else value >= limit
        out.append({"target": what, "value": value, "limit": limit, "sense": sense,
                    "pass": ok, "dtype": dtype_name, "device": device})

    if dtype_name == "float32":
        add("mnist: adamx / torch-fused", ratio("mnist", "adamx", "torch-fused"), 0.3)
        add("mnist: adamx / python-loop", ratio("mnist", "adamx", "python-loop"), 1 / 25)
        add("25m: adamx / torch-fused", ratio("25m", "adamx", "torch-fused"), 1.0)
        r = by.get(("25m", "adamx"))
        if r and r.get("ceiling_share") is not None:
            add("25m: adamx share of the RMW ceiling", r["ceiling_share"], 0.9, ">=")
        add("gpt2: adamx / torch-fused", ratio("gpt2", "adamx", "torch-fused"), 0.9)
        for case in ("25m", "gpt2"):
            add(f"{case}: adamx bf16 state / torch-fused",
                ratio(case, "adamx-bf16-state", "torch-fused"), 0.8)
            add(f"{case}: adamx int8 state / torch-fused",
                ratio(case, "adamx-int8-state", "torch-fused"), 0.7)
    elif dtype_name == "bfloat16":
        for case in ("mnist", "25m", "gpt2"):
            add(f"{case} bf16: adamx / torch-fused", ratio(case, "adamx", "torch-fused"), 0.8)
    return out


# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_mutually_exclusive_group()
    run.add_argument("--full", action="store_true",
                     help="the long run: every case (gpt2 too), the sweep to 1e8, up to 3 s "
                          "of timed steps per peer (minutes on a CPU)")
    run.add_argument("--quick", action="store_true",
                     help="tiny run for tests: mnist and a 1e3/1e5 sweep, 5 repeats")
    p.add_argument("--cases", default=None,
                   help="comma-separated subset of: " + ", ".join(ALL_CASES)
                        + f" (default {RUNS['default']['cases']}; --full: all)")
    p.add_argument("--peers", default=None,
                   help="comma-separated subset of: " + ", ".join(ALL_PEERS) + " (default: "
                        "all that are for the dtype)")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated: float32, bfloat16 (also float16, float64)")
    p.add_argument("--device", default="auto",
                   help="comma-separated: cpu, cuda; auto = cpu, and cuda when present")
    p.add_argument("--sweep-sizes", default=None,
                   help=f"element counts for the sweep (default {RUNS['default']['sweep_sizes']}"
                        f"; --full: {FULL_SWEEP})")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per peer (max, 50)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps after the first (5)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop timing a peer after this long (1 s; --full: 3 s) ...")
    p.add_argument("--min-repeats", type=int, default=None, help="... once it has this many (5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the bandwidth ceiling")
    p.add_argument("--no-graph", action="store_true", help="CUDA: skip the graph variants")
    p.add_argument("--grad-scaler", action="store_true",
                   help="time GradScaler'd steps (scaler.step + update), no graph variants")
    p.add_argument("--clip", action="store_true",
                   help="time clip_grad_norm_ + step (torch's clip against adamx's folded "
                        "one; with --grad-scaler, GradScaler'd), no graph variants")
    p.add_argument("--detail", action="store_true",
                   help="also print the full tables (elements, tensors, n, GB/s, ceiling streams)")
    p.add_argument("--targets", action="store_true",
                   help="also print the CPU step targets (set for 2 threads) as met / not met")
    p.add_argument("--out", default="out/step", help="output directory (default out/step)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.run = "full" if args.full else "quick" if args.quick else "default"
    args.peers_given = args.peers is not None
    for key, value in RUNS[args.run].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.peers is None:
        args.peers = ",".join(ALL_PEERS)
    args.case_list = bc.parse_list(args.cases, ALL_CASES, "case")
    args.peer_list = bc.parse_list(args.peers, ALL_PEERS, "peer")
    args.dtype_list = bc.parse_list(args.dtype, list(DTYPES), "dtype")
    try:
        args.sweep = [int(float(x)) for x in args.sweep_sizes.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"bad --sweep-sizes {args.sweep_sizes!r}")
    if args.device == "auto":
        args.device_list = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        args.device_list = bc.parse_list(args.device, ["cpu", "cuda"], "device")
        if "cuda" in args.device_list and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
    args.repeats = max(args.repeats, 1)
    args.min_repeats = min(max(args.min_repeats, 1), args.repeats)
    return args


def peers_for(args, dtype):
    """The peers of --peers that apply to params of ``dtype`` (and, with --grad-scaler, to a
    GradScaler'd step), and {peer: why not} for the others."""
    chosen, skipped = [], {}
    for peer in args.peer_list:
        if not bc.peer_applies(peer, dtype):
            skipped[peer] = f"for {bc.peer_dtypes_text(peer)} params only"
        elif args.grad_scaler and peer == "python-loop":
            skipped[peer] = "GradScaler drives torch.optim.Optimizers only"
        elif args.clip and peer not in CLIP_PEERS:
            skipped[peer] = "--clip times " + ", ".join(CLIP_PEERS)
        else:
            chosen.append(peer)
    return chosen, skipped


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------
def table_heading(dev_name, dtype_name, args, facts):
    where = (f"{torch.get_num_threads()} threads" if dev_name == "cpu" else
             facts.get("cuda_device", "cuda"))
    what = "GradScaler'd step" if args.grad_scaler else "optimizer.step()"
    if args.clip:
        what = "clip_grad_norm_ + " + what
    return f"## {dev_name}, {dtype_name}, {where}: {what} median"


def print_summary(dev_name, dtype_name, records, args, facts):
    """The short table: per case and peer the median time, the ratio to torch fused, the
    share of the ceiling and the bytes per element counted."""
    print(table_heading(dev_name, dtype_name, args, facts))
    rows = []
    for r in records:
        if r.get("is_ceiling"):
            continue
        rows.append([r["case"], r["peer"], bc.fmt_time(r["median_s"]),
                     "-" if r.get("ratio_to_torch_fused") is None
                     else f"{r['ratio_to_torch_fused']:.2f}",
                     "-" if r.get("ceiling_share") is None
                     else f"{100 * r['ceiling_share']:.0f}%",
                     f"{r['bytes_moved'] / r['elements']:.4g}"])
    print(bc.format_table(["case", "peer", "time", "x torch fused", "% ceiling", "B/elem"],
                          rows, align=["<", "<", ">", ">", ">", ">"]))
    print()


def summary_notes(records, args):
    """One line each on what the summary's columns and cases mean, and on the rows that
    need a word of why."""
    peers = {r["peer"] for r in records if not r.get("is_ceiling")}
    cases = {}
    for r in records:
        cases.setdefault(r["case"], r)
    notes = []
    if records:
        notes.append("time: median step; x torch fused: time over torch fused's (below 1 is "
                     "faster); % ceiling: B/elem x elements / time, over the fastest in-place "
                     "torch stream over the same bytes" + (" (--no-ceiling: not measured)"
                                                           if args.no_ceiling else ""))
        named = [f"{c} = {r['description']}" + (f", {r['elements']:,} elements in "
                                                f"{r['tensors']} tensors" if r["tensors"] > 1
                                                else "")
                 for c, r in cases.items() if not c.startswith("sweep")]
        if any(c.startswith("sweep") for c in cases):
            named.append("sweep-N = one tensor of N elements")
        notes.append("cases: " + "; ".join(named))
    if any(p.startswith("adamx-master") for p in peers):
        notes.append("adamx-master: float32 master copy and moments beside the param; "
                     "adamx-stochastic: bfloat16 params rounded stochastically")
    if peers & set(LEAN_PEERS):
        notes.append("adamx-bf16-state / adamx-int8-state (lean moments): their codec's "
                     "work per element and (8-bit) per block of 256 make them slower than "
                     "float32 state on cache-resident tensors; below 4096 elements a param "
                     "keeps float32 moments")
    if any(p.endswith("+graph") for p in peers):
        notes.append("+graph rows: capturable=True, one captured CUDA graph replayed per "
                     "step; their ratio is to torch-fused+graph")
    return notes


def print_detail(tables, args, facts):
    """The full tables (--detail): element and tensor counts, timed steps, GB/s, and the
    ceiling's streams."""
    for dev_name, dtype_name, records, _ in tables:
        print(f"{table_heading(dev_name, dtype_name, args, facts)}, in detail; GB/s = "
              f"B/elem x elements / median (ceiling rows: bytes the stream really moves)")
        rows = []
        for r in records:
            peer = r["peer"] + (f" ({r['stream']})" if r.get("is_ceiling") else "")
            rows.append([r["case"], f"{r['elements']:,}", r["tensors"], peer, r["n"],
                         bc.fmt_time(r["median_s"]), f"{r['gb_s']:.2f}",
                         "-" if r.get("ratio_to_torch_fused") is None
                         else f"{r['ratio_to_torch_fused']:.3f}",
                         "-" if r.get("ceiling_share") is None
                         else f"{100 * r['ceiling_share']:.1f}%"])
        print(bc.format_table(["case", "elements", "tensors", "peer", "n", "median",
                               "GB/s", "x torch-fused", "% ceiling"], rows,
                              align=["<", ">", ">", "<", ">", ">", ">", ">", ">"]))
        for r in records:
            if r.get("is_ceiling"):
                print(f"ceiling streams, {r['case']}: " + ", ".join(
                    f"{k} {v['gb_s']:.1f} GB/s" for k, v in r["ceiling_streams"].items()))
        slow = sorted({r["peer"] for r in records
                       if not r.get("is_ceiling") and r["n"] < args.repeats})
        if slow:
            print(f"note: fewer than {args.repeats} timed steps (bounded by --max-seconds "
                  f"{args.max_seconds:g}) for some cases of: {', '.join(slow)}; see column n")
        print()


def print_targets(tables):
    """The CPU step targets (--targets): goals the kernel is tuned against, set for 2
    threads, as met / not met."""
    threads = torch.get_num_threads()
    for dev_name, dtype_name, _, tgt in tables:
        for t in tgt:
            v = t["value"]
            shown = f"{100 * v:.1f}%" if "share" in t["target"] else f"{v:.3f}x"
            lim = f"{100 * t['limit']:.0f}%" if "share" in t["target"] else f"{t['limit']:.3g}x"
            print(f"target [{dev_name}, {dtype_name}, {threads} threads] {t['target']} = "
                  f"{shown} (goal {t['sense']} {lim}): {'met' if t['pass'] else 'not met'}")
    if any(tgt for *_, tgt in tables):
        print("(the targets are set for 2 threads" + (")" if threads == 2 else
                                                       f"; this run has {threads})"))
        print()


def main(argv=None):
    args = parse_args(argv)
    bc.prime_allocator()  # before anything is timed; see bench_common.prime_allocator
    out, t_script, facts = bc.start_run(args, "adamx optimizer.step() benchmark")
    print(f"# {args.run} run: repeats {args.repeats} (min {args.min_repeats}, at most "
          f"{args.max_seconds:g} s of timed steps per peer), warm-up {args.warmup} after the "
          f"state-creating step; median reported"
          + ("" if args.run == "full" else "; --full for gpt2 and the sweep to 1e8"))
    print(flush=True)
    cases = build_cases(args.case_list, args.sweep)
    all_records, all_targets, unavailable, not_applicable, tables = [], [], {}, {}, []
    n_jobs = len(args.device_list) * len(args.dtype_list) * len(cases)
    progress = bc.Progress(n_jobs, "step_bench", enabled=not args.no_progress)
    for dev_name in args.device_list:
        device = torch.device(dev_name)
        for dtype_name in args.dtype_list:
            dtype = DTYPES[dtype_name]
            itemsize = torch.empty((), dtype=dtype).element_size()
            peer_list, skipped = peers_for(args, dtype)
            for peer, why in skipped.items():
                not_applicable[f"{dev_name}/{dtype_name}/{peer}"] = why
            records = []
            for case, desc, shapes in cases:
                progress.update(0, suffix=f"{dev_name} {dtype_name} {case}")
                n = sum(numel(s) for s in shapes)
                params = make_params(shapes, dtype, device)
                ceiling = None if args.no_ceiling else run_ceiling(n, itemsize, device, args)
                peers = [(p, False) for p in peer_list]
                if device.type == "cuda" and not (args.no_graph or args.grad_scaler
                                                  or args.clip):
                    peers += [(p, True) for p in GRAPH_PEERS if p in peer_list]
                for peer, graph in peers:
                    label = peer + ("+graph" if graph else "")
                    progress.update(0, suffix=f"{dev_name} {dtype_name} {case} {label}")
                    try:
                        s = run_peer(peer, params, device, args, graph=graph)
                    except bc.PeerUnavailable as exc:
                        unavailable[f"{dev_name}/{dtype_name}/{case}/{label}"] = str(exc)
                        continue
                    must_move = bytes_per_element(args, peer, itemsize) * n
                    rec = {"device": dev_name, "dtype": dtype_name, "case": case,
                           "description": desc, "elements": n, "tensors": len(shapes),
                           "peer": label, "bytes_moved": must_move, **s,
                           "gb_s": must_move / s["median_s"] / 1e9}
                    rec["ceiling_gb_s"] = ceiling["gb_s"] if ceiling else None
                    rec["ceiling_share"] = rec["gb_s"] / ceiling["gb_s"] if ceiling else None
                    records.append(rec)
                # Ratios to torch fused (same graph-ness).
                for rec in records:
                    if rec["case"] != case:
                        continue
                    ref_name = "torch-fused+graph" if rec["peer"].endswith("+graph") \
                        else "torch-fused"
                    ref = next((r for r in records if r["case"] == case
                                and r["peer"] == ref_name), None)
                    rec["ratio_to_torch_fused"] = (rec["median_s"] / ref["median_s"]
                                                   if ref else None)
                if ceiling:
                    records.append({"device": dev_name, "dtype": dtype_name, "case": case,
                                    "description": desc, "elements": n, "tensors": len(shapes),
                                    "peer": "ceiling", "stream": ceiling["best"],
                                    "bytes_moved": ceiling["streams"][ceiling["best"]]["bytes"],
                                    "n": ceiling["streams"][ceiling["best"]]["n"],
                                    "median_s": ceiling["streams"][ceiling["best"]]["median_s"],
                                    "gb_s": ceiling["gb_s"], "ceiling_streams": ceiling["streams"],
                                    "ceiling_share": 1.0, "ratio_to_torch_fused": None,
                                    "is_ceiling": True})
                del params
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                progress.update(1)
            all_records += records
            tgt = [] if args.grad_scaler or args.clip else targets(  # for plain steps
                [r for r in records if not r.get("is_ceiling")], dtype_name, dev_name)
            all_targets += tgt
            tables.append((dev_name, dtype_name, records, tgt))
    progress.close()

    for dev_name, dtype_name, records, _ in tables:
        print_summary(dev_name, dtype_name, records, args, facts)
    notes = summary_notes(all_records, args)
    if args.peers_given:  # asked for by name, so say why they did not run
        for what, why in not_applicable.items():
            notes.append(f"{what} not run: {why}")
    for note in notes:
        print(f"note: {note}")
    if notes:
        print()
    for what, why in unavailable.items():
        print(f"UNAVAILABLE: {what}: {why.splitlines()[0]}")
    if unavailable:
        print()
    if args.detail:
        print_detail(tables, args, facts)
    if args.targets:
        print_targets(tables)

    elapsed = time.perf_counter() - t_script
    result = {"benchmark": "step_bench", "machine": facts,
              "config": {k: v for k, v in vars(args).items()},
              "bytes_per_element_rule": (
                  "torch 10 (12 with GradScaler) * itemsize, adamx 9 * itemsize: see --clip"
                  if args.clip else
                  "8 * itemsize (4 reads + 3 writes + the unscaled grad written back)"
                  if args.grad_scaler else "7 * itemsize (plain Adam: 4 reads + 3 writes)"),
              "records": all_records, "targets": all_targets, "unavailable": unavailable,
              "not_applicable": not_applicable,
              "script_seconds": elapsed, "command": " ".join(sys.argv)}
    path = bc.write_json(out / "step_bench.json", result)
    pngs = plot(tables, out, facts)
    print(f"wrote {path}" + "".join(f", {p}" for p in pngs))
    print(f"total time {elapsed:.1f} s")
    return 0


def plot(tables, out, facts):
    plt = bc.pyplot()
    if plt is None:
        return []
    written = []
    for dev_name, dtype_name, records, _ in tables:
        if not records:
            continue
        fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
        peers = []
        for r in records:
            if r["peer"] not in peers:
                peers.append(r["peer"])
        sweep = [r for r in records if r["case"].startswith("sweep")]
        named = [r for r in records if not r["case"].startswith("sweep")]
        for i, peer in enumerate(peers):
            color = "k" if peer == "ceiling" else f"C{i}"
            pts = sorted((r["elements"], r["median_s"], r["gb_s"]) for r in sweep
                         if r["peer"] == peer)
            style = dict(marker="o", color=color, linewidth=1.5 if peer.startswith("adamx") else 1,
                         linestyle=":" if peer.startswith("ceiling") else "-")
            if pts:
                xs, ts, bw = zip(*pts)
                ax_t.plot(xs, [t * 1e3 for t in ts], label=peer, **style)
                ax_b.plot(xs, bw, label=peer, **style)
            # Named cases as single markers at their element counts.
            pts = [(r["elements"], r["median_s"], r["gb_s"]) for r in named if r["peer"] == peer]
            for x, t, b in pts:
                ax_t.scatter([x], [t * 1e3], marker="x", s=40, color=color)
        ax_t.set_xscale("log")
        ax_t.set_yscale("log")
        ax_b.set_xscale("log")
        ax_t.set_xlabel("elements")
        ax_b.set_xlabel("elements")
        ax_t.set_ylabel("optimizer.step() median (ms)")
        ax_b.set_ylabel("effective GB/s (7 x itemsize bytes per element)")
        where = facts["cpu"] if dev_name == "cpu" else facts.get("cuda_device", "cuda")
        fig.suptitle(f"Adam step, {dev_name} {dtype_name} ({where}, "
                     f"{torch.get_num_threads()} threads)" if dev_name == "cpu" else
                     f"Adam step, {dev_name} {dtype_name} ({where})")
        ax_t.set_title("time (lines: sweep; x: mnist / 25m / gpt2 cases)", fontsize=9)
        ax_b.set_title("bandwidth (sweep)", fontsize=9)
        for ax in (ax_t, ax_b):
            ax.grid(alpha=0.3, which="both")
        if ax_b.lines:  # (named cases alone draw no lines)
            ax_b.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"step_bench_{dev_name}_{dtype_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    sys.exit(main())
