"""benchmarks/fsdp_bench.py runs end to end on a tiny configuration (2 gloo ranks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import adamx

BENCH = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch without torch.distributed / gloo")
def test_fsdp_bench_quick(tmp_path):
    env = dict(os.environ)  # the ranks import the adamx this test imported
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(adamx.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    peers = "adamx,torch-fused,torch" if adamx.is_compiled() else "torch-fused,torch"
    proc = subprocess.run([sys.executable, str(BENCH / "fsdp_bench.py"), "--quick",
                           "--peers", peers, "--timeout", "240", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(BENCH.parent))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((tmp_path / "fsdp_bench.json").read_text())
    assert res["config"]["ranks"] == 2 and res["config"]["threads_per_rank"] == 1
    assert res["config"]["tensors"] == 12 and res["config"]["repeats"] == 3
    assert sum(res["config"]["local_params_per_rank"]) == res["config"]["params"]
    assert set(res["peers"]) == set(peers.split(","))
    for peer in res["peers"].values():
        assert 0 < peer["step_median_s"] <= peer["train_median_s"]
        assert len(peer["step_median_per_rank_s"]) == 2
    assert "| optimizer" in proc.stdout and "step share" in proc.stdout
