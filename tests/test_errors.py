"""Bad input: each case raises a clear error before any tensor is written, so that params
and all optimizer state (step counts included) are exactly as before the failing step,
and no state is created for params that had none."""


import pytest
import torch

import adamx
import adamx.functional as F
from conftest import (LR, OpState, assert_bitwise, assert_unchanged, make_tensors, needs_build,
                      op_backends, op_hyper, snapshot)

pytestmark = needs_build

ERRORS = (RuntimeError, ValueError, TypeError)
NAN = float("nan")


def _trained(groups_shapes=((5, 3), (7,)), steps=2, *, extra_groups=(), **kw):
    """An adamx.Adam that has already taken ``steps`` good steps (so state exists), with
    fresh grads set on all params for the next step."""
    params = make_tensors(groups_shapes, torch.float32, seed=300)
    kw.setdefault("lr", LR)
    opt = adamx.Adam([{"params": params}, *extra_groups], **kw)
    all_params = [p for g in opt.param_groups for p in g["params"]]
    for k in range(steps + 1):
        for p in all_params:
            if p.device.type == "cpu":
                p.grad = torch.randn_like(p)
        if k < steps:
            opt.step()
    return opt, all_params


def _expect_failure(opt, params, match):
    snap = snapshot(opt, params)
    with pytest.raises(ERRORS, match=match):
        opt.step()
    assert_unchanged(opt, params, snap)
    return snap


# --------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fresh", [True, False], ids=["no_state", "with_state"])
def test_sparse_grad(fresh):
    opt, params = _trained(steps=0 if fresh else 2)
    params[0].grad = params[0].grad.to_sparse()
    _expect_failure(opt, params, "(?i)sparse grad")


@pytest.mark.parametrize("fresh", [True, False], ids=["no_state", "with_state"])
@pytest.mark.parametrize("which", ["lr", "lr_tensor", "beta1", "beta2", "eps",
                                   "weight_decay"])
def test_nan_hyperparameter_set_after_construction(which, fresh):
    opt, params = _trained(steps=0 if fresh else 2,
                           **({"lr": torch.tensor(LR)} if which == "lr_tensor" else {}))
    group = opt.param_groups[0]
    if which == "lr":
        group["lr"] = NAN
    elif which == "lr_tensor":
        group["lr"].fill_(NAN)
    elif which == "beta1":
        group["betas"] = (NAN, 0.999)
    elif which == "beta2":
        group["betas"] = (0.9, NAN)
    else:
        group[which] = NAN
    name = "lr" if which == "lr_tensor" else which
    _expect_failure(opt, params, name)


def test_mixed_devices_in_one_group():
    cpu = torch.randn(4)
    meta = torch.empty(4, device="meta")
    cpu.grad = torch.randn(4)
    meta.grad = torch.empty(4, device="meta")
    opt = adamx.Adam([cpu, meta], lr=LR)
    _expect_failure(opt, [cpu, meta], "(?i)device|meta")
    # with state from earlier steps on the CPU param
    opt = adamx.Adam([cpu, meta], lr=LR)
    meta_grad = meta.grad
    meta.grad = None
    opt.step()
    meta.grad = meta_grad
    _expect_failure(opt, [cpu, meta], "(?i)device|meta")


def _bad_second_group(kind):
    p = torch.randn(6)
    if kind == "nan_lr":
        return dict(params=[p], lr=NAN), p
    if kind == "nan_eps":
        return dict(params=[p], eps=NAN), p
    if kind == "sparse":
        p.grad = torch.randn(6).to_sparse()
        return dict(params=[p]), p
    if kind == "integer":
        p = torch.arange(6)
        p.grad = torch.arange(6)
        return dict(params=[p]), p
    if kind == "mixed_devices":
        m = torch.empty(6, device="meta")
        m.grad = torch.empty(6, device="meta")
        return dict(params=[p, m]), p
    if kind == "overlapping_param":
        q = torch.zeros(1).expand(6)
        q.grad = torch.randn(6)
        return dict(params=[q]), q
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan_lr", "nan_eps", "sparse", "integer", "mixed_devices",
                                  "overlapping_param"])
@pytest.mark.parametrize("fresh", [True, False], ids=["no_state", "with_state"])
def test_only_the_second_group_is_bad(kind, fresh):
    """The first group is fine; it must not be stepped either."""
    good = make_tensors([(5, 3), (7,)], torch.float32, seed=301)
    bad_group, bad_p = _bad_second_group(kind)
    bad_params = bad_group["params"]
    bad_lr = bad_group.pop("lr", None)
    bad_eps = bad_group.pop("eps", None)
    opt = adamx.Adam([{"params": good}, bad_group], lr=LR)
    params = good + bad_params
    if not fresh:  # good steps first, the bad group without grads meanwhile
        saved = [q.grad for q in bad_params]
        for q in bad_params:
            q.grad = None
        for _ in range(2):
            for p in good:
                p.grad = torch.randn_like(p)
            opt.step()
        for q, g in zip(bad_params, saved):
            q.grad = g
    for p in good:
        p.grad = torch.randn_like(p)
    for q in bad_params:
        if q.grad is None:
            q.grad = torch.randn_like(q)
    if bad_lr is not None:
        opt.param_groups[1]["lr"] = bad_lr
    if bad_eps is not None:
        opt.param_groups[1]["eps"] = bad_eps
    match = {"nan_lr": "lr", "nan_eps": "eps", "sparse": "(?i)sparse grad",
             "integer": "(?i)dtype|float", "mixed_devices": "(?i)device|meta",
             "overlapping_param": "(?i)overlap|expand"}[kind]
    _expect_failure(opt, params, match)


def test_integer_params_are_rejected_clearly():
    p = torch.arange(5)
    p.grad = torch.ones(5, dtype=torch.long)
    opt = adamx.Adam([p], lr=LR)
    _expect_failure(opt, [p], "(?i)dtype|float")


def test_overlapping_param_is_rejected():
    p = torch.zeros(1).expand(4)  # four elements, one memory location
    p.grad = torch.randn(4)
    opt = adamx.Adam([p], lr=LR)
    _expect_failure(opt, [p], "(?i)overlap|expand")


@pytest.mark.parametrize("corrupt", ["exp_avg_shape", "exp_avg_sq_dtype", "step_two_elems",
                                     "step_int", "missing_max_exp_avg_sq_shape"])
def test_corrupt_state_is_rejected(corrupt):
    opt, params = _trained(amsgrad=True)
    st = opt.state[params[1]]
    if corrupt == "exp_avg_shape":
        st["exp_avg"] = torch.zeros(8)
        match = "(?i)shape"
    elif corrupt == "exp_avg_sq_dtype":
        st["exp_avg_sq"] = st["exp_avg_sq"].double()
        match = "(?i)dtype"
    elif corrupt == "step_two_elems":
        st["step"] = torch.tensor([2.0, 2.0])
        match = "(?i)step"
    elif corrupt == "step_int":
        st["step"] = torch.tensor(2)
        match = "(?i)step"
    else:
        st["max_exp_avg_sq"] = torch.zeros(3)
        match = "(?i)shape"
    _expect_failure(opt, params, match)


# --------------------------------------------------------------------------------------
# The functional form and the op
# --------------------------------------------------------------------------------------
def _lists(n=2, amsgrad=True, dtype=torch.float32):
    shapes = [(3, 4), (5,), (2,)][:n]
    params = make_tensors(shapes, dtype, seed=310)
    grads = make_tensors(shapes, dtype, seed=311)
    exp_avgs = make_tensors(shapes, dtype, seed=312)
    exp_avg_sqs = [t.abs() for t in make_tensors(shapes, dtype, seed=313)]
    max_sqs = [t.abs() + 1 for t in make_tensors(shapes, dtype, seed=314)] if amsgrad else []
    steps = [torch.tensor(3.0) for _ in shapes]
    return [params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps]


HYPER = dict(lr=LR, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8)


def _snap_lists(lists):
    return [[t.clone() for t in lst] for lst in lists]


def _assert_lists_unchanged(lists, snap):
    for name, lst, saved in zip(("params", "grads", "exp_avgs", "exp_avg_sqs",
                                 "max_exp_avg_sqs", "state_steps"), lists, snap):
        assert len(lst) == len(saved)
        for i, (t, s) in enumerate(zip(lst, saved)):
            if t.device.type == "meta":
                continue
            if t.is_sparse:
                t, s = t.to_dense(), s.to_dense()
            assert t.dtype == s.dtype and torch.equal(t, s), f"{name}[{i}] changed"


def _call(kind, lists, amsgrad=True, **hyper):
    h = dict(HYPER, **hyper)
    if kind == "functional":
        F.adam(*lists, amsgrad=amsgrad, **h)
    else:
        lr = h.pop("lr")
        b1, b2 = h.pop("beta1"), h.pop("beta2")
        lr_kw = dict(lr=0.0, lr_tensor=lr) if torch.is_tensor(lr) else dict(lr=lr)
        torch.ops.adamx.adam_(*lists, **lr_kw, beta1=b1, beta2=b2, amsgrad=amsgrad,
                              maximize=False, decoupled_weight_decay=False,
                              eps_inside_sqrt=False, **h)


def _mutations():
    """name -> (function editing the lists in place, extra hyper-params, error match)."""
    def drop(idx, which=-1):
        return lambda L: L[idx].pop(which)

    def set_item(idx, i, make):
        def f(L):
            L[idx][i] = make(L[idx][i])
        return f

    return {
        "fewer_grads": (drop(1), {}, "grads"),
        "fewer_exp_avgs": (drop(2), {}, "exp_avgs"),
        "fewer_exp_avg_sqs": (drop(3), {}, "exp_avg_sqs"),
        "fewer_max_exp_avg_sqs": (drop(4), {}, "max_exp_avg_sqs"),
        "fewer_state_steps": (drop(5), {}, "state_steps"),
        "more_grads": (lambda L: L[1].append(torch.zeros(2)), {}, "grads"),
        "grad_shape": (set_item(1, 1, lambda t: torch.zeros(6)), {}, "(?i)shape"),
        "grad_dtype": (set_item(1, 1, lambda t: t.double()), {}, "(?i)dtype"),
        "grad_device": (set_item(1, 1, lambda t: torch.empty_like(t, device="meta")), {},
                        "(?i)device|meta"),
        "grad_sparse": (set_item(1, 1, lambda t: t.to_sparse()), {}, "(?i)sparse grad"),
        "exp_avg_shape": (set_item(2, 0, lambda t: t.t().contiguous()), {}, "(?i)shape"),
        "exp_avg_sq_dtype": (set_item(3, 1, lambda t: t.half()), {}, "(?i)dtype"),
        "max_exp_avg_sq_shape": (set_item(4, 1, lambda t: t[:3].clone()), {}, "(?i)shape"),
        "param_device": (set_item(0, 1, lambda t: torch.empty_like(t, device="meta")), {},
                         "(?i)device|meta"),
        "param_integer": (lambda L: [L[i].__setitem__(1, torch.arange(5)) for i in (0, 1)],
                          {}, "(?i)dtype|float"),
        "step_int": (set_item(5, 0, lambda t: torch.tensor(3)), {}, "(?i)step"),
        "step_vector": (set_item(5, 0, lambda t: torch.tensor([3.0, 3.0])), {}, "(?i)step"),
        "nan_lr": (lambda L: None, dict(lr=NAN), "lr"),
        "nan_lr_tensor": (lambda L: None, dict(lr=torch.tensor(NAN)), "lr"),
        "nan_beta1": (lambda L: None, dict(beta1=NAN), "beta1"),
        "nan_beta2": (lambda L: None, dict(beta2=NAN), "beta2"),
        "nan_eps": (lambda L: None, dict(eps=NAN), "eps"),
        "nan_weight_decay": (lambda L: None, dict(weight_decay=NAN), "weight_decay"),
    }


MUTATIONS = _mutations()


@pytest.mark.parametrize("name", list(MUTATIONS))
@pytest.mark.parametrize("kind", ["functional", "op"])
def test_functional_and_op_reject_bad_input_before_writing(kind, name):
    edit, hyper, match = MUTATIONS[name]
    lists = _lists(n=3)
    # sanity: the unedited lists step fine (on copies)
    _call(kind, _snap_lists(lists))
    edit(lists)
    snap = _snap_lists(lists)
    with pytest.raises(ERRORS, match=match):
        _call(kind, lists, **hyper)
    _assert_lists_unchanged(lists, snap)


def test_functional_without_amsgrad_takes_an_empty_max_list():
    lists = _lists(amsgrad=False)
    F.adam(*lists, amsgrad=False, **HYPER)
    assert float(lists[5][0]) == 4
    # and ignores a max list it does not need
    lists = _lists(amsgrad=True)
    lists[4].pop()
    F.adam(*lists, amsgrad=False, **HYPER)
    assert float(lists[5][0]) == 4


def test_functional_amsgrad_needs_the_max_list():
    lists = _lists(amsgrad=False)
    snap = _snap_lists(lists)
    with pytest.raises(ERRORS, match="max_exp_avg_sqs"):
        F.adam(*lists, amsgrad=True, **HYPER)
    _assert_lists_unchanged(lists, snap)


def test_inference_tensor_param_outside_inference_mode():
    with torch.inference_mode():
        p = torch.randn(5)
    p.grad = torch.randn(5)
    opt = adamx.Adam([p], lr=LR)
    _expect_failure(opt, [p], "(?i)inference")
    # inside inference mode the same step is fine
    with torch.inference_mode():
        opt.step()
    assert float(opt.state[p]["step"]) == 1


def test_inference_tensor_param_in_second_group():
    good = make_tensors([(4,), (3, 2)], torch.float32, seed=320)
    with torch.inference_mode():
        bad = torch.randn(5)
    opt = adamx.Adam([{"params": good}, {"params": [bad]}], lr=LR)
    for p in good + [bad]:
        p.grad = torch.randn_like(p)
    _expect_failure(opt, good + [bad], "(?i)inference")


@pytest.mark.parametrize("kind", ["nan_lr", "nan_beta2", "sparse", "inference",
                                  "state_shape", "grad_none_then_sparse_first"])
def test_second_group_goes_bad_after_every_param_has_state(kind):
    """Both groups have stepped (so the step takes its fast path); then the second goes
    bad. Nothing of the first group may change."""
    good = make_tensors([(5, 3), (7,)], torch.float32, seed=330)
    if kind == "inference":
        with torch.inference_mode():
            second = [torch.randn(6), torch.randn(2)]
    else:
        second = make_tensors([(6,), (2,)], torch.float32, seed=331)
    opt = adamx.Adam([{"params": good}, {"params": second, "lr": 0.01}], lr=LR)
    params = good + second
    if kind != "inference":
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    else:
        # first group outside inference mode (its state must stay normal tensors), second
        # group inside (inference tensors can only be updated there)
        for p in good:
            p.grad = torch.randn_like(p)
        opt.step()
        for p in second:
            p.grad = torch.randn_like(p)
        for p in good:
            p.grad = None
        with torch.inference_mode():
            opt.step()
        assert not opt.state[good[0]]["exp_avg"].is_inference()
    for p in params:
        p.grad = torch.randn_like(p)
    group = opt.param_groups[1]
    match = {"nan_lr": "lr", "nan_beta2": "beta2", "sparse": "(?i)sparse",
             "inference": "(?i)inference", "state_shape": "(?i)shape",
             "grad_none_then_sparse_first": "(?i)sparse"}[kind]
    if kind == "nan_lr":
        group["lr"] = NAN
    elif kind == "nan_beta2":
        group["betas"] = (0.9, NAN)
    elif kind == "sparse":
        second[1].grad = second[1].grad.to_sparse()
    elif kind == "state_shape":
        opt.state[second[0]]["exp_avg_sq"] = torch.zeros(3, 2)
    elif kind == "grad_none_then_sparse_first":
        second[0].grad = second[0].grad.to_sparse()
        second[1].grad = None
    _expect_failure(opt, params, match)


# --------------------------------------------------------------------------------------
# The op on each backend (the CPU kernel, and the CUDA path run on the CPU by the
# emulation, which shares the CUDA backend's checks and operand preparation), and
# hyper-parameters of the wrong type
# --------------------------------------------------------------------------------------
BACKENDS = op_backends(chunk_size=64, block_dim=8)
cpu_step = BACKENDS["cpu"]


def small_state(amsgrad=True, seed=600):
    shapes = [(4, 6), (9,)]
    return OpState(make_tensors(shapes, torch.float32, seed=seed), amsgrad=amsgrad), \
        make_tensors(shapes, torch.float32, seed=seed + 1)


def expect_refused(step, st, grads, match, **hyper):
    before = st.clone()
    with pytest.raises(ERRORS, match=match):
        step(*st.lists(grads), **op_hyper(**hyper))
    assert_bitwise(st, before, "a refused step wrote")


# A scalar tensor on another device routed the step to another kernel
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


# Written, then raised
@pytest.mark.parametrize("which", ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_self_overlapping_state_is_refused_before_any_write(backend, which):
    """A state tensor made with expand() passed the checks; the kernel updated the param
    and the step count on a temporary, and only the copy-back raised."""
    st, grads = small_state()
    getattr(st, which)[1] = torch.zeros(1).expand(9)
    expect_refused(BACKENDS[backend], st, grads, "(?i)overlap", amsgrad=True)


# One step tensor shared by several params
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


# capturable=True on CPU params
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


# A string hyper-parameter
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
