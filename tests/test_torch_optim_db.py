"""torch's own test inputs for Adam and AdamW, driving adamx.

``torch.testing._internal.common_optimizers.optim_db`` holds, per optimizer, the
configurations torch's optimizer tests run (``optim_inputs_func``, with the global flags
``foreach``/``fused``/``differentiable`` added as torch's helper adds them) and the inputs
that must fail (``optim_error_inputs_func``). Each Adam/AdamW entry runs here against
adamx, compared with torch.optim on the same params and grads: the trajectory, the state,
the ``state_dict`` (torch's keys exactly), checkpoints both ways, and the errors.

adamx's documented differences, and nothing else, are left out:
  * ``differentiable=True`` is not supported (the fused step updates in place, outside
    autograd): those configurations are dropped, and adamx's refusal is tested;
  * ``foreach`` and ``fused`` are accepted and ignored (every step is fused): adamx gets
    them as given, the reference is torch's for-loop step, and error inputs that torch
    raises only because of ``foreach=True`` are skipped, saying so.
"""

import copy
import warnings

import pytest
import torch

import adamx
from conftest import TOL, needs_build, save_and_load

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")

pytestmark = needs_build

ENTRIES = [info for info in common_optimizers.optim_db
           if info.optim_cls in (torch.optim.Adam, torch.optim.AdamW)]
OURS = {torch.optim.Adam: adamx.Adam, torch.optim.AdamW: adamx.AdamW}
DTYPES = [torch.float32, torch.float64, torch.complex64]
DEVICE = "cpu"
STEPS = 5


def _configs():
    cases = []
    for info in ENTRIES:
        for dtype in DTYPES:
            if dtype.is_complex and not info.supports_complex:
                continue
            inputs = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs(
                DEVICE, dtype, info, skip=("differentiable",))
            for optim_input in inputs:
                cases.append(pytest.param(
                    info.optim_cls, dtype, optim_input.kwargs,
                    id=f"{info.name}-{str(dtype)[6:]}-{optim_input.desc}"))
    return cases


CONFIGS = _configs()


def _tol(dtype):
    return TOL[torch.float32 if dtype == torch.complex64 else dtype]


def _params(dtype, seed=0):
    """A weight and a bias, as torch's optimizer tests use."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(10, 5, dtype=dtype, generator=g)
    bias = torch.randn(10, dtype=dtype, generator=g)
    return [torch.nn.Parameter(weight), torch.nn.Parameter(bias)]


def _groups(params, layout):
    if layout == "one group":
        return params
    # a second group with options of its own, as torch's test_param_groups_* build them
    return [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.003, "weight_decay": 0.2}]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]


def _reference_kwargs(kwargs):
    """The configuration torch's for-loop step runs as the reference."""
    return dict({k: v for k, v in kwargs.items() if k not in ("foreach", "fused")},
                foreach=False)


def _make(torch_cls, dtype, kwargs, layout, seed=0):
    ours_params, theirs_params = _params(dtype, seed), _params(dtype, seed)
    ours = OURS[torch_cls](_groups(ours_params, layout), **copy.deepcopy(kwargs))
    theirs = torch_cls(_groups(theirs_params, layout), **_reference_kwargs(kwargs))
    return ours, ours_params, theirs, theirs_params


def _run(opt, params, steps):
    for k in steps:
        for p, g in zip(params, _grads(params, k)):
            p.grad = g
        opt.step()


def _assert_same(ours, ours_params, theirs, theirs_params, dtype):
    tol = _tol(dtype)
    for p, q in zip(ours_params, theirs_params):
        torch.testing.assert_close(p, q, **tol)
        mine, ref = ours.state[p], theirs.state[q]
        assert mine.keys() == ref.keys()
        for key, value in ref.items():
            if key == "step":
                assert float(mine[key]) == float(value)
                assert mine[key].dtype == value.dtype and mine[key].device == value.device
            else:
                assert mine[key].dtype == value.dtype, key
                torch.testing.assert_close(mine[key], value, **tol)


@pytest.mark.parametrize("layout", ["one group", "two groups"])
@pytest.mark.parametrize("torch_cls, dtype, kwargs", CONFIGS)
def test_steps_match_torch(torch_cls, dtype, kwargs, layout):
    ours, ours_params, theirs, theirs_params = _make(torch_cls, dtype, kwargs, layout)
    _run(ours, ours_params, range(STEPS))
    _run(theirs, theirs_params, range(STEPS))
    _assert_same(ours, ours_params, theirs, theirs_params, dtype)


@pytest.mark.parametrize("torch_cls, dtype, kwargs", CONFIGS)
def test_state_dict_is_torchs_and_loads_both_ways(torch_cls, dtype, kwargs):
    ours, ours_params, theirs, theirs_params = _make(torch_cls, dtype, kwargs, "two groups")
    _run(ours, ours_params, range(3))
    _run(theirs, theirs_params, range(3))
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    # torch's group keys exactly (values too, but for the flags adamx ignores)
    for g_ours, g_theirs in zip(sd_ours["param_groups"], sd_theirs["param_groups"]):
        assert g_ours.keys() == g_theirs.keys()
        for key, value in g_theirs.items():
            if key not in ("foreach", "fused"):
                assert g_ours[key] == value if not torch.is_tensor(value) else \
                    torch.equal(g_ours[key], value), key
    assert sd_ours["state"].keys() == sd_theirs["state"].keys()
    for key, state in sd_theirs["state"].items():
        assert sd_ours["state"][key].keys() == state.keys()

    # adamx's checkpoint into torch, and torch's into adamx: both go on as the other would
    for source, target_cls, direction in ((sd_ours, torch_cls, "adamx->torch"),
                                          (sd_theirs, OURS[torch_cls], "torch->adamx")):
        params = [p.detach().clone().requires_grad_() for p in ours_params]
        cls_kwargs = _reference_kwargs(kwargs) if target_cls is torch_cls else kwargs
        target = target_cls(_groups(params, "two groups"), **copy.deepcopy(cls_kwargs))
        loaded = save_and_load(source)
        if target_cls is torch_cls:
            # The flags adamx ignores are the user's, kept in its groups; torch would honour
            # them (its fused step takes no complex params): the reference's instead.
            for group in loaded["param_groups"]:
                group.update(fused=None, foreach=False)
        target.load_state_dict(loaded)
        _run(target, params, range(3, 5))
        straight = [p.detach().clone().requires_grad_() for p in ours_params]
        continued = torch_cls(_groups(straight, "two groups"), **_reference_kwargs(kwargs))
        continued.load_state_dict(save_and_load(sd_theirs))
        _run(continued, straight, range(3, 5))
        for p, q in zip(params, straight):
            torch.testing.assert_close(p, q, **_tol(dtype), msg=direction)


@pytest.mark.parametrize("torch_cls, dtype, kwargs", CONFIGS[:1])
def test_groups_added_and_moved_keep_torchs_keys(torch_cls, dtype, kwargs):
    ours, ours_params, theirs, theirs_params = _make(torch_cls, dtype, kwargs, "one group")
    for opt, params in ((ours, ours_params), (theirs, theirs_params)):
        extra = torch.nn.Parameter(torch.randn(3, dtype=dtype))
        opt.add_param_group({"params": [extra], "lr": 0.01})
        opt.param_groups.insert(0, opt.param_groups.pop())  # the new group first
        _run(opt, params + [extra], range(2))
    keys = [g.keys() for g in ours.state_dict()["param_groups"]]
    assert keys == [g.keys() for g in theirs.state_dict()["param_groups"]]


def _error_cases():
    cases = []
    for info in ENTRIES:
        for error in info.optim_error_inputs_func(DEVICE, torch.float32):
            kwargs = error.optimizer_error_input.kwargs
            marks = []
            if kwargs.get("foreach"):
                marks.append(pytest.mark.skip(
                    reason="adamx ignores foreach (every step is fused): torch refuses this "
                           "only for its foreach implementation"))
            cases.append(pytest.param(info.optim_cls, error, marks=marks,
                                      id=f"{info.name}-{error.optimizer_error_input.desc}"))
    return cases


@pytest.mark.parametrize("torch_cls, error", _error_cases())
def test_error_inputs_as_torch(torch_cls, error):
    optim_input = error.optimizer_error_input
    cls = OURS[torch_cls]
    params, kwargs = optim_input.params, optim_input.kwargs
    if error.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR:
        if issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type, match=error.error_regex):
                cls(params, **kwargs)
        else:
            with pytest.raises(error.error_type, match=error.error_regex):
                cls(params, **kwargs)
    else:
        opt = cls(params, **kwargs)
        with pytest.raises(error.error_type, match=error.error_regex):
            opt.step()


@pytest.mark.parametrize("torch_cls", [info.optim_cls for info in ENTRIES],
                         ids=[info.name for info in ENTRIES])
def test_differentiable_is_refused(torch_cls):
    with pytest.raises(RuntimeError, match="differentiable=True"):
        OURS[torch_cls](_params(torch.float32), differentiable=True)


@pytest.mark.parametrize("torch_cls", [info.optim_cls for info in ENTRIES],
                         ids=[info.name for info in ENTRIES])
def test_step_without_grads_and_on_the_meta_device(torch_cls):
    """No grads: nothing changes and no state is made. Meta params: step counts advance
    as torch's do."""
    for device in ("cpu", "meta"):
        params = {}
        for name, cls in (("torch", torch_cls), ("adamx", OURS[torch_cls])):
            p = torch.nn.Parameter(torch.ones(4, 3, device=device))
            opt = cls([p])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
                assert len(opt.state) == 0
                p.grad = torch.ones_like(p)
                opt.step()
                opt.step()
            params[name] = (p.detach().clone(), float(opt.state[p]["step"]))
        if device == "cpu":
            torch.testing.assert_close(params["adamx"][0], params["torch"][0])
        assert params["adamx"][1] == params["torch"][1] == 2
