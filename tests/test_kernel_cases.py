"""Every kernel the module has, on every backend: the one table of cases.

The cases come from the compiled module, not from this file: conftest.KERNEL_CASES
(adamx._C.KERNEL_CASES: param dtype, how moments are stored, the compile-time switches)
and conftest.RUNTIME_GRID (every combination of adamx._C.RUNTIME_SWITCHES, the flags every
kernel reads). A switch, dtype or state kind added to the C++ list is run here, on every
backend, without a test edit. For each case:
- every backend (conftest.BACKENDS) writes the CPU kernel's bits, for every combination of
  the run-time switches: params, grads, moments, master copies, 8-bit codes and scales,
  step counts;
- each run-time switch changes the step (a flag that the kernels never read fails);
- the CPU kernel follows the float64 reference (conftest.RefAdam), where the case's state
  is torch's layout (compact moments have their own bitwise checks, test_lean_state.py),
  for the switches RefAdam implements (conftest.REFERENCE_SWITCHES: a new switch is
  compared with it once RefAdam learns its formula).
"""

import pytest
import torch

from conftest import (BACKENDS, KERNEL_CASES, LR, REFERENCE_SWITCHES, RUNTIME_GRID,
                      RUNTIME_SWITCHES, TOL, OpState, RefAdam, assert_bitwise, assert_close,
                      case_id, make_grad_seq, needs_build, op_hyper, same_bits)

pytestmark = needs_build

# A scalar, an empty tensor, one shorter than a vector, one that spans chunks and 8-bit
# code blocks (256 elements) of the small geometries, and a 2-D one.
SHAPES = [(), (0,), (7,), (1031,), (17, 33)]
STEPS = 3
GRAD_SCALE = 4.0  # a power of two: scaled grads are exact, so the unscaled step is too
PARAM_SEED = 3
# The params' random streams (the op's param_ids and element_offsets): ids of their own, and
# offsets that put a multiple of 2^32 inside three of them (mid-vector, as a shard's may).
STREAMS = dict(param_ids=[4, 8, 15, 16, 23],
               element_offsets=[5, 0, 2**32 - 3, 2**32 - 517, 2**41 - 100])
CASE_IDS = [case_id(c) for c in KERNEL_CASES]


def _grads(case):
    """grads[k]: the grads of step k (times GRAD_SCALE when the case unscales them)."""
    scale = GRAD_SCALE if case["unscale_grad"] else 1.0
    dtype = getattr(torch, case["param_dtype"])
    return [[(g.double() * scale).to(dtype) for g in step]
            for step in make_grad_seq(SHAPES, dtype, STEPS, seed=11)]


def _run(backend, case, flags, eps=1e-8):
    """STEPS steps of `case` with the run-time switches `flags` on `backend`: the state
    and the grads of the last step as the op left them."""
    state = OpState.of_case(case, SHAPES, seed=PARAM_SEED)
    hyper = op_hyper(weight_decay=0.1, eps=eps, amsgrad=case["amsgrad"],
                     stochastic_rounding=case["stochastic_rounding"], **flags)
    scale = torch.tensor(GRAD_SCALE) if case["unscale_grad"] else None
    for grads in _grads(case):
        BACKENDS[backend](*state.lists(grads), **hyper, **state.operands(), grad_scale=scale,
                          seed=17, **STREAMS)
    return state, grads


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
def test_every_backend_writes_the_cpu_kernels_bits(case, backend):
    for flags in RUNTIME_GRID:
        want, want_grads = _run("cpu", case, flags)
        got, got_grads = _run(backend, case, flags)
        assert_bitwise(got, want, f"{backend} {flags}")
        for i, (a, b) in enumerate(zip(got_grads, want_grads)):
            assert same_bits(a, b), f"{backend} {flags}: grad {i}"


@pytest.mark.parametrize("switch", RUNTIME_SWITCHES)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
def test_every_runtime_switch_changes_the_step(case, switch):
    # (a large eps, so that where it sits moves even a bfloat16 param)
    off, _ = _run("cpu", case, {}, eps=0.1)
    on, _ = _run("cpu", case, {switch: True}, eps=0.1)
    assert not all(same_bits(a, b) for a, b in zip(on.params, off.params) if a.numel()), \
        f"{switch}=True left every param as {switch}=False does"


# The kernels with moments in torch's layout, rounded to nearest (RefAdam's stores).
NEAREST_CASES = [c for c in KERNEL_CASES
                 if c["state_dtype"] == "float32" and not c["stochastic_rounding"]]


@pytest.mark.parametrize("case", NEAREST_CASES, ids=[case_id(c) for c in NEAREST_CASES])
def test_cpu_kernel_follows_the_float64_reference(case):
    """Plain and master-copy cases (the moments in torch's layout), rounded to nearest;
    the reference runs on the master copy, in float32, where there is one."""
    dtype = getattr(torch, case["param_dtype"])
    known = [f for f in RUNTIME_GRID
             if all(k in REFERENCE_SWITCHES for k, on in f.items() if on)]
    grad_seq = _grads(case)
    for flags in known:
        state, _ = _run("cpu", case, flags)
        start = OpState.of_case(case, SHAPES, seed=PARAM_SEED)
        stored = torch.float32 if case["master_weights"] else dtype
        ref = RefAdam(start.master_params or start.params, stored, lr=LR, weight_decay=0.1,
                      amsgrad=case["amsgrad"],
                      **{REFERENCE_SWITCHES[k]: on for k, on in flags.items() if on})
        for grads in grad_seq:
            ref.step(grads, grad_scale=GRAD_SCALE if case["unscale_grad"] else None)
        mine = dict(exp_avg=state.exp_avgs, exp_avg_sq=state.exp_avg_sqs,
                    max_exp_avg_sq=state.max_exp_avg_sqs)
        for i, p in enumerate(state.master_params or state.params):
            assert_close(p, ref.p[i], TOL[stored], f"{flags} param {i}")
            for key, value in ref.state_of(i).items():
                assert_close(mine[key][i], value, TOL[stored], f"{flags} {key} {i}")
        for p, master in zip(state.params, state.master_params):
            assert same_bits(p, master.to(dtype)), "a param is not its master copy's rounding"

