"""What both benchmark scripts share: the optimizers under comparison behind one
interface, the run's machine facts, a small progress bar, tables, JSON and plotting."""

import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import adamx
    from adamx.reference import seed_adam
    _ADAMX_IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - reported, and the torch peers still run
    adamx = None
    seed_adam = None
    _ADAMX_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


class PeerUnavailable(RuntimeError):
    """This optimizer cannot run here (adamx not built, no fused kernel for a dtype...)."""


class PythonLoopAdam:
    """The tutorial's Python-loop Adam (``adamx.reference.seed_adam``) behind the
    optimizer interface the other peers have: its own first/second moment buffers, a step
    counter from 1, ``step()`` and ``zero_grad()``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999)):
        if seed_adam is None:
            raise PeerUnavailable(f"adamx.reference cannot be imported ({_ADAMX_IMPORT_ERROR})")
        self.params = [p for p in params]
        self.lr, self.betas = lr, betas
        self.vs = [torch.zeros_like(p) for p in self.params]
        self.sqrs = [torch.zeros_like(p) for p in self.params]
        self.t = 1

    def step(self):
        seed_adam(self.params, self.vs, self.sqrs, self.lr, self.t, *self.betas)
        self.t += 1

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


def _adamx_cls(name):
    if adamx is None:
        raise PeerUnavailable(f"import adamx failed ({_ADAMX_IMPORT_ERROR})")
    if not adamx.is_compiled():
        raise PeerUnavailable("adamx is imported but its compiled kernels are not built "
                              "(pip install ., or python setup.py build_ext --inplace)")
    return getattr(adamx, name)


# The peers that are for some param dtypes only (on others they raise PeerUnavailable):
# master weights for float16/bfloat16 params, stochastic rounding for bfloat16 ones.
PEER_DTYPES = {"adamx-master": (torch.float16, torch.bfloat16),
               "adamx-stochastic": (torch.bfloat16,)}


def peer_applies(name, dtype):
    """Whether the peer ``name`` is for params of ``dtype`` (see PEER_DTYPES)."""
    return dtype in PEER_DTYPES.get(name, (dtype,))


def peer_dtypes_text(name):
    """``name``'s param dtypes as text, e.g. "float16/bfloat16" (all: "any")."""
    if name not in PEER_DTYPES:
        return "any"
    return "/".join(str(d).replace("torch.", "") for d in PEER_DTYPES[name])


# name -> (description, factory(params, lr, capturable) -> optimizer)
PEERS = {
    "python-loop": ("the tutorial's Python loop (adamx.reference.seed_adam, eps inside sqrt)",
                    lambda ps, lr, cap: PythonLoopAdam(ps, lr=lr)),
    "torch": ("torch.optim.Adam() defaults (CPU: the for-loop; CUDA: foreach)",
              lambda ps, lr, cap: torch.optim.Adam(ps, lr=lr, capturable=cap)),
    "torch-forloop": ("torch.optim.Adam(foreach=False)",
                      lambda ps, lr, cap: torch.optim.Adam(ps, lr=lr, foreach=False,
                                                           capturable=cap)),
    "torch-foreach": ("torch.optim.Adam(foreach=True)",
                      lambda ps, lr, cap: torch.optim.Adam(ps, lr=lr, foreach=True,
                                                           capturable=cap)),
    "torch-fused": ("torch.optim.Adam(fused=True)",
                    lambda ps, lr, cap: torch.optim.Adam(ps, lr=lr, fused=True,
                                                         capturable=cap)),
    "adamx": ("adamx.Adam()",
              lambda ps, lr, cap: _adamx_cls("Adam")(ps, lr=lr, capturable=cap)),
    "adamx-eps-inside": ("adamx.Adam(eps_inside_sqrt=True)",
                         lambda ps, lr, cap: _adamx_cls("Adam")(ps, lr=lr, capturable=cap,
                                                                eps_inside_sqrt=True)),
    "adamx-master": ("adamx.Adam(master_weights=True): fp32 master copies and state",
                     lambda ps, lr, cap: _adamx_cls("Adam")(
                         _reduced(ps, "master weights", "adamx-master"), lr=lr,
                         capturable=cap, master_weights=True)),
    "adamx-stochastic": ("adamx.Adam(stochastic_rounding=True)",
                         lambda ps, lr, cap: _adamx_cls("Adam")(
                             _reduced(ps, "stochastic rounding", "adamx-stochastic"),
                             lr=lr, capturable=cap, stochastic_rounding=True)),
    "adamx-bf16-state": ("adamx.Adam(state_dtype='bfloat16'): bfloat16 moments (bfloat16 "
                         "params: with master weights)",
                         lambda ps, lr, cap: _adamx_cls("Adam")(
                             ps, lr=lr, capturable=cap, state_dtype="bfloat16",
                             master_weights=any(p.dtype == torch.bfloat16 for p in ps))),
    "adamx-int8-state": ("adamx.Adam(state_dtype='int8'): 8-bit moments",
                         lambda ps, lr, cap: _adamx_cls("Adam")(
                             ps, lr=lr, capturable=cap, state_dtype="int8")),
}


def _reduced(params, what, peer):
    """``params`` if the peer ``peer`` applies to all of them (``what`` is what it is for),
    else PeerUnavailable."""
    if any(not peer_applies(peer, p.dtype) for p in params):
        raise PeerUnavailable(f"{what} is for {peer_dtypes_text(peer)} params")
    return params


def make_optimizer(name, params, lr=1e-3, capturable=False):
    """The peer ``name`` over ``params``; PeerUnavailable (with the reason) if it cannot be
    built here."""
    if name not in PEERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(PEERS)}")
    try:
        return PEERS[name][1](list(params), lr, capturable)
    except PeerUnavailable:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        raise PeerUnavailable(f"{type(exc).__name__}: {exc}") from exc


def parse_list(text, allowed, what):
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def prime_allocator(nbytes=30 * 2**20):
    """Allocates and frees one ``nbytes`` CPU buffer, as any training process has done by
    the time it steps its optimizer (loading data, a first forward pass).

    glibc's malloc serves blocks above its mmap threshold (128 KiB at start) by mmap, and
    munmaps them on free, so each such temporary is page-faulted in afresh; freeing one
    mmapped block raises the threshold to its size (up to 32 MiB). A fresh benchmark
    process has not done that yet, and the unfused peers (the Python loop, torch's for-loop
    and foreach), which allocate temporaries every step, would then measure several times
    slower than in training (measured: the Python loop's MNIST step 0.85 ms instead of
    0.23 ms). adamx and torch's fused step allocate nothing per step."""
    buf = torch.empty(nbytes // 4, dtype=torch.float32)
    buf.fill_(0)
    del buf


def start_run(args, title):
    """The prologue of a benchmark's main(): threads, output folder, header.
    Returns (output folder, start time, machine facts)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_script = time.perf_counter()
    facts = machine_facts()
    print_header(title, facts)
    return out, t_script, facts


# --------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def adamx_info():
    if adamx is None:
        return {"available": False, "error": _ADAMX_IMPORT_ERROR}
    try:
        info = dict(adamx.build_info())
    except Exception as exc:  # noqa: BLE001
        info = {"compiled": adamx.is_compiled(), "build_info_error": str(exc)}
    info["available"] = bool(info.get("compiled", False))
    info["module"] = os.path.dirname(adamx.__file__)
    return info


def utc_now():
    """The time now, UTC, ISO 8601 to the second (2026-12-05T07:30:00Z)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_average():
    """The 1, 5 and 15 minute load averages (None where the OS has none): a figure measured
    while other work shared the CPUs says so."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def command_line():
    """How this process was started, as a shell line: the ADAMX_* variables set, python, and
    the script's arguments (its path as given)."""
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
           if k.startswith("ADAMX_")]
    return " ".join(env + ["python", shlex.join(sys.argv)])


def machine_facts(device="cpu"):
    """The machine and the run's start: CPU, threads, memory, versions, the adamx build, the
    start time (UTC) and the load averages then. write_json adds the end's."""
    facts = {
        "started_utc": utc_now(),
        "loadavg_start": load_average(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "adamx": adamx_info(),
    }
    if torch.cuda.is_available():
        facts["cuda_device"] = torch.cuda.get_device_name(0)
        facts["cuda_runtime"] = torch.version.cuda
    return facts


def print_header(title, facts, out=sys.stdout):
    print(f"# {title}", file=out)
    print(f"#   CPU: {facts['cpu']} ({facts['logical_cpus']} logical CPUs, torch threads "
          f"{facts['torch_threads']}, {facts['memory_gib']} GiB RAM)", file=out)
    print(f"#   python {facts['python']}, torch {facts['torch']}"
          + (f", GPU: {facts['cuda_device']} (CUDA {facts['cuda_runtime']})"
             if "cuda_device" in facts else ", no GPU"), file=out)
    ax = facts["adamx"]
    if ax.get("available"):
        shown = {k: v for k, v in ax.items() if k not in ("available", "module")}
        print(f"#   adamx build: {shown}", file=out)
    else:
        print(f"#   adamx: UNAVAILABLE ({ax.get('error') or ax})", file=out)
    out.flush()


# --------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (and
    ``enabled``); otherwise every call does nothing."""

    def __init__(self, total, label="", enabled=True, stream=None, width=28, min_interval=0.1):
        self.stream = stream or sys.stderr
        self.active = bool(enabled) and _isatty(self.stream)
        self.total, self.label, self.width = max(int(total), 1), label, width
        self.n, self.min_interval, self.last, self.start = 0, min_interval, 0.0, time.perf_counter()
        self.suffix = ""

    def update(self, n=1, suffix=None):
        self.n += n
        if suffix is not None:
            self.suffix = suffix
        if not self.active:
            return
        now = time.perf_counter()
        if now - self.last >= self.min_interval or self.n >= self.total:
            self.last = now
            self._draw(now)

    def set_label(self, label):
        self.label = label

    def _draw(self, now):
        frac = min(self.n / self.total, 1.0)
        filled = int(frac * self.width)
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        bar = "#" * filled + "-" * (self.width - filled)
        line = (f"\r{self.label} [{bar}] {self.n}/{self.total} {elapsed:5.1f}s"
                + (f" eta {eta:5.1f}s" if math.isfinite(eta) else "")
                + (f" {self.suffix}" if self.suffix else ""))
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()

    def close(self):
        if self.active:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
            self.active = False


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------
def format_table(headers, rows, align=None):
    """A GitHub-flavoured markdown table (readable as plain text too)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(3, len(str(h)), *(len(r[i]) for r in cells)) if cells else
              max(3, len(str(h))) for i, h in enumerate(headers)]
    align = align or ["<"] + [">"] * (len(headers) - 1)

    def line(values):
        return "| " + " | ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if a == ">" else "-" * w
                            for a, w in zip(align, widths)) + " |"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def write_json(path, obj):
    """Writes ``obj`` as JSON. A result (a dict) gets ``command``, the command line that
    ran it (command_line(): it replaces a script's own " ".join(sys.argv), which lacks the
    ADAMX_* variables), and, in its ``machine`` facts, the end time (UTC) and the load
    averages at the end."""
    path = Path(path)
    if isinstance(obj, dict):
        obj = dict(obj)
        obj["command"] = command_line()
        if isinstance(obj.get("machine"), dict):
            obj["machine"] = {**obj["machine"], "finished_utc": utc_now(),
                              "loadavg_end": load_average()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
        f.write("\n")
    return path


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o)}")


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a printed note)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception as exc:  # noqa: BLE001
        print(f"note: matplotlib is not usable ({exc}); PNG plots are skipped, JSON is written")
        return None


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_time(seconds):
    """Seconds in the unit that reads best (us, ms, s)."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def save_figure(fig, path, title=None):
    """Titles, lays out, writes (dpi 110) and closes a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
