"""Master weights and stochastic rounding: the kernels' two ways of keeping small updates of
float16/bfloat16 params, on the CPU kernel (every ISA, 1 and 2 threads) and the CUDA kernel
body emulated on the CPU, through the op, the functional API and the optimizer.

master_params: a float16/bfloat16 model with fp32 master copies must follow the fp32
model's trajectory exactly: given the same grads, the master copies and the fp32 state are
bitwise the fp32 run's params and state, and each param is its master's rounding.

stochastic_rounding: each new bfloat16 param is one of the two bfloat16 neighbours of the
fp32 result, the upper with probability equal to the distance from the lower in units of
the gap (checked statistically over many elements), reproducibly: the same bits for any
thread count, ISA, on the CPU and in the emulated CUDA body, and other bits for another
seed, step or tensor.
"""

import copy

import pytest
import torch

import adamx
from conftest import (BACKENDS, LR, OPTION_GRID, OPTION_IDS, OpState, make_grad_seq,
                      make_tensors, needs_build, op_hyper, same_bits)

pytestmark = needs_build

REDUCED = [torch.float16, torch.bfloat16]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (17, 33), (1031,), (4, 250)]
# The CPU kernel and the emulated CUDA body, the latter with a small geometry that makes it
# run several chunks, blocks and launches (conftest.BACKENDS).
BACKEND_NAMES = ["cpu", "emulated_cuda_small"]


def assert_same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert same_bits(a, b), f"{what}: max abs diff {(a.double() - b.double()).abs().max()}"


# --------------------------------------------------------------------------------------
# Master weights
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("options", OPTION_GRID, ids=OPTION_IDS)
def test_master_weights_follow_the_fp32_trajectory(options, dtype, backend):
    """Same grads in (the reduced-precision grads, widened for the fp32 run): after every
    step the master copies and state are the fp32 run's bits; each param is its master's
    rounding to nearest."""
    step = BACKENDS[backend]
    amsgrad = options.get("amsgrad", False)
    params = make_tensors(SHAPES, dtype, seed=1)
    ours = OpState([p.clone() for p in params], amsgrad, master_weights=True)
    fp32 = OpState([p.float() for p in params], amsgrad)
    hyper = op_hyper(weight_decay=0.1, **options)
    for grads in make_grad_seq(SHAPES, dtype, 4, seed=2):
        step(*ours.lists([g.clone() for g in grads]), **ours.operands(), **hyper)
        step(*fp32.lists([g.float() for g in grads]), **hyper)
        for i in range(len(SHAPES)):
            assert_same(ours.master_params[i], fp32.params[i], f"master {i}")
            assert_same(ours.exp_avgs[i], fp32.exp_avgs[i], f"exp_avg {i}")
            assert_same(ours.exp_avg_sqs[i], fp32.exp_avg_sqs[i], f"exp_avg_sq {i}")
            if amsgrad:
                assert_same(ours.max_exp_avg_sqs[i], fp32.max_exp_avg_sqs[i], f"max {i}")
            assert_same(ours.params[i], fp32.params[i].to(dtype), f"param {i}")
            assert float(ours.steps[i]) == float(fp32.steps[i])


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_master_weights_with_a_grad_scale(dtype):
    """GradScaler's division in the same pass: the master copy still follows the fp32 run
    given the same scaled grads, and the grads are written back unscaled in their dtype."""
    params = make_tensors(SHAPES, dtype, seed=3)
    ours = OpState([p.clone() for p in params], amsgrad=False, master_weights=True)
    fp32 = OpState([p.float() for p in params], amsgrad=False)
    scale = torch.tensor(1024.0)
    for grads in make_grad_seq(SHAPES, dtype, 3, seed=4, scale=64.0):
        ours_grads = [g.clone() for g in grads]
        fp32_grads = [g.float() for g in grads]
        BACKENDS["cpu"](*ours.lists(ours_grads), **ours.operands(), grad_scale=scale,
                        found_inf=torch.tensor(0.0), **op_hyper())
        BACKENDS["cpu"](*fp32.lists(fp32_grads), grad_scale=scale, found_inf=torch.tensor(0.0),
                        **op_hyper())
        for i in range(len(SHAPES)):
            assert_same(ours.master_params[i], fp32.params[i], f"master {i}")
            assert_same(ours_grads[i], fp32_grads[i].to(dtype), f"grad {i}")


def test_master_weights_emulated_cuda_equals_cpu_with_device_scalars():
    """Step counts, lr and the scaler read by the kernel body (the capturable path)."""
    params = make_tensors(SHAPES, torch.bfloat16, seed=5)
    a = OpState([p.clone() for p in params], amsgrad=True, master_weights=True)
    b = a.clone()
    hyper = op_hyper(lr=torch.tensor(LR), amsgrad=True, decoupled_weight_decay=True,
                     weight_decay=0.01)
    for grads in make_grad_seq(SHAPES, torch.bfloat16, 3, seed=6):
        scaler = dict(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
        for state, backend in ((a, "cpu"), (b, "emulated_cuda_in_kernel")):
            BACKENDS[backend](*state.lists([g.clone() for g in grads]), **state.operands(),
                              **scaler, **hyper)
    for i, (x, y) in enumerate(zip(a.tensors(), b.tensors())):
        assert_same(x, y, f"tensor {i}")


def test_master_weights_skip_on_found_inf():
    params = make_tensors(SHAPES, torch.bfloat16, seed=7)
    st = OpState([p.clone() for p in params], amsgrad=False, master_weights=True)
    before = st.clone()
    grads = make_grad_seq(SHAPES, torch.bfloat16, 1, seed=8)[0]
    BACKENDS["cpu"](*st.lists(grads), **st.operands(), grad_scale=torch.tensor(2.0),
                    found_inf=torch.tensor(1.0), **op_hyper())
    for i, (x, y) in enumerate(zip(st.tensors(), before.tensors())):
        assert_same(x, y, f"tensor {i}")


@pytest.mark.parametrize("case, error, match", [
    ("fp32 param", TypeError, "master_params are fp32 copies of float16 or bfloat16"),
    ("bf16 master", RuntimeError, r"master_params\[1\] has dtype BFloat16"),
    ("bf16 state", TypeError, r"exp_avgs\[1\] is BFloat16 but exp_avg_sqs\[1\] is Float; "
                              "both moments are stored alike"),
    ("fp16 state", RuntimeError, r"exp_avgs\[1\] has dtype Half .* must be float32"),
    ("short list", ValueError, "got 2 params but 1 master_params"),
    ("wrong shape", RuntimeError, r"master_params\[1\] has shape"),
    ("shares memory", RuntimeError, r"master_params\[0\] and master_params\[1\] share memory"),
    ("with stochastic rounding", ValueError, "stochastic_rounding rounds bfloat16 params"),
])
def test_master_weights_bad_input_changes_nothing(case, error, match):
    params = [torch.randn(5).bfloat16(), torch.randn(3, 4).bfloat16()]
    st = OpState(params, amsgrad=False, master_weights=True)
    grads = [torch.randn_like(p) for p in params]
    hyper = op_hyper()
    if case == "fp32 param":
        st.params[1] = st.params[1].float()
        grads[1] = grads[1].float()
    elif case == "bf16 master":
        st.master_params[1] = st.master_params[1].bfloat16()
    elif case == "bf16 state":  # bfloat16 moments beside a master copy: both of them
        st.exp_avgs[1] = st.exp_avgs[1].bfloat16()
    elif case == "fp16 state":
        st.exp_avgs[1] = st.exp_avgs[1].half()
    elif case == "short list":
        st.master_params = st.master_params[:1]
    elif case == "wrong shape":
        st.master_params[1] = st.master_params[1].flatten()
    elif case == "shares memory":
        st.master_params[1] = st.master_params[0][:0].new_empty(0)  # placeholder, replaced
        base = torch.zeros(12)
        st.master_params[0], st.master_params[1] = base[:5], base[:12].view(3, 4)
    elif case == "with stochastic rounding":
        hyper = op_hyper(stochastic_rounding=True)
    before = st.clone()
    for backend in BACKEND_NAMES:
        with pytest.raises(error, match=match):
            BACKENDS[backend](*st.lists(grads), master_params=st.master_params, **hyper)
        for i, (x, y) in enumerate(zip(st.tensors(), before.tensors())):
            assert same_bits(x, y), f"{case}: tensor {i} changed"


def bf16_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.ReLU(), torch.nn.Linear(17, 3),
                               torch.nn.LayerNorm(3))


def set_grads(model, k, dtype=None):
    g = torch.Generator().manual_seed(100 + k)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(dtype or p.dtype)


def take_steps(model, opt, ks):
    """`opt` steps `model` once on set_grads' grads for each step number k in `ks`."""
    for k in ks:
        set_grads(model, k)
        opt.step()


def step_with_fp32_twin(model, opt, twin, twin_opt, k):
    """One step of `model` on set_grads' grads for step k, and one of its float32 `twin` on
    the same grads, widened."""
    set_grads(model, k)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.float()
    opt.step()
    twin_opt.step()


def test_optimizer_master_weights_follow_fp32_and_fp32_params_step_as_usual():
    """A model whose Linear layers are bfloat16 and LayerNorm float32, master_weights=True:
    bfloat16 params get master copies (fp32 state), the float32 LayerNorm does not; the
    trajectory is the fp32 model's, bit for bit, through the first step (state made in
    Python) and the later ones (the C++ fast path)."""
    fp32 = bf16_model()
    ours = copy.deepcopy(fp32)
    ours[0].to(torch.bfloat16)
    ours[2].to(torch.bfloat16)
    for p32, p in zip(fp32.parameters(), ours.parameters()):
        p32.data.copy_(p.data.float())  # the same starting values
    opt32 = adamx.AdamW(fp32.parameters(), lr=LR)
    opt = adamx.AdamW(ours.parameters(), lr=LR, master_weights=True)
    for k in range(4):
        step_with_fp32_twin(ours, opt, fp32, opt32, k)
        for p32, p in zip(fp32.parameters(), ours.parameters()):
            state = opt.state[p]
            if p.dtype == torch.bfloat16:
                assert_same(state["master_param"], p32.data, "master")
                assert_same(p.data, p32.data.bfloat16(), "param")
                assert state["exp_avg"].dtype == torch.float32
            else:
                assert "master_param" not in state
                assert_same(p.data, p32.data, "fp32 param")
            assert_same(state["exp_avg_sq"], opt32.state[p32]["exp_avg_sq"], "exp_avg_sq")


def test_master_weights_state_dict_round_trips_and_moves_to_and_from_torch():
    model = bf16_model().to(torch.bfloat16)
    opt = adamx.Adam(model.parameters(), lr=LR, master_weights=True)
    take_steps(model, opt, range(2))
    sd = opt.state_dict()
    p0 = next(iter(model.parameters()))
    assert sd["state"][0]["master_param"].dtype == torch.float32
    assert sd["param_groups"][0]["master_weights"] is True

    # adamx -> adamx: the master copies and fp32 moments come back exactly.
    twin = copy.deepcopy(model)
    opt2 = adamx.Adam(twin.parameters(), lr=LR, master_weights=True)
    opt2.load_state_dict(copy.deepcopy(sd))
    for p, q in zip(model.parameters(), twin.parameters()):
        for key in ("master_param", "exp_avg", "exp_avg_sq"):
            assert_same(opt2.state[q][key], opt.state[p][key], key)
    set_grads(model, 5)
    set_grads(twin, 5)
    opt.step()
    opt2.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_same(q.data, p.data, "param after resuming")

    # adamx -> torch.optim.Adam: loads (torch casts the state to bfloat16) and steps.
    torch_model = copy.deepcopy(model)
    topt = torch.optim.Adam(torch_model.parameters(), lr=LR)
    topt.load_state_dict(copy.deepcopy(opt.state_dict()))
    set_grads(torch_model, 6)
    topt.step()

    # torch.optim.Adam -> adamx with master weights: master copies start from the params,
    # moments widen exactly; the group setting the checkpoint lacks stays on.
    opt3_model = copy.deepcopy(torch_model)
    opt3 = adamx.Adam(opt3_model.parameters(), lr=LR, master_weights=True)
    tsd = topt.state_dict()
    opt3.load_state_dict(tsd)
    assert opt3.param_groups[0]["master_weights"] is True
    for (i, p) in enumerate(opt3_model.parameters()):
        state = opt3.state[p]
        assert_same(state["master_param"], p.data.float(), "master from param")
        assert_same(state["exp_avg"], tsd["state"][i]["exp_avg"].float(), "exp_avg widened")
    set_grads(opt3_model, 7)
    opt3.step()
    assert p0.dtype == torch.bfloat16


def test_master_weights_switched_on_later_start_from_the_params():
    model = bf16_model().to(torch.bfloat16)
    opt = adamx.Adam(model.parameters(), lr=LR)
    set_grads(model, 0)
    opt.step()
    opt.param_groups[0]["master_weights"] = True
    set_grads(model, 1)
    opt.step()
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert_same(p.data, opt.state[p]["master_param"].bfloat16(), "param")
    opt.param_groups[0]["master_weights"] = False
    set_grads(model, 2)
    opt.step()
    for p in model.parameters():
        assert "master_param" not in opt.state[p] and opt.state[p]["exp_avg"].dtype == p.dtype


# --------------------------------------------------------------------------------------
# The param is the truth: where a param is not its master's rounding to nearest any more
# (written since the last step: edited in place, loaded, cast to float32 and back), the
# step restarts the master copy from the param; elsewhere nothing changes.
# --------------------------------------------------------------------------------------
def restarted_masters(params, masters):
    """The master copies a step must start from: the param, widened, wherever the param is
    not its master's rounding to nearest (bitwise; both NaN counts as the same), else the
    master copy itself."""
    out = []
    for p, m in zip(params, masters):
        rounded = m.to(p.dtype)
        same = same_bits_each(p, rounded) | (p.isnan() & rounded.isnan())
        out.append(torch.where(same, m, p.float()))
    return out


def fp32_twin(state, masters):
    """The fp32 run that the state with master copies `masters` must follow: its params
    are the master copies, its moments and step counts the state's."""
    twin = OpState([m.clone() for m in masters], amsgrad=bool(state.max_exp_avg_sqs))
    for name in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
        setattr(twin, name, [t.clone() for t in getattr(state, name)])
    return twin


# In-place edits of the params between steps, as users and EMA code make them: new values
# (the bits of another random tensor) and a clamp.
PARAM_EDITS = {
    "copy_": lambda p, k: p.copy_(make_tensors([tuple(p.shape)], p.dtype, seed=40 + k)[0]),
    "clamp_": lambda p, k: p.clamp_(-0.5, 0.5),
}


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("edit", list(PARAM_EDITS))
def test_master_copy_restarts_where_its_param_was_edited(edit, dtype, backend):
    """After an in-place edit of the params, the next steps follow the fp32 run that starts
    from the edited params where the edit changed them (and from the master copies
    elsewhere), bit for bit, as the trajectory test above does."""
    step = BACKENDS[backend]
    params = make_tensors(SHAPES, dtype, seed=30)
    ours = OpState([p.clone() for p in params], amsgrad=True, master_weights=True)
    hyper = op_hyper(weight_decay=0.1, amsgrad=True)
    grad_seq = make_grad_seq(SHAPES, dtype, 4, seed=31)
    for grads in grad_seq[:2]:
        step(*ours.lists([g.clone() for g in grads]), **ours.operands(), **hyper)
    before = [p.clone() for p in ours.params]
    for k, p in enumerate(ours.params):
        PARAM_EDITS[edit](p, k)
    changed = sum(int((~same_bits_each(p, b)).sum()) for p, b in zip(ours.params, before))
    assert changed > 100  # the edit changed many elements (and left others alone)
    fp32 = fp32_twin(ours, restarted_masters(ours.params, ours.master_params))
    for grads in grad_seq[2:]:
        step(*ours.lists([g.clone() for g in grads]), **ours.operands(), **hyper)
        step(*fp32.lists([g.float() for g in grads]), **hyper)
        for i in range(len(SHAPES)):
            assert_same(ours.master_params[i], fp32.params[i], f"master {i}")
            assert_same(ours.params[i], fp32.params[i].to(dtype), f"param {i}")
            assert_same(ours.exp_avg_sqs[i], fp32.exp_avg_sqs[i], f"exp_avg_sq {i}")


def special_masters(dtype):
    """(param, master copy) pairs of special values, the first in each pair as the step
    finds it and the second as the master copy holds it, and what a step with lr = 0 (which
    leaves the value it starts from unchanged) must leave in the master copy."""
    nan, inf = float("nan"), float("inf")
    huge = 70000.0 if dtype == torch.float16 else 3.4e38      # rounds to inf
    tiny = 1e-10 if dtype == torch.float16 else 2.0 ** -140   # rounds to +0
    rows = [  # (param, master, master after the step)
        (nan, nan, nan),        # both NaN: the copy is kept (no restart from NaN to NaN)
        (nan, 1.0, nan),        # a NaN written into the param: the copy becomes NaN
        (2.0, nan, 2.0),        # a number written over a NaN: the copy restarts from it
        (inf, huge, huge),      # the rounding of a finite copy overflows: the copy is kept
        (-0.0, tiny, -0.0),     # the sign of a zero written into the param counts
        (0.0, tiny, tiny),      # the rounding of a tiny copy: kept
        (-inf, -1.0, -inf),     # an infinity written into the param
    ]
    param, master, after = (torch.tensor([r[j] for r in rows]) for j in range(3))
    return param.to(dtype).repeat(40), master.repeat(40), after.repeat(40)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_master_copy_restart_of_special_values(dtype, backend, restore_cpu_capability):
    """NaNs, infinities and signed zeros on either side: what the step starts from (seen
    with lr = 0 and no weight decay, which leave it unchanged), on two steps in a row, on
    every ISA of the CPU kernel and the emulated CUDA body."""
    param, master, after = special_masters(dtype)
    number = ~after.isnan()
    for isa in adamx.supported_cpu_capabilities() if backend == "cpu" else [None]:
        if isa is not None:
            adamx.set_cpu_capability(isa)
        st = OpState([param.clone()], amsgrad=False, master_weights=True)
        st.master_params = [master.clone()]
        for _ in range(2):
            BACKENDS[backend](*st.lists([torch.ones_like(param)]), **st.operands(),
                              **op_hyper(lr=0.0))
            got = st.master_params[0]
            assert torch.equal(got.isnan(), after.isnan()), isa
            assert same_bits(got[number], after[number]), isa
            assert torch.equal(st.params[0].isnan(), after.isnan()), isa
            assert same_bits(st.params[0][number], after[number].to(dtype)), isa


def fp32_optimizer_twin(model, opt, masters):
    """A float32 copy of `model` whose params are `masters`, with an adamx optimizer (no
    master copies) holding `opt`'s moments and step counts: the run `opt` must follow."""
    twin = copy.deepcopy(model).float()
    for q, m in zip(twin.parameters(), masters):
        q.data.copy_(m)
    twin_opt = type(opt)(twin.parameters())  # the checkpoint sets the groups' settings
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin, twin_opt


def load_model_then_optimizer(model, opt, ckpt):
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])


def load_optimizer_then_model(model, opt, ckpt):
    opt.load_state_dict(ckpt["opt"])
    model.load_state_dict(ckpt["model"])


def load_with_torch_set_state_dict(model, opt, ckpt):
    from torch.distributed.checkpoint.state_dict import set_state_dict
    set_state_dict(model, opt, model_state_dict=ckpt["model"], optim_state_dict=ckpt["dcp_opt"])


LOAD_ORDERS = {"model_then_optimizer": load_model_then_optimizer,
               "optimizer_then_model": load_optimizer_then_model,
               "torch_set_state_dict": load_with_torch_set_state_dict}


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("order", list(LOAD_ORDERS))
def test_resuming_in_either_load_order_is_the_uninterrupted_run(order, dtype):
    """A checkpoint loaded into a freshly initialised model and optimizer, the model first
    or the optimizer first (as torch's set_state_dict does): the following steps are the
    uninterrupted run's, bit for bit (params, master copies, moments)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    kw = dict(lr=LR, weight_decay=0.1, master_weights=True)
    model = bf16_model().to(dtype)
    opt = adamx.AdamW(model.parameters(), **kw)
    take_steps(model, opt, range(3))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                          "dcp_opt": get_state_dict(model, opt)[1]})
    resumed = bf16_model(seed=1).to(dtype)  # another initialisation
    resumed_opt = adamx.AdamW(resumed.parameters(), **kw)
    LOAD_ORDERS[order](resumed, resumed_opt, ckpt)
    for k in range(3, 5):
        set_grads(model, k)
        set_grads(resumed, k)
        opt.step()
        resumed_opt.step()
        for p, q in zip(model.parameters(), resumed.parameters()):
            assert_same(q.data, p.data, f"param after step {k}")
            for key, value in opt.state[p].items():
                assert_same(resumed_opt.state[q][key], value, f"{key} after step {k}")


def test_a_param_cast_to_float32_and_back_steps_from_its_own_value():
    """A bfloat16 model stepped with master copies, then cast to float32 and stepped there
    (no master copies: the float32 params are their own), then cast back: the next step
    starts from the params where they moved, not from the master copies left from before
    the cast."""
    model = bf16_model().to(torch.bfloat16)
    opt = adamx.AdamW(model.parameters(), lr=LR, master_weights=True)
    take_steps(model, opt, range(2))
    model.float()
    opt.param_groups[0]["lr"] = 0.05  # steps that move every param past its bfloat16 gap
    take_steps(model, opt, range(2, 4))
    opt.param_groups[0]["lr"] = LR
    model.to(torch.bfloat16)
    params = [p.data for p in model.parameters()]
    # The float32 steps either dropped the master copies (float32 params have none: the
    # state contract's way) or left stale ones; either way the step starts from the params.
    kept = [opt.state[p].get("master_param") for p in model.parameters()]
    assert all(m is None or not same_bits(p, m.bfloat16()) for p, m in zip(params, kept))
    kept = [p.float() if m is None else m for p, m in zip(params, kept)]
    twin, twin_opt = fp32_optimizer_twin(model, opt, restarted_masters(params, kept))
    for k in range(4, 6):
        step_with_fp32_twin(model, opt, twin, twin_opt, k)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert_same(opt.state[p]["master_param"], q.data, f"master after step {k}")
            assert_same(p.data, q.data.bfloat16(), f"param after step {k}")


def test_master_weights_and_stochastic_rounding_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        adamx.Adam([torch.zeros(2, requires_grad=True)], master_weights=True,
                   stochastic_rounding=True)


# --------------------------------------------------------------------------------------
# Stochastic rounding
# --------------------------------------------------------------------------------------
def bf16_neighbours(x):
    """The bfloat16 neighbours of each float32 x: toward zero and away from zero (equal when
    x is a bfloat16), and where x lies between them (0 to 1), from its bits."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = bits & 0xFFFF
    toward = bits - low
    away = torch.where(low > 0, toward + 0x10000, toward)

    def as_bf16(b):
        hi = (b >> 16).to(torch.int32)
        return (hi - (hi >= 2**15).to(torch.int32) * 2**16).to(torch.int16).view(torch.bfloat16)

    return as_bf16(toward), as_bf16(away), low.double() / 2**16


def sr_step(params, grads, seed=0, backend="cpu", steps=None, **hyper):
    st = OpState([p.clone() for p in params], amsgrad=False, steps=steps)
    BACKENDS[backend](*st.lists([g.clone() for g in grads]), seed=seed,
                      **op_hyper(stochastic_rounding=True, **hyper))
    return st


def fp32_result(params, grads, steps=None, **hyper):
    st = OpState([p.float() for p in params], amsgrad=False, steps=steps)
    BACKENDS["cpu"](*st.lists([g.float() for g in grads]), **op_hyper(**hyper))
    return st


def test_stochastic_rounding_is_unbiased():
    """Each new param is a bfloat16 neighbour of the fp32 result, away from zero with
    probability equal to the result's distance from the other neighbour in units of their
    gap: over N elements, sum(away - that probability) is a sum of N independent zero-mean
    terms of variance <= 1/4, so it lies within 6 sqrt(N)/2; rounding to nearest, or a bias
    of 1% of a gap, is far outside."""
    n = 400_000
    g = torch.Generator().manual_seed(9)
    params = [(torch.randn(n, generator=g) * 4).bfloat16()]
    grads = [torch.randn(n, generator=g).bfloat16()]
    exact = fp32_result(params, grads, lr=1e-3).params[0]
    rounded = sr_step(params, grads, lr=1e-3).params[0]
    toward, away, frac = bf16_neighbours(exact)
    is_away = same_bits_each(rounded, away)
    assert (is_away | same_bits_each(rounded, toward)).all()
    moving = frac > 0
    bound = 6 * moving.sum().item() ** 0.5 / 2
    assert moving.sum() > n // 2
    assert abs((is_away[moving].double() - frac[moving]).sum().item()) < bound
    nearest_away = (frac[moving] >= 0.5).double()
    assert abs((nearest_away - frac[moving]).sum().item()) > 10 * bound or \
        abs((nearest_away - frac[moving]).abs().sum().item()) > 10 * bound
    biased = (frac[moving] + 0.01).clamp(max=1)
    assert abs((is_away[moving].double() - biased).sum().item()) > bound


def same_bits_each(a, b):
    return a.view(torch.int16) == b.view(torch.int16)


def test_round_to_nearest_stalls_and_stochastic_rounding_does_not():
    """bfloat16 params of 1.0 and a constant grad, lr 1e-4 for 300 steps: each update is
    ~1e-4, below half a bfloat16 gap at 1.0 (2**-9 ~ 0.002), so rounding to nearest
    leaves every param at 1.0; stochastic rounding moves them by the fp32 run's amount on
    average (within 5% of it)."""
    n, steps = 20_000, 300
    params = [torch.ones(n, dtype=torch.bfloat16)]
    grads = [torch.ones(n, dtype=torch.bfloat16)]
    nearest = OpState([params[0].clone()], amsgrad=False)
    rounding = OpState([params[0].clone()], amsgrad=False)
    fp32 = OpState([params[0].float()], amsgrad=False)
    for _ in range(steps):
        BACKENDS["cpu"](*nearest.lists(grads), **op_hyper(lr=1e-4))
        BACKENDS["cpu"](*rounding.lists(grads), **op_hyper(lr=1e-4, stochastic_rounding=True))
        BACKENDS["cpu"](*fp32.lists([grads[0].float()]), **op_hyper(lr=1e-4))
    moved = 1 - fp32.params[0].double().mean().item()
    assert moved > 0.02
    assert (nearest.params[0] == 1).all()
    sr_moved = 1 - rounding.params[0].double().mean().item()
    assert abs(sr_moved - moved) < 0.05 * moved


@pytest.mark.parametrize("options", OPTION_GRID, ids=OPTION_IDS)
def test_stochastic_rounding_is_the_same_on_every_isa_thread_count_and_the_emulated_cuda_body(
        options, restore_cpu_capability, restore_threads):
    params = make_tensors(SHAPES, torch.bfloat16, seed=10)
    grad_seq = make_grad_seq(SHAPES, torch.bfloat16, 3, seed=11)
    amsgrad = options.get("amsgrad", False)
    hyper = op_hyper(stochastic_rounding=True, weight_decay=0.1, **options)

    def run(backend):
        st = OpState([p.clone() for p in params], amsgrad)
        for grads in grad_seq:
            BACKENDS[backend](*st.lists([g.clone() for g in grads]), seed=1234, **hyper)
        return st

    runs = {}
    for isa in adamx.supported_cpu_capabilities():
        adamx.set_cpu_capability(isa)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs[f"{isa}/{threads}"] = run("cpu")
    runs["emulated_cuda"] = run("emulated_cuda_small")
    first_name, first = next(iter(runs.items()))
    for name, st in runs.items():
        for i, (a, b) in enumerate(zip(first.tensors(), st.tensors())):
            assert same_bits(a, b), f"{name} vs {first_name}: tensor {i}"


def test_stochastic_rounding_emulated_cuda_reads_the_step_in_the_kernel():
    """The key's step count comes from memory in the capturable path."""
    params = make_tensors(SHAPES, torch.bfloat16, seed=12)
    grads = make_grad_seq(SHAPES, torch.bfloat16, 1, seed=13)[0]
    a = sr_step(params, grads, seed=5, steps=[3.0] * len(SHAPES))
    b = sr_step(params, grads, seed=5, backend="emulated_cuda_in_kernel",
                steps=[3.0] * len(SHAPES))
    for i, (x, y) in enumerate(zip(a.tensors(), b.tensors())):
        assert same_bits(x, y), f"tensor {i}"


def test_stochastic_rounding_streams_differ_by_seed_step_and_tensor():
    n = 4096
    params = [torch.full((n,), 1.0, dtype=torch.bfloat16)] * 2
    params = [p.clone() for p in params]
    grads = [torch.full((n,), 1.0, dtype=torch.bfloat16)] * 2
    base = sr_step(params, grads, seed=1, lr=1e-3).params
    assert not torch.equal(base[0], base[1])  # two tensors, two streams
    assert torch.equal(sr_step(params, grads, seed=1, lr=1e-3).params[0], base[0])
    assert not torch.equal(sr_step(params, grads, seed=2, lr=1e-3).params[0], base[0])
    # with beta1 = beta2 = 0 the exact update is the same at every step count: only the
    # key's step can make the roundings differ
    flat = dict(seed=1, lr=1e-3, beta1=0.0, beta2=0.0)
    first, later = sr_step(params, grads, **flat), sr_step(params, grads, **flat, steps=[7.0, 7.0])
    assert torch.equal(fp32_result(params, grads, lr=1e-3, beta1=0.0, beta2=0.0).params[0],
                       fp32_result(params, grads, lr=1e-3, beta1=0.0, beta2=0.0,
                                   steps=[7.0, 7.0]).params[0])
    assert not torch.equal(later.params[0], first.params[0])
    # a seed is any 64-bit integer: Python ints wrap
    x = OpState([p.clone() for p in params], amsgrad=False)
    adamx.functional.adam(*x.lists([g.clone() for g in grads]), lr=1e-3, beta1=0.9,
                          beta2=0.999, weight_decay=0, eps=1e-8, stochastic_rounding=True,
                          seed=2**64 + 1)
    assert torch.equal(x.params[0], base[0])


def test_stochastic_rounding_leaves_float32_params_alone_and_refuses_float16():
    params = make_tensors([(5,), (7,)], torch.float32, seed=14)
    grads = make_grad_seq([(5,), (7,)], torch.float32, 1, seed=15)[0]
    a = sr_step(params, grads)
    b = fp32_result(params, grads)
    for x, y in zip(a.params, b.params):
        assert same_bits(x, y)
    half = [p.half() for p in params]
    st = OpState([p.clone() for p in half], amsgrad=False)
    with pytest.raises(TypeError, match="stochastic_rounding is implemented for bfloat16"):
        BACKENDS["cpu"](*st.lists([g.half() for g in grads]),
                        **op_hyper(stochastic_rounding=True))
    assert all(same_bits(x, y) for x, y in zip(st.params, half))


def test_optimizer_stochastic_rounding_matches_the_functional_step_on_both_paths():
    """adamx.Adam(stochastic_rounding=True): the first step (state made in Python, the op
    called with lists) and later ones (the C++ fast path) use the group's seed, and each
    param's position among the group's params with grads."""
    model = bf16_model().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    opt = adamx.Adam(model.parameters(), lr=LR, stochastic_rounding=True, seed=77)
    assert opt.param_groups[0]["seed"] == 77
    st = OpState([p.data for p in ref.parameters()], amsgrad=False)
    for k in range(3):
        set_grads(model, k)
        set_grads(ref, k)
        opt.step()
        BACKENDS["cpu"](*st.lists([p.grad for p in ref.parameters()]), seed=77,
                        **op_hyper(stochastic_rounding=True))
        for p, q in zip(model.parameters(), ref.parameters()):
            assert same_bits(p.data, q.data)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["stochastic_rounding"] is True
    assert sd["param_groups"][0]["seed"] == 77


def test_groups_get_seeds_of_their_own():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    torch.manual_seed(0)
    opt = adamx.Adam([{"params": [a]}, {"params": [b]}], stochastic_rounding=True)
    seeds = [g["seed"] for g in opt.param_groups]
    assert len(set(seeds)) == 2 and all(isinstance(s, int) for s in seeds)
    opt = adamx.Adam([{"params": [a]}, {"params": [b], "seed": 9}], seed=5)
    assert [g["seed"] for g in opt.param_groups] == [5, 9]
    # An optimizer's seed s and s + 1 share no group's stream (issue #22: the groups had
    # s + index, so seed=6's first group drew the bits of seed=5's second).
    three = [{"params": [a]}, {"params": [b]}, {"params": [torch.zeros(3)]}]
    five, six = ({g["seed"] for g in adamx.Adam(three, seed=s).param_groups} for s in (5, 6))
    assert len(five) == len(six) == 3 and not five & six
    assert 5 in five and 6 in six  # the first group keeps the seed given
    opt = adamx.Adam([{"params": [a]}, {"params": [b]}])  # no random bits: the indices
    assert [g["seed"] for g in opt.param_groups] == [0, 1]


@pytest.mark.parametrize("noise", [dict(stochastic_rounding=True), dict(state_dtype="int8"),
                                   dict(state_dtype="bfloat16")])
def test_default_seed_is_drawn_from_torch_only_where_noise_is_used(noise):
    """Issue #22, part 3. A group given no seed that draws random bits gets one from
    torch's default generator: reproduced by torch.manual_seed, another for another
    manual seed and for the next optimizer, kept in state_dict (a resumed run draws the
    same bits). A group without noise leaves torch's random stream alone and its
    state_dict has torch's keys exactly. (Before: every group's seed was its index, the
    same in every run and optimizer.)"""
    p = torch.zeros(8, requires_grad=True)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    plain = adamx.Adam([p], stochastic_rounding=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(plain.state_dict()["param_groups"][0]) == \
        set(torch.optim.Adam([p]).state_dict()["param_groups"][0])

    def seed_of(manual_seed):
        torch.manual_seed(manual_seed)
        return adamx.Adam([p], **noise).param_groups[0]["seed"]

    assert seed_of(1) == seed_of(1)
    assert seed_of(1) != seed_of(2)
    torch.manual_seed(1)
    first = adamx.Adam([p], **noise)
    assert not torch.equal(torch.get_rng_state(), before)  # one draw
    second = adamx.Adam([p], **noise)
    assert first.param_groups[0]["seed"] != second.param_groups[0]["seed"]
    saved = first.state_dict()["param_groups"][0]
    assert saved["seed"] == first.param_groups[0]["seed"]
    second.load_state_dict(first.state_dict())
    assert second.param_groups[0]["seed"] == first.param_groups[0]["seed"]


def test_default_seeds_round_independently():
    """Two optimizers given no seed, stepping equal bfloat16 params with equal grads by
    small updates (stochastic_rounding): each element rounds up with probability q (its
    fp32 result's place between its two bfloat16 neighbours), so two independent streams
    agree with probability q^2 + (1 - q)^2, not 1. Before, both drew the stream of seed 0
    (the group's index) and agreed everywhere."""
    n = 1 << 16
    gen = torch.Generator().manual_seed(3)
    data = (torch.rand(n, generator=gen) + 1).to(torch.bfloat16)  # in [1, 2): gaps 2^-7
    grad = torch.randn(n, generator=gen).to(torch.bfloat16)
    results = []
    torch.manual_seed(0)
    for _ in range(2):
        p = data.clone().requires_grad_()
        opt = adamx.Adam([p], lr=1e-3, stochastic_rounding=True)  # steps of ~lr << gap
        p.grad = grad.clone()
        opt.step()
        results.append(p.detach().clone())
    ref = data.float().clone().requires_grad_()
    ref_opt = adamx.Adam([ref], lr=1e-3)
    ref.grad = grad.float()
    ref_opt.step()
    bits = ref.detach().view(torch.int32)  # positive: truncation rounds down
    down = (bits & ~0xFFFF).view(torch.float32)
    up = ((bits & ~0xFFFF) + 0x10000).view(torch.float32)
    q = (ref.detach() - down) / (up - down)
    for r in results:  # each is one of the two neighbours
        assert ((r.float() == down) | (r.float() == up)).all()
    expected = (q * q + (1 - q) * (1 - q)).mean().item()
    agree = (results[0] == results[1]).float().mean().item()
    assert expected < 0.9
    assert agree == pytest.approx(expected, abs=0.02)


def test_stochastic_rounding_of_special_values():
    """Infinities stay infinite, NaNs stay NaN (quiet), zeros stay zero, on the CPU kernel
    and the emulated CUDA body alike: a zero lr leaves each fp32 result the param itself."""
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1.0],
                           dtype=torch.bfloat16)
    params = [special.repeat(50)]
    grads = [torch.ones_like(params[0])]
    results = [sr_step(params, grads, lr=0.0, backend=b) for b in BACKEND_NAMES]
    for st in results:
        out = st.params[0]
        assert same_bits(out[~out.isnan()], params[0][~params[0].isnan()])
        assert torch.equal(out.isnan(), params[0].isnan())
    assert same_bits(results[0].params[0], results[1].params[0])


# --------------------------------------------------------------------------------------
# On a GPU: the CUDA kernel gives the CPU kernel's bits (master copies and stochastic
# rounding alike), with host and device step counts.
# --------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("mode", ["master", "stochastic"])
@pytest.mark.parametrize("capturable", [False, True], ids=["host_steps", "device_steps"])
def test_cuda_kernel_equals_the_cpu_kernel(mode, capturable):
    dtype = torch.bfloat16
    params = make_tensors(SHAPES, dtype, seed=20)
    grad_seq = make_grad_seq(SHAPES, dtype, 3, seed=21)
    cpu = OpState([p.clone() for p in params], amsgrad=True, master_weights=mode == "master")
    gpu = cpu.clone()
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params"):
        setattr(gpu, name, [t.cuda() for t in getattr(gpu, name)])
    if capturable:
        gpu.steps = [s.cuda() for s in gpu.steps]
    extra = dict(stochastic_rounding=True) if mode == "stochastic" else {}
    hyper = op_hyper(amsgrad=True, weight_decay=0.1, **extra)
    for grads in grad_seq:  # the op runs where its tensors are
        torch.ops.adamx.adam_(*cpu.lists([g.clone() for g in grads]), **cpu.operands(),
                              seed=3, **hyper)
        torch.ops.adamx.adam_(*gpu.lists([g.cuda() for g in grads]), **gpu.operands(),
                              seed=3, **hyper)
    for i, (a, b) in enumerate(zip(cpu.tensors(), gpu.tensors())):
        assert same_bits(a, b.cpu()), f"tensor {i}"


@pytest.mark.parametrize("option", ["master_weights", "stochastic_rounding"])
def test_compiled_step_equals_eager(option):
    """torch.compile(fullgraph=True) of the step: the op's fake kernel takes master_params
    and the seed, and the compiled step gives the eager step's bits."""
    eager_model = bf16_model().to(torch.bfloat16)
    compiled_model = copy.deepcopy(eager_model)
    torch.manual_seed(0)  # a default seed is drawn (stochastic_rounding): the same one
    eager = adamx.Adam(eager_model.parameters(), lr=LR, **{option: True})
    torch.manual_seed(0)
    compiled = adamx.Adam(compiled_model.parameters(), lr=LR, **{option: True})
    step = torch.compile(compiled.step, fullgraph=True, backend="aot_eager")
    for k in range(3):
        set_grads(eager_model, k)
        set_grads(compiled_model, k)
        eager.step()
        step()
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        assert same_bits(p.data, q.data)
        for key, value in eager.state[p].items():
            assert same_bits(value, compiled.state[q][key]), key


# --------------------------------------------------------------------------------------
# keep_grads: the unscaled grads are not written back
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype,kind", [
    (torch.float32, "plain"), (torch.float64, "plain"), (torch.float16, "plain"),
    (torch.bfloat16, "plain"), (torch.float16, "master"), (torch.bfloat16, "master"),
    (torch.bfloat16, "stochastic_rounding")], ids=str)
@pytest.mark.parametrize("layout", ["dense", "transposed_grads"])
def test_keep_grads_steps_as_the_written_back_step_and_leaves_grads(dtype, kind, layout,
                                                                    backend):
    """With a grad_scale, keep_grads=True gives the params and state of the step that
    writes the unscaled grads back, bit for bit, and leaves every grad as it was (also
    grads laid out unlike their params, which the step reads through temporaries)."""
    step = BACKENDS[backend]
    params = make_tensors(SHAPES, dtype, seed=11)
    kept = OpState([p.clone() for p in params], False, master_weights=kind == "master")
    written = kept.clone()
    hyper = op_hyper(weight_decay=0.1, stochastic_rounding=kind == "stochastic_rounding")
    scale = torch.tensor(1024.0)
    for grads in make_grad_seq(SHAPES, dtype, 3, seed=12, scale=1024.0):
        if layout == "transposed_grads":
            grads = [g.t().contiguous().t() if g.dim() == 2 else g for g in grads]
        mine, theirs = [g.clone() for g in grads], [g.clone() for g in grads]  # (strides kept)
        step(*kept.lists(mine), **kept.operands(), grad_scale=scale, keep_grads=True, **hyper)
        step(*written.lists(theirs), **written.operands(), grad_scale=scale, **hyper)
        for i, (a, b) in enumerate(zip(kept.tensors(), written.tensors())):
            assert same_bits(a, b), f"tensor {i}"
        for i, (g, g0, gw) in enumerate(zip(mine, grads, theirs)):
            assert same_bits(g, g0), f"grad {i} was written"
            if g.numel() > 0 and bool((g0 != 0).any()):
                assert not same_bits(gw, g0), f"grad {i}: the written-back step wrote it"
