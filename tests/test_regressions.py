"""Defects a review found, one test (or a few) each; every test here failed before its fix.

Each step that must fail leaves params and state exactly as they were, on the CPU kernel
and on the CUDA path (run on the CPU by the emulation, which shares the CUDA backend's
checks and operand preparation).
"""

import warnings

import pytest
import torch

import adamx
import adamx.functional as F
from conftest import (LR, TOL, OpState, assert_bitwise, assert_close, assert_unchanged,
                      make_grad_seq, make_tensors, needs_build, op_hyper, snapshot)

pytestmark = needs_build

ERRORS = (RuntimeError, ValueError, TypeError)


def cpu_step(*lists, **hyper):
    torch.ops.adamx.adam_(*lists, **hyper)


def emulated_step(*lists, **hyper):
    torch.ops.adamx._adam_emulated_cuda_(*lists, **hyper, chunk_size=64, block_dim=8)


BACKENDS = {"cpu": cpu_step, "emulated_cuda": emulated_step}


def small_state(amsgrad=True, seed=600):
    shapes = [(4, 6), (9,)]
    return OpState(make_tensors(shapes, torch.float32, seed=seed), amsgrad=amsgrad), \
        make_tensors(shapes, torch.float32, seed=seed + 1)


def expect_refused(step, st, grads, match, **hyper):
    before = st.clone()
    with pytest.raises(ERRORS, match=match):
        step(*st.lists(grads), **op_hyper(**hyper))
    assert_bitwise(st, before, "a refused step wrote")


# --- 1. A scalar tensor on another device routed the step to another kernel -----------------
@pytest.mark.parametrize("which", ["lr", "step"])
def test_scalar_on_meta_is_refused_not_silently_skipped(which):
    """A meta lr (or step count) with CPU params made the dispatcher run the fake kernel,
    which changed nothing and raised nothing."""
    st, grads = small_state()
    hyper = {}
    if which == "lr":
        hyper["lr"] = torch.tensor(LR, device="meta")
    else:
        st.steps[1] = torch.tensor(0.0, device="meta")
    before = st.clone()
    with pytest.raises(RuntimeError, match="(?i)meta.*CPU or on the params' device|device"):
        F.adam(*st.lists(grads), lr=hyper.get("lr", LR), beta1=0.9, beta2=0.999,
               weight_decay=0.0, eps=1e-8, amsgrad=True)
    for a, b in zip(st.tensors(), before.tensors()):
        if a.device.type != "meta":
            assert torch.equal(a, b)


def test_meta_lr_in_second_group_changes_no_group():
    """Two groups, the second with a meta lr: the first was stepped, the second silently
    not. Now the step raises and neither group changes."""
    good = make_tensors([(5, 3), (7,)], torch.float32, seed=602)
    other = make_tensors([(6,)], torch.float32, seed=603)
    opt = adamx.Adam([{"params": good}, {"params": other}], lr=LR)
    params = good + other
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    opt.param_groups[1]["lr"] = torch.tensor(LR, device="meta")
    snap = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="(?i)meta"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_meta_lr_goes_through_the_fake_kernel_only_with_meta_params():
    params = [torch.empty(3, device="meta")]
    st = OpState(params, amsgrad=False)
    st.steps = [torch.tensor(0.0, device="meta")]
    torch.ops.adamx.adam_(*st.lists([torch.empty(3, device="meta")]),
                          **op_hyper(lr=torch.tensor(LR, device="meta")))


# --- 2. Written, then raised -------------------------------------------------------------------
@pytest.mark.parametrize("which", ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_self_overlapping_state_is_refused_before_any_write(backend, which):
    """A state tensor made with expand() passed the checks; the kernel updated the param
    and the step count on a temporary, and only the copy-back raised."""
    st, grads = small_state()
    getattr(st, which)[1] = torch.zeros(1).expand(9)
    expect_refused(BACKENDS[backend], st, grads, "(?i)overlap", amsgrad=True)


# --- 3. One step tensor shared by several params -------------------------------------------
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_shared_step_tensor_is_refused(backend):
    """The CPU kernel counted a shared step once per param, the CUDA path once in all or
    once per param: three answers. Now it is a clear error."""
    st, grads = small_state()
    st.steps = [st.steps[0]] * 2
    expect_refused(BACKENDS[backend], st, grads, "(?i)state_steps\\[0\\] and state_steps\\[1\\] "
                   "share memory", amsgrad=True)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_state_tensor_shared_between_params_or_with_a_param_is_refused(backend):
    st, grads = small_state()
    st.params[1] = st.params[0].view(-1)[:9]  # a view into another param
    expect_refused(BACKENDS[backend], st, grads, "(?i)params\\[0\\] and params\\[1\\] share",
                   amsgrad=True)
    st, grads = small_state()
    st.exp_avg_sqs[1] = st.exp_avgs[1]
    expect_refused(BACKENDS[backend], st, grads, "(?i)share memory", amsgrad=True)


def test_interleaved_views_of_one_buffer_are_not_shared_memory():
    """Disjoint strided views (even and odd elements) of one buffer are separate params."""
    base = make_tensors([(40,)], torch.float32, seed=604)[0]
    st = OpState([base[0::2], base[1::2]], amsgrad=False)
    grads = make_tensors([(20,), (20,)], torch.float32, seed=605)
    ref = OpState([base[0::2].clone(), base[1::2].clone()], amsgrad=False)
    cpu_step(*st.lists(grads), **op_hyper())
    cpu_step(*ref.lists(grads), **op_hyper())
    assert torch.equal(st.params[0], ref.params[0]) and torch.equal(st.params[1], ref.params[1])


# --- 4. A param listed twice in one group -----------------------------------------------------
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


# --- 5. NaN payloads across ISAs: see test_optimizer_platform.py ---------------------------------

# --- 6. capturable=True on CPU params --------------------------------------------------------------
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_capturable_cpu_params_are_refused_like_torch(cls):
    """adamx accepted capturable=True on CPU params and saved it in its checkpoints, which
    torch then refused to step."""
    def make(module):
        p = torch.ones(3)
        p.grad = torch.ones(3)
        return p, getattr(module, cls)([p], lr=LR, capturable=True)

    _, topt = make(torch.optim)
    with pytest.raises(AssertionError) as theirs:
        topt.step()
    p, opt = make(adamx)
    snap = snapshot(opt, [p])
    with pytest.raises(AssertionError, match="capturable") as ours:
        opt.step()
    assert "supported devices" in str(theirs.value) and "supported devices" in str(ours.value)
    assert_unchanged(opt, [p], snap)
    # with fused=True torch accepts it on the CPU, and so does adamx
    p, opt = make(adamx)
    opt.param_groups[0]["fused"] = True
    opt.step()
    assert float(opt.state[p]["step"]) == 1


# --- 7. A string hyper-parameter --------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("lr", "0.01"), ("betas", ("0.9", 0.999)),
                                       ("betas", (0.9, "0.999")), ("eps", "1e-8"),
                                       ("weight_decay", "0.1"), ("weight_decay", "0")])
@pytest.mark.parametrize("fresh", [True, False], ids=["first_step", "later_step"])
def test_string_hyperparameter_is_a_type_error_on_every_step(key, value, fresh):
    """float() parsed it on the step that made state, and used it silently; torch raises
    TypeError on every step."""
    params = make_tensors([(5,), (2, 3)], torch.float32, seed=608)
    opt = adamx.Adam(params, lr=LR)
    for p in params:
        p.grad = torch.randn_like(p)
    if not fresh:
        opt.step()
    opt.param_groups[0][key] = value
    snap = snapshot(opt, params)
    for _ in range(2):
        with pytest.raises(TypeError, match="must be a number"):
            opt.step()
        assert_unchanged(opt, params, snap)


def test_string_hyperparameter_in_the_functional_api():
    st, grads = small_state()
    with pytest.raises(TypeError, match="must be a number"):
        F.adam(*st.lists(grads), lr="0.01", beta1=0.9, beta2=0.999, weight_decay=0.0,
               eps=1e-8, amsgrad=True)


# --- 8. group['params'] replaced by a tuple -------------------------------------------------------
def test_group_params_as_a_tuple_steps_like_a_list():
    p0 = make_tensors([(5,), (3, 2)], torch.float32, seed=609)
    grad_seq = make_grad_seq([(5,), (3, 2)], torch.float32, 3, seed=610)
    runs = []
    for container in (list, tuple):
        params = [p.clone() for p in p0]
        opt = adamx.Adam(params, lr=LR)
        opt.param_groups[0]["params"] = container(params)
        for grads in grad_seq:
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        runs.append(params)
    for a, b, before in zip(*runs, p0):
        assert torch.equal(a, b) and not torch.equal(a, before)
