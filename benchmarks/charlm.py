"""Lean optimizer states on a run where quantization can bite: a small byte-level
transformer language model trained on the Python standard library's own source.

Every machine with Python has the data: the ``*.py`` files under
``sysconfig.get_paths()["stdlib"]`` (site-packages and dist-packages left out), in sorted
order of their relative paths; every 10th file (index 9, 19, ...) is held out for
validation, and files are read in that order until --data-mb MB are in (the last one cut).
The text is modelled as bytes (vocab 256), not characters: no vocabulary to build, the
same embedding and output sizes whatever the data budget or the Python version, every
file encodes (stdlib sources are almost all ASCII, so a byte is nearly always a
character). The stdlib differs between Python versions, so the JSON records the version
and a hash of the data: compare losses only where those match.

The model is a pre-LayerNorm decoder-only transformer (learned positions, causal
scaled-dot-product attention, 4x GELU MLP, untied output head, no dropout). Every run
starts from the same initial weights and sees the same batches (random windows of
--context + 1 bytes, drawn once from --seed), with AdamW (betas 0.9/0.999, eps 1e-8,
weight decay 0.01 on every param) and the same schedule: linear warmup over the first
5% of --steps, then cosine decay to 10% of --lr (torch.optim.lr_scheduler.LambdaLR).

    adamx-fp32          adamx.AdamW(): today's fp32 moments
    adamx-bf16          adamx.AdamW(state_dtype="bfloat16")
    adamx-int8          adamx.AdamW(state_dtype="int8")
    torch-fused         torch.optim.AdamW(fused=True) (a control)
    torchao-adamw8bit   torchao.optim.AdamW8bit() (block 256, compiled per param shape)
    bnb-adamw8bit       bitsandbytes.optim.AdamW8bit() (blockwise dynamic 8-bit)

A run whose optimizer this adamx build does not have (its constructor raises TypeError)
is reported as "not available in this build", a peer that does not import as "not
installed", and a run that raises later as failed at its step; the other runs go on.
--max-steps-peer stops the torchao/bitsandbytes runs early (their steps are slow on the
CPU); their curves then end there, on the same schedule.

The validation loss (mean cross-entropy in nats per byte over --eval-batches fixed
windows of the held-out files) is taken at step 0, every --eval-every steps and at the
end. The final train loss is the mean batch loss over the last --eval-every steps. Step
times are medians over all steps of the whole training step (forward, backward,
optimizer step, scheduler) and of optimizer.step() alone. State bytes per param: the
bytes of every tensor in ``opt.state`` (a tensor subclass counted by the tensors it is
made of, as torchao's OptimState8bit, which reports itself as float32), over the
model's param count. Writes results.json and val_loss.png into --out and prints a table.
"""

import argparse
import copy
import hashlib
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import bench_common as bc

VAL_EVERY_NTH_FILE = 10
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.01


# --------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------
def _adamx_adamw(**extra):
    def make(params, lr):
        if bc.adamx is None or not bc.adamx.is_compiled():
            raise bc.PeerUnavailable("adamx is not built (" + str(bc.adamx_info()) + ")")
        try:
            return bc.adamx.AdamW(params, lr=lr, betas=BETAS, eps=EPS,
                                  weight_decay=WEIGHT_DECAY, **extra)
        except TypeError as exc:
            raise bc.PeerUnavailable(f"not available in this build ({short(exc)})") from exc
    return make


def _torch_fused(params, lr):
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                             fused=True)


def _torchao(params, lr):
    try:
        from torchao.optim import AdamW8bit
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a broken install
        raise bc.PeerUnavailable(f"not installed ({short(exc)})") from exc
    return AdamW8bit(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


def _bnb(params, lr):
    try:
        from bitsandbytes.optim import AdamW8bit
    except Exception as exc:  # noqa: BLE001
        raise bc.PeerUnavailable(f"not installed ({short(exc)})") from exc
    return AdamW8bit(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


# name -> (description, factory(params, lr), is a third-party peer (--max-steps-peer))
OPTIMIZERS = {
    "adamx-fp32": ("adamx.AdamW()", _adamx_adamw(), False),
    "adamx-bf16": ('adamx.AdamW(state_dtype="bfloat16")',
                   _adamx_adamw(state_dtype="bfloat16"), False),
    "adamx-int8": ('adamx.AdamW(state_dtype="int8")', _adamx_adamw(state_dtype="int8"), False),
    "torch-fused": ("torch.optim.AdamW(fused=True)", _torch_fused, False),
    "torchao-adamw8bit": ("torchao.optim.AdamW8bit()", _torchao, True),
    "bnb-adamw8bit": ("bitsandbytes.optim.AdamW8bit()", _bnb, True),
}
BASELINE = "adamx-fp32"


def short(exc, limit=160):
    """``Type: message``, first line only, cut to ``limit`` characters."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def tensor_bytes(t):
    """Bytes a tensor holds; a wrapper subclass (torchao's OptimState8bit) by its parts."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(opt):
    return sum(tensor_bytes(v) for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def stdlib_files(root=None):
    """The stdlib's ``*.py`` files, sorted by their path relative to ``root``."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
             and p.is_file()]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(data_mb):
    """(train bytes, val bytes, facts): every VAL_EVERY_NTH_FILE-th file to validation,
    files read in order until ``data_mb`` MB are in."""
    root, files = stdlib_files()
    budget = int(data_mb * 2**20)
    parts = {"train": [], "val": []}
    total, used = 0, 0
    digest = hashlib.sha256()
    for i, path in enumerate(files):
        if total >= budget:
            break
        data = path.read_bytes()[:budget - total]
        parts["val" if i % VAL_EVERY_NTH_FILE == VAL_EVERY_NTH_FILE - 1 else "train"].append(data)
        digest.update(data)
        total += len(data)
        used += 1
    train, val = (torch.frombuffer(bytearray(b"".join(parts[k])), dtype=torch.uint8)
                  for k in ("train", "val"))
    facts = {"root": str(root), "files_found": len(files), "files_used": used,
             "train_bytes": len(train), "val_bytes": len(val), "sha256": digest.hexdigest(),
             "python": sys.version.split()[0]}
    return train, val, facts


def window_starts(n_bytes, count, context, generator):
    if n_bytes <= context + 1:
        raise SystemExit(f"charlm.py: {n_bytes} bytes of data is too little for context "
                         f"{context}; raise --data-mb")
    return torch.randint(0, n_bytes - context - 1, (count,), generator=generator)


def get_batch(data, starts, context, device):
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx].long().to(device)
    return chunk[:, :-1], chunk[:, 1:]


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d_model, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    def __init__(self, layers, d_model, heads, context, vocab=256):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x, y):
        h = self.tok(x) + self.pos[:x.shape[1]]
        logits = self.head(self.ln(self.blocks(h)))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def lr_lambda(steps):
    warmup = max(1, int(WARMUP_FRACTION * steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, val, val_starts, args):
    model.eval()
    losses = [float(model(*get_batch(val, s, args.context, args.device)))
              for s in val_starts.split(args.batch_size)]
    model.train()
    return sum(losses) / len(losses)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_run(name, init_state, train, val, train_starts, val_starts, args, progress):
    """Trains one model with optimizer ``name``; returns its record (PeerUnavailable if
    the optimizer cannot be built)."""
    desc, factory, is_peer = OPTIMIZERS[name]
    model = build_model(args)
    model.load_state_dict(init_state)
    model.to(args.device)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    opt = factory(params, args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps))
    steps = min(args.steps, args.max_steps_peer) if is_peer and args.max_steps_peer else args.steps
    rec = {"run": name, "optimizer": desc, "status": "ok", "available": True,
           "steps_planned": args.steps, "n_params": n_params}
    val_curve = [[0, evaluate(model, val, val_starts, args)]]
    train_curve, window, step_s, opt_s = [], [], [], []
    t_run = time.perf_counter()
    step = 0
    try:
        for step in range(steps):
            x, y = get_batch(train, train_starts[step], args.context, args.device)
            sync(args.device)
            t0 = time.perf_counter()
            loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync(args.device)
            t1 = time.perf_counter()
            opt.step()
            sync(args.device)
            t2 = time.perf_counter()
            sched.step()
            step_s.append(time.perf_counter() - t0)
            opt_s.append(t2 - t1)
            window.append(loss.item())
            done = step + 1
            if done % args.eval_every == 0 or done == steps:
                train_curve.append([done, sum(window) / len(window)])
                window = []
                val_curve.append([done, evaluate(model, val, val_starts, args)])
                progress.update(0, suffix=f"{name} val {val_curve[-1][1]:.3f}")
                if not progress.active and args.log_evals:  # a line per eval in a log file
                    print(f"# {name} step {done}: val {val_curve[-1][1]:.4f}, "
                          f"{time.perf_counter() - t_run:.0f} s", file=sys.stderr, flush=True)
            progress.update()
    except Exception as exc:  # noqa: BLE001 - a peer that fails on this device; reported
        rec.update(status="failed", available=False,
                   unavailable=f"failed at step {step} ({short(exc)})")
        progress.update(steps - step)
    rec.update({
        "steps": len(step_s), "train_s": time.perf_counter() - t_run,
        "val_curve": val_curve, "train_curve": train_curve,
        "final_val_loss": val_curve[-1][1] if len(val_curve) > 1 else None,
        "final_train_loss": train_curve[-1][1] if train_curve else None,
        "step_median_s": bc.median(step_s) if step_s else None,
        "opt_step_median_s": bc.median(opt_s) if opt_s else None,
        "first_step_s": step_s[0] if step_s else None,
        "state_bytes": state_bytes(opt),
        "state_bytes_per_param": state_bytes(opt) / n_params,
        "nonfinite_loss": any(not math.isfinite(x) for _, x in val_curve + train_curve),
    })
    return rec


def build_model(args):
    return ByteLM(args.layers, args.d_model, args.heads, args.context)


def compare_to_baseline(records):
    base = next((r for r in records if r["run"] == BASELINE and r["status"] == "ok"), None)
    for r in records:
        if base is None or r.get("final_val_loss") is None or r["status"] != "ok":
            continue
        # at the baseline's eval step equal to this run's last one (--max-steps-peer)
        ref = dict((s, v) for s, v in base["val_curve"]).get(r["val_curve"][-1][0])
        if ref is not None:
            r["val_loss_minus_fp32"] = r["final_val_loss"] - ref
            r["val_loss_vs_fp32_pct"] = 100 * (r["final_val_loss"] - ref) / ref


def table(records):
    rows = []
    for r in records:
        if r["status"] == "unavailable" or r.get("final_val_loss") is None:
            rows.append([r["run"], r["optimizer"], "-", "-", "-", "-", "-", "-", "-", "-",
                         r["unavailable"]])
            continue
        d, pct = r.get("val_loss_minus_fp32"), r.get("val_loss_vs_fp32_pct")
        notes = [r["unavailable"]] if r["status"] == "failed" else []
        if r["steps"] < r["steps_planned"] and r["status"] == "ok":
            notes.append(f"stopped at {r['steps']} of {r['steps_planned']} steps "
                         "(--max-steps-peer)")
        if r["nonfinite_loss"]:
            notes.append("non-finite loss")
        rows.append([
            r["run"], r["optimizer"], r["steps"], f"{r['final_val_loss']:.4f}",
            "-" if d is None else f"{d:+.4f}", "-" if pct is None else f"{pct:+.2f}%",
            "-" if r["final_train_loss"] is None else f"{r['final_train_loss']:.4f}",
            f"{r['step_median_s'] * 1e3:.1f}", f"{r['opt_step_median_s'] * 1e3:.2f}",
            f"{r['state_bytes_per_param']:.3f}", "; ".join(notes)])
    return bc.format_table(
        ["run", "optimizer", "steps", "final val loss", "vs fp32", "vs fp32 %",
         "final train loss", "step median (ms)", "opt.step median (ms)", "state B/param",
         "notes"], rows, align=["<", "<"] + [">"] * 8 + ["<"])


def plot(records, out, title):
    plt = bc.pyplot()
    if plt is None:
        return []
    fig, (ax, axd) = plt.subplots(1, 2, figsize=(13, 5))
    base = next((r for r in records if r["run"] == BASELINE and r["status"] == "ok"), None)
    ref = dict((s, v) for s, v in base["val_curve"]) if base else {}
    for r in records:
        if len(r.get("val_curve") or []) < 2:
            continue
        steps, losses = zip(*r["val_curve"])
        style = dict(linestyle="-" if r["run"] in (BASELINE, "torch-fused") else "--",
                     color=f"C{list(OPTIMIZERS).index(r['run'])}", label=r["run"],
                     linewidth=1.2)
        ax.plot(steps, losses, **style)
        pairs = [(s, v - ref[s]) for s, v in r["val_curve"] if s in ref and s > 0]
        if pairs and r is not base:
            axd.plot(*zip(*pairs), **style)
    ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    axd.axhline(0, color="black", linewidth=0.8)
    axd.set_xlabel("step")
    axd.set_ylabel(f"validation loss minus {BASELINE}")
    for a in (ax, axd):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    return [bc.save_figure(fig, out / "val_loss.png", title)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help="comma-separated subset of: " + ", ".join(OPTIMIZERS))
    p.add_argument("--out", default="out/charlm", help="output directory (default out/charlm)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr (warmup, then cosine)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--data-mb", type=float, default=8.0,
                   help="MB of stdlib source to read, train and validation (default 8)")
    p.add_argument("--max-steps-peer", type=int, default=None,
                   help="stop the torchao/bitsandbytes runs after this many steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for tests: 1 layer, d_model 32, context 32, batch 4, "
                        "6 steps on 0.25 MB")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-evals", action="store_true",
                   help="without a progress bar (no terminal), print a line per evaluation")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.context = 6, 4, 32
        args.layers, args.d_model, args.heads = 1, 32, 2
        args.eval_every, args.eval_batches, args.data_mb = 3, 2, 0.25
    if args.d_model % args.heads:
        p.error("--d-model must be a multiple of --heads")
    args.run_list = bc.parse_list(args.optimizers, list(OPTIMIZERS), "optimizer")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("charlm.py: error: --device cuda: torch sees no CUDA GPU "
              f"(torch {torch.__version__}); run with --device cpu", file=sys.stderr)
        return 2
    args.device = torch.device(args.device)
    out, t_script, facts = bc.start_run(args, "adamx lean-state byte-level LM benchmark")
    train, val, data = load_corpus(args.data_mb)
    print(f"# data: {data['files_used']} of {data['files_found']} stdlib .py files under "
          f"{data['root']} (python {data['python']}): {data['train_bytes']} train / "
          f"{data['val_bytes']} val bytes, sha256 {data['sha256'][:12]}")
    torch.manual_seed(args.seed)
    model = build_model(args)
    init_state = copy.deepcopy(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(args.seed)
    train_starts = window_starts(len(train), args.steps * args.batch_size, args.context, g) \
        .view(args.steps, args.batch_size)
    val_starts = window_starts(len(val), args.eval_batches * args.batch_size, args.context, g)
    print(f"# model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, "
          f"context {args.context}, {n_params} params; {args.steps} steps x batch "
          f"{args.batch_size}, lr {args.lr:g} (warmup {WARMUP_FRACTION:.0%}, cosine to "
          f"{FINAL_LR_FRACTION:g}x), eval every {args.eval_every} steps on "
          f"{args.eval_batches} batches; device {args.device}, seed {args.seed}")
    print()

    progress = bc.Progress(args.steps * len(args.run_list), "charlm",
                           enabled=not args.no_progress)
    records = []
    for name in args.run_list:
        progress.set_label(name)
        try:
            rec = train_run(name, init_state, train, val, train_starts, val_starts, args,
                            progress)
        except bc.PeerUnavailable as exc:
            rec = {"run": name, "optimizer": OPTIMIZERS[name][0], "status": "unavailable",
                   "available": False, "unavailable": str(exc)}
            progress.update(args.steps)
        except Exception as exc:  # noqa: BLE001 - a peer's constructor refusing these params
            rec = {"run": name, "optimizer": OPTIMIZERS[name][0], "status": "unavailable",
                   "available": False, "unavailable": f"error ({short(exc)})"}
            progress.update(args.steps)
        records.append(rec)
    progress.close()
    compare_to_baseline(records)

    title = (f"byte-level LM on the stdlib, {args.layers}x{args.d_model}, ctx {args.context},"
             f" {args.steps} steps x {args.batch_size}")
    print(f"## {title}")
    print(table(records))
    print("Val loss: nats/byte on the held-out files at the last step; vs fp32: minus "
          f"{BASELINE}'s at the same step. Step: forward + backward + optimizer step; "
          "state B/param: bytes of all tensors in opt.state over the param count.")

    result = {
        "benchmark": "charlm", "data": data, "n_params": n_params, "machine": facts,
        "config": {k: v for k, v in vars(args).items() if k != "run_list"},
        "hyperparams": {"betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY,
                        "warmup_fraction": WARMUP_FRACTION,
                        "final_lr_fraction": FINAL_LR_FRACTION},
        "runs": records, "script_seconds": time.perf_counter() - t_script,
        "command": " ".join(sys.argv),
    }
    path = bc.write_json(out / "results.json", result)
    pngs = plot(records, out, title)
    print(f"wrote {path}" + "".join(f", {p}" for p in pngs))
    print(f"total time {result['script_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
