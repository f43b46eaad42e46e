"""The state contract (adamx/_state.py): every path that makes, loads or converts a
param's state (the step, load_state_dict, add_param_group, an option changed between
steps) checks it against one definition, converts what converts exactly or by the
documented re-encoding, refuses the rest with a clear error before anything changes, and
never starts a state that is not empty over from zero."""

import contextlib
import copy

import pytest
import torch

import adamx
from conftest import needs_build

pytestmark = needs_build

BIG = (4, 4096)  # compact moments from COMPACT_MIN_NUMEL elements up


def _param(shape=BIG, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype).requires_grad_()


def _grad(p, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p.shape, generator=g, dtype=p.dtype)


def _assert_torch_step_refuses(p, checkpoint, error):
    """torch.optim.Adam loads ``checkpoint`` and raises ``error`` only at its step."""
    torch_opt = torch.optim.Adam([p])
    torch_opt.load_state_dict(checkpoint)
    p.grad = _grad(p)
    with pytest.raises(error):
        torch_opt.step()


def _steps(opt, params, count=2, seed=1):
    for k in range(count):
        for i, p in enumerate(params):
            p.grad = _grad(p, seed + 100 * k + i)
        opt.step()


def _stepped(shape=BIG, **options):
    """A param and an adamx.Adam(``options``) that has taken two steps on it."""
    p = _param(shape)
    opt = adamx.Adam([p], **options)
    _steps(opt, [p])
    return p, opt


def _snapshot(opt):
    """Everything load_state_dict, add_param_group or a step may change."""
    return ([dict(copy.deepcopy({k: v for k, v in g.items() if k != "params"}),
                  params=list(g["params"])) for g in opt.param_groups],
            {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in opt.state.items()})


def _assert_unchanged(opt, snapshot):
    groups, state = snapshot
    assert len(opt.param_groups) == len(groups)
    for ours, theirs in zip(opt.param_groups, groups):
        assert ours.keys() == theirs.keys()
        for key in ours:
            if key == "params":
                assert all(a is b for a, b in zip(ours[key], theirs[key]))
            else:
                assert ours[key] == theirs[key], key
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys()
        for key, value in s.items():
            if torch.is_tensor(value):
                assert torch.equal(value, state[id(p)][key]), key
                assert value.stride() == state[id(p)][key].stride(), key


@contextlib.contextmanager
def _refused(opt, match=None):
    """The block raises ValueError (matching ``match``) and leaves ``opt``'s groups and
    state as they were."""
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        yield
    _assert_unchanged(opt, before)


# --------------------------------------------------------------------------------------
# Shapes: a checkpoint's [1, 4096] moments are not broadcast into a [4, 4096] param.

@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "int8"])
def test_checkpoint_moments_of_another_shape_are_refused(state_dtype):
    small = torch.zeros(1, 4096, requires_grad=True)
    torch_opt = torch.optim.Adam([small])
    _steps(torch_opt, [small])
    checkpoint = torch_opt.state_dict()

    p, opt = _stepped(state_dtype=state_dtype)
    with _refused(opt, r"param 0 has exp_avg as a torch.float32 tensor of "
                       r"shape \(1, 4096\).*shape \(4, 4096\)"):
        opt.load_state_dict(checkpoint)
    # torch.optim.Adam loads it too, but its step refuses the broadcast: adamx refuses at
    # once, before the optimizer changes.
    _assert_torch_step_refuses(p, checkpoint, RuntimeError)


# --------------------------------------------------------------------------------------
# Layouts: state laid out unlike its param is re-laid (exactly for float moments, by the
# documented re-encoding for 8-bit codes), not left to fail every later step.

def _conv_model():
    torch.manual_seed(0)
    return torch.nn.Conv2d(16, 32, 3)  # weight: 32 * 16 * 3 * 3 = 4608 elements


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "int8"])
def test_channels_last_after_state_exists(state_dtype):
    model = _conv_model()
    opt = adamx.Adam(model.parameters(), state_dtype=state_dtype)
    x = torch.randn(2, 16, 8, 8)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    weight = model.weight
    from adamx.optimizer import _moment_float
    before = [_moment_float(opt.state[weight], k) for k in ("exp_avg", "exp_avg_sq")]
    model.to(memory_format=torch.channels_last)
    assert weight.stride() != before[0].stride()
    for _ in range(2):
        opt.zero_grad()
        model(x.to(memory_format=torch.channels_last)).square().sum().backward()
        opt.step()
    state = opt.state[weight]
    for key in ("exp_avg_codes", "exp_avg_sq_codes") if state_dtype == "int8" else \
            ("exp_avg", "exp_avg_sq"):
        assert state[key].stride() == weight.stride(), key


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "int8"])
def test_checkpoint_with_other_strides_is_relaid(state_dtype):
    """A checkpoint made with the param transposed: the values move to the param's
    layout exactly (8-bit codes: decoded and encoded again), and training goes on."""
    p = _param((64, 128))
    source = p.detach().t().contiguous().t().requires_grad_()  # same values, other strides
    src_opt = adamx.Adam([source], state_dtype=state_dtype)
    _steps(src_opt, [source])
    saved = copy.deepcopy(src_opt.state_dict())
    from adamx.optimizer import _moment_float
    moments = [_moment_float(src_opt.state[source], k) for k in ("exp_avg", "exp_avg_sq")]

    opt = adamx.Adam([p], state_dtype=state_dtype)
    opt.load_state_dict(saved)
    state = opt.state[p]
    for key in ("exp_avg_codes", "exp_avg_sq_codes") if state_dtype == "int8" else \
            ("exp_avg", "exp_avg_sq"):
        assert state[key].stride() == p.stride(), key
    for key, m in zip(("exp_avg", "exp_avg_sq"), moments):
        loaded = _moment_float(state, key)
        if state_dtype == "int8":  # re-encoded: within the codes' precision
            assert ((loaded - m).abs() <= 2 ** -3 * m.abs() + 1e-6 * m.abs().max()).all()
        else:
            assert torch.equal(loaded, m)
    _steps(opt, [p], seed=7)
    assert float(opt.state[p]["step"]) == 4


# --------------------------------------------------------------------------------------
# Options changed between steps.

def test_unknown_state_dtype_set_on_a_group_is_refused_at_the_next_step():
    p, opt = _stepped()
    opt.param_groups[0]["state_dtype"] = "int4"
    param_before = p.detach().clone()
    p.grad = _grad(p)
    with _refused(opt, "state_dtype must be one of"):
        opt.step()
    assert torch.equal(p.detach(), param_before)


@pytest.mark.parametrize("alias, stored", [(torch.int8, torch.uint8),
                                           (torch.bfloat16, torch.bfloat16),
                                           (torch.float32, torch.float32)])
def test_state_dtype_aliases_set_on_a_group(alias, stored):
    p, opt = _stepped()
    opt.param_groups[0]["state_dtype"] = alias
    _steps(opt, [p])
    state = opt.state[p]
    key = "exp_avg_codes" if stored == torch.uint8 else "exp_avg"
    assert state[key].dtype == stored
    assert float(state["step"]) == 4


def test_amsgrad_switched_on_with_compact_state_is_refused():
    p, opt = _stepped(state_dtype="int8")
    opt.param_groups[0]["amsgrad"] = True
    p.grad = _grad(p)
    with _refused(opt, "does not combine with amsgrad=True"):
        opt.step()


# --------------------------------------------------------------------------------------
# 8-bit codes under their own keys.

def test_torch_cannot_step_8bit_codes_as_moments():
    p, opt = _stepped(state_dtype="int8")
    saved = opt.state_dict()
    assert {"exp_avg_codes", "exp_avg_sq_codes", "code_scales"} <= saved["state"][0].keys()
    assert "exp_avg" not in saved["state"][0]
    torch_opt = torch.optim.Adam([p])
    torch_opt.load_state_dict(copy.deepcopy(saved))
    p.grad = _grad(p)
    param_before = p.detach().clone()
    with pytest.raises(KeyError, match="exp_avg"):
        torch_opt.step()
    assert torch.equal(p.detach(), param_before)
    # The converter gives torch what it can step.
    torch_opt = torch.optim.Adam([p])
    torch_opt.load_state_dict(adamx.to_torch_state_dict(saved))
    torch_opt.step()


def test_older_checkpoint_with_codes_under_the_moments_names_loads():
    p, opt = _stepped(state_dtype="int8")
    saved = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(saved)
    s = old["state"][0]
    s["exp_avg"], s["exp_avg_sq"] = s.pop("exp_avg_codes"), s.pop("exp_avg_sq_codes")
    q = p.detach().clone().requires_grad_()
    opt2 = adamx.Adam([q], state_dtype="int8")
    opt2.load_state_dict(old)
    for key in ("exp_avg_codes", "exp_avg_sq_codes", "code_scales"):
        assert torch.equal(opt2.state[q][key], saved["state"][0][key])
    back = adamx.to_torch_state_dict(old)
    assert back["state"][0]["exp_avg"].dtype == torch.float32
    _steps(opt, [p], seed=3)
    _steps(opt2, [q], seed=3)
    assert torch.equal(p, q)


def test_state_bytes_counts_the_codes():
    p = _param((256, 256))
    opt = adamx.Adam([p], state_dtype="int8")
    _steps(opt, [p], count=1)
    assert adamx.state_bytes(opt)["moment_bytes_per_param"] == pytest.approx(2 + 8 / 256)


# --------------------------------------------------------------------------------------
# A state that is not empty is never started over.

@pytest.mark.parametrize("missing", ["exp_avg", "exp_avg_sq"])
def test_checkpoint_without_a_moment_is_refused(missing):
    p, opt = _stepped((5, 7))
    saved = copy.deepcopy(opt.state_dict())
    del saved["state"][0][missing]
    with _refused(opt, f"param 0 has no '{missing}'"):
        opt.load_state_dict(saved)
    # torch.optim.Adam refuses such a state too (at its step).
    _assert_torch_step_refuses(p, saved, KeyError)


def test_state_without_a_moment_is_refused_by_the_step():
    p, opt = _stepped((5, 7))
    del opt.state[p]["exp_avg_sq"]
    p.grad = _grad(p)
    with _refused(opt, "param 0.0 has no 'exp_avg_sq'"):
        opt.step()


# --------------------------------------------------------------------------------------
# GradScaler without grads, the meta device.

def test_grad_scaler_step_without_grads_is_a_no_op_as_in_torch():
    results = []
    for make in (lambda ps: torch.optim.Adam(ps, fused=True), adamx.Adam):
        p = _param((3, 4))
        opt = make([p])
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(p.sum())  # a loss was scaled, but no param got a grad
        scaler.step(opt)  # (its update() would then refuse, for both: no inf checks)
        results.append((p.detach().clone(), len(opt.state)))
    (p_torch, n_torch), (p_ours, n_ours) = results
    assert torch.equal(p_torch, p_ours)
    assert n_torch == n_ours == 0


@pytest.mark.parametrize("kwargs", [{}, dict(amsgrad=True), dict(capturable=False,
                                                                  weight_decay=0.1)])
def test_meta_device_step_counts_advance_as_in_torch(kwargs):
    counts = []
    for cls in (torch.optim.Adam, adamx.Adam):
        p = torch.empty(3, 4, device="meta", requires_grad=True)
        opt = cls([p], **kwargs)
        for _ in range(3):
            p.grad = torch.empty_like(p)
            opt.step()
        counts.append((float(opt.state[p]["step"]), opt.state[p]["step"].device,
                       sorted(opt.state[p])))
    assert counts[0] == counts[1]


# --------------------------------------------------------------------------------------
# add_param_group and load_state_dict: all or nothing.

@pytest.mark.parametrize("group", [
    dict(state_dtype="int4"),
    dict(state_dtype="int8", amsgrad=True),
    dict(state_dtype="bfloat16", dtype=torch.bfloat16),  # bf16 params need master copies
])
def test_add_param_group_that_is_refused_changes_nothing(group):
    group = dict(group)
    dtype = group.pop("dtype", torch.float32)
    p, opt = _stepped()
    with _refused(opt):
        opt.add_param_group(dict(group, params=[_param(dtype=dtype, seed=5)]))


def test_add_param_group_reads_an_iterator_once():
    p, q = _param((3,)), _param((4,))
    opt = adamx.Adam([p])
    opt.add_param_group({"params": iter([q])})
    assert opt.param_groups[1]["params"] == [q]


def test_load_state_dict_that_is_refused_changes_nothing():
    """The second group's options are refused after the first group's state would fit:
    nothing is loaded."""
    a, b = _param((5,)), _param((6,))
    opt = adamx.Adam([{"params": [a]}, {"params": [b]}])
    _steps(opt, [a, b])
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = 0.5
    saved["state"][0]["exp_avg"].fill_(3.0)
    saved["param_groups"][1]["state_dtype"] = "int4"
    with _refused(opt, "state_dtype must be one of"):
        opt.load_state_dict(saved)


# --------------------------------------------------------------------------------------
# Group keys and options as torch keeps them.

def test_state_dict_group_keys_are_torchs_after_groups_move():
    a, b, c = _param((3,)), _param((4,)), _param((5,))
    ours = adamx.Adam([{"params": [a]}, {"params": [b]}], lr=0.01)
    theirs = torch.optim.Adam([{"params": [a]}, {"params": [b]}], lr=0.01)
    for opt in (ours, theirs):
        opt.add_param_group({"params": [c]})
        opt.param_groups.reverse()  # groups shifted: each one keeps its seed
    keys = [set(g) for g in ours.state_dict()["param_groups"]]
    assert keys == [set(g) for g in theirs.state_dict()["param_groups"]]
    # A seed given is kept; one set later too.
    ours.param_groups[0]["seed"] = 123
    assert ours.state_dict()["param_groups"][0]["seed"] == 123
    seeded = adamx.Adam([a], seed=5)
    assert seeded.state_dict()["param_groups"][0]["seed"] == 5


def test_tensor_betas_stay_tensors_and_mixed_betas_are_refused():
    p = _param((3,))
    opt = adamx.Adam([p], betas=(torch.tensor([[0.8]]), torch.tensor(0.9)))
    assert all(torch.is_tensor(b) and b.dim() == 0 for b in opt.param_groups[0]["betas"])
    ref = adamx.Adam([q := p.detach().clone().requires_grad_()], betas=(0.8, 0.9))
    _steps(opt, [p])
    _steps(ref, [q])
    assert torch.equal(p, q)
    for betas in ((0.9, torch.tensor(0.99)), (torch.tensor(0.9), 0.99)):
        with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
            adamx.Adam([p], betas=betas)


def test_complex_params_step_as_torch():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 3, dtype=torch.complex64, generator=g)
    grads = [torch.randn(5, 3, dtype=torch.complex64, generator=g) for _ in range(4)]
    ours, theirs = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    opt = adamx.Adam([ours], weight_decay=0.1, amsgrad=True)
    ref = torch.optim.Adam([theirs], weight_decay=0.1, amsgrad=True, foreach=False)
    for grad in grads:
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours, theirs)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert opt.state[ours][key].dtype == torch.complex64
        torch.testing.assert_close(opt.state[ours][key], ref.state[theirs][key])


# --------------------------------------------------------------------------------------
# Random sequences of events (hypothesis' stateful testing): step, save and load, change
# options, move a param to another layout, offer a checkpoint or a group that must be
# refused. After every step each state fits the contract as it is; a step count is the
# number of steps its param took; whatever is refused leaves the optimizer as it was.

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

from adamx import _state  # noqa: E402


class OptimizerEvents(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.big = _param((64, 80), seed=11)  # compact moments
        self.small = _param((7,), seed=12)  # float32 moments in any group
        self.opt = adamx.Adam([{"params": [self.big]}, {"params": [self.small]}],
                              state_dtype="int8")
        self.steps = 0
        self.stepped = False  # no option changed since the last step

    @rule(seed=st.integers(0, 1000))
    def step(self, seed):
        _steps(self.opt, [self.big, self.small], count=1, seed=seed)
        self.steps += 1
        self.stepped = True

    @rule(value=st.sampled_from(["float32", "bfloat16", "int8", torch.int8, torch.bfloat16,
                                 torch.float32]))
    def set_state_dtype(self, value):
        self.opt.param_groups[0]["state_dtype"] = value
        self.stepped = False

    @rule(value=st.sampled_from(["int4", "float16", torch.float16, None]))
    def refused_state_dtype(self, value):
        group = self.opt.param_groups[0]
        previous = group["state_dtype"]
        group["state_dtype"] = value
        self.big.grad, self.small.grad = _grad(self.big), _grad(self.small)
        with _refused(self.opt, "state_dtype must be one of"):
            self.opt.step()
        group["state_dtype"] = previous

    @rule()
    def transpose_layout(self):
        self.big.data = self.big.data.t().contiguous().t()
        self.stepped = False

    @rule()
    def save_and_load(self):
        saved = copy.deepcopy(self.opt.state_dict())
        self.opt.load_state_dict(saved)

    @precondition(lambda self: self.steps > 0)
    @rule(how=st.sampled_from(["drop moment", "shape", "scales", "state_dtype"]))
    def refused_checkpoint(self, how):
        saved = copy.deepcopy(self.opt.state_dict())
        state = saved["state"][0]
        keys = [k for k in ("exp_avg", "exp_avg_codes") if k in state]
        if how == "drop moment":
            del state[keys[0]]
        elif how == "shape":
            state[keys[0]] = state[keys[0]][:1]
        elif how == "scales":
            if "code_scales" not in state:
                return
            state["code_scales"] = state["code_scales"][:, :1]
        else:
            saved["param_groups"][1]["state_dtype"] = "int4"
        with _refused(self.opt):
            self.opt.load_state_dict(saved)

    @rule(group=st.sampled_from([dict(state_dtype="int4"),
                                 dict(state_dtype="int8", amsgrad=True)]))
    def refused_group(self, group):
        with _refused(self.opt):
            self.opt.add_param_group(dict(group, params=[_param((3,), seed=13)]))

    @invariant()
    def state_fits_after_a_step(self):
        if not self.stepped or self.steps == 0:
            return
        for group in self.opt.param_groups:
            for p in group["params"]:
                state = self.opt.state[p]
                assert _state._fits(p, state, _state.spec(p, group))
                assert float(state["step"]) == self.steps


TestOptimizerEvents = OptimizerEvents.TestCase
TestOptimizerEvents.settings = settings(max_examples=50, stateful_step_count=15,
                                        deadline=None)


def test_moments_in_another_float_dtype_are_widened_not_narrowed():
    p, opt = _stepped((5, 7))
    state = opt.state[p]
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = state[key].half()  # widened exactly
    _steps(opt, [p])
    assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float32
    for key in ("exp_avg", "exp_avg_sq"):
        opt.state[p][key] = opt.state[p][key].double()
    p.grad = _grad(p)
    with _refused(opt, "exp_avg in torch.float64"):
        opt.step()
