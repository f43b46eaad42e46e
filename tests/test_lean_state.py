"""Compact (lean) optimizer state: bfloat16 moments and 8-bit codes (state_dtype).

The kernels are checked bitwise against what they must compute: the plain float32 kernel
run on the decoded moments (the param update uses the new moments before they are stored,
so its result must be the plain kernel's exactly), and the new moments encoded by
adamx._compact (a pure-torch mirror of the header's codes and random bits, tested on its
own in test_compact_codes.py). Then the optimizer: memory, small params, refusals, the
stall that stochastic rounding prevents, checkpoints, and training quality against
float32 state.
"""

import itertools

import pytest
import torch

import adamx
from adamx import _compact
from conftest import BACKENDS, OpState

pytestmark = pytest.mark.skipif(not adamx.is_compiled(), reason="needs the compiled kernels")

HYPER = dict(lr=0.03, beta1=0.9, beta2=0.999, eps=1e-8)
# Sizes in one op call: whole blocks of codes, partial last blocks, a tensor split between
# two threads (over 32K elements), one element, none.
SIZES = (4096, 5000, 257, 1, 0, 70001)
# (state kind, param dtype, master weights, stochastic rounding of the param): every
# combination that has a kernel.
CONFIGS = [("bfloat16", torch.float32, False, False),
           ("bfloat16", torch.bfloat16, True, False),
           ("int8", torch.float32, False, False),
           ("int8", torch.bfloat16, True, False),
           ("int8", torch.bfloat16, False, False),
           ("int8", torch.bfloat16, False, True)]
CONFIG_IDS = ["-".join([k, str(d).split(".")[1]] + (["master"] if m else [])
                       + (["sr"] if sr else [])) for k, d, m, sr in CONFIGS]
SWITCH_GRID = [dict(maximize=a, decoupled_weight_decay=b, eps_inside_sqrt=c, weight_decay=wd)
               for a, b, c, wd in itertools.product([False, True], [False, True],
                                                    [False, True], [0.0, 0.1])]


# The random streams of a LeanCase's params (the op's param_ids and element_offsets): ids
# of their own, and offsets that put a multiple of 2^32 inside a tensor (mid-vector, mid
# block of codes: the 5000- and 70001-element SIZES), as a shard's may.
PARAM_IDS = tuple(7 + 5 * i for i in range(len(SIZES)))
ELEMENT_OFFSETS = (0, 2**32 - 517, 12345, 2**40 + 3, 7, 2**33 - 1000)


def _encode(kind, x, which, key, offset=0):
    """Moment ``x`` (float32) stored as ``kind`` with the random stream ``key`` from element
    ``offset`` on."""
    key = _compact.moment_key(key)
    if kind == "bfloat16":
        return _compact.stochastic_bf16(x, key, which, offset), None
    return _compact.encode_codes(x, which == 0, key, offset)


def _decode(kind, stored, scales, which):
    """Moment ``stored`` as ``kind`` decoded to float32 (``scales``: its [2, blocks] code
    scales, for "int8")."""
    if kind == "bfloat16":
        return stored.float()
    return _compact.decode_codes(stored, scales[which], signed=which == 0)


class LeanCase(OpState):
    """One op call's tensors with compact moments, made from a generator seed: the OpState
    of `config` (state kind, param dtype, master weights, stochastic rounding: a CONFIGS
    entry) with random params, master copies (with master weights) and moments (encoded
    as the kind stores them), the call's grads, which clone() copies and tensors() lists
    with the state, and the params' random streams (PARAM_IDS, ELEMENT_OFFSETS)."""

    _LISTS = OpState._LISTS + ("grads",)

    def __init__(self, config, sizes=SIZES, seed=0, step=4.0):
        kind, self.dtype, master, self.sr = config
        gen = torch.Generator().manual_seed(seed)
        params, grads, masters, moments = [], [], [], []
        for n in sizes:
            p = torch.randn(n, generator=gen)
            params.append(p.to(self.dtype))
            grads.append(torch.randn(n, generator=gen).to(self.dtype))
            masters.append(p)  # the param is its rounding; kept with master weights
            # Moments with a wide dynamic range, as in training.
            m = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 2)
            v = torch.rand(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
            v[::37] = 0  # exp_avg_sq's code 0 (its floor) in every block
            moments.append((m * 0.01, v * 1e-4))
        super().__init__(params, amsgrad=False, steps=[step] * len(sizes),
                         master_weights=master, state_dtype=kind)
        self.grads = grads
        self.param_ids = [PARAM_IDS[i % len(PARAM_IDS)] for i in range(len(sizes))]
        self.element_offsets = [ELEMENT_OFFSETS[i % len(ELEMENT_OFFSETS)]
                                for i in range(len(sizes))]
        if master:
            self.master_params = masters
        for i, (m, v) in enumerate(moments):
            self._store(i, m, v, key=1000 + i)

    def _store(self, i, m, v, key):
        """Moments i (float32) stored as this state stores them, with the random stream
        ``key``: the moments, and for "int8" their code scales."""
        offset = self.element_offsets[i]
        self.exp_avgs[i], ms = _encode(self.state_dtype, m, 0, key, offset)
        self.exp_avg_sqs[i], vs = _encode(self.state_dtype, v, 1, key, offset)
        if ms is not None:
            self.code_scales[i] = torch.stack([ms, vs])

    def kwargs(self, seed, switches, grad_scale=None):
        return dict(HYPER, **switches, seed=seed, stochastic_rounding=self.sr,
                    **self.operands(), grad_scale=grad_scale, param_ids=self.param_ids,
                    element_offsets=self.element_offsets)

    def lists(self):
        return super().lists(self.grads)

    def expected(self, seed, switches, grad_scale=None):
        """What the compact step must give: the plain float32 kernel on the decoded
        moments, its new moments encoded."""
        out = self.clone()
        switches = dict(dict(weight_decay=0.0), **switches)
        for i in range(len(self.params)):
            scales = self.code_scales[i] if self.code_scales else None
            m = _decode(self.state_dtype, self.exp_avgs[i], scales, 0)
            v = _decode(self.state_dtype, self.exp_avg_sqs[i], scales, 1)
            step = self.steps[i].clone()
            grad = out.grads[i]
            if self.dtype == torch.float32:
                adamx.functional.adam([out.params[i]], [grad], [m], [v], [], [step], **HYPER,
                                      **switches, grad_scale=grad_scale)
            else:
                master = out.master_params[i] if self.master_params else self.params[i].float()
                adamx.functional.adam([out.params[i]], [grad], [m], [v], [], [step], **HYPER,
                                      **switches, master_params=[master],
                                      grad_scale=grad_scale)
            key = _compact.rounding_key(seed, self.param_ids[i], float(step))
            if self.dtype != torch.float32 and self.sr:
                out.params[i] = _compact.stochastic_bf16(master, key,
                                                         offset=self.element_offsets[i])
            out._store(i, m, v, key=key)
            out.steps[i] = step
        return out


def _assert_same(got, want):
    """Every list of two LeanCases (the state's and the grads) has the same bytes."""
    for name in got._LISTS:
        assert len(getattr(got, name)) == len(getattr(want, name)), name
        for i, (a, b) in enumerate(zip(getattr(got, name), getattr(want, name))):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
            same = (a.reshape(-1).view(torch.uint8) == b.reshape(-1).view(torch.uint8))
            assert bool(same.all()), f"{name}[{i}] differs in {int((~same).sum())} bytes"


def _run_cpu(case, seed, switches, grad_scale=None):
    BACKENDS["cpu"](*case.lists(), **_op_kwargs(case, seed, switches, grad_scale))


def _op_kwargs(case, seed, switches, grad_scale=None):
    kwargs = case.kwargs(seed, switches, grad_scale)
    wd = kwargs.pop("weight_decay", 0.0)
    return dict(kwargs, lr=kwargs.pop("lr"), weight_decay=wd)


# The op on the CPU kernel and on the emulated CUDA kernel (conftest.BACKENDS): with the
# GPU's chunks (70001 elements span two of them, of many blocks of codes each) and with
# small ones (64 elements; for 8-bit states rounded up to one block of 256 codes): tensors
# span many chunks and launches. Each SIZES tensor with a partial last block of codes
# ends with it on every one of them.
BACKEND_NAMES = ["cpu", "emulated_cuda", "emulated_cuda_small"]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_step_is_the_plain_step_with_encoded_moments(config, backend):
    for k, switches in enumerate(SWITCH_GRID):
        case = LeanCase(config, seed=k)
        want = case.expected(seed=7 + k, switches=switches)
        BACKENDS[backend](*case.lists(), **_op_kwargs(case, 7 + k, switches))
        _assert_same(case, want)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_every_isa_and_thread_count_agrees(config):
    """One result whatever the SIMD width or the thread split (blocks of codes are never
    cut between threads)."""
    base = LeanCase(config, seed=3)
    want = base.expected(seed=5, switches={})
    before_isa, before_threads = adamx.cpu_capability(), torch.get_num_threads()
    try:
        for isa in adamx.supported_cpu_capabilities():
            for threads in (1, 2, 3):
                adamx.set_cpu_capability(isa)
                torch.set_num_threads(threads)
                case = base.clone()
                _run_cpu(case, 5, {})
                _assert_same(case, want)
    finally:
        adamx.set_cpu_capability(before_isa)
        torch.set_num_threads(before_threads)


@pytest.mark.parametrize("keep_grads", [False, True])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_grad_scaler_unscales_in_the_same_pass(config, backend, keep_grads):
    """The grads divided by grad_scale as they are read, and written back unless
    keep_grads (then left as they were)."""
    grad_scale = torch.tensor(1024.0)
    case = LeanCase(config, seed=11)
    for g in case.grads:
        g.mul_(1024)
    want = case.expected(seed=2, switches={}, grad_scale=grad_scale)
    if keep_grads:
        want.grads = [g.clone() for g in case.grads]
    switches = dict(keep_grads=True) if keep_grads else {}
    BACKENDS[backend](*case.lists(), **_op_kwargs(case, 2, switches, grad_scale))
    _assert_same(case, want)


def test_nan_in_a_block_makes_its_moments_nan():
    """A block of codes shares one scale: a NaN grad makes that block's moments NaN (its
    params NaN after the next step), and no other block's (documented)."""
    case = LeanCase(("int8", torch.float32, False, False), sizes=(1024,))
    case.grads[0][300] = float("nan")
    _run_cpu(case, 0, {})
    m = _decode("int8", case.exp_avgs[0], case.code_scales[0], 0)
    assert torch.isnan(m[256:512]).all()
    assert not torch.isnan(m[:256]).any() and not torch.isnan(m[512:]).any()


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[0] == "int8"],
                         ids=[i for c, i in zip(CONFIGS, CONFIG_IDS) if c[0] == "int8"])
def test_non_finite_blocks_agree_on_every_isa(config):
    """Blocks with a NaN or an infinite grad (the new moments' maxima are not finite), and
    the next step of blocks whose stored scale is then NaN or infinite: every ISA's CPU
    kernel writes the CUDA body's bits (the SIMD blocks leave these to the generic one),
    NaN payloads included, but for bfloat16 params' NaNs: ATen's SIMD conversion to
    bfloat16 (the CPU kernel's store of the param, on AVX2 and AVX-512) writes 0xffff where
    c10::BFloat16 (the CUDA body, the scalar CPU kernel) writes 0x7fc0; the params are NaN
    in the same places."""
    base = LeanCase(config, sizes=(1024, 5000), seed=8)
    base.grads[0][300] = float("nan")
    base.grads[0][700] = float("inf")
    base.grads[1][4100] = -float("inf")
    base.grads[1][10] = float("nan")
    want = base.clone()
    for k in range(2):
        BACKENDS["emulated_cuda"](*want.lists(), **_op_kwargs(want, 9 + k, {}))
    before = adamx.cpu_capability()
    try:
        for isa in adamx.supported_cpu_capabilities():
            adamx.set_cpu_capability(isa)
            case, expected = base.clone(), want.clone()
            for k in range(2):
                _run_cpu(case, 9 + k, {})
            for got, wanted in zip(case.params, expected.params):
                assert torch.equal(got.isnan(), wanted.isnan()), isa
                got.masked_fill_(got.isnan(), 0.0)
                wanted.masked_fill_(wanted.isnan(), 0.0)
            _assert_same(case, expected)
    finally:
        adamx.set_cpu_capability(before)


# ------------------------------------------------------------------ op-level refusals


def _refusal(config=CONFIGS[2], **change):
    case = LeanCase(config, sizes=(300,))
    kwargs = _op_kwargs(case, 0, {})
    lists = list(case.lists())
    for k, v in change.items():
        if k in ("exp_avgs", "exp_avg_sqs", "params", "grads"):
            lists[("params", "grads", "exp_avgs", "exp_avg_sqs").index(k)] = v
        else:
            kwargs[k] = v
    snapshot = [t.clone() for t in case.params + case.exp_avgs + case.exp_avg_sqs]
    return case, lists, kwargs, snapshot


@pytest.mark.parametrize("change, message", [
    (dict(amsgrad=True), "amsgrad"),
    (dict(code_scales=None), "code_scales"),
    (dict(code_scales=[torch.zeros(2, 1)]), r"shape \[2, 2\]"),
    (dict(code_scales=[torch.zeros(2, 2, dtype=torch.float64)]), "float32"),
    (dict(exp_avg_sqs=[torch.zeros(300)]), "both moments are stored alike"),
    (dict(params=[torch.zeros(300, dtype=torch.float16)],
          grads=[torch.zeros(300, dtype=torch.float16)]), "float32 and bfloat16 params"),
    (dict(params=[torch.zeros(600)[::2]], grads=[torch.zeros(300)]), "dense"),
])
def test_bad_compact_inputs_are_refused_before_any_write(change, message):
    case, lists, kwargs, snapshot = _refusal(**change)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        torch.ops.adamx.adam_(*lists, **kwargs)
    after = case.params + case.exp_avgs + case.exp_avg_sqs
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


# ------------------------------------------------------------------ the optimizer


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(100, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10)).to(dtype)


def _train(opt, model, steps=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 100, generator=gen).to(next(model.parameters()).dtype)
        y = torch.randint(0, 10, (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("state_dtype, per_param", [("float32", 8.0), ("bfloat16", 4.0),
                                                    ("int8", 2 + 8 / 256)])
def test_state_bytes_and_small_params(state_dtype, per_param):
    model = _model()
    opt = adamx.AdamW(model.parameters(), state_dtype=state_dtype)
    _train(opt, model, steps=1)
    weight, bias = model[0].weight, model[0].bias  # 6400 elements: compact; 64: float32
    assert opt.state[bias]["exp_avg"].dtype == torch.float32
    big = [p for p in model.parameters() if p.numel() >= adamx.COMPACT_MIN_NUMEL]
    assert big == [weight]
    expected = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.uint8}
    assert _moment_dtype(opt.state[weight]) == expected[state_dtype]
    # A model of large params only: the per-param figure itself.
    big_model = torch.nn.Linear(256, 256, bias=False)
    opt = adamx.Adam(big_model.parameters(), state_dtype=state_dtype)
    big_model(torch.randn(2, 256)).sum().backward()
    opt.step()
    report = adamx.state_bytes(opt)
    assert report["params"] == 65536
    assert report["moment_bytes_per_param"] == pytest.approx(per_param)
    assert report["bytes"] == report["moment_bytes"] + 4  # and the step count


def test_refusals_at_construction():
    model = _model()
    with pytest.raises(ValueError, match="amsgrad"):
        adamx.Adam(model.parameters(), amsgrad=True, state_dtype="int8")
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        adamx.Adam(model.parameters(), state_dtype="float16")
    with pytest.raises(ValueError, match="master_weights=True"):
        adamx.Adam(_model(torch.bfloat16).parameters(), state_dtype="bfloat16")
    # torch dtypes name the same choices
    opt = adamx.Adam(model.parameters(), state_dtype=torch.bfloat16)
    assert opt.param_groups[0]["state_dtype"] == "bfloat16"


def test_rounding_to_nearest_stalls_where_stochastic_rounding_tracks():
    """beta2 = 0.999: v moves by 1e-3 of the way to g^2 per step. Stored in bfloat16 (8
    bits) and rounded to nearest, as torch stores a bfloat16 param's state, it cannot
    move at all from v = 1 towards g^2 in [1.3, 1.7] (each step's change, under 7e-4, is
    less than half a bfloat16 gap, 3.9e-3); rounded stochastically (adamx's bfloat16 and
    8-bit states) it tracks the float32 value on average."""
    n, steps = 8192, 200
    gen = torch.Generator().manual_seed(0)
    g2 = 1.3 + 0.4 * torch.rand(n, generator=gen)
    g = g2.sqrt()
    target = 1 + (g2 - 1) * (1 - 0.999 ** steps)  # v after `steps` steps from v = 1

    p = torch.zeros(n, dtype=torch.bfloat16, requires_grad=True)
    torch_opt = torch.optim.Adam([p], fused=True)
    torch_opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(p),
                          "exp_avg_sq": torch.ones_like(p)}
    for _ in range(steps):
        p.grad = g.to(torch.bfloat16)
        torch_opt.step()
    assert torch.equal(torch_opt.state[p]["exp_avg_sq"].float(), torch.ones(n))  # stalled

    for state_dtype in ("bfloat16", "int8"):
        q = torch.zeros(n, requires_grad=True)
        opt = adamx.Adam([q], state_dtype=state_dtype)
        state = {"step": torch.tensor(10.0), "exp_avg": torch.zeros(n),
                 "exp_avg_sq": torch.ones(n)}
        opt.load_state_dict({"state": {0: state},
                             "param_groups": opt.state_dict()["param_groups"]})
        assert _moment_dtype(opt.state[q]) != torch.float32  # encoded on loading
        for _ in range(steps):
            q.grad = g.clone()
            opt.step()
        v = _moments(opt, q)[1]
        moved = (v - 1).mean() / (target - 1).mean()
        assert moved.item() == pytest.approx(1, abs=0.02), state_dtype
        assert (v - target).std().item() > 0  # it is the average that tracks


def _heavy_tailed_grads(blocks, steps, seed=0):
    """Per block of codes (256 elements), one large Cauchy grad (median 1) at the block's
    start and 255 small ones, Cauchy times 10^-U(2, 8): grads whose squares span far more
    than exp_avg_sq's code can hold under one scale."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        cauchy = torch.tan(torch.pi * (torch.rand(blocks, 256, generator=gen) - 0.5))
        g = cauchy * torch.pow(10.0, -2 - 6 * torch.rand(blocks, 256, generator=gen))
        g[:, 0] = torch.tan(torch.pi * (torch.rand(blocks, generator=gen) - 0.5))
        yield g.view(-1)


def _largest_steps(state_dtype, blocks=64, steps=400, lr=1e-3):
    """The largest |param change| / lr of each step of Adam over _heavy_tailed_grads."""
    p = torch.zeros(blocks * 256, requires_grad=True)
    opt = adamx.Adam([p], lr=lr, state_dtype=state_dtype)
    largest = []
    for g in _heavy_tailed_grads(blocks, steps):
        before = p.detach().clone()
        p.grad = g
        opt.step()
        largest.append(((p.detach() - before).abs().max() / lr).item())
    return torch.tensor(largest)


def test_no_outsized_steps_with_heavy_tailed_grads():
    """Issue #22, part 2. A block of 8-bit moments shares one scale: where one grad is
    ~1e5 times the others, their exp_avg_sq lies below its code's smallest step, while
    their exp_avg (of half the range) does not. Decoded as zero, exp_avg_sq made such an
    element's step lr * m / eps: hundreds of lr (this test measured 1e4 lr and more before
    the floor). With exp_avg_sq's code 0 decoding to half a step (its floor), the largest
    step stays within 2x float32 state's over the same run; bfloat16 moments (8 exponent
    bits, no shared scale) never had the hazard."""
    reference = _largest_steps("float32")
    assert 1 < reference.max() < 5  # Adam's steps: a few lr at most
    for state_dtype in ("int8", "bfloat16"):
        largest = _largest_steps(state_dtype)
        assert largest.max() <= 2 * reference.max(), state_dtype
        assert largest.mean() <= 1.5 * reference.mean(), state_dtype


def _moment_dtype(state):
    """How a state stores its moments: 8-bit codes (uint8) are kept under keys of their
    own, which torch.optim.Adam cannot read as moments."""
    return state["exp_avg_codes" if "exp_avg_codes" in state else "exp_avg"].dtype


def _moments(opt, p):
    """exp_avg and exp_avg_sq of param p, decoded to float32."""
    state = opt.state[p]
    from adamx.optimizer import _moment_float
    return _moment_float(state, "exp_avg"), _moment_float(state, "exp_avg_sq")


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_training_follows_float32_state(state_dtype):
    """A small MLP, 60 steps: compact states stay close to float32 states (the same
    trajectory early on, then within quantization noise)."""
    base = _model()
    ref = adamx.AdamW(base.parameters(), lr=3e-3)
    ref_losses = _train(ref, base, steps=60)
    model = _model()
    opt = adamx.AdamW(model.parameters(), lr=3e-3, state_dtype=state_dtype)
    losses = _train(opt, model, steps=60)
    assert abs(sum(losses[-10:]) - sum(ref_losses[-10:])) / sum(ref_losses[-10:]) < 0.05
    for p, q in zip(base.parameters(), model.parameters()):
        assert (p - q).abs().max() < 0.05


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_checkpoint_resumes_bitwise(state_dtype):
    """state_dict holds the compact tensors as they are: a resumed run is the same bits
    as an uninterrupted one."""
    model = _model()
    opt = adamx.AdamW(model.parameters(), state_dtype=state_dtype)
    _train(opt, model, steps=5)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = opt.state_dict()
    weight_state = saved["state"][0]
    assert _moment_dtype(weight_state) == {"bfloat16": torch.bfloat16,
                                           "int8": torch.uint8}[state_dtype]
    assert ("code_scales" in weight_state) == (state_dtype == "int8")
    assert saved["param_groups"][0]["state_dtype"] == state_dtype
    import copy
    saved = copy.deepcopy(saved)
    _train(opt, model, steps=5, seed=1)
    after = [p.clone() for p in model.parameters()]

    model2 = _model()
    model2.load_state_dict(saved_model)
    opt2 = adamx.AdamW(model2.parameters(), state_dtype=state_dtype)
    opt2.load_state_dict(saved)
    assert _moment_dtype(opt2.state[model2[0].weight]) == _moment_dtype(weight_state)
    _train(opt2, model2, steps=5, seed=1)
    for a, b in zip(after, model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_torch_checkpoints_both_ways(state_dtype):
    """A torch.optim.AdamW checkpoint loaded into a compact optimizer is encoded; a
    compact checkpoint converted by to_torch_state_dict loads into torch.optim.AdamW; the
    moments agree within the storage's precision."""
    model = _model()
    torch_opt = torch.optim.AdamW(model.parameters())
    _train(torch_opt, model, steps=3)
    opt = adamx.AdamW(model.parameters(), state_dtype=state_dtype)
    opt.load_state_dict(torch_opt.state_dict())
    weight = model[0].weight
    assert opt.param_groups[0]["state_dtype"] == state_dtype  # kept: torch's lacks it
    m, v = _moments(opt, weight)
    tm, tv = torch_opt.state[weight]["exp_avg"], torch_opt.state[weight]["exp_avg_sq"]
    rel = 2 ** -8 if state_dtype == "bfloat16" else 2 ** -3
    for x, t in ((m, tm), (v, tv)):
        scale = t.abs().max()
        assert ((x - t).abs() <= rel * t.abs() + 1e-6 * scale).all()

    back = adamx.to_torch_state_dict(opt.state_dict())
    assert "state_dtype" not in back["param_groups"][0]
    assert all("code_scales" not in s for s in back["state"].values())
    torch_opt2 = torch.optim.AdamW(model.parameters())
    torch_opt2.load_state_dict(back)
    assert torch.equal(torch_opt2.state[weight]["exp_avg"], m)
    assert torch.equal(torch_opt2.state[weight]["exp_avg_sq"], v)


def test_checkpoint_that_does_not_fit_is_refused_and_changes_nothing():
    model = _model()
    opt = adamx.AdamW(model.parameters(), state_dtype="int8")
    _train(opt, model, steps=2)
    saved = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    bad = dict(saved, state={**saved["state"], 0: dict(saved["state"][0],
                                                       code_scales=torch.zeros(2, 3))})
    with pytest.raises(ValueError, match="code_scales"):
        opt.load_state_dict(bad)
    bad = dict(saved, state={**saved["state"], 0: dict(saved["state"][0],
                                                       exp_avg_sq=torch.zeros(64, 100))})
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.load_state_dict(bad)
    after = opt.state[model[0].weight]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_changing_state_dtype_converts_the_state():
    model = _model()
    opt = adamx.AdamW(model.parameters(), state_dtype="int8")
    _train(opt, model, steps=3)
    m8, v8 = _moments(opt, model[0].weight)
    opt.param_groups[0]["state_dtype"] = "float32"
    _train(opt, model, steps=0)
    opt.zero_grad()
    model(torch.randn(2, 100)).sum().backward()
    opt.step()
    state = opt.state[model[0].weight]
    assert state["exp_avg"].dtype == torch.float32 and "code_scales" not in state


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2]], ids=[CONFIG_IDS[0], CONFIG_IDS[2]])
def test_compiled_step_is_the_eager_step(config):
    """torch.compile traces the op with its fake kernel (code_scales a mutated list too)
    and runs the same kernel: the same bits as eager."""
    eager, compiled = LeanCase(config, sizes=(5000, 300)), LeanCase(config, sizes=(5000, 300))

    def step(case):
        torch.ops.adamx.adam_(*case.lists(), **_op_kwargs(case, 4, {}))

    step(eager)
    torch._dynamo.reset()
    torch.compile(step, backend="aot_eager", fullgraph=True)(compiled)
    _assert_same(compiled, eager)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_lean_groups_take_the_fast_path_with_the_python_steps_bits(config):
    """Once their state exists, lean groups step through the C++ fast path (no Python step
    after the first), with the bits of the Python step: compact and small params (which
    keep float32 moments) in one group, a channels_last weight, two groups."""
    kind, dtype, master, sr = config
    runs = []
    for fast in (True, False):
        torch.manual_seed(0)
        weight = torch.randn(16, 8, 8, 8).to(dtype).to(memory_format=torch.channels_last)
        params = [weight, torch.randn(70, 70).to(dtype), torch.randn(64).to(dtype),
                  torch.randn(5000).to(dtype)]
        params = [p.requires_grad_() for p in params]
        opt = adamx.AdamW([{"params": params[:3]}, {"params": params[3:], "lr": 0.01}],
                          lr=0.03, state_dtype=kind, master_weights=master,
                          stochastic_rounding=sr, seed=11)
        python_steps = []
        step_lists = opt._step_lists
        opt._step_lists = lambda *a: (python_steps.append(1), step_lists(*a))
        if not fast:
            opt._step_fast = lambda *a: False
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        runs.append((params, opt, len(python_steps)))
    (params, opt, python_steps), (ref_params, ref_opt, _) = runs
    assert python_steps == 1  # the first, which made the state
    assert any("code_scales" in s for s in opt.state.values()) == (kind == "int8")
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


def test_compact_threshold_is_the_fast_paths():
    assert adamx._ops._C.COMPACT_MIN_NUMEL == adamx.COMPACT_MIN_NUMEL
