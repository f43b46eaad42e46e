"""The benchmark scripts run end to end on tiny configurations, so that they cannot rot.

Each script runs as a subprocess (as the README runs it) with --quick; the test checks its
exit status, its tables and its JSON. The MNIST script reads $ADAMX_MNIST_DIR when it is
set and otherwise runs on the synthetic stand-in (--no-download, so that a test never
reaches for the network).
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adamx

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/
REPO = BENCH.parent
MNIST_DIR = os.environ.get("ADAMX_MNIST_DIR")

try:
    import matplotlib  # noqa: F401  (only whether it is there)
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


def run_script(name, *args, env=None, timeout=600, check=True):
    """Runs a benchmark script with the adamx this test imported (first on its path)."""
    if env is None:
        env = os.environ.copy()
        here = os.path.dirname(os.path.dirname(os.path.abspath(adamx.__file__)))
        env["PYTHONPATH"] = os.pathsep.join([here] + [x for x in [env.get("PYTHONPATH")] if x])
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(REPO))
    if check:
        assert proc.returncode == 0, \
            f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def import_bench(name):
    """A benchmark script as a module (they import their neighbours by plain name)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_mnist_mlp_quick(tmp_path):
    args = ["--quick", "--out", str(tmp_path)]
    if not MNIST_DIR:
        args.append("--no-download")
    proc = run_script("mnist_mlp.py", *args)
    out = proc.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["synthetic"] == (not MNIST_DIR)
    if not MNIST_DIR:
        assert "SYNTHETIC" in out and "SYNTHETIC" in res["data"]
    assert res["train_images"] == 2048 and res["test_images"] == 1000
    assert res["config"]["device"] == "cpu" and "# config: device cpu," in out

    optimizers = ["python-loop", "torch", "torch-foreach", "torch-fused"]
    if adamx.is_compiled():
        optimizers += ["adamx", "adamx-eps-inside"]
    runs = {(r["optimizer"], r["data_mode"]) for r in res["runs"]}
    for name in optimizers:
        for mode in ("transform", "tensors"):
            assert (name, mode) in runs, (name, mode)
    for r in res["runs"]:
        assert r["epochs"] == 1 and len(r["epoch_losses"]) == 1 and r["device"] == "cpu"
        assert r["steps"] == 32 and r["steps_per_epoch"] == 32
        assert 0 < r["step_median_s"] <= r["step_total_s"] <= r["wall_s"]
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["loss_curve_every_30"][0][0] == 0 and r["loss_curve_every_30"][1][0] == 30
    # The tutorial's table, the summary and the checks were printed.
    assert "epoch: 1, Train Loss: " in out
    assert "## Summary, data path 'transform'" in out and "published" in out
    # The agreement section says what it measured, and never calls a correct run wrong.
    assert "MISMATCH" not in out and "MATCH:" not in out
    agree = res["agreement"]
    assert agree["part_threshold"] > 0
    # Both data paths see identical batches, so every optimizer's losses agree exactly.
    assert {d["optimizer"] for d in agree["data_paths"]} == set(optimizers)
    for d in agree["data_paths"]:
        assert d["identical"] and d["max_batch_loss_diff"] == 0.0 and d["steps"] == 32, d
    assert "DATA PATHS: transform and tensors give identical batch losses" in out
    pairs = {"torch-fused vs torch", "torch-foreach vs torch"}
    if adamx.is_compiled():
        pairs |= {"adamx vs torch", "adamx-eps-inside vs python-loop"}
    # One step from the same state: the updates agree to a few ulps of the params;
    # torch's foreach and for-loop steps are bitwise identical.
    one = {r["pair"]: r for r in agree["one_step"]}
    assert set(one) == pairs
    for pair, r in one.items():
        assert r["control"] == pair.startswith("torch-")
        assert r["points"] >= 1 and r["max_ulps"] <= 64 and r["frac_identical"] > 0.9, r
        label = "ONE STEP (control): " if r["control"] else "ONE STEP: "
        assert f"{label}{pair}: " in out
    assert one["torch-foreach vs torch"]["frac_identical"] == 1.0
    assert "ONE STEP (control): torch-foreach vs torch: all param elements bitwise identical" in out
    # Whole runs: every pair on both data paths, with where they part and how far apart
    # they end; the first step starts from the same weights, so its loss is identical.
    runs_by = {(r["optimizer"], r["data_mode"]): r for r in res["runs"]}
    train = {(c["pair"], c["data_mode"]): c for c in agree["training"]}
    assert set(train) == {(p, m) for p in pairs for m in ("transform", "tensors")}
    for (pair, mode), c in train.items():
        ours, ref = pair.split(" vs ")
        assert c["steps"] == 32 and 1 <= c["steps_identical"] <= c["steps_within_threshold"] <= 32
        assert c["final_train_loss"] == [runs_by[(ours, mode)]["final_train_loss"],
                                         runs_by[(ref, mode)]["final_train_loss"]]
        assert abs(c["final_train_loss_diff"]) <= c["max_epoch_loss_diff"] + 1e-12
        tag = " (control)" if c["control"] else ""
        assert f"TRAINING [{mode}]{tag}: {pair}: batch losses " in out
    assert train[("torch-foreach vs torch", "tensors")]["steps_identical"] == 32
    if HAVE_MPL:
        assert (tmp_path / "loss_curves.png").stat().st_size > 0
        assert (tmp_path / "step_time.png").stat().st_size > 0
    # Not a terminal: the progress bar stays quiet.
    assert "\r" not in proc.stderr


def test_mnist_mlp_subset_and_one_mode(tmp_path):
    proc = run_script("mnist_mlp.py", "--quick", "--synthetic", "--out", str(tmp_path),
                      "--optimizers", "torch-fused,python-loop", "--data-mode", "tensors",
                      "--limit-train", "640", "--device", "cpu")
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["synthetic"] and "SYNTHETIC" in proc.stdout
    assert [(r["optimizer"], r["data_mode"], r["device"]) for r in res["runs"]] == [
        ("torch-fused", "tensors", "cpu"), ("python-loop", "tensors", "cpu")]
    assert all(r["steps"] == 10 for r in res["runs"])
    # No pair of PAIRS ran: nothing measured, and the output says why.
    assert res["agreement"]["one_step"] == [] and res["agreement"]["training"] == []
    assert "need both optimizers of a pair" in proc.stdout


def test_mnist_mlp_device_argument():
    mnist_mlp = import_bench("mnist_mlp")
    assert mnist_mlp.parse_args([]).device == "cpu"
    assert mnist_mlp.parse_args(["--device", "cuda"]).device == "cuda"
    with pytest.raises(SystemExit):
        mnist_mlp.parse_args(["--device", "tpu"])
    args = mnist_mlp.parse_args(["--device", "cpu"])
    assert mnist_mlp.check_device(args) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_mnist_mlp_cuda_without_gpu(tmp_path):
    proc = run_script("mnist_mlp.py", "--quick", "--synthetic", "--device", "cuda",
                      "--out", str(tmp_path), check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("mnist_mlp.py: error: --device cuda: ") and \
        "--device cpu" in lines[0]
    assert proc.stdout == "" and not (tmp_path / "results.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mnist_mlp_cuda(tmp_path):
    names = "python-loop,torch,torch-fused" + (",adamx,adamx-eps-inside"
                                               if adamx.is_compiled() else "")
    proc = run_script("mnist_mlp.py", "--quick", "--synthetic", "--device", "cuda",
                      "--optimizers", names, "--out", str(tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())
    assert "# config: device cuda," in proc.stdout
    ran = {r["optimizer"] for r in res["runs"]}
    assert {"python-loop", "torch", "torch-fused"} <= ran
    assert all(r["device"].startswith("cuda") and r["steps"] == 32 for r in res["runs"])
    for r in res["agreement"]["one_step"]:
        assert r["frac_identical"] > 0.5 and r["max_ulps"] <= 64, r


def test_step_bench_quick(tmp_path):
    proc = run_script("step_bench.py", "--quick", "--dtype", "float32,bfloat16",
                      "--device", "cpu", "--targets", "--detail", "--out", str(tmp_path))
    res = json.loads((tmp_path / "step_bench.json").read_text())
    recs = res["records"]
    peers = {"python-loop", "torch-forloop", "torch-foreach", "torch-fused"}
    if adamx.is_compiled():
        peers.add("adamx")
    for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
        for case, n in (("mnist", 159010), ("sweep-1e3", 1000), ("sweep-1e5", 100000)):
            got = {r["peer"]: r for r in recs if r["dtype"] == dtype and r["case"] == case}
            assert peers <= set(got), (dtype, case, set(got))
            assert "ceiling" in got and got["ceiling"]["stream"] in ("adam-like", "rmw", "scale")
            for peer in peers:
                r = got[peer]
                assert r["elements"] == n and r["bytes_moved"] == 7 * itemsize * n
                assert r["n"] >= 3 and r["median_s"] > 0
                assert abs(r["gb_s"] - r["bytes_moved"] / r["median_s"] / 1e9) < 1e-6 * r["gb_s"]
                assert r["ceiling_share"] > 0
            assert got["torch-fused"]["ratio_to_torch_fused"] == 1.0
            if adamx.is_compiled() and dtype == "bfloat16":
                # master weights: bfloat16 grad and param read and param written, fp32
                # master and moments read and written
                assert got["adamx-master"]["bytes_moved"] == (3 * 2 + 6 * 4) * n
                assert got["adamx-stochastic"]["bytes_moved"] == 7 * 2 * n
            elif adamx.is_compiled():
                assert "adamx-master" not in got and "adamx-stochastic" not in got
    assert recs[0]["tensors"] == 4  # the MNIST MLP's 4 tensors
    if adamx.is_compiled():
        # The CPU step targets that --quick covers (MNIST: float32 twice, bfloat16 once),
        # printed with --targets as met / not met.
        assert len(res["targets"]) == 3
        lines = [line for line in proc.stdout.splitlines() if line.startswith("target [cpu, ")]
        assert len(lines) == 3 and all(line.endswith((": met", ": not met")) for line in lines)
    # --detail: the full tables after the summaries.
    assert "## cpu, float32, " in proc.stdout and ", in detail; GB/s = " in proc.stdout
    assert "issue" not in proc.stdout.lower()
    if HAVE_MPL:
        for dtype in ("float32", "bfloat16"):
            assert (tmp_path / f"step_bench_cpu_{dtype}.png").stat().st_size > 0
    assert "\r" not in proc.stderr


def test_step_bench_default_output_is_clean(tmp_path):
    """The default run's output, on a small configuration: summary tables first, only the
    peers that apply to each dtype (no UNAVAILABLE lines), no targets (no PASS/FAIL)."""
    proc = run_script("step_bench.py", "--dtype", "float32,bfloat16", "--device", "cpu",
                      "--cases", "sweep", "--sweep-sizes", "1e3", "--repeats", "3",
                      "--warmup", "1", "--min-repeats", "1", "--out", str(tmp_path))
    out = proc.stdout
    lines = out.splitlines()
    assert not [line for line in lines if "UNAVAILABLE" in line], out
    assert not [line for line in lines if "PASS" in line or "FAIL" in line], out
    assert not [line for line in lines if line.startswith("target [")], out
    # After the header (#-lines and a blank), the first thing is the float32 summary.
    body = [line for line in lines if line and not line.startswith("# ")]
    assert body[0].startswith("## cpu, float32, ") and "optimizer.step() median" in body[0]
    assert [c.strip() for c in body[1].split("|")[1:-1]] == [
        "case", "peer", "time", "x torch fused", "% ceiling", "B/elem"]
    assert sum(line.startswith("## cpu, ") for line in lines) == 2
    res = json.loads((tmp_path / "step_bench.json").read_text())
    assert res["unavailable"] == {}
    ran = {(r["dtype"], r["peer"]) for r in res["records"]}
    if adamx.is_compiled():
        assert ("bfloat16", "adamx-master") in ran and ("bfloat16", "adamx-stochastic") in ran
        assert "lean moments" in out  # the word on why lean states are slow on small tensors
    assert not {("float32", "adamx-master"), ("float32", "adamx-stochastic")} & ran
    assert set(res["not_applicable"]) == {"cpu/float32/adamx-master",
                                          "cpu/float32/adamx-stochastic"}
    assert "not run" not in out  # skipped quietly: the default run did not name them


def test_step_bench_runs_and_peers():
    """The runs' plans, explicit options over them, and the peers each dtype gets."""
    step_bench = import_bench("step_bench")
    default = step_bench.parse_args([])
    assert default.case_list == ["mnist", "25m", "sweep"] and max(default.sweep) == 10**6
    assert default.max_seconds == 1.0 and not default.targets
    full = step_bench.parse_args(["--full"])
    assert full.case_list == step_bench.ALL_CASES and max(full.sweep) == 10**8
    assert full.max_seconds == 3.0
    quick = step_bench.parse_args(["--quick", "--cases", "mnist"])
    assert quick.case_list == ["mnist"] and quick.repeats == 5
    # The options scripts/gpu-check.sh gives (on the CPU here).
    gpu = step_bench.parse_args(["--device", "cpu", "--cases", "sweep,gpt2",
                                 "--sweep-sizes", "1e8", "--dtype", "float32,bfloat16",
                                 "--peers", "torch-fused,adamx,adamx-master", "--no-progress",
                                 "--no-graph", "--grad-scaler", "--out", "x"])
    assert gpu.case_list == ["sweep", "gpt2"] and gpu.sweep == [10**8]
    assert gpu.peer_list == ["torch-fused", "adamx", "adamx-master"] and gpu.peers_given
    with pytest.raises(SystemExit):
        step_bench.parse_args(["--full", "--quick"])

    def peers(dtype, *argv):
        return step_bench.peers_for(step_bench.parse_args(list(argv)), dtype)[0]
    lean = ["adamx-bf16-state", "adamx-int8-state"]
    assert peers(torch.float32) == ["python-loop", "torch-forloop", "torch-foreach",
                                    "torch-fused", "adamx"] + lean
    assert peers(torch.bfloat16) == step_bench.ALL_PEERS
    assert "adamx-master" in peers(torch.float16)
    assert "adamx-stochastic" not in peers(torch.float16)
    assert "python-loop" not in peers(torch.float32, "--grad-scaler")


def test_step_bench_gpt2_shapes():
    step_bench = import_bench("step_bench")
    shapes = step_bench.gpt2_small_shapes()
    assert len(shapes) == 148
    assert sum(step_bench.numel(s) for s in shapes) == 124_439_808
    assert sum(step_bench.numel(s) for s in step_bench.MNIST_SHAPES) == 159_010


def test_scripts_run_without_adamx(tmp_path):
    """With adamx unimportable, both scripts say so and still run the torch peers."""
    fake = tmp_path / "fake"
    (fake / "adamx").mkdir(parents=True)
    (fake / "adamx" / "__init__.py").write_text("raise ImportError('adamx deliberately broken')\n")
    env = os.environ.copy()
    env["PYTHONPATH"] = str(fake) + os.pathsep + env.get("PYTHONPATH", "")
    proc = run_script("step_bench.py", "--quick", "--cases", "mnist", "--device", "cpu",
                      "--out", str(tmp_path / "s"), env=env)  # on a GPU, +graph peers too
    assert "adamx: UNAVAILABLE" in proc.stdout and "deliberately broken" in proc.stdout
    res = json.loads((tmp_path / "s" / "step_bench.json").read_text())
    assert {r["peer"] for r in res["records"]} == {"torch-forloop", "torch-foreach",
                                                   "torch-fused", "ceiling"}
    assert any(k.endswith("/adamx") for k in res["unavailable"])
    proc = run_script("mnist_mlp.py", "--quick", "--synthetic", "--data-mode", "tensors",
                      "--out", str(tmp_path / "m"), env=env)
    assert "UNAVAILABLE: adamx" in proc.stdout
    res = json.loads((tmp_path / "m" / "results.json").read_text())
    assert {r["optimizer"] for r in res["runs"]} == {"torch", "torch-foreach", "torch-fused"}


def test_step_bench_grad_scaler_quick(tmp_path):
    """GradScaler'd steps: every peer runs (float32), the fused ones without GradScaler's
    own unscale pass."""
    proc = run_script("step_bench.py", "--quick", "--cases", "mnist", "--device", "cpu",
                      "--grad-scaler", "--no-ceiling", "--out", str(tmp_path))
    assert "GradScaler'd step median" in proc.stdout
    res = json.loads((tmp_path / "step_bench.json").read_text())
    assert {r["peer"] for r in res["records"]} >= {"torch-foreach", "torch-fused", "adamx"}
    assert res["bytes_per_element_rule"].startswith("8 * itemsize")


def test_mixed_precision_tiny(tmp_path):
    """Every run of both settings, 10 steps each on synthetic data: the JSON has them all,
    the runs this build cannot make say why, and the measures are in range."""
    proc = run_script("mixed_precision.py", "--quick", "--synthetic", "--limit-train", "640",
                      "--limit-test", "200", "--out", str(tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())
    mixed_precision = import_bench("mixed_precision")
    assert res["synthetic"] and "SYNTHETIC" in proc.stdout
    assert list(res["settings"]) == ["default", "small-lr"]
    assert res["settings"]["small-lr"]["lr"] == mixed_precision.SMALL_LR
    for setting in res["settings"].values():
        runs = {r["run"]: r for r in setting["runs"]}
        assert list(runs) == list(mixed_precision.RUNS)
        for name, r in runs.items():
            if not r["available"]:
                assert name not in ("fp32", "bf16-nearest-torch", "fp16-scaler-torch"), r
                assert r["unavailable"] and r["unavailable"] in proc.stdout
                continue
            assert r["steps"] == 10 and len(r["epoch_losses"]) == 1
            assert r["param_bytes_per_param"] == {"fp32": 4, "bf16": 2, "fp16": 2}[
                r["param_dtype"]]
            # moments in the param's dtype or fp32, or compact (the 784x200 weight's, 4 or
            # 2.03 B per param beside float32 master copies of bf16 params or fp32 biases)
            lean = {"fp32-bf16-state": 4, "fp32-int8-state": 2, "bf16-master-bf16-state": 8}
            assert r["state_bytes_per_param"] >= lean.get(name, 2 * r["param_bytes_per_param"])
            if name in lean:
                assert r["state_bytes_per_param"] < lean[name] + 0.2
            assert r["step_median_us"] > 0 and 0.0 <= r["test_accuracy"] <= 1.0
            probed = mixed_precision.RUNS[name][3]
            assert (r["noop_sampled_steps"] == 1) == probed
            assert (r["noop_update_share"] is not None) == probed
            if probed:
                assert 0.0 <= r["noop_update_share"] <= 1.0 and r["noop_sampled_moves"] > 0
                assert r["steps_timed"] == 9  # the sampled step is not timed
        assert runs["fp32"]["train_loss_minus_fp32"] == 0.0
        if not adamx.is_compiled():
            assert not runs["bf16-nearest"]["available"]
    assert proc.stdout.count("| bf16-nearest-torch ") == 2  # one table row per setting
    if HAVE_MPL:
        assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert "\r" not in proc.stderr


def test_mixed_precision_unavailable_argument(monkeypatch):
    """An optimizer argument this build lacks (TypeError on construction) is reported as
    not available in this build, whatever the build."""
    mixed_precision = import_bench("mixed_precision")
    bc = mixed_precision.bc

    def lacks_argument(params, lr, capturable):
        raise TypeError("__init__() got an unexpected keyword argument 'stochastic_rounding'")

    monkeypatch.setitem(bc.PEERS, "adamx-stochastic", ("test", lacks_argument))
    with pytest.raises(bc.PeerUnavailable, match="^not available in this build"):
        mixed_precision.make_run_optimizer("adamx-stochastic",
                                           [torch.zeros(2, requires_grad=True)], 1e-3)


@pytest.mark.parametrize("scaler", [[], ["--grad-scaler"]], ids=["plain", "grad-scaler"])
def test_step_bench_clip_quick(tmp_path, scaler):
    """Clip + step: torch's clip_grad_norm_ before its peers' steps, adamx's folded one,
    with the bytes each must move (float32: torch 40 or 48, adamx 36)."""
    proc = run_script("step_bench.py", "--quick", "--cases", "mnist", "--device", "cpu",
                      "--clip", "--no-ceiling", *scaler, "--out", str(tmp_path))
    assert "clip_grad_norm_ + " in proc.stdout
    res = json.loads((tmp_path / "step_bench.json").read_text())
    per_elem = {r["peer"]: r["bytes_moved"] / r["elements"] for r in res["records"]}
    torch_bytes = 48 if scaler else 40
    assert per_elem == {"torch-forloop": torch_bytes, "torch-foreach": torch_bytes,
                        "torch-fused": torch_bytes, "adamx": 36}


def test_clip_step_quick(tmp_path):
    """clip_step.py: torch's loop, adamx's and adamx's with keep_grads, with and without
    GradScaler, each with its ratio to torch's loop of the same case."""
    run_script("clip_step.py", "--elements", "2e4", "--repeats", "2", "--warmup", "1",
               "--out", str(tmp_path))
    res = json.loads((tmp_path / "clip_step.json").read_text())
    loops = {(r["case"], r["loop"]): r["ratio"] for r in res["records"]}
    assert set(loops) == {(case, loop) for case in ("plain", "grad-scaler")
                          for loop in ("torch clip + fused", "adamx", "adamx keep_grads")}
    assert loops[("plain", "torch clip + fused")] == 1.0
    assert loops[("grad-scaler", "torch clip + fused")] == 1.0
