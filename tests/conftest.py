"""Shared helpers for adamx's CPU tests: tolerances, a float64 reference of the update,
deterministic inputs, snapshot/compare utilities, and a checkpoint's save and load.

Everything numeric that the tests compare against lives here, so that the tolerances are
written down (and justified) in one place; so do the option grid and the op-level state
helper that the CPU, emulated-CUDA and CUDA tests share.
"""

import io
import itertools
import math

import pytest
import torch

import adamx

# --------------------------------------------------------------------------------------
# Tolerances: one table, TOL, for every comparison that is not bitwise.
#
# adamx against `RefAdam` below, a float64 evaluation of the same formula that rounds every
#   stored tensor (param, exp_avg, exp_avg_sq, max_exp_avg_sq) to the param dtype after each
#   step, exactly where the kernel stores them. So the only differences are (a) the kernel's
#   per-operation rounding in its compute type (float32 for float32/float16/bfloat16,
#   float64 for float64), a few units in the last place (ulp) of the compute type per step,
#   and (b) for float16/bfloat16, the rare element whose value lies so close to a rounding
#   boundary of the storage type that (a) moves it to the neighbouring value: one ulp of the
#   storage type, which later steps carry along but do not grow (the grads do not depend on
#   the param except through weight decay). rtol is therefore a few ulp of the storage type
#   (finfo.eps is one ulp at 1.0; the relative size of one ulp is at most eps). atol covers
#   values that cancel towards zero (exp_avg of alternating grads), where a relative bound
#   means nothing: their absolute error is a few ulp of the quantities they came from, which
#   are O(1) here (grads and params are N(0, 1) draws), so atol is a few eps too. float64:
#   the kernel and the reference round differently in a handful of operations per step;
#   after 15 steps the largest difference measured is ~2e-16 (in units of 1 + |value|), so
#   1e-13 leaves a wide margin while still catching any formula error (a wrong beta or bias
#   correction moves results by >1e-4). Measured worst case as a fraction of TOL over the
#   whole option grid: float32 0.54, float16 0.34, bfloat16 0.008, float64 0.002.
#
# adamx against torch.optim.Adam/AdamW (foreach=False, or fused=True): the same formula in
#   a different operation order (torch's loop uses addcdiv, a separate bias correction,
#   ...), so float32/float64 differ by a few ulp per step, as against the reference, and the
#   same table applies. Reduced precision is only compared with torch's fused CPU kernel (it
#   computes in float32 and stores in the param dtype, as adamx does; measured: bitwise
#   equal for bfloat16/float16), because torch's foreach=False loop computes every op in
#   the reduced dtype (float16 even underflows eps=1e-8 to 0 and divides by zero).
# --------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REDUCED = (torch.float16, torch.bfloat16)


def _eps(dtype):
    return torch.finfo(dtype).eps


TOL = {
    torch.float64: dict(rtol=1e-13, atol=1e-13),
    torch.float32: dict(rtol=8 * _eps(torch.float32), atol=8 * _eps(torch.float32)),
    # one or two storage ulp, see above
    torch.float16: dict(rtol=2 * _eps(torch.float16), atol=2 * _eps(torch.float16)),
    torch.bfloat16: dict(rtol=2 * _eps(torch.bfloat16), atol=2 * _eps(torch.bfloat16)),
}

# --------------------------------------------------------------------------------------
# The option grid: every combination of the switches of the formula that the float64
# reference implements (REFERENCE_SWITCHES: adamx._C.SWITCHES but stochastic_rounding, which
# changes how bfloat16 params round, not the formula: test_mixed_precision.py tests it), as
# keyword dicts. Ids name the switches that are on ("-" for none). A switch the module has
# beyond these is run on every kernel and backend by test_kernel_cases.py (from
# adamx._C), and joins this grid when RefAdam learns its formula.
# --------------------------------------------------------------------------------------
SWITCHES = tuple(adamx._ops._C.SWITCHES) if adamx.is_compiled() else ()
# Each switch of the formula that RefAdam implements, and RefAdam's keyword for it.
REFERENCE_SWITCHES = dict(amsgrad="amsgrad", maximize="maximize",
                          decoupled_weight_decay="decoupled", eps_inside_sqrt="eps_inside_sqrt")
FORMULA_SWITCHES = tuple(s for s in SWITCHES if s in REFERENCE_SWITCHES)
OPTION_GRID = [dict(zip(FORMULA_SWITCHES, bits))
               for bits in itertools.product([False, True], repeat=len(FORMULA_SWITCHES))]
OPTION_IDS = ["+".join(k for k, on in o.items() if on) or "-" for o in OPTION_GRID]

# The learning rate most tests use: large enough that every step visibly moves a
# bfloat16 param of size ~1 (one bfloat16 ulp at 1.0 is 2**-7 ~ 0.008; an Adam step moves
# by about lr), so reduced-precision tests are not vacuous.
LR = 0.03

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


# Every test module of the optimizer applies this; the missing-build path has its own
# tests that run either way.
needs_build = pytest.mark.skipif(
    not adamx.is_compiled(),
    reason="adamx._C is not built (run `python setup.py build_ext --inplace`)")


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def restore_cpu_capability():
    original = adamx.cpu_capability()
    yield original
    adamx.set_cpu_capability(original)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
SHAPES = [(), (0,), (1,), (7,), (3, 5), (17, 33), (2, 3, 4, 5), (1031,)]


def make_tensors(shapes, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype)
            for s in shapes]


def make_grad_seq(shapes, dtype, steps, seed, scale=1.0):
    """grads[step][i]: deterministic N(0, scale^2) grads, already in ``dtype``."""
    return [make_tensors(shapes, dtype, seed * 1000 + k, scale) for k in range(steps)]


def op_hyper(lr=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, **switches):
    """The keyword arguments of torch.ops.adamx.adam_ (lr defaults to LR)."""
    return adamx.functional.op_kwargs(lr=LR if lr is None else lr, beta1=beta1, beta2=beta2,
                                      weight_decay=weight_decay, eps=eps, **switches)


def op_backends(**geometry):
    """The op on each backend, as functions of (*lists, **op keywords): the CPU kernel, and
    the CUDA body run on the CPU by the emulation with `geometry`: its launch geometry
    (chunk_size, block_dim, max_tensors, max_blocks; small ones make tensors span several
    chunks, blocks and launches) and where it reads scalars (steps_in_kernel, lr_in_kernel,
    scaler_in_kernel: as device memory, as a GPU reads device tensors)."""
    def cpu(*lists, **hyper):
        torch.ops.adamx.adam_(*lists, **hyper)

    def emulated(*lists, **hyper):
        torch.ops.adamx._adam_emulated_cuda_(*lists, **hyper, **geometry)
    return {"cpu": cpu, "emulated_cuda": emulated}


def _on_cuda(*lists, **hyper):
    """The op on the GPU: every tensor operand copied there but the step counts, and the
    results copied back into the CPU tensors given (so a test reads them as it reads the
    CPU op's). The step counts stay host counts, so the step's scalars are computed on the
    host as the CPU kernel computes them (a device count would have the GPU's pow compute
    them, which need not round as the host's does)."""
    def there(x):
        if torch.is_tensor(x):
            return x.cuda()
        return [t.cuda() for t in x] if isinstance(x, (list, tuple)) else x
    moved = [there(x) for x in lists[:5]] + list(lists[5:])
    kwargs = {k: there(v) for k, v in hyper.items()}
    torch.ops.adamx.adam_(*moved, **kwargs)
    for given, used in list(zip(lists, moved)) + [(hyper[k], kwargs[k]) for k in hyper]:
        if torch.is_tensor(given):
            given.copy_(used)
        elif isinstance(given, (list, tuple)):
            for a, b in zip(given, used):
                a.copy_(b)


SMALL_GEOMETRY = dict(chunk_size=64, block_dim=8, max_tensors=3, max_blocks=5)
# The ways to run the op, one table for every test that runs it: the CPU kernel; the CUDA
# body emulated on the CPU with the GPU's geometry, with a small one (several chunks,
# blocks and launches), and with every scalar read as device memory; the GPU when there is
# one (tensors copied there and back).
BACKENDS = dict(
    cpu=op_backends()["cpu"],
    emulated_cuda=op_backends()["emulated_cuda"],
    emulated_cuda_small=op_backends(**SMALL_GEOMETRY)["emulated_cuda"],
    emulated_cuda_in_kernel=op_backends(**SMALL_GEOMETRY, steps_in_kernel=True,
                                        lr_in_kernel=True,
                                        scaler_in_kernel=True)["emulated_cuda"])
HAS_GPU = adamx.is_compiled() and adamx._ops._C.built_with_cuda() and torch.cuda.is_available()
if HAS_GPU:
    BACKENDS["cuda"] = _on_cuda


# --------------------------------------------------------------------------------------
# The kernel cases: every kernel the module has (adamx._C.KERNEL_CASES: param dtype, how
# the moments are stored, the compile-time switches), each to be run with every
# combination of the run-time switches (adamx._C.RUNTIME_SWITCHES). A switch, dtype or
# state kind added to the C++ list is in these tables without a test edit.
# --------------------------------------------------------------------------------------
KERNEL_CASES = [dict(k) for k in adamx._ops._C.KERNEL_CASES] if adamx.is_compiled() else []
RUNTIME_SWITCHES = tuple(adamx._ops._C.RUNTIME_SWITCHES) if adamx.is_compiled() else ()
RUNTIME_GRID = [dict(zip(RUNTIME_SWITCHES, bits))
                for bits in itertools.product([False, True], repeat=len(RUNTIME_SWITCHES))]


def case_id(case):
    on = [k for k, v in case.items() if v is True]
    return "-".join([case["param_dtype"], "state_" + case["state_dtype"]] + on)


class OpState:
    """Params and Adam state kept by hand, as lists for the op (the way a user of the
    functional API keeps them): moments stored as `state_dtype` names them ("float32":
    torch's layout, in the param's dtype, or float32 beside master copies; "bfloat16";
    "int8": codes with per-block scales), fp32 master copies of the params when
    `master_weights`, and max_exp_avg_sq when `amsgrad`."""

    def __init__(self, params, amsgrad, step_dtype=torch.float32, steps=None, *,
                 master_weights=False, state_dtype="float32"):
        self.params = params
        self.master_params = [p.float() for p in params] if master_weights else []
        self.state_dtype = state_dtype
        like = self.master_params or params
        self.code_scales = []
        if state_dtype == "int8":
            self.exp_avgs = [torch.zeros(p.shape, dtype=torch.uint8) for p in params]
            self.exp_avg_sqs = [torch.zeros(p.shape, dtype=torch.uint8) for p in params]
            self.code_scales = [torch.zeros(2, adamx._compact.num_code_blocks(p.numel()))
                                for p in params]
        else:
            dtype = torch.bfloat16 if state_dtype == "bfloat16" else None
            self.exp_avgs = [torch.zeros_like(p, dtype=dtype) for p in like]
            self.exp_avg_sqs = [torch.zeros_like(p, dtype=dtype) for p in like]
        self.max_exp_avg_sqs = [torch.zeros_like(p) for p in like] if amsgrad else []
        steps = steps if steps is not None else [0.0] * len(params)
        self.steps = [torch.tensor(float(s), dtype=step_dtype) for s in steps]

    @classmethod
    def of_case(cls, case, shapes, seed):
        """The state of a kernel case (a KERNEL_CASES entry) for params of `shapes`."""
        dtype = getattr(torch, case["param_dtype"])
        return cls(make_tensors(shapes, dtype, seed), case["amsgrad"],
                   master_weights=case["master_weights"], state_dtype=case["state_dtype"])

    def lists(self, grads):
        return (self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                self.steps)

    def operands(self):
        """The op's keyword operands of this state (master copies, code scales)."""
        return dict(master_params=self.master_params or None,
                    code_scales=self.code_scales or None)

    _LISTS = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps",
              "master_params", "code_scales")

    def clone(self):
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        for name in self._LISTS:
            setattr(other, name, [t.clone() for t in getattr(self, name)])
        return other

    def tensors(self):
        return [t for name in self._LISTS for t in getattr(self, name)]


def assert_bitwise(state_a, state_b, what=""):
    """Every tensor of two OpStates has the same bits (NaN payloads included)."""
    for i, (a, b) in enumerate(zip(state_a.tensors(), state_b.tensors())):
        a, b = a.cpu(), b.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        assert same_bits(a, b), f"{what}: tensor {i} differs (max abs diff " \
            f"{(a.double() - b.double()).abs().max().item() if a.numel() else 0})"


def same_bits(a, b):
    """Whether two tensors of one dtype hold the same bit patterns."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


# --------------------------------------------------------------------------------------
# The float64 reference
# --------------------------------------------------------------------------------------
class RefAdam:
    """The Adam update in float64, rounding each stored tensor to ``dtype`` after
    each step (where adamx stores it). Written from the formula, not from adamx."""

    def __init__(self, params, dtype, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled=False, eps_inside_sqrt=False):
        self.dtype = dtype
        self.p = [p.detach().to(torch.float64).clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.vmax = [torch.zeros_like(p) for p in self.p]
        self.t = 0
        self.lr, (self.b1, self.b2), self.eps = float(lr), betas, eps
        self.wd, self.amsgrad, self.maximize = weight_decay, amsgrad, maximize
        self.decoupled, self.inside = decoupled, eps_inside_sqrt

    def _round(self, x):
        return x.to(self.dtype).to(torch.float64)

    def step(self, grads, grad_scale=None):
        """One step; with ``grad_scale`` (GradScaler's), the grads are divided by it first,
        and the step returns them so divided, rounded to ``dtype`` (as adamx stores them)."""
        self.t += 1
        t, b1, b2, lr, wd = self.t, self.b1, self.b2, self.lr, self.wd
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        unscaled = []
        for i, grad in enumerate(grads):
            g = grad.to(torch.float64)
            if grad_scale is not None:
                g = g / grad_scale
                unscaled.append(self._round(g))
            p = self.p[i]
            if self.maximize:
                g = -g
            if wd != 0:
                if self.decoupled:
                    p = p * (1 - lr * wd)
                else:
                    g = g + wd * p
            m = self.m[i] + (1 - b1) * (g - self.m[i])
            v = self.v[i] * b2 + (1 - b2) * g * g
            second = v
            if self.amsgrad:
                vmax = torch.maximum(self.vmax[i], v)
                second = vmax
                self.vmax[i] = self._round(vmax)
            if self.inside:
                denom = torch.sqrt(second / bc2 + self.eps)
            else:
                denom = torch.sqrt(second) / math.sqrt(bc2) + self.eps
            p = p - (lr / bc1) * m / denom
            self.p[i], self.m[i], self.v[i] = self._round(p), self._round(m), self._round(v)
        return unscaled

    def state_of(self, i):
        s = {"exp_avg": self.m[i], "exp_avg_sq": self.v[i]}
        if self.amsgrad:
            s["max_exp_avg_sq"] = self.vmax[i]
        return s


# --------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------
def assert_norm_close(norm, torch_norm, tensors, norm_type):
    """adamx's total norm (float64 accumulation, rounded once) against torch's: the dtype
    torch returns; within half an ulp (and a hair, for the double rounding) of the exact
    norm of the tensors' values; and at least as close to it as torch's, which accumulates
    in float32 and, for float16/bfloat16 grads, rounds each tensor's norm to their dtype
    before the total (measured: float32 orders 1 and 3.5 several ulps off)."""
    assert norm.dtype == torch_norm.dtype, (norm.dtype, torch_norm.dtype)
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors])
    exact = torch.linalg.vector_norm(flat, norm_type).item()
    got, theirs = norm.double().item(), torch_norm.double().item()
    if not math.isfinite(exact):
        assert got == exact or (math.isnan(got) and math.isnan(exact)), (got, exact)
        return
    finfo = torch.finfo(norm.dtype)
    ulp = finfo.eps * 2.0 ** math.floor(math.log2(max(exact, finfo.tiny)))
    assert abs(got - exact) <= 0.5001 * ulp, f"norm {got} vs exact {exact} (ulp {ulp})"
    assert abs(got - exact) <= abs(theirs - exact) + 1e-3 * ulp, \
        f"norm {got} vs torch's {theirs}, exact {exact} (ulp {ulp})"


def assert_close(actual, expected, tol, msg=""):
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64),
                               equal_nan=True, msg=lambda m: f"{msg}\n{m}" if msg else m,
                               **tol)


def assert_opt_matches_ref(opt, params, ref, dtype, tol=None, what=""):
    tol = tol or TOL[dtype]
    for i, p in enumerate(params):
        assert p.dtype == dtype
        assert_close(p, ref.p[i], tol, f"{what} param {i} {tuple(p.shape)}")
        st = opt.state[p]
        assert float(st["step"]) == ref.t
        for key, value in ref.state_of(i).items():
            assert st[key].dtype == dtype
            assert_close(st[key], value, tol, f"{what} {key} {i} {tuple(p.shape)}")


def assert_same_state(opt_a, params_a, opt_b, params_b, tol=None, exact=False):
    """Params and every state tensor of two optimizers over corresponding params."""
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        check = (lambda a, b, m: _assert_equal(a, b, m)) if exact else \
            (lambda a, b, m: assert_close(a, b, tol, m))
        check(pa, pb, f"param {i}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys(), (i, sa.keys(), sb.keys())
        for key in sa:
            if key == "step":
                assert float(sa[key]) == float(sb[key]), (i, sa[key], sb[key])
            else:
                check(sa[key], sb[key], f"{key} {i}")


def _assert_equal(a, b, msg):
    assert a.dtype == b.dtype and a.shape == b.shape, msg
    # bitwise, NaN payloads aside
    assert torch.equal(a, b) or (
        torch.equal(torch.isnan(a), torch.isnan(b))
        and torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)])), msg


def snapshot(opt, params):
    """Deep copies of the params and the whole optimizer state (tensors cloned)."""
    state = {}
    for p in params:
        if p in opt.state:
            state[p] = {k: (v.clone() if torch.is_tensor(v) else v)
                        for k, v in opt.state[p].items()}
    return [p.detach().clone() for p in params], state


def assert_unchanged(opt, params, snap):
    """Everything ``snapshot`` saw is bitwise the same, and no state was added."""
    saved_params, saved_state = snap
    for i, (p, saved) in enumerate(zip(params, saved_params)):
        if p.device.type == "meta":  # no data to compare
            continue
        assert p.dtype == saved.dtype and torch.equal(p.detach(), saved), f"param {i} changed"
    current = {p: s for p, s in opt.state.items() if s}
    assert set(current.keys()) == set(saved_state.keys()), "state entries added or removed"
    for p, saved in saved_state.items():
        now = opt.state[p]
        assert now.keys() == saved.keys()
        for k, v in saved.items():
            if torch.is_tensor(v):
                if v.device.type == "meta":
                    continue
                assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"state {k} changed"
            else:
                assert now[k] == v


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
def save_and_load(obj):
    """``obj`` written by torch.save and read back by torch.load(weights_only=True), as a
    checkpoint on disk comes back (so only what a weights-only load accepts survives)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
