"""state_dict(): torch's layout exactly, and checkpoints that move between adamx and
torch.optim in both directions (through torch.save/torch.load) and continue training as if
nothing had changed."""

import copy

import pytest
import torch

import adamx
from conftest import (LR, TOL, assert_close, assert_same_state, make_grad_seq,
                      make_tensors, needs_build, save_and_load)

pytestmark = needs_build

SHAPES = [(4, 6), (13,), (), (2, 3, 5)]
F32 = TOL[torch.float32]


def _feed(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def _run(opt, params, grad_seq):
    for grads in grad_seq:
        _feed(opt, params, grads)


def _trained_halfway(make_opt, seed, steps):
    """Params (``seed``) and an optimizer on them (``make_opt(params)``) that has taken
    the first half of ``steps`` steps' grads (``seed + 1``): where a checkpoint is taken.
    Returns them and the second half of the grads, for the steps after it."""
    p0 = make_tensors(SHAPES, torch.float32, seed=seed)
    grad_seq = make_grad_seq(SHAPES, torch.float32, steps, seed=seed + 1)
    params = [p.clone() for p in p0]
    opt = make_opt(params)
    _run(opt, params, grad_seq[:steps // 2])
    return params, opt, grad_seq[steps // 2:]


def _make(kind, params, amsgrad, decoupled, **extra):
    kw = dict(dict(lr=LR, weight_decay=0.05, amsgrad=amsgrad), **extra)
    if kind == "adamx":
        return (adamx.AdamW if decoupled else adamx.Adam)(params, **kw)
    impl = {"foreach": False} if kind == "torch" else {"fused": True}
    return (torch.optim.AdamW if decoupled else torch.optim.Adam)(params, **kw, **impl)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
def test_state_dict_layout_is_torchs(amsgrad, decoupled):
    p0 = make_tensors(SHAPES, torch.float32, seed=400)
    grad_seq = make_grad_seq(SHAPES, torch.float32, 3, seed=401)
    ours, theirs = [p.clone() for p in p0], [p.clone() for p in p0]
    opt_ours = _make("adamx", ours, amsgrad, decoupled)
    opt_theirs = _make("torch", theirs, amsgrad, decoupled)
    _run(opt_ours, ours, grad_seq)
    _run(opt_theirs, theirs, grad_seq)
    sd_ours, sd_theirs = opt_ours.state_dict(), opt_theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys() == {"state", "param_groups"}
    assert sd_ours["state"].keys() == sd_theirs["state"].keys() == set(range(len(SHAPES)))
    for i, st in sd_ours["state"].items():
        ref = sd_theirs["state"][i]
        assert st.keys() == ref.keys()
        expected = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
        assert set(st.keys()) == expected
        step = st["step"]
        assert torch.is_tensor(step) and step.dim() == 0
        assert step.dtype == torch.float32 and step.device.type == "cpu"
        assert float(step) == 3
        for key in expected - {"step"}:
            assert st[key].shape == ours[i].shape and st[key].dtype == ours[i].dtype
            assert_close(st[key], ref[key], F32, key)
    assert len(sd_ours["param_groups"]) == 1
    g_ours, g_theirs = sd_ours["param_groups"][0], sd_theirs["param_groups"][0]
    for key, value in g_theirs.items():
        if key in ("foreach", "fused"):  # implementation choices, ignored by adamx
            continue
        assert g_ours[key] == value, key
    assert set(g_ours) - set(g_theirs) <= {"eps_inside_sqrt", "stochastic_rounding",
                                           "master_weights", "seed"}


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("direction", ["adamx->torch", "torch->adamx", "torch_fused->adamx",
                                       "adamx->torch_fused", "adamx->adamx"])
def test_checkpoint_interchange_continues_training(direction, decoupled, amsgrad):
    src, dst = direction.split("->")
    p0 = make_tensors(SHAPES, torch.float32, seed=402)
    grad_seq = make_grad_seq(SHAPES, torch.float32, 12, seed=403)
    first, second = grad_seq[:6], grad_seq[6:]

    # never switching: the destination optimizer all along
    straight = [p.clone() for p in p0]
    opt_straight = _make(dst, straight, amsgrad, decoupled)
    _run(opt_straight, straight, grad_seq)

    # the source for 6 steps, then a checkpoint, then the destination for 6 more
    a = [p.clone() for p in p0]
    opt_a = _make(src, a, amsgrad, decoupled)
    _run(opt_a, a, first)
    sd = save_and_load(opt_a.state_dict())
    b = [p.detach().clone() for p in a]  # the "model checkpoint"
    opt_b = _make(dst, b, amsgrad, decoupled, **({"lr": 0.5} if dst == "adamx" else {}))
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["lr"] == LR  # hyper-parameters come from the checkpoint
    for i, p in enumerate(b):
        assert float(opt_b.state[p]["step"]) == 6
    _run(opt_b, b, second)

    exact = src == dst == "adamx"
    assert_same_state(opt_b, b, opt_straight, straight, tol=F32, exact=exact)
    # The continuation really used the loaded state: starting from fresh moments at the
    # same params gives different numbers.
    c = [p.detach().clone() for p in a]
    opt_c = _make(dst, c, amsgrad, decoupled)
    _run(opt_c, c, second)
    assert (c[0] - b[0]).abs().max() > 1e-4


def test_old_checkpoint_with_number_steps():
    """Old torch checkpoints kept ``step`` as a Python number."""
    a, opt_a, rest = _trained_halfway(lambda ps: adamx.Adam(ps, lr=LR), seed=404, steps=6)
    sd = copy.deepcopy(opt_a.state_dict())
    for st in sd["state"].values():
        st["step"] = float(st["step"])
    b = [p.detach().clone() for p in a]
    opt_b = adamx.Adam(b, lr=LR)
    opt_b.load_state_dict(sd)
    _run(opt_a, a, rest)
    _run(opt_b, b, rest)
    assert_same_state(opt_a, a, opt_b, b, exact=True)
    assert opt_b.state[b[0]]["step"].dtype == torch.float32


@pytest.mark.parametrize("options", [dict(capturable=True, fused=True), dict(fused=True),
                                     dict(foreach=True)], ids=str)
def test_cpu_step_is_accepted_wherever_loaded(options):
    a, opt_a, rest = _trained_halfway(lambda ps: torch.optim.Adam(ps, lr=LR, foreach=False),
                                      seed=406, steps=6)
    sd = save_and_load(opt_a.state_dict())
    assert all(st["step"].device.type == "cpu" for st in sd["state"].values())
    b = [p.detach().clone() for p in a]
    opt_b = adamx.Adam(b, lr=LR, **options)
    opt_b.load_state_dict(sd)
    _run(opt_a, a, rest)
    _run(opt_b, b, rest)
    assert_same_state(opt_b, b, opt_a, a, tol=F32)
    for p in b:
        st = opt_b.state[p]["step"]
        assert st.dtype == torch.float32 and st.dim() == 0 and float(st) == 6


def test_checkpoint_loads_into_other_param_dtype():
    """torch's load_state_dict casts moment buffers to the param dtype (the step stays
    float32); a float32 checkpoint continues on bfloat16 params like torch fused does."""
    a, opt_a, rest = _trained_halfway(lambda ps: adamx.Adam(ps, lr=LR, amsgrad=True),
                                      seed=408, steps=6)
    sd = save_and_load(opt_a.state_dict())
    ours = [p.detach().to(torch.bfloat16) for p in a]
    theirs = [p.clone() for p in ours]
    opt_ours = adamx.Adam(ours, lr=LR, amsgrad=True)
    opt_theirs = torch.optim.Adam(theirs, lr=LR, amsgrad=True, fused=True)
    opt_ours.load_state_dict(copy.deepcopy(sd))
    opt_theirs.load_state_dict(copy.deepcopy(sd))
    assert opt_ours.state[ours[0]]["exp_avg"].dtype == torch.bfloat16
    for grads in rest:
        g16 = [g.to(torch.bfloat16) for g in grads]
        _feed(opt_ours, ours, g16)
        _feed(opt_theirs, theirs, g16)
    assert_same_state(opt_ours, ours, opt_theirs, theirs, tol=TOL[torch.bfloat16])


def test_checkpoint_with_several_groups_and_tensor_lr():
    def groups(ps):
        return [dict(params=ps[:2], lr=torch.tensor(0.02)),
                dict(params=ps[2:], lr=0.05, betas=(0.8, 0.99), amsgrad=True,
                     weight_decay=0.1)]

    a, opt_a, rest = _trained_halfway(lambda ps: adamx.Adam(groups(ps)), seed=410, steps=8)
    sd = save_and_load(opt_a.state_dict())
    b = [p.detach().clone() for p in a]
    t = [p.detach().clone() for p in a]
    opt_b = adamx.Adam(groups(b))
    opt_t = torch.optim.Adam(groups(t), foreach=False)
    # (each gets its own copy: load_state_dict may keep the loaded tensors themselves)
    opt_b.load_state_dict(copy.deepcopy(sd))
    opt_t.load_state_dict(copy.deepcopy(sd))
    assert torch.is_tensor(opt_b.param_groups[0]["lr"])
    _run(opt_a, a, rest)
    _run(opt_b, b, rest)
    _run(opt_t, t, rest)
    assert_same_state(opt_a, a, opt_b, b, exact=True)
    assert_same_state(opt_b, b, opt_t, t, tol=F32)


def test_scheduler_state_round_trip():
    p0 = make_tensors(SHAPES, torch.float32, seed=412)
    grad_seq = make_grad_seq(SHAPES, torch.float32, 10, seed=413)
    a = [p.clone() for p in p0]
    opt_a = adamx.Adam(a, lr=0.05)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    for grads in grad_seq[:5]:
        _feed(opt_a, a, grads)
        sched_a.step()
    ckpt = save_and_load({"opt": opt_a.state_dict(), "sched": sched_a.state_dict()})
    b = [p.detach().clone() for p in a]
    opt_b = adamx.Adam(b, lr=0.05)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    for grads in grad_seq[5:]:
        _feed(opt_a, a, grads)
        sched_a.step()
        _feed(opt_b, b, grads)
        sched_b.step()
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] < 0.05
    assert_same_state(opt_a, a, opt_b, b, exact=True)


def test_deepcopy_of_optimizer_steps_the_same():
    a, opt_a, rest = _trained_halfway(lambda ps: adamx.AdamW(ps, lr=LR, amsgrad=True),
                                      seed=414, steps=6)
    opt_b = copy.deepcopy(opt_a)
    b = opt_b.param_groups[0]["params"]
    assert b[0] is not a[0]
    _run(opt_a, a, rest)
    _run(opt_b, b, rest)
    assert_same_state(opt_a, a, opt_b, b, exact=True)
