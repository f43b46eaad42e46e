"""adamx.Adam / adamx.AdamW: construction, and the numbers of a step against a float64
reference of the formula and against torch.optim.Adam/AdamW, over the whole option grid
and every dtype."""

import warnings

import pytest
import torch

import adamx
from conftest import (DTYPES, LR, OPTION_GRID, OPTION_IDS, REDUCED, SHAPES, TOL, RefAdam,
                      assert_close, assert_opt_matches_ref, assert_same_state, make_grad_seq,
                      make_tensors, needs_build)

pytestmark = needs_build

STEPS = 15
WD = 0.1
WEIGHT_DECAYS = [0.0, WD]


def _hyper(options, weight_decay, tensor_lr, lr=LR):
    """Optimizer keyword arguments: a point of OPTION_GRID, a weight decay, a float or
    tensor lr."""
    return dict(options, lr=torch.tensor(lr) if tensor_lr else lr, weight_decay=weight_decay)


def _ref_for(p0, dtype, hyper):
    return RefAdam(p0, dtype, lr=float(hyper["lr"]), weight_decay=hyper["weight_decay"],
                   amsgrad=hyper["amsgrad"], maximize=hyper["maximize"],
                   decoupled=hyper["decoupled_weight_decay"],
                   eps_inside_sqrt=hyper["eps_inside_sqrt"],
                   betas=hyper.get("betas", (0.9, 0.999)), eps=hyper.get("eps", 1e-8))


def _run(opt, params, grad_seq, *refs):
    """Steps ``opt`` on each grads of ``grad_seq`` (copies: the step must only read them),
    and the float64 references ``refs`` on the same grads."""
    for grads in grad_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for ref in refs:
            ref.step(grads)


# --------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(lr=-1.0), dict(lr=-1e-3), dict(eps=-1e-8), dict(betas=(1.0, 0.999)),
    dict(betas=(-0.1, 0.999)), dict(betas=(0.9, 1.0)), dict(betas=(0.9, -0.5)),
    dict(weight_decay=-0.1), dict(lr=float("nan")), dict(lr=torch.tensor([0.1, 0.2])),
])
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_invalid_hyperparameters_same_error_as_torch(cls, kwargs):
    with pytest.raises(Exception) as expected:
        getattr(torch.optim, cls)([torch.zeros(2)], **kwargs)
    with pytest.raises(type(expected.value)) as got:
        getattr(adamx, cls)([torch.zeros(2)], **kwargs)
    assert str(got.value) == str(expected.value)


def test_defaults_match_torch():
    p = torch.zeros(2)
    for ours, theirs in ((adamx.Adam([p]), torch.optim.Adam([p])),
                         (adamx.AdamW([p]), torch.optim.AdamW([p]))):
        for key, value in theirs.defaults.items():
            assert ours.defaults[key] == value, key
        assert isinstance(ours, torch.optim.Optimizer)
    assert adamx.AdamW([p]).defaults["weight_decay"] == 1e-2
    assert adamx.AdamW([p]).defaults["decoupled_weight_decay"] is True
    assert adamx.Adam([p]).defaults["decoupled_weight_decay"] is False
    assert adamx.Adam([p]).defaults["eps_inside_sqrt"] is False


@pytest.mark.parametrize("cls", [adamx.Adam, adamx.AdamW])
def test_differentiable_is_refused(cls):
    with pytest.raises((ValueError, RuntimeError), match="differentiable"):
        cls([torch.zeros(2, requires_grad=True)], differentiable=True)


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("fused", [None, False, True])
def test_foreach_and_fused_are_accepted_and_change_nothing(foreach, fused):
    p0 = make_tensors([(5, 3)], torch.float32, seed=3)
    grads = make_grad_seq([(5, 3)], torch.float32, 4, seed=4)
    a, b = [p0[0].clone()], [p0[0].clone()]
    opt_a = adamx.Adam(a, lr=LR, foreach=foreach, fused=fused)
    opt_b = adamx.Adam(b, lr=LR)
    _run(opt_a, a, grads)
    _run(opt_b, b, grads)
    assert_same_state(opt_a, a, opt_b, b, exact=True)


# --------------------------------------------------------------------------------------
# The option grid against the float64 reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["lr_float", "lr_tensor"])
@pytest.mark.parametrize("weight_decay", WEIGHT_DECAYS, ids=["wd0", "wd"])
@pytest.mark.parametrize("options", OPTION_GRID, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid_matches_float64_reference(dtype, options, weight_decay, tensor_lr):
    hyper = _hyper(options, weight_decay, tensor_lr)
    p0 = make_tensors(SHAPES, dtype, seed=1)
    grad_seq = make_grad_seq(SHAPES, dtype, STEPS, seed=2)
    params = [p.clone() for p in p0]
    opt = adamx.Adam(params, **hyper)
    ref = _ref_for(p0, dtype, hyper)
    _run(opt, params, grad_seq, ref)
    assert_opt_matches_ref(opt, params, ref, dtype)
    # Not vacuous: every non-empty param moved (in bfloat16 too, see LR).
    for p, before in zip(params, p0):
        if p.numel():
            assert not torch.equal(p, before)
    # The grads were only read.
    for p, g in zip(params, grad_seq[-1]):
        assert torch.equal(p.grad, g)


def test_adamw_class_is_decoupled_adam():
    shapes = [(11,), (4, 4)]
    p0 = make_tensors(shapes, torch.float32, seed=5)
    grad_seq = make_grad_seq(shapes, torch.float32, 10, seed=6)
    a, b = [p.clone() for p in p0], [p.clone() for p in p0]
    opt_a = adamx.AdamW(a, lr=LR, weight_decay=WD, amsgrad=True)
    opt_b = adamx.Adam(b, lr=LR, weight_decay=WD, amsgrad=True, decoupled_weight_decay=True)
    _run(opt_a, a, grad_seq)
    _run(opt_b, b, grad_seq)
    assert_same_state(opt_a, a, opt_b, b, exact=True)
    # and its default weight decay is applied: differs from weight_decay=0
    c = [p.clone() for p in p0]
    opt_c = adamx.AdamW(c, lr=LR)
    _run(opt_c, c, grad_seq)
    d = [p.clone() for p in p0]
    opt_d = adamx.AdamW(d, lr=LR, weight_decay=0.0)
    _run(opt_d, d, grad_seq)
    assert not torch.equal(c[1], d[1])


# --------------------------------------------------------------------------------------
# Against torch.optim
# --------------------------------------------------------------------------------------
def _torch_opt(params, hyper, **impl):
    kw = dict(lr=hyper["lr"].clone() if torch.is_tensor(hyper["lr"]) else hyper["lr"],
              weight_decay=hyper["weight_decay"], amsgrad=hyper["amsgrad"],
              maximize=hyper["maximize"], betas=hyper.get("betas", (0.9, 0.999)),
              eps=hyper.get("eps", 1e-8), **impl)
    if hyper["decoupled_weight_decay"]:
        return torch.optim.AdamW(params, **kw)
    return torch.optim.Adam(params, **kw)


# torch's foreach=False loop computes in the reduced dtype itself, so reduced precision is
# compared with torch's fused kernel only (see TOL in conftest.py).
TORCH_IMPLS = [(dtype, impl) for dtype in DTYPES for impl in ("foreach=False", "fused=True")
               if not (impl == "foreach=False" and dtype in REDUCED)]


# torch has no eps_inside_sqrt: the grid without it.
TORCH_GRID = [o for o in OPTION_GRID if not o["eps_inside_sqrt"]]


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["lr_float", "lr_tensor"])
@pytest.mark.parametrize("weight_decay", WEIGHT_DECAYS, ids=["wd0", "wd"])
@pytest.mark.parametrize("options", TORCH_GRID,
                         ids=[i for o, i in zip(OPTION_GRID, OPTION_IDS) if o in TORCH_GRID])
@pytest.mark.parametrize("dtype,impl", TORCH_IMPLS, ids=[f"{d}-{i}" for d, i in TORCH_IMPLS])
def test_grid_matches_torch(dtype, impl, options, weight_decay, tensor_lr):
    impl_kw = {"foreach": False} if impl == "foreach=False" else {"fused": True}
    hyper = _hyper(options, weight_decay, tensor_lr)
    if tensor_lr and dtype == torch.float64:
        # torch's loop divides a tensor lr by the bias correction in the lr tensor's dtype
        # (float32 rounding, ~1e-8): give it a float64 lr to compare at float64 precision.
        hyper["lr"] = hyper["lr"].double()
    p0 = make_tensors(SHAPES, dtype, seed=7)
    grad_seq = make_grad_seq(SHAPES, dtype, STEPS, seed=8)
    ours, theirs = [p.clone() for p in p0], [p.clone() for p in p0]
    kw = dict(hyper)
    cls = adamx.AdamW if kw.pop("decoupled_weight_decay") else adamx.Adam
    opt_ours = cls(ours, **kw)
    opt_theirs = _torch_opt(theirs, hyper, **impl_kw)
    _run(opt_ours, ours, grad_seq)
    _run(opt_theirs, theirs, grad_seq)
    assert_same_state(opt_ours, ours, opt_theirs, theirs, tol=TOL[dtype])
    step = opt_ours.state[ours[0]]["step"]
    assert step.dtype == torch.float32 and step.dim() == 0 and step.device.type == "cpu"


def test_comparison_detects_a_wrong_hyperparameter():
    """Sanity check of the comparisons above: a slightly different beta2 or eps, or an L2
    penalty instead of decoupled decay, does not pass for the same optimizer."""
    shapes = [(33,), (5, 7)]
    p0 = make_tensors(shapes, torch.float32, seed=9)
    grad_seq = make_grad_seq(shapes, torch.float32, STEPS, seed=10)
    good = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    ours = [p.clone() for p in p0]
    opt = adamx.AdamW(ours, **good)
    _run(opt, ours, grad_seq)
    for wrong in (dict(betas=(0.9, 0.99)), dict(betas=(0.89, 0.999)), dict(lr=LR * 1.01),
                  dict(weight_decay=WD * 2)):
        theirs = [p.clone() for p in p0]
        opt_t = torch.optim.AdamW(theirs, **dict(good, **wrong), foreach=False)
        _run(opt_t, theirs, grad_seq)
        with pytest.raises(AssertionError):
            assert_same_state(opt, ours, opt_t, theirs, tol=TOL[torch.float32])
    theirs = [p.clone() for p in p0]
    opt_t = torch.optim.Adam(theirs, **good, foreach=False)  # L2, not decoupled
    _run(opt_t, theirs, grad_seq)
    with pytest.raises(AssertionError):
        assert_same_state(opt, ours, opt_t, theirs, tol=TOL[torch.float32])
    # and the right one passes
    theirs = [p.clone() for p in p0]
    opt_t = torch.optim.AdamW(theirs, **good, foreach=False)
    _run(opt_t, theirs, grad_seq)
    assert_same_state(opt, ours, opt_t, theirs, tol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wrong", [dict(betas=(0.85, 0.999)), dict(betas=(0.9, 0.99)),
                                   dict(lr=LR * 1.1), dict(eps=1e-2),
                                   dict(weight_decay=WD, decoupled=True)], ids=str)
def test_reference_tolerances_catch_a_wrong_hyperparameter(dtype, wrong):
    """TOL is loose enough for rounding, not for a formula error, in every dtype."""
    hyper = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    p0 = make_tensors(SHAPES, dtype, seed=13)
    grad_seq = make_grad_seq(SHAPES, dtype, STEPS, seed=14)
    params = [p.clone() for p in p0]
    opt = adamx.Adam(params, **hyper)
    ref = RefAdam(p0, dtype, **dict(hyper, **wrong))
    good = RefAdam(p0, dtype, **hyper)
    _run(opt, params, grad_seq, ref, good)
    assert_opt_matches_ref(opt, params, good, dtype)
    with pytest.raises(AssertionError):
        assert_opt_matches_ref(opt, params, ref, dtype)


def test_eps_matters_and_is_placed_like_torch():
    """Grads ~1e-6 make sqrt(v) comparable to eps, so eps's placement and value show."""
    shapes = [(257,)]
    p0 = make_tensors(shapes, torch.float64, seed=11)
    grad_seq = make_grad_seq(shapes, torch.float64, STEPS, seed=12, scale=1e-8)
    results = {}
    for name, kw in {"out": {}, "in": dict(eps_inside_sqrt=True),
                     "out_big_eps": dict(eps=1e-6)}.items():
        ps = [p.clone() for p in p0]
        opt = adamx.Adam(ps, lr=LR, **kw)
        _run(opt, ps, grad_seq)
        results[name] = ps[0]
    theirs = [p.clone() for p in p0]
    opt_t = torch.optim.Adam(theirs, lr=LR, foreach=False)
    _run(opt_t, theirs, grad_seq)
    assert_close(results["out"], theirs[0], TOL[torch.float64])
    for other in ("in", "out_big_eps"):
        assert (results[other] - results["out"]).abs().max() > 1e-4, other


# --------------------------------------------------------------------------------------
# Several groups, params without grads
# --------------------------------------------------------------------------------------
GROUPS = [
    dict(lr=0.01),
    dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.2, amsgrad=True),
    # float64: see test_grid_matches_torch for why the tensor lr is float64
    dict(lr=torch.tensor(0.02, dtype=torch.float64), maximize=True, weight_decay=0.05),
    dict(lr=0.003, betas=(0.5, 0.9), amsgrad=True, maximize=True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_param_groups_with_their_own_hyperparameters(dtype, decoupled):
    shapes = [[(3, 4), (9,)], [(17,), ()], [(2, 2, 2)], [(31,), (1,)]]
    p0 = [make_tensors(s, dtype, seed=20 + i) for i, s in enumerate(shapes)]
    grad_seq = [make_grad_seq(s, dtype, STEPS, seed=30 + i) for i, s in enumerate(shapes)]
    ours = [[p.clone() for p in ps] for ps in p0]
    theirs = [[p.clone() for p in ps] for ps in p0]

    def groups(params):
        return [dict(g, params=ps, lr=g["lr"].clone() if torch.is_tensor(g["lr"]) else g["lr"])
                for g, ps in zip(GROUPS, params)]

    cls_ours = adamx.AdamW if decoupled else adamx.Adam
    opt_ours = cls_ours(groups(ours), lr=0.123, weight_decay=0.0)
    impl = {"fused": True} if dtype in REDUCED else {"foreach": False}
    cls_theirs = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt_theirs = cls_theirs(groups(theirs), lr=0.123, weight_decay=0.0, **impl)
    refs = [_ref_for(ps, dtype, dict(
        lr=g["lr"], weight_decay=g.get("weight_decay", 0.0), amsgrad=g.get("amsgrad", False),
        maximize=g.get("maximize", False), decoupled_weight_decay=decoupled,
        eps_inside_sqrt=False, betas=g.get("betas", (0.9, 0.999)), eps=g.get("eps", 1e-8)))
        for g, ps in zip(GROUPS, p0)]
    for k in range(STEPS):
        for gi in range(len(GROUPS)):
            for p, q, g in zip(ours[gi], theirs[gi], grad_seq[gi][k]):
                p.grad, q.grad = g.clone(), g.clone()
            refs[gi].step(grad_seq[gi][k])
        opt_ours.step()
        opt_theirs.step()
    for gi in range(len(GROUPS)):
        assert_same_state(opt_ours, ours[gi], opt_theirs, theirs[gi], tol=TOL[dtype])
        assert_opt_matches_ref(opt_ours, ours[gi], refs[gi], dtype, what=f"group {gi}")


def test_params_without_grad_are_skipped_and_get_no_state():
    a, b, c = torch.randn(4), torch.randn(5), torch.randn(())
    b0 = b.clone()
    opt = adamx.Adam([{"params": [a, b]}, {"params": [c], "lr": 0.1}], lr=LR)
    a.grad = torch.randn(4)
    opt.step()
    assert torch.equal(b, b0)
    assert b not in opt.state or not opt.state[b]
    assert c not in opt.state or not opt.state[c]
    assert float(opt.state[a]["step"]) == 1
    # a group whose params have no grads at all: nothing happens
    a.grad = None
    a1 = a.clone()
    opt.step()
    assert torch.equal(a, a1) and float(opt.state[a]["step"]) == 1
    # b gets a grad later: its state starts then, at step 1, like torch's
    b.grad = torch.randn(5)
    b_t = b.clone()
    opt_t = torch.optim.Adam([b_t], lr=LR, foreach=False)
    b_t.grad = b.grad.clone()
    opt.step()
    opt_t.step()
    assert float(opt.state[b]["step"]) == 1
    assert_close(b, b_t, TOL[torch.float32])
    assert len(opt.state_dict()["state"]) == 2


def test_zero_grad_and_closure():
    p0 = make_tensors([(6,)], torch.float32, seed=40)[0]
    target = torch.randn(6)
    ours = p0.clone().requires_grad_()
    theirs = p0.clone().requires_grad_()
    opt_ours = adamx.Adam([ours], lr=LR)
    opt_theirs = torch.optim.Adam([theirs], lr=LR, foreach=False)
    for _ in range(10):
        for p, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            def closure(p=p, opt=opt):
                opt.zero_grad()
                loss = ((p - target) ** 2).sum()
                loss.backward()
                return loss
            loss = opt.step(closure)
            assert torch.is_tensor(loss)
        assert ours.grad is not None
    assert_close(ours.detach(), theirs.detach(), TOL[torch.float32])
    opt_ours.zero_grad()
    assert ours.grad is None


def test_step_bumps_param_version_for_autograd():
    """An in-place update must be visible to autograd's saved-tensor checks."""
    w = torch.randn(3, requires_grad=True)
    opt = adamx.Adam([w], lr=LR)
    y = (w * w).sum()  # saves w
    w.grad = torch.ones(3)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_step_bumps_the_version_of_every_tensor_it_writes():
    """Params, exp_avg, exp_avg_sq, max_exp_avg_sq and step, on the step that makes state
    (the list path) and on later ones (the C++ fast path), and through the functional API;
    the grads are only read."""
    params = make_tensors([(3, 4), (5,)], torch.float32, seed=27)
    opt = adamx.Adam(params, lr=LR, amsgrad=True)
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
    for k in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        before = {id(t): t._version for p in params
                  for t in [p, p.grad] + [opt.state[p][key] for key in keys if p in opt.state]}
        opt.step()
        for p in params:
            assert p._version > before[id(p)]
            assert p.grad._version == before[id(p.grad)]
            for key in keys:
                t = opt.state[p][key]
                if k > 0:
                    assert t._version > before[id(t)], (k, key)
    lists = [params, [p.grad for p in params]] + [[opt.state[p][key] for p in params]
                                                  for key in keys]
    versions = [[t._version for t in lst] for lst in lists]
    adamx.functional.adam(*lists, lr=LR, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                          amsgrad=True)
    for name, lst, old in zip(("params", "grads") + keys, lists, versions):
        for t, v in zip(lst, old):
            assert (t._version > v) == (name != "grads"), name


# --------------------------------------------------------------------------------------
# Schedulers, tensor lr
# --------------------------------------------------------------------------------------
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7),
    # OneCycleLR also cycles betas[0] (cycle_momentum): exercises hyper-parameter changes
    # between steps other than lr.
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1,
                                                                total_steps=STEPS + 1),
    "LinearLR+ExponentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[5]),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["lr_float", "lr_tensor"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers_match_torch(name, tensor_lr):
    dtype = torch.float32
    shapes = [(13,), (4, 6)]
    p0 = make_tensors(shapes, dtype, seed=50)
    grad_seq = make_grad_seq(shapes, dtype, STEPS, seed=51)
    lr = (lambda: torch.tensor(0.05)) if tensor_lr else (lambda: 0.05)
    ours, theirs, fixed = ([p.clone() for p in p0] for _ in range(3))
    opt_ours = adamx.Adam(ours, lr=lr(), weight_decay=0.01, amsgrad=True)
    opt_theirs = torch.optim.Adam(theirs, lr=lr(), weight_decay=0.01, amsgrad=True,
                                  foreach=False)
    opt_fixed = adamx.Adam(fixed, lr=lr(), weight_decay=0.01, amsgrad=True)
    sched_ours, sched_theirs = SCHEDULERS[name](opt_ours), SCHEDULERS[name](opt_theirs)
    lrs = []
    for grads in grad_seq:
        for p, q, f, g in zip(ours, theirs, fixed, grads):
            p.grad, q.grad, f.grad = g.clone(), g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
        opt_fixed.step()
        sched_ours.step()
        sched_theirs.step()
        lrs.append(float(opt_ours.param_groups[0]["lr"]))
        assert lrs[-1] == float(opt_theirs.param_groups[0]["lr"])
        assert torch.is_tensor(opt_ours.param_groups[0]["lr"]) == tensor_lr
    assert len(set(lrs)) > 1  # the schedule did change lr
    assert_same_state(opt_ours, ours, opt_theirs, theirs, tol=TOL[dtype])
    # and the changing lr was used: a fixed lr ends elsewhere
    assert (ours[0] - fixed[0]).abs().max() > 1e-3


def test_reduce_lr_on_plateau():
    p0 = make_tensors([(8,)], torch.float32, seed=52)
    ours, theirs = [p0[0].clone()], [p0[0].clone()]
    opt_ours = adamx.Adam(ours, lr=0.05)
    opt_theirs = torch.optim.Adam(theirs, lr=0.05, foreach=False)
    s_ours = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_ours, patience=1, factor=0.5)
    s_theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_theirs, patience=1, factor=0.5)
    for k, grads in enumerate(make_grad_seq([(8,)], torch.float32, STEPS, seed=53)):
        ours[0].grad, theirs[0].grad = grads[0].clone(), grads[0].clone()
        opt_ours.step()
        opt_theirs.step()
        s_ours.step(1.0)  # never improves
        s_theirs.step(1.0)
    assert opt_ours.param_groups[0]["lr"] < 0.05
    assert_same_state(opt_ours, ours, opt_theirs, theirs, tol=TOL[torch.float32])


def test_tensor_lr_changed_in_place_is_used():
    p0 = make_tensors([(9,)], torch.float64, seed=54)
    lr = torch.tensor(0.05, dtype=torch.float64)
    ours = [p0[0].clone()]
    opt = adamx.Adam(ours, lr=lr)
    ref = RefAdam(p0, torch.float64, lr=0.05)
    for k, grads in enumerate(make_grad_seq([(9,)], torch.float64, 6, seed=55)):
        ours[0].grad = grads[0].clone()
        opt.step()
        ref.step(grads)
        opt.param_groups[0]["lr"].mul_(0.5)
        ref.lr *= 0.5
    assert_close(ours[0], ref.p[0], TOL[torch.float64])


def test_group_hyperparameters_changed_between_steps():
    """Any group entry edited between steps takes effect (no caching of hyper-parameters)."""
    shapes = [(10,)]
    p0 = make_tensors(shapes, torch.float64, seed=56)
    grad_seq = make_grad_seq(shapes, torch.float64, 8, seed=57)
    ours, theirs = [p0[0].clone()], [p0[0].clone()]
    opt_ours = adamx.Adam(ours, lr=LR)
    opt_theirs = torch.optim.Adam(theirs, lr=LR, foreach=False)
    changes = [dict(betas=(0.8, 0.99)), dict(eps=1e-3), dict(weight_decay=0.3),
               dict(maximize=True), dict(lr=0.2), dict(betas=(0.95, 0.9))]
    for k, grads in enumerate(grad_seq):
        ours[0].grad, theirs[0].grad = grads[0].clone(), grads[0].clone()
        opt_ours.step()
        opt_theirs.step()
        if k < len(changes):
            opt_ours.param_groups[0].update(changes[k])
            opt_theirs.param_groups[0].update(changes[k])
    assert_same_state(opt_ours, ours, opt_theirs, theirs, tol=TOL[torch.float64])


# --------------------------------------------------------------------------------------
# Non-finite grads propagate as in torch
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_nonfinite_grads_propagate_like_torch(dtype, amsgrad):
    n = 37
    p0 = make_tensors([(n,)], dtype, seed=60)
    ours, theirs = [p0[0].clone()], [p0[0].clone()]
    opt_ours = adamx.Adam(ours, lr=LR, amsgrad=amsgrad, weight_decay=0.1)
    impl = {"fused": True} if dtype in REDUCED else {"foreach": False}
    opt_theirs = torch.optim.Adam(theirs, lr=LR, amsgrad=amsgrad, weight_decay=0.1, **impl)
    for k, grads in enumerate(make_grad_seq([(n,)], dtype, 5, seed=61)):
        g = grads[0].clone()
        if k == 1:
            g[3], g[10], g[20] = float("inf"), float("-inf"), float("nan")
        if k == 3:
            g[5] = float("nan")
        ours[0].grad, theirs[0].grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for key in ("param",) + (("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad
                             else ("exp_avg", "exp_avg_sq")):
        a = ours[0] if key == "param" else opt_ours.state[ours[0]][key]
        b = theirs[0] if key == "param" else opt_theirs.state[theirs[0]][key]
        assert torch.equal(torch.isnan(a), torch.isnan(b)), key
        assert torch.equal(torch.isinf(a), torch.isinf(b)), key
        assert torch.isnan(a).any() or torch.isinf(a).any(), key
        assert_close(a, b, TOL[dtype], key)


# --------------------------------------------------------------------------------------
# The tutorial's loop
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("grad_scale", [1.0, 1e-4])
def test_eps_inside_sqrt_matches_seed_adam(dtype, grad_scale):
    shapes = [(5, 7), (64,), (1,)]
    p0 = make_tensors(shapes, dtype, seed=70)
    grad_seq = make_grad_seq(shapes, dtype, 20, seed=71, scale=grad_scale)
    lr, beta1, beta2 = 0.01, 0.9, 0.999
    ours, seed, torch_like = ([p.clone() for p in p0] for _ in range(3))
    opt = adamx.Adam(ours, lr=lr, betas=(beta1, beta2), eps_inside_sqrt=True)
    opt_torch_like = adamx.Adam(torch_like, lr=lr, betas=(beta1, beta2))
    vs = [torch.zeros_like(p) for p in seed]
    sqrs = [torch.zeros_like(p) for p in seed]
    for t, grads in enumerate(grad_seq, start=1):
        for p, q, r, g in zip(ours, seed, torch_like, grads):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
        opt.step()
        opt_torch_like.step()
        adamx.reference.seed_adam(seed, vs, sqrs, lr, t, beta1, beta2)
    # float32: the seed loop and the kernel round differently (see TOL), ~1e-6 relative
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else TOL[dtype]
    for i, (p, q) in enumerate(zip(ours, seed)):
        assert_close(p, q, tol, f"param {i}")
        assert_close(opt.state[p]["exp_avg"], vs[i], tol, f"exp_avg {i}")
        assert_close(opt.state[p]["exp_avg_sq"], sqrs[i], tol, f"exp_avg_sq {i}")
    if grad_scale < 1:
        # With grads this small eps's placement matters: torch's placement misses the loop.
        with pytest.raises(AssertionError):
            for p, q in zip(torch_like, seed):
                assert_close(p, q, tol)


# --------------------------------------------------------------------------------------
# Memory layouts and sizes
# --------------------------------------------------------------------------------------
def _layouts(dtype):
    """(name, param, grad, base) with param (and grad) in unusual layouts; ``base`` is the
    tensor the param is a view of (or None), whose other elements must stay untouched."""
    g = torch.Generator().manual_seed(80)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    cases = []
    base = rnd(12, 10)
    cases.append(("transposed", base.t(), rnd(12, 10).t(), base))
    base = rnd(40)
    cases.append(("stride2_slice", base[1::2], rnd(40)[::2], base))
    base = rnd(9, 8)
    cases.append(("column_block", base[:, 2:5], rnd(9, 3), base))
    base = rnd(6, 7, 5)
    cases.append(("permuted_sliced", base.permute(2, 0, 1)[:, 1:5, ::3],
                  rnd(5, 4, 3), base))
    p = rnd(2, 3, 5, 4).contiguous(memory_format=torch.channels_last)
    cases.append(("channels_last", p, rnd(2, 3, 5, 4).contiguous(
        memory_format=torch.channels_last), None))
    cases.append(("channels_last_param_contig_grad", rnd(2, 3, 5, 4).contiguous(
        memory_format=torch.channels_last), rnd(2, 3, 5, 4), None))
    cases.append(("expanded_grad", rnd(4, 19), rnd(1, 19).expand(4, 19), None))
    cases.append(("zero_stride_grad_0d", rnd(()), rnd(()), None))
    base = rnd(50)
    cases.append(("unflattened_strided", base[5:45].unflatten(0, (8, 5))[:, ::2],
                  rnd(8, 3), base))
    return cases


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_params_and_grads(dtype, amsgrad):
    cases = _layouts(dtype)
    params = [c[1] for c in cases]
    grads = [c[2] for c in cases]
    bases = [c[3] for c in cases]
    p0 = [p.clone() for p in params]
    base0 = [b.clone() if b is not None else None for b in bases]
    masks = []
    for p, b in zip(params, bases):
        if b is None:
            masks.append(None)
            continue
        m = torch.zeros(b.shape, dtype=torch.bool)
        # mark the view's elements inside the base
        view = m.as_strided(p.shape, p.stride(), p.storage_offset())
        view.fill_(True)
        masks.append(m)
    hyper = dict(lr=LR, amsgrad=amsgrad, weight_decay=0.1)
    opt = adamx.Adam(params, **hyper)
    ref = RefAdam(p0, dtype, **hyper)
    theirs = [p.clone() for p in p0]
    # torch's fused CPU kernel assumes a grad laid out like its param (it silently reads
    # a contiguous grad of a transposed param in the wrong order), so give it such grads;
    # its foreach=False loop takes any layout.
    impl = {"fused": True} if dtype in REDUCED else {"foreach": False}
    opt_t = torch.optim.Adam(theirs, **hyper, **impl)
    for k in range(STEPS):
        gk = [g * (1 + k) if k % 2 else -g for g in grads]  # vary the grads a bit
        for p, q, g in zip(params, theirs, gk):
            p.grad = g
            q.grad = torch.empty_like(q).copy_(g)
        opt.step()
        opt_t.step()
        ref.step(gk)
    for (name, *_), p, q in zip(cases, params, theirs):
        assert_close(p, q, TOL[dtype], name)
    assert_opt_matches_ref(opt, params, ref, dtype)
    for (name, *_), b, b0, m in zip(cases, bases, base0, masks):
        if b is not None:
            assert torch.equal(b[~m], b0[~m]), f"{name}: elements outside the view written"
            assert not torch.equal(b[m], b0[m]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_more_than_a_million_elements(dtype):
    shapes = [((1 << 20) + 13,), (3,)]
    p0 = make_tensors(shapes, dtype, seed=90)
    grad_seq = make_grad_seq(shapes, dtype, 3, seed=91)
    hyper = dict(lr=LR, amsgrad=True, weight_decay=0.1)
    ours = [p.clone() for p in p0]
    opt = adamx.AdamW(ours, **hyper)
    ref = RefAdam(p0, dtype, decoupled=True, **hyper)
    _run(opt, ours, grad_seq, ref)
    assert_opt_matches_ref(opt, ours, ref, dtype)
    # every element was updated (a missed tail chunk would stay at its initial value)
    # (bfloat16: an element > ~2 in size may not move in 3 steps of lr 0.03)
    for chunk in (slice(0, 4096), slice(-4096, None)):
        assert bool((ours[0][chunk] != p0[0][chunk]).float().mean() > 0.9)


def test_many_small_params_in_one_step():
    """Hundreds of tensors, sizes around the kernel's vector and chunk widths, in one group
    (work split across tensor boundaries)."""
    sizes = [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257]
    shapes = [(s,) for s in sizes] * 12 + [(40_000,), (33_000,), (1,)]
    dtype = torch.float32
    p0 = make_tensors(shapes, dtype, seed=15)
    grad_seq = make_grad_seq(shapes, dtype, 5, seed=16)
    ours, theirs = [p.clone() for p in p0], [p.clone() for p in p0]
    opt_ours = adamx.Adam(ours, lr=LR, amsgrad=True, weight_decay=0.1)
    opt_theirs = torch.optim.Adam(theirs, lr=LR, amsgrad=True, weight_decay=0.1,
                                  foreach=False)
    _run(opt_ours, ours, grad_seq)
    _run(opt_theirs, theirs, grad_seq)
    assert_same_state(opt_ours, ours, opt_theirs, theirs, tol=TOL[dtype])


def test_amsgrad_switched_on_between_steps():
    """torch.optim.Adam cannot do this (KeyError); adamx starts max_exp_avg_sq at zero
    then, so the next denominator uses max(0, v) = v."""
    shapes = [(12,), (3, 3)]
    dtype = torch.float64
    p0 = make_tensors(shapes, dtype, seed=17)
    grad_seq = make_grad_seq(shapes, dtype, 10, seed=18)
    params = [p.clone() for p in p0]
    opt = adamx.Adam(params, lr=LR)
    ref = RefAdam(p0, dtype, lr=LR)
    _run(opt, params, grad_seq[:5], ref)
    opt.param_groups[0]["amsgrad"] = True
    ref.amsgrad = True  # its max buffers are zeros until now
    _run(opt, params, grad_seq[5:], ref)
    assert_opt_matches_ref(opt, params, ref, dtype)


def test_step_inside_inference_mode_and_no_grad():
    p0 = make_tensors([(8,)], torch.float32, seed=19)
    grads = make_grad_seq([(8,)], torch.float32, 2, seed=20)
    a, b = [p0[0].clone().requires_grad_()], [p0[0].clone().requires_grad_()]
    opt_a, opt_b = adamx.Adam(a, lr=LR), adamx.Adam(b, lr=LR)
    for g in grads:
        a[0].grad, b[0].grad = g[0].clone(), g[0].clone()
        with torch.inference_mode():
            opt_a.step()
        with torch.no_grad():
            opt_b.step()
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], p0[0])


def test_capturable_and_fused_change_nothing_on_cpu():
    """torch's fused=True accepts capturable=True on the CPU (its other paths refuse it,
    and so does adamx: see test_errors.py); the numbers are the same."""
    shapes = [(9,), (2, 5)]
    p0 = make_tensors(shapes, torch.float32, seed=21)
    grad_seq = make_grad_seq(shapes, torch.float32, 5, seed=22)
    a, b = [p.clone() for p in p0], [p.clone() for p in p0]
    opt_a = adamx.Adam(a, lr=LR, capturable=True, fused=True, amsgrad=True)
    opt_b = adamx.Adam(b, lr=LR, amsgrad=True)
    _run(opt_a, a, grad_seq)
    _run(opt_b, b, grad_seq)
    assert_same_state(opt_a, a, opt_b, b, exact=True)
    assert opt_a.state[a[0]]["step"].dtype == torch.float32


def test_step_hooks_and_scheduler_order_bookkeeping():
    """Optimizer hooks run once per step, and schedulers see the step (no 'lr_scheduler.step()
    before optimizer.step()' warning), as with torch.optim.Adam."""
    import warnings

    from torch.optim.optimizer import register_optimizer_step_post_hook

    p = torch.randn(4)
    opt = adamx.Adam([p], lr=LR)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    global_handle = register_optimizer_step_post_hook(
        lambda o, args, kwargs: calls.append("global_post") if o is opt else None)
    try:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(2):
                p.grad = torch.randn(4)
                opt.step()
                sched.step()
    finally:
        global_handle.remove()
    assert calls == ["pre", "post", "global_post"] * 2
    assert opt.param_groups[0]["lr"] == pytest.approx(LR / 4)


@pytest.mark.parametrize("betas", [(0.0, 0.0), (0.3, 0.5), (0.5, 0.999), (0.6, 0.9),
                                   (0.999, 0.9999)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_and_branching_betas(dtype, betas):
    """torch's lerp switches formula at weight 1 - beta1 = 0.5; beta 0 and near 1 too."""
    hyper = dict(lr=LR, betas=betas, weight_decay=0.1, amsgrad=True)
    p0 = make_tensors(SHAPES, dtype, seed=23)
    grad_seq = make_grad_seq(SHAPES, dtype, STEPS, seed=24)
    ours, theirs = [p.clone() for p in p0], [p.clone() for p in p0]
    opt_ours = adamx.Adam(ours, **hyper)
    impl = {"fused": True} if dtype in REDUCED else {"foreach": False}
    opt_theirs = torch.optim.Adam(theirs, **hyper, **impl)
    ref = RefAdam(p0, dtype, **hyper)
    for grads in grad_seq:
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
        ref.step(grads)
    assert_same_state(opt_ours, ours, opt_theirs, theirs, tol=TOL[dtype])
    assert_opt_matches_ref(opt_ours, ours, ref, dtype)


def test_hyperparameters_of_other_number_types():
    """ints, lists for betas, numpy scalars and 0-d tensors of other dtypes are numbers too."""
    import numpy as np

    shapes = [(7,)]
    p0 = make_tensors(shapes, torch.float64, seed=25)
    grad_seq = make_grad_seq(shapes, torch.float64, 4, seed=26)
    plain = [p0[0].clone()]
    opt_plain = adamx.Adam(plain, lr=1.0, betas=(0.5, 0.75), eps=1e-8, weight_decay=1.0)
    _run(opt_plain, plain, grad_seq)
    for kw in (dict(lr=1, betas=[0.5, 0.75], weight_decay=1),
               dict(lr=np.float64(1.0), betas=(np.float32(0.5), np.float64(0.75)),
                    eps=np.float64(1e-8), weight_decay=np.int64(1)),
               dict(lr=torch.tensor(1.0, dtype=torch.float64), betas=(0.5, 0.75),
                    weight_decay=1.0)):
        other = [p0[0].clone()]
        opt = adamx.Adam(other, **kw)
        _run(opt, other, grad_seq)
        assert torch.equal(other[0], plain[0]), kw


# --------------------------------------------------------------------------------------
# How group['params'] may look: a param listed twice, a tuple
# --------------------------------------------------------------------------------------
# A param listed twice in one group
def _twice(kind, threads=None):
    p0 = make_tensors([(300_001,), (7,)], torch.float32, seed=606)
    grads = make_grad_seq([(300_001,), (7,)], torch.float32, 3, seed=607)
    a, b = (p.clone() for p in p0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "adamx":
            opt = adamx.Adam([a, b, a], lr=LR, amsgrad=True)
        else:
            opt = torch.optim.Adam([a, b, a], lr=LR, amsgrad=True, foreach=False)
    assert any("duplicate parameters" in str(w.message) for w in caught)
    for g in grads:
        a.grad, b.grad = g[0].clone(), g[1].clone()
        opt.step()
    return a, b, opt


def test_param_listed_twice_is_stepped_twice_like_torch(restore_threads):
    """torch steps such a param twice (its loop), with one state; adamx made two states,
    kept one, and updated the same memory from two threads."""
    a, b, opt = _twice("adamx")
    ta, tb, topt = _twice("torch")
    assert float(opt.state[a]["step"]) == float(topt.state[ta]["step"]) == 6
    assert len(opt.state) == len(topt.state) == 2
    assert_close(a, ta, TOL[torch.float32])
    assert_close(opt.state[a]["exp_avg_sq"], topt.state[ta]["exp_avg_sq"], TOL[torch.float32])
    torch.set_num_threads(1)
    a1, _, _ = _twice("adamx")
    assert torch.equal(a, a1)  # deterministic whatever the threads


# group['params'] replaced by a tuple
def test_group_params_as_a_tuple_steps_like_a_list():
    p0 = make_tensors([(5,), (3, 2)], torch.float32, seed=609)
    grad_seq = make_grad_seq([(5,), (3, 2)], torch.float32, 3, seed=610)
    runs = []
    for container in (list, tuple):
        params = [p.clone() for p in p0]
        opt = adamx.Adam(params, lr=LR)
        opt.param_groups[0]["params"] = container(params)
        _run(opt, params, grad_seq)
        runs.append(params)
    for a, b, before in zip(*runs, p0):
        assert torch.equal(a, b) and not torch.equal(a, before)
