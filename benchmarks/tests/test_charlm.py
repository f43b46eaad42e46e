"""benchmarks/charlm.py runs end to end with --quick (a few steps of a tiny model), writes
its table, JSON and plot, and reports the optimizers that cannot run here instead of
failing: adamx's state_dtype runs before that option exists, torchao or bitsandbytes
where they are not installed."""

import json

import pytest

import adamx
from test_benchmarks import HAVE_MPL, import_bench, run_script

ALL = ["adamx-fp32", "adamx-bf16", "adamx-int8", "torch-fused", "torchao-adamw8bit",
       "bnb-adamw8bit"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("charlm")
    proc = run_script("charlm.py", "--quick", "--threads", "1", "--no-progress",
                      "--out", str(out), timeout=300)
    return proc.stdout, json.loads((out / "results.json").read_text()), out


def test_quick_outputs(quick):
    stdout, res, out = quick
    assert res["benchmark"] == "charlm"
    assert [r["run"] for r in res["runs"]] == ALL
    cfg = res["config"]
    assert (cfg["steps"], cfg["batch_size"], cfg["context"], cfg["eval_every"]) == (6, 4, 32, 3)
    data = res["data"]
    assert data["train_bytes"] > 0 and data["val_bytes"] > 0 and len(data["sha256"]) == 64
    assert data["train_bytes"] + data["val_bytes"] == int(0.25 * 2**20)
    assert res["n_params"] > 0
    assert "| run " in stdout and "state B/param" in stdout
    for name in ALL:
        assert f"| {name} " in stdout
    if HAVE_MPL:
        assert (out / "val_loss.png").stat().st_size > 0


def test_quick_runs(quick):
    _, res, _ = quick
    runs = {r["run"]: r for r in res["runs"]}
    must_run = ["torch-fused"] + (["adamx-fp32"] if adamx.is_compiled() else [])
    for name, r in runs.items():
        assert r["status"] in ("ok", "unavailable", "failed"), r
        assert r["available"] == (r["status"] == "ok")
        if r["status"] != "ok":
            assert name not in must_run, r
            assert r["unavailable"]
            continue
        assert r["steps"] == 6 and r["n_params"] == res["n_params"]
        assert [s for s, _ in r["val_curve"]] == [0, 3, 6]
        assert [s for s, _ in r["train_curve"]] == [3, 6]
        assert 0 < r["final_val_loss"] < 6 and 0 < r["final_train_loss"] < 6
        assert 0 < r["opt_step_median_s"] < r["step_median_s"]
        assert r["state_bytes_per_param"] > 0
    assert runs["torch-fused"]["state_bytes_per_param"] == pytest.approx(8, abs=0.01)
    if runs["adamx-fp32"]["status"] == "ok":
        # same init, same batches, the same AdamW: torch's and adamx's losses agree
        assert runs["adamx-fp32"]["state_bytes_per_param"] == pytest.approx(8, abs=0.01)
        assert runs["adamx-fp32"]["val_loss_minus_fp32"] == 0
        assert runs["torch-fused"]["val_loss_minus_fp32"] == pytest.approx(0, abs=1e-3)


def test_unavailable_is_reported(quick):
    """state_dtype runs are either trained or 'not available in this build'; a peer that
    does not import is 'not installed'."""
    _, res, _ = quick
    runs = {r["run"]: r for r in res["runs"]}
    for name in ("adamx-bf16", "adamx-int8"):
        r = runs[name]
        if adamx.is_compiled() and r["status"] != "ok":
            assert r["unavailable"].startswith("not available in this build"), r
    for name, module in (("torchao-adamw8bit", "torchao"), ("bnb-adamw8bit", "bitsandbytes")):
        try:
            __import__(module)
        except Exception:  # noqa: BLE001
            assert runs[name]["unavailable"].startswith("not installed"), runs[name]


def test_helpers():
    charlm = import_bench("charlm")
    f = charlm.lr_lambda(100)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0)
    assert f(99) == pytest.approx(charlm.FINAL_LR_FRACTION, abs=1e-3)
    assert charlm.short(ValueError("x" * 500)).endswith("...")
    assert len(charlm.short(ValueError("x" * 500))) == 160
    args = charlm.parse_args(["--quick"])
    root, files = charlm.stdlib_files()
    assert files and all("site-packages" not in p.parts for p in files)
    assert files == sorted(files, key=lambda p: p.relative_to(root).as_posix())
    assert args.run_list == ALL


def test_peer_stopped_early_compares_at_its_last_step():
    """--max-steps-peer: a peer's final loss is compared with fp32's at the same step."""
    charlm = import_bench("charlm")
    common = {"status": "ok", "available": True, "steps_planned": 4, "final_train_loss": 1.0,
              "step_median_s": 0.2, "opt_step_median_s": 0.01, "nonfinite_loss": False}
    base = dict(common, run="adamx-fp32", optimizer="a", steps=4,
                val_curve=[[0, 5.0], [2, 3.0], [4, 2.0]], final_val_loss=2.0,
                state_bytes_per_param=8.0)
    peer = dict(common, run="bnb-adamw8bit", optimizer="b", steps=2,
                val_curve=[[0, 5.0], [2, 3.3]], final_val_loss=3.3, state_bytes_per_param=2.04)
    gone = {"run": "adamx-int8", "optimizer": "c", "status": "unavailable",
            "available": False, "unavailable": "not available in this build (TypeError: x)"}
    charlm.compare_to_baseline([base, peer, gone])
    assert peer["val_loss_minus_fp32"] == pytest.approx(0.3)
    assert peer["val_loss_vs_fp32_pct"] == pytest.approx(10.0)
    text = charlm.table([base, peer, gone])
    assert "stopped at 2 of 4 steps" in text and "not available in this build" in text
    assert "+10.00%" in text and "2.040" in text
