"""adamx under torch.compile: the op traced into one graph (fullgraph) through its fake
kernel, and an optimizer step inside a compiled function, both matching eager."""

import pytest
import torch

import adamx
import adamx.functional as F
from conftest import LR, make_grad_seq, make_tensors, needs_build

pytestmark = needs_build

SHAPES = [(4, 6), (13,), (2, 3, 5)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _state(params, amsgrad):
    return dict(exp_avgs=[torch.zeros_like(p) for p in params],
                exp_avg_sqs=[torch.zeros_like(p) for p in params],
                max_exp_avg_sqs=[torch.zeros_like(p) for p in params] if amsgrad else [],
                steps=[torch.tensor(0.0) for _ in params])


def _assert_all_equal(a, b):
    for name in a:
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            assert torch.equal(x, y), f"{name}[{i}]"


def _have_inductor():
    try:
        import torch._inductor.config  # noqa: F401
    except Exception:
        return False
    import shutil
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not _have_inductor(), reason="inductor needs a C++ compiler on this machine"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad,tensor_lr", [(False, False), (True, True)])
def test_op_fullgraph_matches_eager(backend, amsgrad, tensor_lr):
    p0 = make_tensors(SHAPES, torch.float32, seed=500)
    grad_seq = make_grad_seq(SHAPES, torch.float32, 4, seed=501)

    def step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr):
        torch.ops.adamx.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                              lr=0.0 if tensor_lr else LR, lr_tensor=lr if tensor_lr else None,
                              beta1=0.9, beta2=0.999, weight_decay=0.05, eps=1e-8,
                              amsgrad=amsgrad, maximize=False, decoupled_weight_decay=True,
                              eps_inside_sqrt=False)

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    runs = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        params = [p.clone() for p in p0]
        st = _state(params, amsgrad)
        lr = torch.tensor(LR)
        for grads in grad_seq:
            fn(params, grads, st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"],
               st["steps"], lr)
        runs[name] = dict(params=params, **st)
    _assert_all_equal(runs["eager"], runs["compiled"])
    assert float(runs["compiled"]["steps"][0]) == len(grad_seq)
    assert not torch.equal(runs["compiled"]["params"][0], p0[0])


def test_functional_fullgraph_matches_eager():
    p0 = make_tensors(SHAPES, torch.float32, seed=502)
    grad_seq = make_grad_seq(SHAPES, torch.float32, 3, seed=503)

    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        F.adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=LR, beta1=0.9,
               beta2=0.999, weight_decay=0.0, eps=1e-8)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    runs = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        params = [p.clone() for p in p0]
        st = _state(params, False)
        for grads in grad_seq:
            fn(params, grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"])
        runs[name] = dict(params=params, exp_avgs=st["exp_avgs"],
                          exp_avg_sqs=st["exp_avg_sqs"], steps=st["steps"])
    _assert_all_equal(runs["eager"], runs["compiled"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_with_optimizer_inside_compiled_function(backend):
    """A whole training step (forward, backward, opt.step) compiled; graph breaks are
    allowed around the step, the numbers must match eager."""
    torch.manual_seed(510)
    model0 = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(16, 6)
    y = torch.randn(16, 1)
    results = []
    for compiled in (False, True):
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 1))
        model.load_state_dict(model0.state_dict())
        opt = adamx.AdamW(model.parameters(), lr=LR, amsgrad=True)

        def train_step():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        fn = torch.compile(train_step, backend=backend) if compiled else train_step
        losses = [float(fn()) for _ in range(5)]
        results.append((losses, [p.detach().clone() for p in model.parameters()],
                        opt.state_dict()))
    (l_e, p_e, sd_e), (l_c, p_c, sd_c) = results
    assert l_e[-1] < l_e[0]
    # compiled forward/backward may round differently from eager: close, not bitwise
    torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(p_c, p_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for i, st in sd_c["state"].items():
        assert float(st["step"]) == 5 == float(sd_e["state"][i]["step"])
        assert st["step"].dtype == torch.float32


def _assert_compiled_step_matches_eager(make_opt, seed, keys, compile_at=0, **compile_kw):
    """Two optimizers (``make_opt(params)``) from the same params take the same 4 steps,
    one eager, the other's opt.step compiled (aot_eager, ``compile_kw``) from step
    ``compile_at`` on: the params and the state ``keys`` match bitwise."""
    p0 = make_tensors(SHAPES, torch.float32, seed=seed)
    grad_seq = make_grad_seq(SHAPES, torch.float32, 4, seed=seed + 1)
    runs = []
    for compiled in (False, True):
        params = [p.clone() for p in p0]
        opt = make_opt(params)
        fn = opt.step
        for k, grads in enumerate(grad_seq):
            if compiled and k == compile_at:
                fn = torch.compile(opt.step, backend="aot_eager", **compile_kw)
            for p, g in zip(params, grads):
                p.grad = g
            fn()
        runs.append((params, opt))
    (pe, oe), (pc, oc) = runs
    for a, b in zip(pe, pc):
        assert torch.equal(a, b)
        for key in keys:
            assert torch.equal(oe.state[a][key], oc.state[b][key]), key


def test_compiled_optimizer_step_alone_matches_eager():
    _assert_compiled_step_matches_eager(
        lambda params: adamx.Adam(params, lr=torch.tensor(LR), weight_decay=0.1), seed=520,
        keys=("exp_avg", "exp_avg_sq", "step"))


@pytest.mark.parametrize("warm", [False, True], ids=["first_step_compiled", "state_exists"])
def test_optimizer_step_fullgraph_matches_eager(warm):
    _assert_compiled_step_matches_eager(
        lambda params: adamx.AdamW(params, lr=LR, amsgrad=True), seed=530,
        keys=("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"),
        compile_at=1 if warm else 0, fullgraph=True)
