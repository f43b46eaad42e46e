"""Mixed-precision training of the tutorial's MNIST MLP: what each way of keeping
reduced-precision params costs in loss, accuracy, step time and memory.

The model, data, batch order and training loop are mnist_mlp.py's (784-200-10 ReLU,
batch 64, pixels in [-1, 1], the same initial weights and batch order for every run, the
pre-normalised ``tensors`` data path). Each run trains one model:

    fp32                fp32 params, adamx.Adam
    bf16-nearest        bf16 params and forward, adamx.Adam, round-to-nearest
    bf16-nearest-torch  the same with torch.optim.Adam(fused=True) (a control)
    bf16-stochastic     bf16 params, adamx.Adam(stochastic_rounding=True)
    bf16-master         bf16 params, adamx.Adam(master_weights=True) (fp32 copy in the state)
    fp16-scaler-adamx   fp16 params and forward, torch.amp.GradScaler, adamx.Adam
    fp16-scaler-torch   the same with torch.optim.Adam(fused=True)
    fp16-scaler-master  fp16 params, GradScaler, adamx.Adam(master_weights=True): fp32
                        master copies and moments (no peer has this in its fused step)
    fp32-bf16-state     fp32 params, adamx.Adam(state_dtype="bfloat16"): bfloat16 moments
    fp32-int8-state     fp32 params, adamx.Adam(state_dtype="int8"): 8-bit moments
    bf16-master-bf16-state  bf16 params, master weights, bfloat16 moments
    fp32-clip           fp32 params, adamx.Adam, grads clipped to a global 2-norm of 1
                        by ``opt.clip_grad_norm_`` (folded into the step)
    fp32-clip-torch     the same with torch.nn.utils.clip_grad_norm_ and
                        torch.optim.Adam(fused=True)
    fp16-scaler-clip-master  fp16 params, GradScaler, master weights, clipped by
                        ``opt.clip_grad_norm_(grad_scaler=scaler)`` (no unscale pass)
    fp16-scaler-clip-torch   fp16 params, GradScaler, ``scaler.unscale_`` then torch's
                        clip, torch.optim.Adam(fused=True): not available, as GradScaler's
                        unscale_ refuses fp16 grads (reported so, with the reason)
(Compact moments are for params of 4096 elements or more: here the 784x200 weight; the
others keep fp32 moments.)

The loss is taken on the logits cast to fp32. Two settings: ``default`` (lr 1e-3, the
tutorial's) and ``small-lr`` (--small-lr), where many Adam updates are smaller than half
a bf16 ulp of their weight, so that round-to-nearest drops them and bf16 training lags
behind fp32. For the bf16 runs without a master copy, a sample of steps (every
NOOP_EVERY-th) measures that directly: of the param elements that the same step computed
in fp32 (from the same param, grad and moments) moves, the share whose bf16 param came out
unchanged.

A run whose optimizer argument this adamx build lacks (its constructor raises TypeError)
is reported as not available, and the others go on. Prints one table per setting, writes
results.json and loss_curves.png into --out. Step times are of ``optimizer.step()``, and
for the GradScaler runs of ``scaler.step(opt)`` + ``scaler.update()``; the sampled steps
are not timed.

Measured: fp16 params with fp16 Adam moments diverge at the tutorial's settings, with
adamx and with torch's fused Adam alike: (1 - beta2) * grad^2 underflows fp16 in most of
the second moment after the first step, and the second step divides by eps; with master
weights the moments are fp32. The table
notes the first step with a non-finite loss.
"""

import argparse
import copy
import math
import sys
import time

import torch
import torch.nn.functional as F

import bench_common as bc
import mnist_data
import mnist_mlp

# name -> (param dtype, optimizer (a bench_common peer), GradScaler, measure no-op updates,
#          clip the grads' global norm to CLIP_MAX_NORM)
RUNS = {
    "fp32": (torch.float32, "adamx", False, False),
    "bf16-nearest": (torch.bfloat16, "adamx", False, True),
    "bf16-nearest-torch": (torch.bfloat16, "torch-fused", False, True),
    "bf16-stochastic": (torch.bfloat16, "adamx-stochastic", False, True),
    "bf16-master": (torch.bfloat16, "adamx-master", False, False),
    "fp16-scaler-adamx": (torch.float16, "adamx", True, False),
    "fp16-scaler-torch": (torch.float16, "torch-fused", True, False),
    "fp16-scaler-master": (torch.float16, "adamx-master", True, False),
    "fp32-bf16-state": (torch.float32, "adamx-bf16-state", False, False),
    "fp32-int8-state": (torch.float32, "adamx-int8-state", False, False),
    "bf16-master-bf16-state": (torch.bfloat16, "adamx-bf16-state", False, False),
    "fp32-clip": (torch.float32, "adamx", False, False, True),
    "fp32-clip-torch": (torch.float32, "torch-fused", False, False, True),
    "fp16-scaler-clip-master": (torch.float16, "adamx-master", True, False, True),
    "fp16-scaler-clip-torch": (torch.float16, "torch-fused", True, False, True),
}
RUNS = {name: run + (False,) * (5 - len(run)) for name, run in RUNS.items()}
CLIP_MAX_NORM = 1.0
SETTINGS = ["default", "small-lr"]
# The small-lr setting's lr, chosen by measurement (real MNIST, 12800 images, 2 epochs):
# bf16-nearest's final loss exceeds fp32's by 0.22 at 1e-4 (76% of updates lost) and by
# 0.74 at 3e-5 (89%); at 1e-3, after one epoch, by 0.002 (41%). 1e-4 is an lr people use.
SMALL_LR = 1e-4
NOOP_EVERY = 10       # the no-op measure samples every 10th step
CURVE_WINDOW = 50     # the loss curve: mean batch loss over windows of 50 steps
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class ScaledStepper(mnist_mlp.PlainStepper):
    """torch.amp.GradScaler's recipe: the scaled loss's backward, ``scaler.step(opt)``
    (which hands a fused optimizer the scale and the inf flag) and ``scaler.update()``."""

    def __init__(self, opt, device):
        super().__init__(opt)
        self.scaler = torch.amp.GradScaler(device.type)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def step(self):
        self.scaler.step(self.opt)
        self.scaler.update()


class NoOpProbe:
    """Counts, on every NOOP_EVERY-th step, the param elements that the step computed in
    fp32 moves (from the same param, grad and Adam state, torch.optim.Adam's formula) and,
    of those, the ones whose reduced-precision param the real step left unchanged."""

    def __init__(self, opt):
        self.opt = opt
        self.moved = self.unchanged = self.steps = 0

    def samples(self, step):
        return step % NOOP_EVERY == NOOP_EVERY - 1

    def measure(self, take_step):
        group = self.opt.param_groups[0]
        lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
        params = [p for p in group["params"] if p.grad is not None]
        before, fp32_after = [], []
        for p in params:
            state = self.opt.state[p]
            t = float(state["step"]) + 1
            p32, g = p.detach().float(), p.grad.float()
            m = state["exp_avg"].float().lerp_(g, 1 - beta1)
            v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
            before.append(p.detach().clone())
            fp32_after.append(p32 - lr / (1 - beta1 ** t) * m / denom)
        take_step()
        for p, b, a in zip(params, before, fp32_after):
            moved = a != b.float()
            self.moved += int(moved.sum())
            self.unchanged += int((moved & (p.detach() == b)).sum())
        self.steps += 1

    def share(self):
        return self.unchanged / self.moved if self.moved else None


def clip_before_step(stepper, params):
    """``stepper`` with the grads clipped before each step: adamx's ``clip_grad_norm_``
    (folded into the step; with GradScaler, in place of its unscale), else GradScaler's
    unscale (if any) and ``torch.nn.utils.clip_grad_norm_``. Timed as part of the step."""
    opt, scaler, step = stepper.opt, getattr(stepper, "scaler", None), stepper.step

    def clipped_step():
        if hasattr(opt, "clip_grad_norm_"):
            opt.clip_grad_norm_(CLIP_MAX_NORM, grad_scaler=scaler)
        else:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, CLIP_MAX_NORM)
        step()
    stepper.step = clipped_step
    return stepper


def window_means(losses, window=CURVE_WINDOW):
    """[last step of the window, mean batch loss over it] per window of ``window`` steps."""
    return [[min(i + window, len(losses)) - 1, sum(losses[i:i + window]) /
             len(losses[i:i + window])] for i in range(0, len(losses), window)]


def bytes_per_param(tensors, n_params):
    return sum(t.numel() * t.element_size() for t in tensors) / n_params


def make_run_optimizer(peer, params, lr):
    """The optimizer, or PeerUnavailable saying whether this build lacks the argument."""
    try:
        return bc.make_optimizer(peer, params, lr=lr)
    except bc.PeerUnavailable as exc:
        if isinstance(exc.__cause__, TypeError):
            raise bc.PeerUnavailable(f"not available in this build ({exc})") from exc
        raise


def train_run(name, setting, lr, arrays, init_state, args, progress):
    """Trains run ``name`` at learning rate ``lr``; returns its record."""
    dtype, peer, scaled, probe_noops, clip = RUNS[name]
    model = mnist_mlp.fresh_model(init_state, args).to(dtype)
    opt = make_run_optimizer(peer, model.parameters(), lr)
    if scaled and dtype != torch.float32 and not getattr(opt, "_step_supports_amp_scaling",
                                                         False):
        # GradScaler's generic path (its own unscale pass) refuses fp16 grads.
        raise bc.PeerUnavailable("not available in this build (the optimizer lacks "
                                 "GradScaler's fused path, which fp16 grads need)")
    if clip and scaled and dtype == torch.float16 and not hasattr(opt, "clip_grad_norm_"):
        raise bc.PeerUnavailable("torch's loop cannot clip fp16 params' grads under "
                                 "GradScaler (its unscale_ refuses fp16 grads)")
    stepper = ScaledStepper(opt, args.device) if scaled else mnist_mlp.PlainStepper(opt)
    if clip:
        stepper = clip_before_step(stepper, list(model.parameters()))
    probe = NoOpProbe(opt) if probe_noops else None
    loader = mnist_mlp.batches("tensors", arrays, args)
    run = mnist_mlp.train_loop(
        lambda xb, yb: F.cross_entropy(model(xb.to(dtype)).float(), yb), stepper, loader,
        args, progress, f"{setting}/{name}", probe)
    acc = mnist_mlp.accuracy(model, arrays["test_xn"].to(dtype), arrays["test_y"])
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    steps_taken = int(opt.state[params[0]]["step"])  # GradScaler skips overflowing steps
    losses = run["step_losses"]
    return {
        "run": name, "setting": setting, "available": True, "lr": lr,
        "param_dtype": DTYPE_NAMES[dtype], "optimizer": bc.PEERS[peer][0],
        "grad_scaler": scaled, "clip_max_norm": CLIP_MAX_NORM if clip else None,
        "device": str(args.device), "epochs": args.epochs,
        "steps": run["steps"], "steps_skipped": run["steps"] - steps_taken,
        "epoch_losses": run["epoch_losses"], "final_train_loss": run["epoch_losses"][-1],
        "first_nonfinite_loss_step": next(
            (i for i, x in enumerate(losses) if not math.isfinite(x)), None),
        "test_accuracy": acc, "train_s": run["train_s"],
        "step_median_us": bc.median(run["step_times"]) * 1e6,
        "steps_timed": len(run["step_times"]),
        "param_bytes_per_param": bytes_per_param(params, n_params),
        "state_bytes_per_param": bytes_per_param(state, n_params),
        "noop_update_share": probe.share() if probe else None,
        "noop_sampled_steps": probe.steps if probe else 0,
        "noop_sampled_moves": probe.moved if probe else 0,
        f"loss_curve_mean_per_{CURVE_WINDOW}_steps": window_means(losses),
    }


def compare_to_fp32(records):
    """Adds each available run's differences from the setting's fp32 run."""
    base = next((r for r in records if r["run"] == "fp32" and r["available"]), None)
    for r in records:
        if base and r["available"]:
            r["train_loss_minus_fp32"] = r["final_train_loss"] - base["final_train_loss"]
            r["test_accuracy_minus_fp32"] = r["test_accuracy"] - base["test_accuracy"]


def table(records):
    rows = []
    for r in records:
        if not r["available"]:
            rows.append([r["run"], r["param_dtype"], r["optimizer"], "-", "-", "-", "-", "-",
                         "-", "-", "-", r["unavailable"]])
            continue
        noop = r["noop_update_share"]
        notes = [f"{r['steps_skipped']} steps skipped (overflow)"] if r["grad_scaler"] else []
        if r["first_nonfinite_loss_step"] is not None:
            notes.append(f"loss non-finite from step {r['first_nonfinite_loss_step']}")
        diff_loss, diff_acc = r.get("train_loss_minus_fp32"), r.get("test_accuracy_minus_fp32")
        rows.append([
            r["run"], r["param_dtype"], r["optimizer"], f"{r['final_train_loss']:.4f}",
            "-" if diff_loss is None else f"{diff_loss:+.4f}",
            f"{100 * r['test_accuracy']:.2f}%",
            "-" if diff_acc is None else f"{100 * diff_acc:+.2f}",
            f"{r['step_median_us']:.0f}", f"{r['param_bytes_per_param']:g}",
            f"{r['state_bytes_per_param']:.2f}",
            "-" if noop is None else f"{100 * noop:.1f}%", "; ".join(notes)])
    return bc.format_table(
        ["run", "params", "optimizer", "final train loss", "vs fp32", "test acc",
         "vs fp32 (pp)", "step median (us)", "param B/param", "state B/param",
         "no-op updates", "notes"], rows,
        align=["<", "<", "<"] + [">"] * 8 + ["<"])


def plot(by_setting, out, data, args):
    plt = bc.pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, len(by_setting), figsize=(7 * len(by_setting), 5),
                             squeeze=False)
    key = f"loss_curve_mean_per_{CURVE_WINDOW}_steps"
    for ax, (setting, (lr, records)) in zip(axes[0], by_setting.items()):
        for r in records:
            if r["available"]:
                steps, losses = zip(*r[key])
                ax.plot(steps, losses, label=r["run"], linewidth=1,
                        linestyle="-" if r["param_dtype"] == "fp32" else "--")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"train loss (mean over {CURVE_WINDOW} steps)")
        ax.set_title(f"{setting}: lr {lr:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [bc.save_figure(fig, out / "loss_curves.png", "MLP 784-200-10, mixed precision"
                           + (" (SYNTHETIC data)" if data.synthetic else " (MNIST)"))]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mnist_data.add_arguments(p)
    p.add_argument("--out", default="out/mixed_precision",
                   help="output directory (default out/mixed_precision)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="the default setting's lr")
    p.add_argument("--small-lr", type=float, default=SMALL_LR,
                   help=f"the small-lr setting's lr (default {SMALL_LR:g})")
    p.add_argument("--setting", choices=SETTINGS + ["both"], default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=",".join(RUNS),
                   help="comma-separated subset of: " + ", ".join(RUNS))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    args = mnist_data.apply_quick(p.parse_args(argv))
    args.run_list = bc.parse_list(args.runs, list(RUNS), "run")
    args.settings = SETTINGS if args.setting == "both" else [args.setting]
    return args


def main(argv=None):
    args = parse_args(argv)
    args.device = mnist_mlp.check_device(args, prog="mixed_precision.py")
    out, t_script, facts = bc.start_run(args, "adamx mixed-precision MNIST MLP benchmark")
    data, arrays = mnist_mlp.load_data(args)
    bc.prime_allocator()  # as mnist_mlp.py does; see bench_common.prime_allocator
    tag = "" if not data.synthetic else " [SYNTHETIC DATA: losses not comparable with MNIST]"
    print(f"# data: {data.label} from {data.where}: {len(arrays['train_y'])} train / "
          f"{len(arrays['test_y'])} test images" + tag)
    lrs = {"default": args.lr, "small-lr": args.small_lr}
    print(f"# config: device {args.device}, epochs {args.epochs}, batch {args.batch_size}, "
          f"seed {args.seed}, settings "
          + ", ".join(f"{s} (lr {lrs[s]:g})" for s in args.settings)
          + f", runs {', '.join(args.run_list)}")
    print()

    init_state = copy.deepcopy(mnist_mlp.build_model(args.seed).state_dict())
    steps_per_epoch = math.ceil(len(arrays["train_y"]) / args.batch_size)
    progress = bc.Progress(steps_per_epoch * args.epochs * len(args.run_list)
                           * len(args.settings), "mixed precision",
                           enabled=not args.no_progress)
    by_setting = {}
    for setting in args.settings:
        records = []
        for name in args.run_list:
            try:
                records.append(train_run(name, setting, lrs[setting], arrays, init_state,
                                         args, progress))
            except bc.PeerUnavailable as exc:
                dtype, peer = RUNS[name][:2]
                records.append({"run": name, "setting": setting, "available": False,
                                "unavailable": str(exc), "lr": lrs[setting],
                                "param_dtype": DTYPE_NAMES[dtype],
                                "optimizer": bc.PEERS[peer][0]})
                progress.update(steps_per_epoch * args.epochs)
        compare_to_fp32(records)
        by_setting[setting] = (lrs[setting], records)
    progress.close()

    for setting, (lr, records) in by_setting.items():
        print(f"## {setting}: lr {lr:g}, {args.epochs} epochs x {steps_per_epoch} steps{tag}")
        print(table(records))
        for r in records:
            if r["available"] and r["noop_update_share"] is not None:
                print(f"{r['run']}: {100 * r['noop_update_share']:.1f}% of the param updates "
                      f"that fp32 makes left the {r['param_dtype']} param unchanged "
                      f"({r['noop_sampled_moves']} updates on {r['noop_sampled_steps']} "
                      f"sampled steps)")
        print()
    print("Step times: optimizer.step(), for the GradScaler runs scaler.step(opt) + "
          "scaler.update(); state B/param counts every tensor in the optimizer state.")

    result = {
        "benchmark": "mixed_precision", "synthetic": data.synthetic, "data": data.label,
        "data_source": data.where, "data_notes": data.notes,
        "train_images": len(arrays["train_y"]), "test_images": len(arrays["test_y"]),
        "config": {k: v for k, v in vars(args).items() if k not in ("run_list", "settings")},
        "noop_every": NOOP_EVERY, "machine": facts,
        "settings": {s: {"lr": lr, "runs": records} for s, (lr, records) in by_setting.items()},
        "script_seconds": time.perf_counter() - t_script, "command": " ".join(sys.argv),
    }
    path = bc.write_json(out / "results.json", result)
    pngs = plot(by_setting, out, data, args)
    print(f"wrote {path}" + "".join(f", {p}" for p in pngs))
    print(f"total time {result['script_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
