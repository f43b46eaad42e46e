"""adamx.functional.adam and the op behind it, torch.ops.adamx.adam_."""

import pytest
import torch

import adamx
import adamx.functional as F
from conftest import (DTYPES, LR, SHAPES, TOL, OpState, RefAdam, assert_close, make_grad_seq,
                      make_tensors, needs_build)

pytestmark = needs_build

STEPS = 12


@pytest.mark.parametrize("decay", ["none", "l2", "decoupled"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_matches_reference(dtype, amsgrad, maximize, decay):
    p0 = make_tensors(SHAPES, dtype, seed=200)
    grad_seq = make_grad_seq(SHAPES, dtype, STEPS, seed=201)
    params = [p.clone() for p in p0]
    st = OpState(params, amsgrad)
    wd = 0.0 if decay == "none" else 0.1
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, amsgrad=amsgrad,
                 maximize=maximize, decoupled_weight_decay=decay == "decoupled")
    ref = RefAdam(p0, dtype, lr=LR, weight_decay=wd, amsgrad=amsgrad, maximize=maximize,
                  decoupled=decay == "decoupled")
    for k, grads in enumerate(grad_seq):
        # a float lr on even steps, a 0-d tensor on odd ones: same numbers
        lr = torch.tensor(LR, dtype=torch.float64) if k % 2 else LR
        F.adam(*st.lists(grads), lr=lr, **hyper)
        ref.step(grads)
        # the function increments the step counts itself
        assert all(float(s) == k + 1 for s in st.steps)
        assert all(s.dtype == torch.float32 and s.dim() == 0 for s in st.steps)
    tol = TOL[dtype]
    for i, p in enumerate(params):
        assert_close(p, ref.p[i], tol, f"param {i}")
        assert_close(st.exp_avgs[i], ref.m[i], tol, f"exp_avg {i}")
        assert_close(st.exp_avg_sqs[i], ref.v[i], tol, f"exp_avg_sq {i}")
        if amsgrad:
            assert_close(st.max_exp_avg_sqs[i], ref.vmax[i], tol, f"max_exp_avg_sq {i}")


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_functional_equals_optimizer_bitwise(amsgrad):
    shapes = [(7, 3), (100,), ()]
    p0 = make_tensors(shapes, torch.float32, seed=202)
    grad_seq = make_grad_seq(shapes, torch.float32, STEPS, seed=203)
    a, b = [p.clone() for p in p0], [p.clone() for p in p0]
    opt = adamx.Adam(a, lr=LR, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05,
                     amsgrad=amsgrad, eps_inside_sqrt=True)
    st = OpState(b, amsgrad)
    for grads in grad_seq:
        for p, g in zip(a, grads):
            p.grad = g
        opt.step()
        F.adam(*st.lists(grads), lr=LR, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05,
               amsgrad=amsgrad, eps_inside_sqrt=True)
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q)
        s = opt.state[p]
        assert torch.equal(s["exp_avg"], st.exp_avgs[i])
        assert torch.equal(s["exp_avg_sq"], st.exp_avg_sqs[i])
        assert torch.equal(s["step"], st.steps[i])
        if amsgrad:
            assert torch.equal(s["max_exp_avg_sq"], st.max_exp_avg_sqs[i])


def test_functional_defaults_and_empty_lists():
    # keyword defaults: amsgrad, maximize, decoupled, eps_inside_sqrt all False
    p0 = make_tensors([(9,)], torch.float64, seed=204)
    params = [p0[0].clone()]
    st = OpState(params, amsgrad=False)
    grads = make_grad_seq([(9,)], torch.float64, 3, seed=205)
    ref = RefAdam(p0, torch.float64, lr=LR)
    for g in grads:
        F.adam(*st.lists(g), lr=LR, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)
        ref.step(g)
    assert_close(params[0], ref.p[0], TOL[torch.float64])
    # no params: nothing to do, no error
    F.adam([], [], [], [], [], [], lr=LR, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)


def test_functional_accepts_float64_step_counts():
    p0 = make_tensors([(6,)], torch.float32, seed=206)
    params = [p0[0].clone()]
    st = OpState(params, amsgrad=False, step_dtype=torch.float64)
    ref = RefAdam(p0, torch.float32, lr=LR)
    for g in make_grad_seq([(6,)], torch.float32, 4, seed=207):
        F.adam(*st.lists(g), lr=LR, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)
        ref.step(g)
    assert st.steps[0].dtype == torch.float64 and float(st.steps[0]) == 4
    assert_close(params[0], ref.p[0], TOL[torch.float32])


def test_functional_step_counts_continue_from_their_value():
    """The bias correction uses the count after the increment: starting at 9 gives step 10."""
    p0 = make_tensors([(16,)], torch.float64, seed=208)
    g = make_grad_seq([(16,)], torch.float64, 1, seed=209)[0]
    params = [p0[0].clone()]
    st = OpState(params, amsgrad=False)
    st.steps[0].fill_(9.0)
    m0, v0 = torch.full((16,), 0.1, dtype=torch.float64), torch.full((16,), 0.02,
                                                                     dtype=torch.float64)
    st.exp_avgs[0].copy_(m0)
    st.exp_avg_sqs[0].copy_(v0)
    F.adam(*st.lists(g), lr=LR, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)
    m = 0.9 * m0 + 0.1 * g[0]
    v = 0.999 * v0 + 0.001 * g[0] ** 2
    expected = p0[0] - LR / (1 - 0.9**10) * m / ((v / (1 - 0.999**10)).sqrt() + 1e-8)
    assert float(st.steps[0]) == 10
    assert_close(params[0], expected, TOL[torch.float64])


# --------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------
def _op_kwargs(**over):
    kw = dict(lr=LR, lr_tensor=None, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
              amsgrad=False, maximize=False, decoupled_weight_decay=False,
              eps_inside_sqrt=False)
    kw.update(over)
    return kw


def test_op_is_registered_with_its_schema():
    op = torch.ops.adamx.adam_.default
    schema = op._schema
    names = [a.name for a in schema.arguments]
    # the switches in the order of the C++ list (adamx._C.SWITCHES: amsgrad, maximize,
    # decoupled_weight_decay, eps_inside_sqrt, stochastic_rounding)
    assert names == ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                     "state_steps", "lr", "lr_tensor", "beta1", "beta2", "weight_decay",
                     "eps", *adamx._ops._C.SWITCHES, "grad_scale", "found_inf",
                     "master_params", "code_scales", "seed", "param_ids",
                     "element_offsets", "keep_grads"]
    assert {"amsgrad", "maximize", "decoupled_weight_decay", "eps_inside_sqrt",
            "stochastic_rounding"} <= set(adamx._ops._C.SWITCHES)
    mutated = {a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write}
    # grads: unscaled in place when grad_scale is given and keep_grads is not (marked as
    # torch._fused_adam_ marks them)
    assert mutated == {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                       "state_steps", "master_params", "code_scales"}
    assert len(schema.returns) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_direct_call_with_lr_tensor(dtype):
    shapes = [(4, 5), (3,)]
    p0 = make_tensors(shapes, dtype, seed=210)
    grad_seq = make_grad_seq(shapes, dtype, 5, seed=211)
    params = [p.clone() for p in p0]
    st = OpState(params, amsgrad=True)
    ref = RefAdam(p0, dtype, lr=0.05, amsgrad=True, weight_decay=0.1, decoupled=True)
    lr = torch.tensor(0.05, dtype=torch.float64)
    for grads in grad_seq:
        # lr_tensor replaces the float lr (given as a deliberately wrong value here)
        torch.ops.adamx.adam_(*st.lists(grads), **_op_kwargs(
            lr=123.0, lr_tensor=lr, amsgrad=True, weight_decay=0.1,
            decoupled_weight_decay=True))
        ref.step(grads)
    for i, p in enumerate(params):
        assert_close(p, ref.p[i], TOL[dtype], f"param {i}")
        assert_close(st.max_exp_avg_sqs[i], ref.vmax[i], TOL[dtype])
    assert float(st.steps[0]) == 5


def test_opcheck():
    """torch.library.opcheck: schema (declared mutations match what happens), fake/meta
    kernel, autograd registration and AOT dispatch of the op."""
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("this torch has no torch.library.opcheck")
    shapes = [(3, 4), (5,)]
    for amsgrad, lr_tensor in ((False, None), (True, torch.tensor(0.01))):
        params = make_tensors(shapes, torch.float32, seed=212)
        grads = make_tensors(shapes, torch.float32, seed=213)
        st = OpState(params, amsgrad)
        torch.library.opcheck(torch.ops.adamx.adam_.default, st.lists(grads),
                              _op_kwargs(amsgrad=amsgrad, lr_tensor=lr_tensor))


def test_meta_tensors_go_through_the_fake_kernel():
    shapes = [(3, 4), (5,)]
    params = [torch.empty(s, device="meta") for s in shapes]
    st = OpState(params, amsgrad=True)
    st.steps = [torch.tensor(0.0, device="meta") for _ in params]
    grads = [torch.empty(s, device="meta") for s in shapes]
    torch.ops.adamx.adam_(*st.lists(grads), **_op_kwargs(amsgrad=True))
