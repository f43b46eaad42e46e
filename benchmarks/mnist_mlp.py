"""The tutorial's MNIST experiment, run with every Adam we have.

MLP 784-200-10 (ReLU), cross-entropy, batch 64, shuffled, lr 1e-3, 5 epochs, pixels scaled
to [-1, 1], train loss averaged per epoch -- trained once per optimizer from the same
initial weights over the same batch order:

    python-loop       the tutorial's hand-written Adam (adamx.reference.seed_adam)
    torch             torch.optim.Adam()            (default: CPU for-loop, CUDA foreach)
    torch-foreach     torch.optim.Adam(foreach=True)
    torch-fused       torch.optim.Adam(fused=True)
    adamx             adamx.Adam()
    adamx-eps-inside  adamx.Adam(eps_inside_sqrt=True)   (the tutorial's formula)

Two data paths: ``transform`` is the tutorial's pipeline (a Dataset that converts and
normalises each sample in __getitem__, batched by torch.utils.data.DataLoader);
``tensors`` normalises the whole set once and slices batches by the same shuffled index,
so that the optimizer's share of the time is larger. Both see identical batches.

--device cuda runs all of it on the GPU (model, batches, every optimizer, the Python loop
too; the step times synchronize the device before reading the clock); the default is cpu.

Prints the tutorial's per-epoch table per optimizer, a summary (final loss, test accuracy,
wall time, time in optimizer.step(), speed-ups over the Python loop), the published
losses beside ours, and how closely the implementations agree, for adamx against
torch.optim.Adam, adamx(eps_inside_sqrt=True) against the Python loop, and, as a control,
torch's fused and foreach steps against its default:
    ONE STEP   from the same params and state, one step of each: the share of param
               elements that come out bitwise identical, and the largest difference in
               units in the last place (ulp) of the param;
    TRAINING   over the whole run: for how many steps the two runs' batch losses stay
               within PART_TOL of each other before they part, and the differences in
               final train loss and test accuracy;
    DATA PATHS with both data paths: whether each optimizer's batch losses are the same
               on both (they see the same batches, so they should be, bit for bit).
Steps that differ in the last bits (the operations are ordered differently) are amplified
by training until a ReLU or a predicted class flips on some sample and the runs part; the
control pairs show the size of that effect between torch's own implementations. Writes
results.json, loss_curves.png and step_time.png into --out.

MNIST comes from --data-dir, else $ADAMX_MNIST_DIR, else ~/.cache/adamx/mnist (downloaded
when missing); without it a synthetic MNIST-shaped set is used and labelled SYNTHETIC.
"""

import argparse
import copy
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import bench_common as bc
import mnist_data

ALL_OPTIMIZERS = ["python-loop", "torch", "torch-foreach", "torch-fused", "adamx",
                  "adamx-eps-inside"]
# The tutorial's published train losses by epoch.
PUBLISHED = {
    "python-loop": [0.372, 0.186, 0.133, 0.108, 0.091],  # its own loop, eps inside sqrt
    "torch": [0.360, 0.173, 0.123, 0.101, 0.086],        # torch.optim.Adam
}
# Pairs whose agreement is measured: (ours, reference peer, is a control). adamx computes
# torch.optim.Adam's formula, and with eps_inside_sqrt the Python loop's; the controls are
# torch's own implementations against its default, measured the same way.
PAIRS = [("adamx", "torch", False), ("adamx-eps-inside", "python-loop", False),
         ("torch-fused", "torch", True), ("torch-foreach", "torch", True)]
PART_TOL = 1e-5       # batch losses further apart than this: the two runs have parted
LOSS_DIGITS = 4       # digits printed in the per-epoch tables (the tutorial printed 3)
CURVE_EVERY = 30      # the tutorial plotted the loss every 30 steps


def build_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10))


def normalize(images_uint8):
    """ToTensor then Normalize((0.5,), (0.5,)): x/255, then (x - 0.5) / 0.5 -> [-1, 1]."""
    return images_uint8.to(torch.float32).div(255).sub_(0.5).div_(0.5)


class TransformDataset(torch.utils.data.Dataset):
    """The tutorial's per-sample pipeline without torchvision: each __getitem__ converts
    one 28x28 uint8 image to a [1, 28, 28] float tensor and normalises it."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = normalize(self.images[i].unsqueeze(0))
        return x, int(self.labels[i])


class EpochShuffle(torch.utils.data.Sampler):
    """A fresh permutation per epoch from a seeded generator (what shuffle=True does),
    shared by both data paths so that they see the same batches."""

    def __init__(self, n, generator):
        self.n, self.generator = n, generator

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def batches_transform(data, batch_size, generator):
    ds = TransformDataset(data["train_x"], data["train_y"])
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size,
                                         sampler=EpochShuffle(len(ds), generator))
    return loader


class TensorBatches:
    """The same batches from a pre-normalised tensor, sliced by the shuffled index."""

    def __init__(self, x, y, batch_size, generator):
        self.x, self.y, self.bs = x, y, batch_size
        self.sampler = EpochShuffle(len(y), generator)

    def __len__(self):
        return math.ceil(len(self.y) / self.bs)

    def __iter__(self):
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        for i in range(0, len(order), self.bs):
            idx = order[i:i + self.bs].to(self.x.device)
            yield self.x[idx], self.y[idx]


def synchronizer(device):
    """What to call before reading the clock: CUDA kernels run asynchronously, so a step
    has only finished once the device has been synchronized."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def fresh_model(init_state, args):
    """The MLP with the shared initial weights, on --device."""
    model = build_model(args.seed)
    model.load_state_dict(init_state)
    return model.to(args.device)


class PlainStepper:
    """How a plain run backpropagates and steps: ``loss.backward()``, ``opt.step()``.
    ``train_loop`` drives any object with these three methods (a GradScaler'd one too)."""

    def __init__(self, opt):
        self.opt = opt

    def zero_grad(self):
        self.opt.zero_grad()

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()


def batches(mode, data, args):
    """The shuffled batches of data path ``mode``; the same order for every run."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    if mode == "transform":
        return batches_transform(data, args.batch_size, gen)
    return TensorBatches(data["train_xn"], data["train_y_dev"], args.batch_size, gen)


def train_loop(loss_of, stepper, loader, args, progress, label, probe=None):
    """The training loop every MNIST benchmark shares: per batch, ``loss_of(xb, yb)``,
    zero_grad, backward and the timed ``stepper.step()`` (the device synchronized on both
    sides). A ``probe`` (see mixed_precision.NoOpProbe) takes the steps it ``samples``
    itself, around its own measurement, and those steps are not timed. Returns the
    per-epoch mean losses, every batch loss and step time, and the loss every CURVE_EVERY
    steps."""
    sync = synchronizer(args.device)
    epoch_losses, curve, step_times, step_losses = [], [], [], []
    step = 0
    sync()
    t_start = time.perf_counter()
    for epoch in range(args.epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(args.device), yb.to(args.device)  # no-op where they are already
            loss = loss_of(xb, yb)
            stepper.zero_grad()
            stepper.backward(loss)
            sync()
            t0 = time.perf_counter()
            try:
                if probe is not None and probe.samples(step):
                    probe.measure(stepper.step)
                    t0 = None
                else:
                    stepper.step()
            except (RuntimeError, NotImplementedError) as exc:
                if step:  # it stepped before: a real failure, not a missing kernel
                    raise
                raise bc.PeerUnavailable(f"its first step failed on {args.device}: "
                                         f"{str(exc).splitlines()[0]}") from exc
            sync()
            if t0 is not None:
                step_times.append(time.perf_counter() - t0)
            value = loss.item()
            step_losses.append(value)
            total += value
            count += 1
            if step % CURVE_EVERY == 0:
                curve.append([step, value])
            step += 1
            progress.update(1, suffix=f"{label} epoch {epoch + 1}/{args.epochs} "
                                      f"loss {total / count:.4f}")
        epoch_losses.append(total / count)
    sync()
    return {"epoch_losses": epoch_losses, "steps": step, "step_times": step_times,
            "step_losses": step_losses, "curve": curve, "t_start": t_start,
            "train_s": time.perf_counter() - t_start}


def accuracy(model, x, y):
    """The share of ``x`` that ``model`` classifies as ``y`` (a host sync)."""
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train_one(name, mode, data, init_state, args, progress):
    """Trains one model with optimizer ``name`` on data path ``mode``; returns its record."""
    model = fresh_model(init_state, args)
    opt = bc.make_optimizer(name, model.parameters(), lr=args.lr)
    loader = batches(mode, data, args)
    run = train_loop(lambda xb, yb: F.cross_entropy(model(xb), yb), PlainStepper(opt),
                     loader, args, progress, f"{name}/{mode}")
    acc = accuracy(model, data["test_xn"], data["test_y"])
    t_total = time.perf_counter() - run["t_start"]  # .item() has synchronized
    step_times, epoch_losses = run["step_times"], run["epoch_losses"]
    sorted_times = sorted(step_times)
    return {
        "optimizer": name, "data_mode": mode, "device": str(args.device),
        "description": bc.PEERS[name][0],
        "epochs": args.epochs, "steps": run["steps"], "steps_per_epoch": len(loader),
        "epoch_losses": epoch_losses, "final_train_loss": epoch_losses[-1],
        "test_accuracy": acc, "wall_s": t_total, "train_s": run["train_s"],
        "step_total_s": sum(step_times), "step_median_s": bc.median(step_times),
        "step_p10_s": sorted_times[len(sorted_times) // 10],
        "step_p90_s": sorted_times[(9 * len(sorted_times)) // 10],
        "loss_curve_every_30": run["curve"],
        "_step_losses": run["step_losses"],  # for the checks; not written to the JSON
    }


def fmt_loss(x):
    return f"{x:.{LOSS_DIGITS}f}"


def training_agreement(a, b):
    """How long two runs over the same batches keep together: the number of leading steps
    whose batch losses are identical, and within PART_TOL (after which the runs have
    parted), and how far apart they end (final train loss, test accuracy)."""
    sa, sb = a["_step_losses"], b["_step_losses"]
    diffs = [abs(x - y) for x, y in zip(sa, sb)]
    steps = len(diffs)
    la, lb = a["epoch_losses"], b["epoch_losses"]
    return {"steps": steps,
            "steps_identical": next((i for i, d in enumerate(diffs) if d > 0), steps),
            "part_threshold": PART_TOL,
            "steps_within_threshold": next((i for i, d in enumerate(diffs) if d > PART_TOL),
                                           steps),
            "max_batch_loss_diff": max(diffs, default=0.0),
            "final_train_loss": [a["final_train_loss"], b["final_train_loss"]],
            "final_train_loss_diff": a["final_train_loss"] - b["final_train_loss"],
            "max_epoch_loss_diff": max(abs(x - y) for x, y in zip(la, lb)),
            "test_accuracy": [a["test_accuracy"], b["test_accuracy"]],
            "test_accuracy_diff": a["test_accuracy"] - b["test_accuracy"],
            "epoch_losses": [la, lb]}


def _ulp(x):
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, math.inf)) - a


def _state_of(opt, i, p):
    """The Adam state of the i-th param ``p`` of ``opt``, in torch.optim.Adam's keys."""
    if isinstance(opt, bc.PythonLoopAdam):
        return {"exp_avg": opt.vs[i], "exp_avg_sq": opt.sqrs[i],
                "step": torch.tensor(float(opt.t - 1))}
    return opt.state[p]


def one_step_agreement(ours, ref, arrays, init_state, args, steps=200, every=20):
    """Runs ``ref`` for ``steps`` steps (tensors path); every ``every`` steps, copies its
    params and state into a fresh ``ours`` and takes the same step with both. Returns the
    largest param difference in ulps of the param and the share of identical elements."""
    model = fresh_model(init_state, args)
    opt = bc.make_optimizer(ref, model.parameters(), lr=args.lr)
    batches = iter(TensorBatches(arrays["train_xn"], arrays["train_y_dev"], args.batch_size,
                                 torch.Generator().manual_seed(args.seed + 1)))
    max_ulps, max_abs, same, total, points, done = 0.0, 0.0, 0, 0, 0, 0
    for k, (xb, yb) in zip(range(steps), batches):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        params = list(model.parameters())
        if k % every == every - 1:
            before = [p.detach().clone() for p in params]
            twins = [p.detach().clone().requires_grad_() for p in params]
            other = bc.make_optimizer(ours, twins, lr=args.lr)
            # One step on zero grads makes ``ours`` its state, with its own step dtype and
            # device, and moves no param (a zero first moment updates by zero); then the
            # reference's state is copied into it.
            for t in twins:
                t.grad = torch.zeros_like(t)
            other.step()
            for i, (t, p) in enumerate(zip(twins, params)):
                t.grad = p.grad.clone()
                for key, value in _state_of(opt, i, p).items():
                    other.state[t][key].copy_(value)
            opt.step()
            other.step()
            for t, p, b in zip(twins, params, before):
                d = (t.detach() - p.detach()).abs()
                # in ulps of the larger of the param before and after the step (the
                # rounding of p - update is on that scale)
                scale = torch.maximum(b.abs(), p.detach().abs())
                max_abs = max(max_abs, d.max().item())
                max_ulps = max(max_ulps, (d / _ulp(scale)).max().item())
                same += (d == 0).sum().item()
                total += d.numel()
            points += 1
        else:
            opt.step()
        done += 1
    return {"pair": f"{ours} vs {ref}", "steps": done, "points": points, "max_ulps": max_ulps,
            "max_abs": max_abs, "frac_identical": same / max(total, 1)}


def one_step_line(r, control):
    if r["frac_identical"] == 1:
        agree = "all param elements bitwise identical"
    else:
        agree = (f"{100 * r['frac_identical']:.2f}% of param elements bitwise identical, the "
                 f"rest at most {r['max_ulps']:.0f} ulp apart (max |diff| {r['max_abs']:.2e})")
    points = f"{r['points']} point" + ("s" if r["points"] != 1 else "")
    return (f"ONE STEP{' (control)' if control else ''}: {r['pair']}: {agree}; one step from "
            f"the same params and state, at {points} of the first {r['steps']} steps")


def training_line(c):
    n, same, within = c["steps"], c["steps_identical"], c["steps_within_threshold"]
    if same == n:
        together = f"batch losses identical at all {n} steps"
    elif within == n:
        together = (f"batch losses within {PART_TOL:g} at all {n} steps (identical for the "
                    f"first {same})")
    else:
        together = (f"batch losses within {PART_TOL:g} for the first {within} of {n} steps "
                    f"(identical for the first {same}), then the runs part")
    (fa, fb), (aa, ab) = c["final_train_loss"], c["test_accuracy"]
    return (f"TRAINING [{c['data_mode']}]{' (control)' if c['control'] else ''}: "
            f"{c['pair']}: {together}; final train loss {fmt_loss(fa)} vs {fmt_loss(fb)} "
            f"(diff {c['final_train_loss_diff']:+.2e}), test accuracy {100 * aa:.2f}% vs "
            f"{100 * ab:.2f}%")


def report_agreement(by, modes, arrays, init_state, args, tag=""):
    """Measures and prints how closely each pair of PAIRS agrees (one step, and over the
    run on each data path), and whether both data paths gave every optimizer the same
    losses. Returns the records for the JSON."""
    ran = {name for name, _ in by}
    pairs = [(o, r, ctl) for o, r, ctl in PAIRS if o in ran and r in ran]
    print(f"## Agreement: one step from the same state, and whole runs over the same batches "
          f"(runs part where their batch losses differ by more than {PART_TOL:g}){tag}")
    one_step, training, data_paths = [], [], []
    for ours, ref, control in pairs:
        r = one_step_agreement(ours, ref, arrays, init_state, args)
        one_step.append({**r, "control": control})
        print(one_step_line(r, control))
    for mode in modes:
        for ours, ref, control in pairs:
            a, b = by.get((ours, mode)), by.get((ref, mode))
            if a and b:
                c = {"pair": f"{ours} vs {ref}", "data_mode": mode, "control": control,
                     **training_agreement(a, b)}
                training.append(c)
                print(training_line(c))
    if len(modes) == 2:
        for name in sorted(ran, key=args.optimizer_list.index):
            c = training_agreement(by[(name, "transform")], by[(name, "tensors")])
            data_paths.append({"optimizer": name, "identical": c["max_batch_loss_diff"] == 0,
                               "steps": c["steps"],
                               "max_batch_loss_diff": c["max_batch_loss_diff"]})
        same = [d["optimizer"] for d in data_paths if d["identical"]]
        if same:
            print(f"DATA PATHS: transform and tensors give identical batch losses at every "
                  f"step for {', '.join(same)}")
        for d in data_paths:
            if not d["identical"]:
                print(f"DATA PATHS: {d['optimizer']}: transform and tensors batch losses "
                      f"differ by up to {d['max_batch_loss_diff']:.2e}")
    if any(c["steps_identical"] < c["steps"] for c in training):
        print("note: a few ulp per step is rounding (the implementations order their "
              "operations differently); training amplifies it until a ReLU or a predicted "
              "class flips on some sample and the runs part. The control lines measure the "
              "same effect between torch's own implementations, in this run.")
    if not any(not ctl for _, _, ctl in pairs):
        print("note: the adamx vs torch and adamx-eps-inside vs python-loop measures need both "
              "optimizers of a pair in --optimizers (and adamx built)")
    print()
    return {"part_threshold": PART_TOL, "one_step": one_step, "training": training,
            "data_paths": data_paths}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mnist_data.add_arguments(p)
    p.add_argument("--out", default="out/mnist", help="output directory (default out/mnist)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizers", default=",".join(ALL_OPTIMIZERS),
                   help="comma-separated subset of: " + ", ".join(ALL_OPTIMIZERS))
    p.add_argument("--data-mode", choices=["transform", "tensors", "both"], default="both")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the model, the batches and every optimizer run (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    args = mnist_data.apply_quick(p.parse_args(argv))
    args.optimizer_list = bc.parse_list(args.optimizers, ALL_OPTIMIZERS, "optimizer")
    return args


def check_device(args, prog="mnist_mlp.py"):
    """Turns --device into a torch.device; exits with a one-line message (status 2, from
    script ``prog``) when it names a GPU that torch cannot see."""
    if args.device == "cuda" and not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else "torch sees no CUDA GPU")
        print(f"{prog}: error: --device cuda: {why} (torch {torch.__version__}); "
              f"run with --device cpu", file=sys.stderr)
        raise SystemExit(2)
    return torch.device(args.device)


def load_data(args):
    # The synthetic stand-in's first N images do not depend on its size: make only those used.
    sizes = (min(args.limit_train or 60000, 60000), min(args.limit_test or 10000, 10000))
    if args.synthetic:
        data = mnist_data.synthetic_mnist(*sizes)
        data.notes = ["--synthetic was given"]
    else:
        data = mnist_data.get_mnist(args.data_dir, allow_download=not args.no_download,
                                    synthetic_sizes=sizes)
    train_x, train_y = data.train_images, data.train_labels
    test_x, test_y = data.test_images, data.test_labels
    if args.limit_train:
        train_x, train_y = train_x[:args.limit_train], train_y[:args.limit_train]
    if args.limit_test:
        test_x, test_y = test_x[:args.limit_test], test_y[:args.limit_test]
    # The transform path reads train_x and train_y on the CPU (as a DataLoader does) and
    # moves each batch; the normalised copies live on --device.
    dev = args.device
    arrays = {"train_x": train_x, "train_y": train_y, "train_y_dev": train_y.to(dev),
              "test_y": test_y.to(dev),
              "train_xn": normalize(train_x).unsqueeze(1).to(dev),
              "test_xn": normalize(test_x).unsqueeze(1).to(dev)}
    return data, arrays


def main(argv=None):
    args = parse_args(argv)
    args.device = check_device(args)
    out, t_script, facts = bc.start_run(args, "adamx MNIST MLP benchmark (the tutorial's experiment)")

    data, arrays = load_data(args)
    bc.prime_allocator()  # loading did this already; see bench_common.prime_allocator
    tag = "" if not data.synthetic else " [SYNTHETIC DATA: losses not comparable with MNIST]"
    print(f"# data: {data.label} from {data.where}: {len(arrays['train_y'])} train / "
          f"{len(arrays['test_y'])} test images" + tag)
    for note in data.notes:
        print(f"#   note: {note.splitlines()[0]}")
    modes = ["transform", "tensors"] if args.data_mode == "both" else [args.data_mode]
    print(f"# config: device {args.device}, epochs {args.epochs}, batch {args.batch_size}, "
          f"lr {args.lr}, seed {args.seed}, data paths {', '.join(modes)}, optimizers {', '.join(args.optimizer_list)}")
    print()

    init_state = copy.deepcopy(build_model(args.seed).state_dict())
    n_params = sum(v.numel() for v in init_state.values())
    steps_per_epoch = math.ceil(len(arrays["train_y"]) / args.batch_size)
    runs, unavailable = [], {}
    total_steps = steps_per_epoch * args.epochs * len(modes) * len(args.optimizer_list)
    progress = bc.Progress(total_steps, "mnist", enabled=not args.no_progress)
    for mode in modes:
        for name in args.optimizer_list:
            try:
                rec = train_one(name, mode, arrays, init_state, args, progress)
            except bc.PeerUnavailable as exc:
                unavailable[name] = str(exc)
                progress.update(steps_per_epoch * args.epochs)
                continue
            runs.append(rec)
    progress.close()
    for name, why in unavailable.items():
        print(f"UNAVAILABLE: {name}: {why}")

    # The tutorial's tables.
    for rec in runs:
        print(f"## {rec['optimizer']} ({rec['description']}), data path {rec['data_mode']}{tag}")
        for e, loss in enumerate(rec["epoch_losses"]):
            print(f"epoch: {e + 1}, Train Loss: {fmt_loss(loss)}")
        print(f"test accuracy: {100 * rec['test_accuracy']:.2f}%")
        print()

    # Summary per data path.
    by = {(r["optimizer"], r["data_mode"]): r for r in runs}
    for mode in modes:
        base = by.get(("python-loop", mode))
        rows = []
        for name in args.optimizer_list:
            r = by.get((name, mode))
            if r is None:
                continue
            sp_step = (base["step_total_s"] / r["step_total_s"]) if base else None
            sp_wall = (base["wall_s"] / r["wall_s"]) if base else None
            r["step_speedup_vs_python_loop"], r["wall_speedup_vs_python_loop"] = sp_step, sp_wall
            rows.append([name, fmt_loss(r["final_train_loss"]),
                         f"{100 * r['test_accuracy']:.2f}%", bc.fmt_time(r["wall_s"]),
                         bc.fmt_time(r["step_median_s"]), bc.fmt_time(r["step_total_s"]),
                         f"{100 * r['step_total_s'] / r['wall_s']:.1f}%",
                         f"{sp_step:.1f}x" if sp_step else "-",
                         f"{sp_wall:.2f}x" if sp_wall else "-"])
        print(f"## Summary, data path '{mode}' ({args.epochs} epochs x {steps_per_epoch} steps, "
              f"{n_params} params){tag}")
        print(bc.format_table(
            ["optimizer", "final train loss", "test acc", "wall (train+test)",
             "step median", "step total", "step share of wall", "step speed-up vs loop",
             "wall speed-up vs loop"], rows))
        print()

    # Published beside ours (our python-loop / torch runs, and the adamx ones matching them).
    ref_mode = "tensors" if "tensors" in modes else modes[0]
    n_pub = min(args.epochs, 5)
    cols = [("published loop", PUBLISHED["python-loop"]), ]
    for name in ("python-loop", "adamx-eps-inside"):
        if (name, ref_mode) in by:
            cols.append((f"ours {name}", by[(name, ref_mode)]["epoch_losses"]))
    cols.append(("published torch", PUBLISHED["torch"]))
    for name in ("torch", "adamx"):
        if (name, ref_mode) in by:
            cols.append((f"ours {name}", by[(name, ref_mode)]["epoch_losses"]))
    print(f"## Train loss by epoch: published (the tutorial's own init and order) beside ours "
          f"(data path {ref_mode}){tag}")
    print(bc.format_table(["epoch"] + [c for c, _ in cols],
                          [[e + 1] + [f"{v[e]:.3f}" if "published" in c else fmt_loss(v[e])
                                      for c, v in cols] for e in range(n_pub)]))
    print()

    agreement = report_agreement(by, modes, arrays, init_state, args, tag)

    # Headline: adamx vs the Python loop and torch fused, per data path.
    for mode in modes:
        ax, loop, fused = by.get(("adamx", mode)), by.get(("python-loop", mode)), \
            by.get(("torch-fused", mode))
        if ax and loop:
            print(f"{mode}: adamx.Adam step total {ax['step_total_s']:.2f} s vs Python loop "
                  f"{loop['step_total_s']:.2f} s ({loop['step_total_s'] / ax['step_total_s']:.1f}x);"
                  f" whole run {ax['wall_s']:.1f} s vs {loop['wall_s']:.1f} s "
                  f"({loop['wall_s'] / ax['wall_s']:.2f}x); step share of adamx's run "
                  f"{100 * ax['step_total_s'] / ax['wall_s']:.1f}%, of the loop's "
                  f"{100 * loop['step_total_s'] / loop['wall_s']:.1f}%"
                  + (f"; torch fused step total {fused['step_total_s']:.2f} s" if fused else ""))

    elapsed = time.perf_counter() - t_script
    result = {
        "benchmark": "mnist_mlp", "synthetic": data.synthetic, "data": data.label,
        "data_source": data.where, "data_notes": data.notes,
        "train_images": len(arrays["train_y"]), "test_images": len(arrays["test_y"]),
        "config": {k: v for k, v in vars(args).items() if k != "optimizer_list"},
        "params": n_params, "machine": facts, "published_losses": PUBLISHED,
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs], "unavailable": unavailable,
        "agreement": agreement, "script_seconds": elapsed, "command": " ".join(sys.argv),
    }
    path = bc.write_json(out / "results.json", result)
    pngs = plot(runs, modes, out, data, args)
    print(f"wrote {path}" + "".join(f", {p}" for p in pngs))
    print(f"total time {elapsed:.1f} s")
    return 0


def plot(runs, modes, out, data, args):
    plt = bc.pyplot()
    if plt is None or not runs:
        return []
    title_tag = " (SYNTHETIC data)" if data.synthetic else " (MNIST)"
    written = []
    ref_mode = "tensors" if "tensors" in modes else modes[0]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        if r["data_mode"] != ref_mode:
            continue
        steps, losses = zip(*r["loss_curve_every_30"])
        ax.plot(steps, losses, label=r["optimizer"], linewidth=1,
                linestyle="--" if r["optimizer"].startswith("adamx") else "-")
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (batch, every {CURVE_EVERY} steps)")
    ax.set_yscale("log")
    ax.set_title(f"MLP 784-200-10, Adam variants{title_tag}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    written.append(out / "loss_curves.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [n for n in args.optimizer_list if any(r["optimizer"] == n for r in runs)]
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        vals = []
        for n in names:
            r = next((r for r in runs if r["optimizer"] == n and r["data_mode"] == mode), None)
            vals.append(r["step_median_s"] * 1e6 if r else 0.0)
        xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, vals, width, label=f"data path: {mode}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("optimizer.step() median (us)")
    where = "GPU" if args.device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    ax.set_yscale("log")
    ax.set_title(f"Adam step time, MNIST MLP ({sum(v.numel() for v in build_model(0).parameters())}"
                 f" params, {where}){title_tag}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=110)
    plt.close(fig)
    written.append(out / "step_time.png")
    return written


if __name__ == "__main__":
    sys.exit(main())
