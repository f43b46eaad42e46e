"""One rank of tests/test_distributed.py's multi-process jobs (not a test file itself).

    python tests/dist_worker.py JOB --rank R --world-size W --port P --out DIR

Each job runs several settings in a row; each setting ends with every rank's collectives
done before anything is compared, so that one failing rank cannot leave the other waiting.
A setting's outcome (``"ok"`` or the traceback) goes into DIR/JOB-rankR.json, which the
test reads. Every comparison is against adamx stepping the same model unsharded in this
same process (a plain-tensor replica fed the gathered grads of the sharded model), bitwise,
and against torch.optim.Adam on such a replica to conftest.TOL.
"""

import argparse
import copy
import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import state_dict as dsd

import adamx
from conftest import TOL, assert_norm_close
from test_lifecycle import SHARDED_KINDS

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
LR = 0.03
STEPS = 4
# The optimizer settings every FSDP2 comparison runs: plain Adam, and AdamW with amsgrad
# and two param groups (one step, two op calls).
CONFIGS = {
    "adam": dict(lr=LR),
    "adamw-amsgrad": dict(lr=LR, weight_decay=0.1, amsgrad=True, decoupled_weight_decay=True),
}


# -- comparisons -----------------------------------------------------------------------

def full(t):
    """The whole tensor of a DTensor (a collective), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def bits(t):
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)


class Mismatches:
    """Collects differences; raised together once a setting's collectives are done."""

    def __init__(self):
        self.found = []

    def bitwise(self, what, got, want):
        if got.dtype != want.dtype or got.shape != want.shape or \
                not torch.equal(bits(got), bits(want)):
            diff = (got.double().cpu() - want.double().cpu()).abs().max().item() \
                if got.shape == want.shape else "shape"
            self.found.append(f"{what}: not bitwise equal ({got.dtype} {tuple(got.shape)} vs "
                              f"{want.dtype} {tuple(want.shape)}, max diff {diff})")

    def close(self, what, got, want):
        try:  # (on the CPU: under CPU offload the replica is on the GPU, the shards not)
            torch.testing.assert_close(got.cpu(), want.cpu(), **TOL[want.dtype])
        except AssertionError as exc:
            self.found.append(f"{what}: {exc}")

    def norm(self, what, got, torch_norm, grads, norm_type=2.0):
        """conftest.assert_norm_close: half an ulp from the exact norm, no further than
        torch's."""
        try:
            assert_norm_close(got.cpu(), torch_norm.cpu(), [g.cpu() for g in grads], norm_type)
        except AssertionError as exc:
            self.found.append(f"{what}: {exc}")

    def check(self, condition, what):
        if not condition:
            self.found.append(what)

    def raise_if_any(self):
        if self.found:
            raise AssertionError("\n".join(self.found))


def named_state(model, opt):
    """{name: {key: full tensor}} of opt's state, params named as in model (collective)."""
    out = {}
    for name, p in model.named_parameters():
        state = opt.state.get(p, {})
        out[name] = {k: full(v).detach().clone() for k, v in sorted(state.items())}
    return out


def compare_models(m, what, model, ref_model, exact=True):
    params = {n: full(p).detach() for n, p in model.named_parameters()}
    for name, ref in ref_model.named_parameters():
        (m.bitwise if exact else m.close)(f"{what} param {name}", params[name],
                                          full(ref).detach())


def compare_states(m, what, got, want, exact=True):
    for name in want:
        m.check(set(got[name]) == set(want[name]),
                f"{what} {name}: state keys {sorted(got[name])} vs {sorted(want[name])}")
        for key in set(got[name]) & set(want[name]):
            a, b = got[name][key], want[name][key]
            if key == "step":
                m.check(a.item() == b.item(), f"{what} {name} step {a.item()} vs {b.item()}")
            elif key == "code_scales":  # (a DTensor param's: (2, rows, blocks per row))
                m.bitwise(f"{what} {name} {key}", a.reshape(2, -1), b.reshape(2, -1))
            else:
                (m.bitwise if exact else m.close)(f"{what} {name} {key}", a, b)


# -- models ------------------------------------------------------------------------------

def mlp():
    """Widths that shard unevenly over 2 ranks: 33 rows split 17/16, and the last layer's
    single row leaves rank 1 an empty weight and bias shard."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 7), nn.Tanh(),
                         nn.Linear(7, 1))


def shard(model, **kwargs):
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def make_opt(cls, model, config):
    if config.get("amsgrad"):  # two groups: the weights with decay, the biases without
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        groups = [dict(params=weights), dict(params=biases, weight_decay=0.0)]
    else:
        groups = list(model.parameters())
    if cls is torch.optim.Adam:
        config = dict(config)
        if config.pop("decoupled_weight_decay", False):
            return torch.optim.AdamW(groups, foreach=False, **config)
        return torch.optim.Adam(groups, foreach=False, **config)
    return cls(groups, **config)


def batch(rank, step, device, dtype=torch.float32, width=16):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, width, generator=g).to(device, dtype)


def give_grads(replicas, model):
    """Sets each replica's grads to the sharded model's, gathered (a collective)."""
    grads = {n: full(p.grad).detach() for n, p in model.named_parameters()}
    for replica in replicas:
        for n, p in replica.named_parameters():
            p.grad = grads[n].to(p.device, p.dtype, copy=True)


# -- settings ----------------------------------------------------------------------------

def fsdp2(ctx, mp_policy=None, offload_policy=None, dtype=torch.float32, configs=CONFIGS,
          model_fn=None):
    """FSDP2 fully_shard, adamx against adamx and torch.optim on an unsharded replica
    (torch.optim only where it has the same formula: not with master weights, stochastic
    rounding or compact moments)."""
    from torch.distributed.tensor import DTensor
    kwargs = {}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    m = Mismatches()
    for config_name, config in configs.items():
        base = (model_fn or mlp)().to(ctx.device, dtype)
        ref_model, torch_model = copy.deepcopy(base), copy.deepcopy(base)
        model = shard(base, **kwargs)
        opt = make_opt(adamx.Adam, model, config)
        ref_opt = make_opt(adamx.Adam, ref_model, config)
        # (torch.optim has no master weights, stochastic rounding or compact moments)
        with_torch = not (config.get("master_weights") or config.get("stochastic_rounding")
                          or config.get("state_dtype"))
        torch_opt = make_opt(torch.optim.Adam, torch_model, config) if with_torch else None
        for step in range(STEPS):
            x = batch(ctx.rank, step, ctx.device, dtype, width=ref_model[0].in_features)
            model(x).float().square().mean().backward()
            give_grads([ref_model, torch_model], model)
            for o in (opt, ref_opt, torch_opt):
                if o is not None:
                    o.step()
                    o.zero_grad()
            what = f"{config_name} step {step + 1}"
            compare_models(m, f"{what} adamx", model, ref_model)
            if with_torch:
                compare_models(m, f"{what} torch", model, torch_model, exact=False)
        state = named_state(model, opt)
        compare_states(m, f"{config_name} adamx", state, named_state(ref_model, ref_opt))
        if with_torch:
            compare_states(m, f"{config_name} torch", state,
                           named_state(torch_model, torch_opt), exact=False)
        if config.get("master_weights"):
            for name, s in state.items():
                m.check(s["master_param"].dtype == torch.float32
                        and s["exp_avg"].dtype == torch.float32, f"{name}: state not fp32")
        for p in model.parameters():  # state sharded exactly as its param; steps as torch's
            s = opt.state[p]
            for key in STATE_KEYS + ("master_param",):
                if key in s:
                    m.check(isinstance(s[key], DTensor) and s[key].placements == p.placements
                            and s[key].device_mesh == p.device_mesh
                            and s[key].to_local().shape == p.to_local().shape,
                            f"{config_name} {key} not sharded like its param")
            m.check(type(s["step"]) is torch.Tensor and s["step"].device.type == "cpu"
                    and s["step"].dtype == torch.float32, f"{config_name} step count {s['step']!r}")
        if ctx.rank == 1:  # the last layer's shards on rank 1 are empty
            m.check(model[-1].weight.to_local().numel() == 0, "no empty shard on rank 1")
    m.raise_if_any()


def fsdp2_bf16(ctx):
    """MixedPrecisionPolicy(param_dtype=bf16): the step sees float32 shards and grads."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    fsdp2(ctx, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))


def fsdp2_bf16_master(ctx):
    """bfloat16 params sharded, with fp32 master copies (master_weights=True): the master
    copies are DTensors sharded as their params, and the step equals the unsharded one's
    bit for bit."""
    fsdp2(ctx, dtype=torch.bfloat16, configs={
        "master": dict(lr=LR, master_weights=True),
        "master-amsgrad": dict(CONFIGS["adamw-amsgrad"], master_weights=True)})


def sharded_rounding(ctx):
    """Issue #22, part 3: a shard draws the random bits its elements draw unsharded. The
    op's element_offsets of each layout (a shard that is one run of the param: its first
    element's index there; any other: a run past the param's indices, shared by replicas
    alone); bfloat16 params rounded stochastically under FSDP2 equal the unsharded run bit
    for bit; and two equal rows on two ranks round independently (they rounded alike on
    every element when each rank counted its shard from 0)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    from adamx._sharded import element_offset
    m = Mismatches()
    rank, world = ctx.rank, ctx.world_size
    mesh1 = init_device_mesh(ctx.device_type, (world,))
    mesh2 = init_device_mesh(ctx.device_type, (world, 1), mesh_dim_names=("dp", "tp"))
    layouts = [  # (shape, mesh, placements, (rank 0's offset, rank 1's))
        ((5, 3), mesh1, [Shard(0)], (0, 9)),          # rows 3 + 2: rank 1's from row 3
        ((1, 4), mesh1, [Shard(0)], (0, 0)),          # rank 1: empty
        ((2, 4, 3), mesh1, [Shard(1)], (24, 48)),     # (2, 2, 3): two runs of the param,
        ((4, 6), mesh1, [Shard(1)], (24, 48)),        # (4, 3): four; past its indices
        ((7,), mesh1, [Replicate()], (0, 0)),
        ((5, 4), mesh2, [Shard(0), Replicate()], (0, 12)),
        ((3, 4), mesh2, [Replicate(), Shard(1)], (0, 0)),  # a mesh dim of one: the whole
    ]
    for shape, mesh, placements, offsets in layouts:
        t = distribute_tensor(torch.zeros(shape, device=ctx.device), mesh, placements)
        m.check(element_offset(t) == offsets[rank],
                f"{shape} {placements}: offset {element_offset(t)}, want {offsets[rank]}")
    fsdp2(ctx, dtype=torch.bfloat16, configs={
        "stochastic_rounding": dict(lr=LR, stochastic_rounding=True, seed=5)})
    # Equal rows on the two ranks, rounded at random: as often alike as independent draws.
    torch.manual_seed(3)
    row = torch.randn(1, 8192)
    whole = torch.cat([row] * world).to(ctx.device, torch.bfloat16)
    p = nn.Parameter(distribute_tensor(whole, mesh1, [Shard(0)]))
    opt = adamx.Adam([p], lr=0.1, stochastic_rounding=True, seed=9)
    p.grad = distribute_tensor(torch.randn(1, 8192).repeat(world, 1).to(ctx.device,
                                                                        torch.bfloat16),
                               mesh1, [Shard(0)])
    opt.step()
    rows = full(p).detach().float()
    alike = (rows[0] == rows[1]).double().mean().item()
    m.check(0.6 < alike < 0.75, f"equal rows on two ranks agree on {alike:.3f} of elements")
    # Ranks whose torch was seeded differently (as data parallel runs seed dropout) draw
    # one default seed, the first rank's, so that replicas stay equal.
    torch.manual_seed(50 + rank)
    replica = nn.Parameter(distribute_tensor(whole[:1].clone(), mesh1, [Replicate()]))
    opt = adamx.Adam([replica], lr=0.1, stochastic_rounding=True)
    replica.grad = distribute_tensor(torch.randn(1, 8192, generator=torch.Generator()
                                                 .manual_seed(7)).to(ctx.device, torch.bfloat16),
                                     mesh1, [Replicate()])
    opt.step()
    check_same_on_every_rank(m, "default seeds", opt.param_groups[0]["seed"])
    check_same_on_every_rank(m, "a replicated param's bits",
                             replica.to_local().float().sum().item())
    m.raise_if_any()


def lean_mlp():
    """mlp() with a first layer of rows of 256 (8448 elements, 17 + 16 rows on 2 ranks):
    large enough for compact moments, and rows that 8-bit blocks can follow."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 33), nn.Tanh(), nn.Linear(33, 7), nn.Tanh(),
                         nn.Linear(7, 1))


def fsdp2_lean(ctx):
    """Compact moments (state_dtype) under FSDP2, uneven shards: bitwise the unsharded
    run, state included (8-bit blocks follow the rows FSDP2 shards by; the random bits of
    each element are its index's in the whole param); bfloat16 moments for a param sharded
    by columns too, 8-bit codes falling back to float32 moments there (blocks cannot
    follow such shards), and 8-bit codes of a one-row param whose shard on rank 1 is
    empty."""
    fsdp2(ctx, model_fn=lean_mlp, configs={  # (a seed: the replica's optimizer is another)
        "bfloat16": dict(lr=LR, state_dtype="bfloat16", seed=11),
        "int8": dict(lr=LR, weight_decay=0.1, decoupled_weight_decay=True, state_dtype="int8",
                     seed=12)})
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    m = Mismatches()
    mesh = init_device_mesh(ctx.device_type, (ctx.world_size,))
    cases = [  # (shape, placements, state_dtype, moments stored, bitwise the unsharded run)
        ((64, 256), [Shard(1)], "bfloat16", "bfloat16", False),  # columns: other bits
        ((64, 256), [Shard(1)], "int8", "float32", True),        # blocks cannot follow
        ((1, 4096), [Shard(0)], "int8", "int8", True),           # rank 1's shard is empty
    ]
    for shape, placements, state_dtype, stored, exact in cases:
        what = f"{state_dtype} {shape} {placements}"
        torch.manual_seed(4)
        whole = torch.randn(shape, device=ctx.device)
        p = nn.Parameter(distribute_tensor(whole, mesh, placements))
        ref = nn.Parameter(whole.clone())
        opt = adamx.Adam([p], lr=LR, state_dtype=state_dtype, seed=3)
        ref_opt = adamx.Adam([ref], lr=LR, state_dtype=stored, seed=3)
        for step in range(STEPS):
            grad = torch.randn(shape, device=ctx.device)
            p.grad, ref.grad = distribute_tensor(grad, mesh, placements), grad.clone()
            opt.step()
            ref_opt.step()
        got = adamx._state.stored_moments(p, opt.state[p])
        m.check(got == stored, f"{what}: moments stored as {got}")
        if exact:
            m.bitwise(what, full(p).detach(), ref.detach())
        else:  # as close as two seeds' runs (test_lifecycle.LEAN_TOL)
            diff = (full(p).detach() - ref.detach()).abs().max().item()
            m.check(diff < 0.5 * LR, f"{what}: {diff} from the unsharded run")
    m.raise_if_any()


def fsdp2_offload(ctx):
    from torch.distributed.fsdp import CPUOffloadPolicy
    fsdp2(ctx, offload_policy=CPUOffloadPolicy())


def dtensor_placements(ctx):
    """DTensor params made directly: several placements in one step, uneven and empty
    shards, meshes of one and two dims, a Partial grad, a replicated step count on a
    sub-mesh; the step needs no communication but the Partial grad's reduction."""
    from torch.distributed.tensor import (DTensor, Partial, Replicate, Shard, distribute_tensor,
                                          init_device_mesh)
    world = ctx.world_size
    mesh1 = init_device_mesh(ctx.device_type, (world,))
    mesh2 = init_device_mesh(ctx.device_type, (world, 1), mesh_dim_names=("dp", "tp"))
    mesh2t = init_device_mesh(ctx.device_type, (1, world), mesh_dim_names=("a", "b"))
    layouts = [  # (shape, dtype, mesh, placements)
        ((5, 3), torch.float32, mesh1, [Shard(0)]),          # 3 + 2 rows
        ((4, 6), torch.float32, mesh1, [Shard(1)]),
        ((7,), torch.float32, mesh1, [Replicate()]),
        ((1, 4), torch.float32, mesh1, [Shard(0)]),          # rank 1: empty
        ((6, 2), torch.bfloat16, mesh1, [Shard(0)]),
        ((5, 4), torch.float32, mesh2, [Shard(0), Replicate()]),
        ((3, 4), torch.float32, mesh2, [Replicate(), Shard(1)]),
        ((3, 5), torch.float32, mesh2t, [Replicate(), Shard(1)]),
    ]
    m = Mismatches()
    g = torch.Generator().manual_seed(7)
    fulls = [torch.randn(shape, generator=g).to(ctx.device, dtype)
             for shape, dtype, _, _ in layouts]
    params = [nn.Parameter(distribute_tensor(t, mesh, placements))
              for t, (_, _, mesh, placements) in zip(fulls, layouts)]
    partial = nn.Parameter(distribute_tensor(torch.randn(4, 3, generator=g).to(ctx.device),
                                             mesh1, [Replicate()]))
    # (clones: the whole of a replicated DTensor is its local tensor itself)
    ref = [nn.Parameter(t.clone()) for t in fulls + [partial.full_tensor()]]
    # torch's fused CPU step computes reduced precision in float32 as adamx does (conftest)
    torch_ref = [nn.Parameter(p.detach().clone()) for p in ref]
    config = dict(lr=LR, weight_decay=0.01)
    opt = adamx.Adam(params + [partial], **config)
    ref_opt = adamx.Adam(ref, **config)
    torch_opt = torch.optim.Adam(torch_ref, fused=True, **config)
    for step in range(STEPS):
        grads = [torch.randn(p.shape, generator=g).to(ctx.device, p.dtype) for p in params]
        for p, grad, (_, _, mesh, placements) in zip(params, grads, layouts):
            p.grad = distribute_tensor(grad, mesh, placements)
        # A Partial grad (tensor parallel before its reduction): each rank holds a part,
        # the grad is their sum; the step reduces it to the param's Replicate first.
        parts = [torch.randn(4, 3, generator=g).to(ctx.device) for _ in range(world)]
        partial.grad = DTensor.from_local(parts[ctx.rank], mesh1, [Partial()])
        grads.append(sum(parts[1:], parts[0]))
        for ps in (ref, torch_ref):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
        if step == 1:  # a replicated DTensor step count on a sub-mesh
            st = opt.state[params[5]]
            st["step"] = distribute_tensor(st["step"], mesh2["dp"], [Replicate()])
        for o in (opt, ref_opt, torch_opt):
            o.step()
        gathered = [full(p).detach() for p in params + [partial]]
        for i, (got, want, want_torch) in enumerate(zip(gathered, ref, torch_ref)):
            m.bitwise(f"step {step + 1} param {i}", got, want.detach())
            m.close(f"step {step + 1} torch param {i}", got, want_torch.detach())
    for i, (p, r) in enumerate(zip(params + [partial], ref)):
        s, rs = opt.state[p], ref_opt.state[r]
        for key in ("exp_avg", "exp_avg_sq"):
            m.check(s[key].placements == p.placements, f"param {i} {key} placements")
            m.bitwise(f"param {i} {key}", full(s[key]), rs[key])
        m.check(full(s["step"]).item() == STEPS, f"param {i} step {s['step']}")
    m.check(isinstance(opt.state[params[5]]["step"], DTensor), "step DTensor kept")
    m.check(params[3].to_local().shape == ((1, 4) if ctx.rank == 0 else (0, 4)),
            "rank 1's shard of a one-row param is not empty")
    m.raise_if_any()


def zero_ddp(ctx):
    """DDP with adamx, and ZeroRedundancyOptimizer(optimizer_class=adamx.Adam): steps,
    consolidate_state_dict, and a fresh ZeRO loading the consolidated state."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    m = Mismatches()
    # capturable keeps step counts on the GPU, and ZeRO's load puts them on the CPU: a
    # setting only where params are on a GPU (on the CPU capturable=True is refused).
    names = ("ddp", "zero") + (("zero-capturable",) if ctx.device_type == "cuda" else ())
    for name in names:
        base = mlp().to(ctx.device)
        ref_model = copy.deepcopy(base)
        model = DDP(base)
        extra = dict(capturable=True) if name == "zero-capturable" else {}
        if name.startswith("zero"):
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=adamx.Adam,
                                          lr=LR, weight_decay=0.01, **extra)
        else:
            opt = adamx.Adam(model.parameters(), lr=LR, weight_decay=0.01)
        ref_opt = adamx.Adam(ref_model.parameters(), lr=LR, weight_decay=0.01, **extra)
        # capturable: the loaded step counts are on the CPU, the replica's on the GPU, and
        # the per-step scalars are computed there and here (bitwise is not promised)
        exact = name != "zero-capturable"

        def train(steps, opt, first=0):
            for step in range(first, first + steps):
                model(batch(ctx.rank, step, ctx.device)).square().mean().backward()
                for p, r in zip(model.module.parameters(), ref_model.parameters()):
                    r.grad = p.grad.clone()  # DDP's all-reduced grad: the whole batch's
                opt.step()
                ref_opt.step()
                opt.zero_grad()
                ref_opt.zero_grad()
                compare_models(m, f"{name} step {step + 1}", model.module, ref_model, exact)

        train(STEPS, opt)
        if name.startswith("zero"):
            opt.consolidate_state_dict(to=0)
            sd = [opt.state_dict() if ctx.rank == 0 else None]
            dist.broadcast_object_list(sd, src=0)
            sd = sd[0]
            ref_sd = ref_opt.state_dict()
            for i, s in ref_sd["state"].items():
                for key, value in s.items():
                    if key != "step":
                        m.bitwise(f"zero consolidated {i} {key}", sd["state"][i][key], value)
                    m.check(float(sd["state"][i]["step"]) == STEPS, f"consolidated step {i}")
            loaded = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=adamx.Adam,
                                             lr=1.0, **extra)
            loaded.load_state_dict(copy.deepcopy(sd))
            for p, s in loaded.optim.state.items():  # ZeRO puts the 0-d step on the CPU
                m.check(s["step"].device.type == "cpu" and s["step"].item() == STEPS,
                        f"loaded step {s['step']!r}")
            m.check(loaded.param_groups[0]["lr"] == LR, "loaded lr")
            train(2, loaded, first=STEPS)
    m.raise_if_any()


def dcp_state(model, opt):
    """The model's and the optimizer's state dicts as DCP saves and loads them."""
    return {"model": dsd.get_model_state_dict(model),
            "optim": dsd.get_optimizer_state_dict(model, opt)}


def dcp_save(model, opt, path):
    dcp.save(dcp_state(model, opt), checkpoint_id=path)


def dcp_load(model, opt, path, **load_options):
    """Loads a DCP checkpoint into the model and its optimizer, as torch documents it."""
    sd = dcp_state(model, opt)
    dcp.load(sd, checkpoint_id=path, **load_options)
    dsd.set_model_state_dict(model, sd["model"])
    dsd.set_optimizer_state_dict(model, opt, sd["optim"])


def dcp_save_load(ctx):
    """torch.distributed.checkpoint: adamx's sharded state saved under FSDP2 and loaded
    into torch.optim.Adam, and the other way; the adamx checkpoint is also kept, with its
    whole state and one more step, for the 1-rank job (2 ranks -> 1)."""
    m = Mismatches()
    config = CONFIGS["adamw-amsgrad"]

    def trained(cls):
        model = shard(mlp().to(ctx.device))
        opt = make_opt(cls, model, config)
        for step in range(STEPS):
            model(batch(ctx.rank, step, ctx.device)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    def load(cls, path):
        model = shard(mlp().to(ctx.device))
        opt = make_opt(cls, model, dict(config, lr=1.0))  # the checkpoint's lr must win
        dcp_load(model, opt, path)
        return model, opt

    def continue_both(model_a, opt_a, model_b, opt_b, what):
        for step in range(2):
            for model in (model_a, model_b):
                model(batch(ctx.rank, 100 + step, ctx.device)).square().mean().backward()
            for opt in (opt_a, opt_b):
                opt.step()
                opt.zero_grad()
        compare_models(m, what, model_a, model_b, exact=False)

    for src, dst in ((adamx.Adam, torch.optim.Adam), (torch.optim.Adam, adamx.Adam)):
        what = f"{src.__module__.split('.')[0]} -> {dst.__module__.split('.')[0]}"
        path = os.path.join(ctx.out, f"dcp-{src.__module__.split('.')[0]}")
        model, opt = trained(src)
        dcp_save(model, opt, path)
        loaded_model, loaded_opt = load(dst, path)
        compare_states(m, what, named_state(loaded_model, loaded_opt), named_state(model, opt))
        m.check(loaded_opt.param_groups[0]["lr"] == LR, f"{what}: lr not loaded")
        m.check(all(isinstance(s["exp_avg"], type(p)) for p, s in loaded_opt.state.items()),
                f"{what}: loaded state not DTensors")
        if src is adamx.Adam:  # the reference for the 1-rank job, from a third copy
            full_state = dsd.get_optimizer_state_dict(
                model, opt, options=dsd.StateDictOptions(full_state_dict=True, cpu_offload=True))
            next_params = one_more_step(*load(adamx.Adam, path))
            if ctx.rank == 0:
                torch.save(dict(state=full_state, params=next_params),
                           os.path.join(ctx.out, "dcp-adamx-reference.pt"))
        continue_both(model, opt, loaded_model, loaded_opt, what + " continued")
    m.raise_if_any()


def one_more_step(model, opt):
    """Sets fixed whole grads (the same on any world size, sharded or not), steps, returns
    the params."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    g = torch.Generator().manual_seed(99)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements) \
            if isinstance(p, DTensor) else grad
    opt.step()
    return {n: full(p).detach().cpu() for n, p in model.named_parameters()}


def dcp_reshard(ctx):
    """The 2-rank adamx checkpoint (after the first STEPS + 2) loaded on 1 rank: into
    FSDP2 with adamx, and into torch.optim.Adam; state equal to the saved whole state,
    and one more step equal to the 2-rank run's."""
    m = Mismatches()
    ref = torch.load(os.path.join(ctx.out, "dcp-adamx-reference.pt"), weights_only=False)
    for cls in (adamx.Adam, torch.optim.Adam):
        model = shard(mlp().to(ctx.device))
        opt = make_opt(cls, model, dict(CONFIGS["adamw-amsgrad"], lr=1.0))
        dcp_load(model, opt, os.path.join(ctx.out, "dcp-adamx"))
        got = dsd.get_optimizer_state_dict(model, opt, options=dsd.StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        what = f"2 -> 1 ranks, {cls.__module__.split('.')[0]}"
        for name, want in ref["state"]["state"].items():
            for key, value in want.items():
                m.bitwise(f"{what} {name} {key}", got["state"][name][key], value)
        m.check(got["param_groups"] == ref["state"]["param_groups"], f"{what} groups")
        params = one_more_step(model, opt)
        for name, want in ref["params"].items():
            (m.bitwise if cls is adamx.Adam else m.close)(f"{what} next step {name}",
                                                         params[name], want)
    m.raise_if_any()


def clip_sharded(ctx):
    """Adam.clip_grad_norm_ on FSDP2 grads: the norm is the global one (adamx's kernel on
    each rank's shards, the accumulators summed over the mesh: within half an ulp of the
    exact norm of the whole grads, no further than torch's clip_grad_norm_ on the same
    DTensor grads, close to the unsharded run's) and every rank folds
    the same factor into its step, which matches the unsharded run (with GradScaler too,
    whose found-inf then comes from the global norm)."""
    m = Mismatches()
    for with_scaler in (False, True):
        base = mlp().to(ctx.device)
        ref_model = copy.deepcopy(base)
        model = shard(base)
        opt = adamx.Adam(model.parameters(), lr=LR)
        ref_opt = adamx.Adam(ref_model.parameters(), lr=LR)
        scalers = [torch.amp.GradScaler(ctx.device_type, init_scale=2.0 ** 10) if with_scaler
                   else None for _ in range(2)]
        if with_scaler:  # the replica's grads come scaled from the sharded model's
            scalers[1].scale(torch.ones((), device=ctx.device))
        for step in range(STEPS):
            x = batch(ctx.rank, step, ctx.device)
            loss = model(x).square().mean()
            (scalers[0].scale(loss) if with_scaler else loss).backward()
            give_grads([ref_model], model)
            want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            whole = [full(p.grad) for p in model.parameters()]
            if with_scaler:
                inverse = scalers[0]._scale.double().reciprocal().float()
                want = want * inverse
                whole = [g * inverse for g in whole]  # (a power of two: exact)
            before = [p.grad.to_local().clone() for p in model.parameters()]
            got = opt.clip_grad_norm_(0.05, grad_scaler=scalers[0])
            for g, p in zip(before, model.parameters()):  # folded: no pass over the grads
                m.bitwise("grads after clip_grad_norm_", p.grad.to_local(), g)
            ref_got = ref_opt.clip_grad_norm_(0.05, grad_scaler=scalers[1])
            what = f"{'scaler ' if with_scaler else ''}step {step + 1}"
            m.norm(f"{what} norm vs torch's", full(got), full(want), whole)
            m.close(f"{what} norm vs unsharded", full(got), ref_got)
            for o, scaler in ((opt, scalers[0]), (ref_opt, scalers[1])):
                if scaler is None:
                    o.step()
                else:
                    scaler.step(o)
                    scaler.update()
                o.zero_grad()
            compare_models(m, what, model, ref_model, exact=False)
    m.raise_if_any()


def clip_placements(ctx):
    """Adam.clip_grad_norm_ on DTensor grads of every placement on 1-D and 2-D meshes
    (shards, replicas, both): each element counted once, so the norm is within half an
    ulp of the exact norm of the whole grads and no further than torch's, the same on
    every rank, for orders 2, 1, 3.5 and inf; and a NaN on one rank's shard makes every
    rank's norm NaN."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    m = Mismatches()
    world = ctx.world_size
    mesh1 = init_device_mesh(ctx.device_type, (world,))
    mesh2 = init_device_mesh(ctx.device_type, (world, 1), mesh_dim_names=("dp", "tp"))
    settings = {
        "1-D": (mesh1, [((5, 3), [Shard(0)]), ((1, 4), [Shard(0)]), ((4, 6), [Shard(1)]),
                        ((7,), [Replicate()])]),
        "2-D": (mesh2, [((5, 4), [Shard(0), Replicate()]), ((3, 4), [Replicate(), Shard(1)]),
                        ((6,), [Replicate(), Replicate()]), ((4, 5), [Shard(1), Replicate()])]),
    }
    for name, (mesh, layouts) in settings.items():
        g = torch.Generator().manual_seed(4)
        wholes = [torch.randn(shape, generator=g).to(ctx.device) for shape, _ in layouts]
        params = [nn.Parameter(distribute_tensor(torch.zeros_like(w), mesh, placements))
                  for w, (_, placements) in zip(wholes, layouts)]
        opt = adamx.Adam(params, lr=LR)
        for norm_type in (2.0, 1.0, 3.5, float("inf")):
            for p, w, (_, placements) in zip(params, wholes, layouts):
                p.grad = distribute_tensor(w.clone(), mesh, placements)
            # torch's norm of the whole grads (of the DTensor grads, order inf fails on
            # rank 1's empty shard: _foreach_norm has no identity there)
            want = torch.nn.utils.get_total_norm(wholes, norm_type)
            got = full(opt.clip_grad_norm_(1e9, norm_type))
            m.norm(f"{name} order {norm_type}", got, want, wholes, norm_type)
            check_same_on_every_rank(m, f"{name} order {norm_type} norm", got.item())
            opt.zero_grad()
            # a NaN in rank 1's part of the first grad only
            for p, w, (_, placements) in zip(params, wholes, layouts):
                bad = w.clone()
                if p is params[0]:
                    bad[-1] = float("nan")
                p.grad = distribute_tensor(bad, mesh, placements)
            got = full(opt.clip_grad_norm_(1e9, norm_type))
            m.check(got.isnan().item(), f"{name} order {norm_type}: a NaN on one rank gave {got}")
            opt.zero_grad()
    m.raise_if_any()


# -- loading whole checkpoints into sharded params (issue #20) --------------------------


def broadcast_options():
    return dsd.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def wide():
    """A model with a param large enough for compact moments (6144 >= 4096 elements)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 384), nn.Tanh(), nn.Linear(384, 1))


def train(model, opt, dtype=torch.float32, steps=STEPS):
    """Steps a model (sharded or not) on the batches of rank 0, the same on every rank."""
    for step in range(steps):
        device = next(model.parameters()).device
        model(batch(0, step, device, dtype)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()


def load_broadcast(ctx, model, opt, full_model, full_optim):
    """Whole state dicts read on rank 0 alone and broadcast (the others pass {}; copies:
    torch's loaders take over and change what they are given)."""
    options = broadcast_options()
    dsd.set_model_state_dict(model, copy.deepcopy(full_model) if ctx.rank == 0 else {},
                             options=options)
    dsd.set_optimizer_state_dict(model, opt, copy.deepcopy(full_optim) if ctx.rank == 0
                                 else {}, options=options)


def groups_of(opt):
    """The groups' settings (betas as a tuple: torch's broadcast load makes it a list)."""
    return [{k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "params"}
            for g in opt.param_groups]


def on_every_rank(value):
    """``value`` of every rank, gathered (a collective)."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def check_same_on_every_rank(m, what, value):
    values = on_every_rank(value)
    m.check(all(v == values[0] for v in values), f"{what} differ between ranks: {values}")


def local_snapshot(opt):
    return groups_of(opt), {i: {k: full(v).clone() if torch.is_tensor(v) else v
                                for k, v in sorted(s.items())}
                            for i, s in enumerate(opt.state.values())}


def same_snapshot(a, b):
    if a[0] != b[0] or a[1].keys() != b[1].keys():
        return False
    return all(sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)
        for sa, sb in ((a[1][i], b[1][i]) for i in a[1]))


def broadcast_group_settings(ctx):
    """An adamx checkpoint whose groups set adamx's own keys (eps_inside_sqrt, seed,
    stochastic_rounding), read on rank 0 and broadcast into FSDP2 adamx built with their
    defaults: every rank ends with the checkpoint's groups (all keys), as a plain
    load_state_dict of the unsharded model gives them, and the next step is that
    unsharded run's, bit for bit."""
    m = Mismatches()
    config = dict(CONFIGS["adamw-amsgrad"], eps_inside_sqrt=True, seed=7,
                  stochastic_rounding=True)
    source = mlp().to(ctx.device)
    source_opt = make_opt(adamx.Adam, source, config)
    train(source, source_opt)
    # (copies: a load takes a checkpoint's tensors as they are, as torch's does)
    full_optim = copy.deepcopy(dsd.get_optimizer_state_dict(source, source_opt))
    destination = dict(CONFIGS["adamw-amsgrad"], lr=1.0)  # the checkpoint's lr must win
    ref = mlp().to(ctx.device)
    ref.load_state_dict(source.state_dict())
    ref_opt = make_opt(adamx.Adam, ref, destination)
    ref_opt.load_state_dict(copy.deepcopy(source_opt.state_dict()))
    model = shard(mlp().to(ctx.device))
    opt = make_opt(adamx.Adam, model, destination)
    load_broadcast(ctx, model, opt, source.state_dict(), full_optim)
    check_same_on_every_rank(m, "param_groups", groups_of(opt))
    m.check(groups_of(opt) == groups_of(ref_opt),
            f"groups {groups_of(opt)} vs the unsharded load's {groups_of(ref_opt)}")
    want = one_more_step(ref, ref_opt)
    got = one_more_step(model, opt)
    for name in want:
        m.bitwise(f"next step {name}", got[name], want[name])
    m.raise_if_any()


def broadcast_compact_checkpoint(ctx):
    """A whole checkpoint with 8-bit or bfloat16 moments (adamx's state_dtype), read on
    rank 0 and broadcast into FSDP2 adamx built with float32 moments. bfloat16 moments
    load (torch's broadcast delivers them in the loading optimizer's float32 moments,
    exactly; the checkpoint's state_dtype then stores them as bfloat16 again, exactly),
    and the next step is the unsharded load's. 8-bit codes cannot be sharded so (torch
    adds them on rank 0 alone): every rank raises the same error, naming
    adamx.to_torch_state_dict, with the groups and the coded param's state as they were;
    converted so, the checkpoint loads on every rank and the next step is the unsharded
    run's."""
    m = Mismatches()
    for state_dtype in ("int8", "bfloat16"):
        source = wide().to(ctx.device)
        source_opt = adamx.Adam(source.parameters(), lr=LR, state_dtype=state_dtype)
        train(source, source_opt)
        full_optim = copy.deepcopy(dsd.get_optimizer_state_dict(source, source_opt))
        model = shard(wide().to(ctx.device))
        opt = adamx.Adam(model.parameters(), lr=1.0)
        dsd.get_optimizer_state_dict(model, opt)  # (makes the state, as torch's load)
        ref = wide().to(ctx.device)
        ref.load_state_dict(source.state_dict())
        ref_opt = adamx.Adam(ref.parameters(), lr=1.0)
        if state_dtype == "int8":
            before = local_snapshot(opt)
            try:
                load_broadcast(ctx, model, opt, source.state_dict(), full_optim)
                error = None
            except Exception as exc:  # noqa: BLE001  (compared between ranks below)
                error = f"{type(exc).__name__}: {exc}"
            errors = on_every_rank(error)
            m.check(all(e is not None and e == errors[0] for e in errors)
                    and "to_torch_state_dict" in errors[0],
                    f"{state_dtype}: not the same error on every rank: {errors}")
            # The groups as they were, and the state of the param with codes (torch's
            # broadcast writes the checkpoint's float moments of the other params into
            # their state in place before load_state_dict runs).
            after = local_snapshot(opt)
            m.check(after[0] == before[0], f"{state_dtype}: the refused load changed the groups")
            m.check(same_snapshot((after[0], {0: after[1][0]}), (before[0], {0: before[1][0]})),
                    f"{state_dtype}: the refused load changed the state of the coded param")
            load_broadcast(ctx, model, opt, source.state_dict(),
                           adamx.to_torch_state_dict(full_optim))
            ref_opt.load_state_dict(adamx.to_torch_state_dict(source_opt.state_dict()))
        else:
            load_broadcast(ctx, model, opt, source.state_dict(), full_optim)
            ref_opt.load_state_dict(copy.deepcopy(source_opt.state_dict()))
            m.check(opt.state[model[0].weight]["exp_avg"].dtype == torch.bfloat16,
                    f"{state_dtype}: the loaded moments are not bfloat16")
        check_same_on_every_rank(m, f"{state_dtype}: param_groups", groups_of(opt))
        want, got = one_more_step(ref, ref_opt), one_more_step(model, opt)
        for name in want:
            m.bitwise(f"{state_dtype}: next step {name}", got[name], want[name])
    m.raise_if_any()


def moments(model, opt):
    """named_state without master copies (a collective)."""
    return {name: {k: v for k, v in s.items() if k != "master_param"}
            for name, s in named_state(model, opt).items()}


def broadcast_master_copies(ctx):
    """An adamx checkpoint of bfloat16 params with master copies, broadcast from rank 0
    into FSDP2 adamx built without them: every rank takes master_weights=True and starts
    its copies from the params (rank 0's whole copies, which torch adds there alone, are
    left out), as the unsharded load of the checkpoint without its copies, and with the
    moments torch's broadcast rounded into the optimizer's bfloat16 ones, steps. And a
    whole (not sharded) state loaded straight into DTensor params is refused on every
    rank, changing nothing."""
    m = Mismatches()
    source = mlp().to(ctx.device, torch.bfloat16)
    source_opt = adamx.Adam(source.parameters(), lr=LR, master_weights=True)
    train(source, source_opt, torch.bfloat16)
    full_optim = copy.deepcopy(dsd.get_optimizer_state_dict(source, source_opt))
    # The unsharded load of the checkpoint as the broadcast delivers it: torch writes the
    # moments into the loading optimizer's state, bfloat16 without master copies.
    without = copy.deepcopy(source_opt.state_dict())
    for state in without["state"].values():
        del state["master_param"]
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = state[key].bfloat16()
    ref = mlp().to(ctx.device, torch.bfloat16)
    ref.load_state_dict(source.state_dict())
    ref_opt = adamx.Adam(ref.parameters(), lr=1.0)
    ref_opt.load_state_dict(without)
    model = shard(mlp().to(ctx.device, torch.bfloat16))
    opt = adamx.Adam(model.parameters(), lr=1.0)
    load_broadcast(ctx, model, opt, source.state_dict(), full_optim)
    check_same_on_every_rank(m, "param_groups", groups_of(opt))
    m.check(groups_of(opt) == groups_of(ref_opt),
            f"groups {groups_of(opt)} vs the unsharded load's {groups_of(ref_opt)}")
    want, got = one_more_step(ref, ref_opt), one_more_step(model, opt)
    for name in want:
        m.bitwise(f"next step {name}", got[name], want[name])
    before = local_snapshot(opt)
    try:
        opt.load_state_dict(copy.deepcopy(source_opt.state_dict()))
        error = None
    except ValueError as exc:
        error = str(exc)
    errors = on_every_rank(error)
    m.check(all(e is not None and "as a whole tensor" in e and e == errors[0] for e in errors),
            f"a whole state into DTensor params: {errors}")
    m.check(same_snapshot(local_snapshot(opt), before), "the refused load changed the optimizer")
    m.raise_if_any()


REDUCED_CONFIGS = {"master": dict(lr=LR, master_weights=True),
                   "stochastic": dict(lr=LR, stochastic_rounding=True)}


def torch_checkpoint_into_reduced_precision(ctx):
    """A torch.optim.Adam checkpoint of bfloat16 params loaded into FSDP2 adamx with
    master_weights=True or stochastic_rounding=True: by DCP (which refuses the group key
    and master copies the checkpoint lacks unless told allow_partial_load=True, and then
    loads) and by a whole state dict broadcast from rank 0; the next step is the unsharded
    run's (the same checkpoint loaded by set_optimizer_state_dict), bit for bit."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException
    m = Mismatches()
    source = shard(mlp().to(ctx.device, torch.bfloat16))
    source_opt = torch.optim.Adam(source.parameters(), lr=LR, foreach=False)
    train(source, source_opt, torch.bfloat16)
    path = os.path.join(ctx.out, "dcp-torch-bf16")
    dcp_save(source, source_opt, path)
    whole = dsd.StateDictOptions(full_state_dict=True)
    full_model = dsd.get_model_state_dict(source, options=whole)
    full_optim = copy.deepcopy(dsd.get_optimizer_state_dict(source, source_opt, options=whole))
    for name, config in REDUCED_CONFIGS.items():
        config = dict(config, lr=1.0)  # the checkpoint's lr must win
        ref = mlp().to(ctx.device, torch.bfloat16)
        ref.load_state_dict(full_model)
        ref_opt = adamx.Adam(ref.parameters(), **config)
        dsd.set_optimizer_state_dict(ref, ref_opt, copy.deepcopy(full_optim))
        # (master copies aside: a load without them keeps the ones it has, which the step
        # restarts from the params; see the next step)
        loaded = moments(ref, ref_opt)
        want = one_more_step(ref, ref_opt)
        routes = {}

        def check_next_step(route, model, opt):
            what = f"{name} {route}"
            check_same_on_every_rank(m, f"{what}: param_groups", groups_of(opt))
            m.check(groups_of(opt) == groups_of(ref_opt),
                    f"{what}: groups {groups_of(opt)} vs {groups_of(ref_opt)}")
            compare_states(m, what, moments(model, opt), loaded)
            got = routes[route] = one_more_step(model, opt)
            for fqn in want:
                if name == "stochastic":
                    # Stochastic rounding's bits hash each element's index in its shard,
                    # so sharded steps round otherwise than unsharded ones: one of the
                    # two neighbours (a bfloat16 gap: rtol 2**-7); the routes alike.
                    a, b = got[fqn].float(), want[fqn].float()
                    m.check(bool(((a - b).abs() <= b.abs() * 2 ** -7).all()),
                            f"{what}: next step {fqn} more than a bfloat16 gap away")
                    if route != "dcp":
                        m.bitwise(f"{what}: next step {fqn} vs dcp's", got[fqn],
                                  routes["dcp"][fqn])
                else:
                    m.bitwise(f"{what}: next step {fqn}", got[fqn], want[fqn])

        model = shard(mlp().to(ctx.device, torch.bfloat16))
        opt = adamx.Adam(model.parameters(), **config)
        try:
            dcp.load(dcp_state(model, opt), checkpoint_id=path)
            error = ""
        except CheckpointException as exc:  # (a BaseException)
            error = str(exc.failures)
        m.check("Missing key in checkpoint" in error,
                f"{name} dcp: a plain load did not refuse the missing keys: {error!r}")
        dcp_load(model, opt, path, planner=DefaultLoadPlanner(allow_partial_load=True))
        check_next_step("dcp", model, opt)
        model = shard(mlp().to(ctx.device, torch.bfloat16))
        opt = adamx.Adam(model.parameters(), **config)
        load_broadcast(ctx, model, opt, full_model, full_optim)
        check_next_step("broadcast", model, opt)
    m.raise_if_any()


# -- the lifecycle table's sharded rows (tests/test_lifecycle.py) ------------------------

SHARDED_EVENTS = ("fresh", "dcp", "broadcast", "edit_in_place", "amsgrad_for_one_step")


def shard_layers(model):
    """fully_shard on every layer with params, then on the model."""
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model


def fixed_grads(model, k):
    """test_mixed_precision.set_grads's grads (whole), sharded as each param."""
    from torch.distributed.tensor import distribute_tensor
    g = torch.Generator().manual_seed(100 + k)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=g).to(p.dtype)
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements)


def sharded_event(ctx, life, kind_name, event, model, opt):
    """The event of a sharded row that test_lifecycle.py has no sharded form of: a DCP
    save and load into another model and optimizer, or a whole checkpoint broadcast from
    rank 0 into them."""
    kind = life.KINDS[kind_name]
    resumed = shard_layers(life.model_of(kind, seed=1))
    resumed_opt = life.optimizer_of(kind, resumed)
    if event == "dcp":
        path = os.path.join(ctx.out, f"life-{kind_name}")
        dcp_save(model, opt, path)
        dcp_load(resumed, resumed_opt, path)
    else:
        whole = dsd.StateDictOptions(full_state_dict=True)
        load_broadcast(ctx, resumed, resumed_opt,
                       dsd.get_model_state_dict(model, options=whole),
                       dsd.get_optimizer_state_dict(model, opt, options=whole))
    return resumed, resumed_opt


def lifecycle_row(ctx, kind_name, event):
    """A sharded run of the lifecycle table's kind through the event, compared with the
    unsharded run of tests/test_lifecycle.py (compare_step)."""
    import test_lifecycle as life
    kind = life.KINDS[kind_name]
    # test_lifecycle's own events run as they are on the sharded model; the loads are
    # sharded_event's (the unsharded run goes on uninterrupted: the loaded state is its own)
    own_event = life.EVENTS[event] if event in ("edit_in_place", "amsgrad_for_one_step") \
        else None
    want = life.run(kind, own_event)[0]
    model = shard_layers(life.model_of(kind))
    opt = life.optimizer_of(kind, model)
    m = Mismatches()
    for k in range(life.STEPS):
        if own_event is not None and k >= life.EVENT_AT:
            model, opt = own_event(kind, model, opt, k)
        elif k == life.EVENT_AT and event != "fresh":
            model, opt = sharded_event(ctx, life, kind_name, event, model, opt)
        fixed_grads(model, k)
        opt.step()
        compare_step(m, life, kind, model, want[k], f"{kind_name} {event}", k)
        for p in model.parameters():  # the large params' moments as the kind stores them
            if p.numel() >= adamx.COMPACT_MIN_NUMEL and p in opt.state:
                stored = adamx._state.stored_moments(p, opt.state[p])
                m.check(stored == kind.options.get("state_dtype", "float32"),
                        f"{kind_name} {event}: moments stored as {stored} after step {k + 1}")
    return m


def compare_step(m, life, kind, model, want, what, k):
    """A sharded model's params after step k + 1 against the unsharded run's: bitwise,
    stochastic rounding and compact moments too (their random bits hash each element's
    index in its whole param, and 8-bit blocks follow the rows FSDP2 shards by)."""
    for i, (p, b) in enumerate(zip(model.parameters(), want)):
        m.bitwise(f"{what}: param {i} after step {k + 1}", full(p).detach(), b)


def lifecycle_sharded(kind_name):
    """The setting of tests/test_lifecycle.py's rows for DTensor params (FSDP2 on 2 ranks)
    of one kind: through each of SHARDED_EVENTS."""
    def setting(ctx):
        import test_lifecycle as life
        found = []
        for event in SHARDED_EVENTS:
            if (kind_name, event) not in life.REFUSED:  # (test_lifecycle checks refusals)
                found += lifecycle_row(ctx, kind_name, event).found
        if found:
            raise AssertionError("\n".join(found))
    setting.__name__ = f"lifecycle_{kind_name}"
    return setting


def lifecycle_reshard(ctx):
    """The 2-rank run's DCP checkpoint (taken at the event) of each kind loaded on 1 rank:
    the steps after it are the unsharded run's (2 -> 1)."""
    import test_lifecycle as life
    m = Mismatches()
    for kind_name in SHARDED_KINDS:
        kind = life.KINDS[kind_name]
        want = life.run(kind)[0]
        model = shard_layers(life.model_of(kind, seed=1))
        opt = life.optimizer_of(kind, model)
        dcp_load(model, opt, os.path.join(ctx.out, f"life-{kind_name}"))
        for k in range(life.EVENT_AT, life.STEPS):
            fixed_grads(model, k)
            opt.step()
            compare_step(m, life, kind, model, want[k], f"{kind_name} 2 -> 1", k)
    m.raise_if_any()


JOBS = {  # job -> its settings, run in this order
    "cpu2": [fsdp2, fsdp2_bf16, fsdp2_bf16_master, dtensor_placements, sharded_rounding,
             fsdp2_lean, zero_ddp, dcp_save_load, clip_sharded, clip_placements],
    "cpu1": [dcp_reshard],
    "life2": [lifecycle_sharded(kind) for kind in SHARDED_KINDS],
    "life1": [lifecycle_reshard],
    "loads2": [broadcast_group_settings, broadcast_compact_checkpoint, broadcast_master_copies,
               torch_checkpoint_into_reduced_precision],
    "offload": [fsdp2_offload],
    "nccl2": [fsdp2, fsdp2_bf16, fsdp2_bf16_master, dtensor_placements, zero_ddp],
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--only", help="run only this setting (debugging)")
    ctx = parser.parse_args()
    torch.set_num_threads(1)
    if ctx.backend == "nccl":
        torch.cuda.set_device(ctx.rank)
        ctx.device_type, ctx.device = "cuda", torch.device("cuda", ctx.rank)
    else:
        ctx.device_type, ctx.device = "cpu", torch.device("cpu")
    # nccl for GPU tensors, gloo for CPU ones (CPU offload's shards)
    backend = "cpu:gloo,cuda:nccl" if ctx.backend == "nccl" else ctx.backend
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{ctx.port}",
                            rank=ctx.rank, world_size=ctx.world_size,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for setting in JOBS[ctx.job]:
        if ctx.only and setting.__name__ != ctx.only:
            continue
        try:
            setting(ctx)
            results[setting.__name__] = "ok"
        except Exception:  # noqa: BLE001  (reported to the test, which fails)
            results[setting.__name__] = traceback.format_exc()
        with open(os.path.join(ctx.out, f"{ctx.job}-rank{ctx.rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()  # (a rank whose peer destroyed the group first may abort)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
