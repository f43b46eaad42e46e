"""Independent noise (issue #22, part 3). The random bits of stochastic rounding (bfloat16
params, compact moments) are a hash of the group's seed, the param's identity (the op's
param_ids: adamx.Adam gives each param its index in the optimizer, as state_dict numbers
it), the step count and the element's index in the whole param (the op's element_offsets
count a shard's elements from its place there). So:

- a param's bits do not depend on the op call, list position or other params' grads;
- two params, or two optimizers, never share a stream: equal values round alike only as
  often as independent draws do;
- a param stepped in pieces, each with its offset, rounds as the whole param does.

adamx._compact mirrors the ids and offsets (test_lean_state.py checks the kernels against
it with offsets across a multiple of 2^32; test_kernel_cases.py checks every backend with
them). FSDP2 on 2 gloo ranks against the unsharded run: test_distributed.py
(sharded_rounding).
"""

import pytest
import torch

import adamx
from conftest import BACKENDS, KERNEL_CASES, OpState, case_id, needs_build, op_hyper, same_bits

pytestmark = needs_build

N = 8192
# Two independent stochastic roundings of one value that lies a fraction q of the way up
# its gap agree with probability q^2 + (1 - q)^2 (1/2 to 1, depending on the values);
# identical bits agree on every element. So a pair of results is compared with a control
# pair, drawn with a seed of its own: the two agree as often, within 0.03 (over 8192
# elements, more than 4 standard deviations of the difference).
TOLERANCE = 0.03


def _agreement(a, b):
    return (a.reshape(-1) == b.reshape(-1)).double().mean().item()


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=g), torch.randn(N, generator=g)


def _assert_independent(a, b, control, what):
    """`a` and `b` (rounded from equal values) agree as often as `a` and `control` (the
    same value rounded with another seed's bits) do."""
    rate, independent = _agreement(a, b), _agreement(a, control)
    assert abs(rate - independent) < TOLERANCE and independent < 0.9, \
        f"{what}: equal values agree on {rate:.3f}, independent draws on {independent:.3f}"


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_params_of_one_group_draw_streams_of_their_own(state_dtype):
    """A float32 param and a bfloat16 one with a master copy, holding the same values, are
    stepped in two op calls (master copies apart). Each call counted its params from 0, so
    their compact moments rounded alike on every element."""
    values, grad = _data(0)
    grad = grad.to(torch.bfloat16).float()  # the same grads exactly, too
    key = "exp_avg_codes" if state_dtype == "int8" else "exp_avg"

    def run(seed):
        reduced = torch.nn.Parameter(values.to(torch.bfloat16))
        plain = torch.nn.Parameter(reduced.detach().float())  # the same values exactly
        opt = adamx.Adam([plain, reduced], lr=0.01, master_weights=True,
                         state_dtype=state_dtype, seed=seed)
        moments = []
        for _ in range(2):  # the first step makes the state (Python), the second is C++'s
            plain.grad, reduced.grad = grad.clone(), grad.to(torch.bfloat16)
            opt.step()
            moments.append((opt.state[plain][key].clone(), opt.state[reduced][key].clone()))
        return moments

    for step, ((plain, reduced), (control, _)) in enumerate(zip(run(4), run(5))):
        _assert_independent(plain, reduced, control, f"step {step + 1}")


@pytest.mark.parametrize("groups", [1, 2])
def test_a_params_bits_do_not_depend_on_other_params_grads(groups):
    """Param b's rounding is the same whether or not the param before it has a grad (its
    position among the params with grads used to key it), in one group or two."""
    def run(a_has_grad):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(N).to(torch.bfloat16))
        b = torch.nn.Parameter(torch.randn(N).to(torch.bfloat16))
        params = [{"params": [a]}, {"params": [b]}] if groups == 2 else [a, b]
        opt = adamx.Adam(params, lr=0.1, stochastic_rounding=True, seed=8)
        for _ in range(3):  # both the Python step and the C++ one
            a.grad, b.grad = (torch.randn(N).to(torch.bfloat16) for _ in range(2))
            if not a_has_grad:
                a.grad = None
            opt.step()
        return b.detach().clone()

    assert same_bits(run(True), run(False))


def test_optimizers_and_params_round_independently():
    """Two optimizers built one after the other draw their seeds from torch's generator;
    equal params in each, or two equal params in one, round independently."""
    values, grad = _data(1)
    torch.manual_seed(5)
    twins = [torch.nn.Parameter(values.to(torch.bfloat16)) for _ in range(5)]
    first = adamx.Adam(twins[:2], lr=0.1, stochastic_rounding=True)
    second = adamx.Adam(twins[2:4], lr=0.1, stochastic_rounding=True)
    control = adamx.Adam(twins[4:], lr=0.1, stochastic_rounding=True, seed=12345)
    for p in twins:
        p.grad = grad.to(torch.bfloat16)
    for opt in (first, second, control):
        opt.step()
    _assert_independent(twins[0], twins[1], twins[4], "two params of one optimizer")
    _assert_independent(twins[0], twins[2], twins[4], "the first params of two optimizers")


def test_loaded_codes_are_encoded_with_each_params_bits():
    """Loading float32 moments into an 8-bit optimizer encodes them with each param's
    stream (it encoded every param with the stream of param 0)."""
    values, grad = _data(2)
    params = [torch.nn.Parameter(values.clone()) for _ in range(2)]
    source = adamx.Adam(params, lr=0.01)
    for p in params:
        p.grad = grad.clone()
    source.step()
    codes = []
    for seed in (3, 4):
        lean = adamx.Adam(params, lr=0.01, state_dtype="int8", seed=seed)
        lean.load_state_dict(source.state_dict())
        codes.append([lean.state[p]["exp_avg_sq_codes"] for p in params])
    _assert_independent(codes[0][0], codes[0][1], codes[1][0], "loaded codes")


# The kernel cases that draw random bits: bfloat16 params rounded stochastically, compact
# moments.
RANDOM_CASES = [c for c in KERNEL_CASES
                if c["stochastic_rounding"] or c["state_dtype"] != "float32"]
WHOLE = 3000
CUT = 1280  # a multiple of the 256-element blocks of 8-bit codes, as shards of them are
# Element 2^32 of the stream falls mid-vector and mid-block of codes in the first piece.
OFFSET = 2**32 - 1000


def _pieces(state, cut):
    """`state` (one 1-D param) as two params: elements [0, cut) and [cut, end)."""
    out = OpState.__new__(OpState)
    out.__dict__.update(state.__dict__)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params"):
        setattr(out, name, [piece.clone() for t in getattr(state, name)
                            for piece in (t[:cut], t[cut:])])
    out.steps = [state.steps[0].clone(), state.steps[0].clone()]
    blocks = cut // adamx._compact.KCODE_BLOCK
    out.code_scales = [piece.clone() for s in state.code_scales
                       for piece in (s[:, :blocks], s[:, blocks:])]
    return out


def _joined(pieces, name):
    parts = getattr(pieces, name)
    if name == "code_scales":
        return [torch.cat(parts, dim=1)] if parts else []
    return [torch.cat(parts)] if parts else []


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", RANDOM_CASES, ids=[case_id(c) for c in RANDOM_CASES])
def test_a_param_in_pieces_rounds_as_the_whole(case, backend):
    """One param stepped whole, and stepped as two pieces (two params of one call, with the
    whole's id and each piece's offset in it): the same bits. Every ISA on the CPU."""
    isas = adamx.supported_cpu_capabilities() if backend == "cpu" else [None]
    dtype = getattr(torch, case["param_dtype"])
    g = torch.Generator().manual_seed(6)
    grads = [(torch.randn(WHOLE, generator=g) * 4).to(dtype) for _ in range(3)]
    hyper = op_hyper(amsgrad=case["amsgrad"], stochastic_rounding=case["stochastic_rounding"])
    scale = torch.tensor(2.0) if case["unscale_grad"] else None
    start = OpState.of_case(case, [(WHOLE,)], seed=9)
    for isa in isas:
        if isa is not None:
            adamx.set_cpu_capability(isa)
        whole, pieces = start.clone(), _pieces(start, CUT)
        for grad in grads:
            BACKENDS[backend](*whole.lists([grad.clone()]), **hyper, **whole.operands(),
                              grad_scale=scale, seed=21, param_ids=[77],
                              element_offsets=[OFFSET])
            BACKENDS[backend](*pieces.lists([grad[:CUT].clone(), grad[CUT:].clone()]),
                              **hyper, **pieces.operands(), grad_scale=scale, seed=21,
                              param_ids=[77, 77], element_offsets=[OFFSET, OFFSET + CUT])
        for name in ("params", "exp_avgs", "exp_avg_sqs", "master_params", "code_scales"):
            for got, want in zip(_joined(pieces, name), getattr(whole, name)):
                assert same_bits(got, want), f"{isa}: {name} differ"


def test_stream_arguments_are_checked_before_anything_is_written():
    p = torch.randn(8).to(torch.bfloat16)
    state = OpState([p], amsgrad=False)
    before = [t.clone() for t in state.tensors()]
    grad = [torch.randn(8).to(torch.bfloat16)]
    hyper = op_hyper(stochastic_rounding=True)
    for bad, message in [(dict(param_ids=[1, 2]), "got 1 params but 2 param_ids"),
                         (dict(element_offsets=[]), "got 1 params but 0 element_offsets"),
                         (dict(param_ids=[-1]), r"param_ids\[0\] is -1"),
                         (dict(param_ids=[2**32]), r"in \[0, 2\^32\)"),
                         (dict(element_offsets=[-5]), r"element_offsets\[0\] is -5"),
                         (dict(element_offsets=[2**63 - 4]), "room for its 8 elements")]:
        with pytest.raises(ValueError, match=message):
            torch.ops.adamx.adam_(*state.lists(grad), **hyper, **bad)
        assert all(same_bits(a, b) for a, b in zip(state.tensors(), before)), bad
