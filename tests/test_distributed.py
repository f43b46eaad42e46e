"""Sharded training: FSDP2, DTensor params, distributed checkpoints, ZeRO and DDP.

Each job spawns its ranks (tests/dist_worker.py, one process per rank, gloo on 127.0.0.1
and a free port) and runs several settings in them; each test below reads one setting's
outcome. In every setting adamx on the sharded model is compared with adamx stepping the
same model unsharded in one process (a replica fed the sharded model's gathered grads):
bitwise, since the step is elementwise and each rank runs the same kernel on its shard;
and with torch.optim.Adam on such a replica, to conftest.TOL. Params after every step and
the state at the end are compared after gathering (``full_tensor()``).

    cpu2    2 ranks: FSDP2 (two optimizer settings, uneven and empty shards), FSDP2 with
            MixedPrecisionPolicy(bf16), DTensor params of mixed placements on 1-D and
            2-D meshes, DDP and ZeroRedundancyOptimizer (consolidate, load), DCP save and
            load between adamx and torch.optim.Adam both ways
    cpu1    1 rank: the 2-rank adamx checkpoint loaded on one rank (2 -> 1)
    loads2  2 ranks: whole checkpoints read on rank 0 and broadcast into FSDP2 adamx
            (adamx's own group keys, compact moments refused on every rank), and a
            torch.optim.Adam checkpoint loaded into master_weights / stochastic_rounding
            by DCP and by broadcast
    offload FSDP2 with CPUOffloadPolicy (needs a GPU)
    nccl2   the cpu2 settings but DCP, on 2 GPUs with nccl (needs 2 GPUs), plus ZeRO with
            capturable=True (its step counts moved to the CPU by ZeRO's load)

A job that outlives its timeout is killed and fails its tests, rather than hanging.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import adamx

WORKER = Path(__file__).with_name("dist_worker.py")
JOB_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.skipif(not adamx.is_compiled(), reason="adamx's kernels are not built"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch without torch.distributed / gloo"),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(job, world_size, out, backend="gloo"):
    """Runs `job` on `world_size` ranks; returns {setting: outcome} per rank."""
    env = dict(os.environ)
    # The workers import the adamx this test imported.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(adamx.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), job, "--rank", str(rank), "--world-size",
         str(world_size), "--port", str(port), "--out", str(out), "--backend", backend],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(world_size)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=JOB_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"distributed job {job!r} did not finish in {JOB_TIMEOUT_S} s")
    results = []
    for rank, proc in enumerate(procs):
        path = Path(out) / f"{job}-rank{rank}.json"
        outcome = json.loads(path.read_text()) if path.exists() else {}
        outcome["_exit"] = (proc.returncode, logs[rank][-4000:])
        results.append(outcome)
    return results


def check(results, setting):
    for rank, outcome in enumerate(results):
        code, log = outcome["_exit"]
        assert setting in outcome, f"rank {rank} did not run {setting} (exit {code}):\n{log}"
        assert outcome[setting] == "ok", f"rank {rank}, {setting}:\n{outcome[setting]}"


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def cpu2(checkpoint_dir):
    return run_job("cpu2", 2, checkpoint_dir)


@pytest.fixture(scope="module")
def cpu1(cpu2, checkpoint_dir):
    check(cpu2, "dcp_save_load")  # the checkpoint this job loads
    return run_job("cpu1", 1, checkpoint_dir)


@pytest.fixture(scope="module")
def loads2(checkpoint_dir):
    return run_job("loads2", 2, checkpoint_dir)


def test_fsdp2(cpu2):
    check(cpu2, "fsdp2")


def test_fsdp2_mixed_precision_bf16(cpu2):
    check(cpu2, "fsdp2_bf16")


def test_fsdp2_bf16_params_with_master_weights(cpu2):
    check(cpu2, "fsdp2_bf16_master")


def test_dtensor_mixed_placements_uneven_2d(cpu2):
    check(cpu2, "dtensor_placements")


def test_sharded_params_round_as_unsharded(cpu2):
    check(cpu2, "sharded_rounding")


def test_fsdp2_compact_moments(cpu2):
    check(cpu2, "fsdp2_lean")


def test_ddp_and_zero_redundancy_optimizer(cpu2):
    check(cpu2, "zero_ddp")


def test_clip_grad_norm_sharded(cpu2):
    check(cpu2, "clip_sharded")


def test_clip_grad_norm_of_every_placement(cpu2):
    check(cpu2, "clip_placements")


def test_dcp_adamx_and_torch_both_ways(cpu2):
    check(cpu2, "dcp_save_load")


def test_dcp_two_ranks_to_one(cpu1):
    check(cpu1, "dcp_reshard")


def test_broadcast_load_leaves_every_rank_the_same_groups(loads2):
    check(loads2, "broadcast_group_settings")


def test_broadcast_load_of_compact_moments(loads2):
    check(loads2, "broadcast_compact_checkpoint")


def test_broadcast_load_of_master_copies_into_an_optimizer_without(loads2):
    check(loads2, "broadcast_master_copies")


def test_torch_checkpoint_into_master_weights_and_stochastic_rounding(loads2):
    check(loads2, "torch_checkpoint_into_reduced_precision")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CPUOffloadPolicy needs an accelerator (no CUDA device here)")
def test_fsdp2_cpu_offload(tmp_path):
    world_size = min(torch.cuda.device_count(), 2)
    check(run_job("offload", world_size, tmp_path,
                  backend="nccl" if dist.is_nccl_available() else "gloo"), "fsdp2_offload")


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="needs 2 CUDA devices and nccl")
def test_nccl_two_gpus(tmp_path):
    results = run_job("nccl2", 2, tmp_path, backend="nccl")
    for setting in ("fsdp2", "fsdp2_bf16", "fsdp2_bf16_master", "dtensor_placements",
                    "zero_ddp"):
        check(results, setting)


def test_state_dict_group_keys_are_torchs():
    """adamx's own group keys (eps_inside_sqrt, stochastic_rounding, master_weights, seed)
    are left out of state_dict at their defaults, so the layout is torch.optim.Adam's
    exactly (a DCP load plan asks the checkpoint for every key the destination has); kept
    when set and loaded; a key the checkpoint lacks keeps the loading optimizer's value."""
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    ours, theirs = adamx.Adam([p], lr=0.1), torch.optim.Adam([p], lr=0.1)
    assert set(ours.state_dict()["param_groups"][0]) == set(theirs.state_dict()["param_groups"][0])
    inside = adamx.Adam([p], eps_inside_sqrt=True)
    assert inside.state_dict()["param_groups"][0]["eps_inside_sqrt"] is True
    assert ours.param_groups[0]["eps_inside_sqrt"] is False  # the group itself keeps it
    inside.load_state_dict(ours.state_dict())
    assert inside.param_groups[0]["eps_inside_sqrt"] is True
    ours.load_state_dict(inside.state_dict())
    assert ours.param_groups[0]["eps_inside_sqrt"] is True
    rounding = adamx.Adam([p], stochastic_rounding=True, seed=7)
    group = rounding.state_dict()["param_groups"][0]
    assert group["stochastic_rounding"] is True and group["seed"] == 7
    assert "master_weights" not in group
    inside.step()
