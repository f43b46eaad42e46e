"""Mixed precision: adamx with torch.amp.GradScaler, as torch's fused Adam.

The optimizer (GradScaler hands the step its grad_scale and found_inf) against
torch.optim.Adam(fused=True) with a GradScaler of its own, over steps with forced
overflow; the op's semantics (the grad divided by grad_scale before maximize and weight
decay and written back, a non-zero found_inf skipping everything, step counts included)
against the float64 reference, on the CPU kernel and the emulated CUDA kernel; and the
same on a GPU (skipped without one), a captured CUDA graph of a scaled step included.
"""

import inspect

import pytest
import torch

import adamx
from conftest import (BACKENDS, LR, OPTION_GRID, OPTION_IDS, REDUCED, SMALL_GEOMETRY, TOL,
                      OpState, RefAdam, assert_bitwise, assert_close, make_grad_seq,
                      make_tensors, needs_build, op_backends, op_hyper, same_bits)

pytestmark = needs_build

HAVE_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAVE_CUDA,
                               reason="no CUDA GPU (torch.cuda.is_available() is False)")

SHAPES = [(), (1,), (7,), (3, 5), (17, 33), (1031,)]
SCALER_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STEPS = 8
# (step, param index, value) forced into the grads: GradScaler must skip those steps.
OVERFLOWS = {2: (3, float("inf")), 5: (0, float("nan")), 6: (5, float("-inf"))}
MODES = ["step", "unscale_", "unscale_+clip"]
# Optimizer settings compared with torch's fused Adam/AdamW. Not conftest.OPTION_GRID: torch
# has no eps_inside_sqrt (half the grid), the grid sets no weight decay, and each setting is
# 7 tests (dtypes x modes) of two GradScaler'd runs, so the grid's 16 settings would make
# 112 tests of these 21. The op tests below run the whole grid.
OPTIMIZER_OPTIONS = [dict(), dict(amsgrad=True, maximize=True, weight_decay=0.1),
                     dict(decoupled=True, weight_decay=0.1)]
OPTIMIZER_IDS = ["adam", "amsgrad+maximize+wd", "adamw"]


def grads_at(k, grad_seq, scale, dtype):
    """Step k's grads as a backward pass under a GradScaler leaves them: scaled, in the
    param dtype, with the forced overflows."""
    grads = [(g.double() * scale).to(dtype) for g in grad_seq[k]]
    if k in OVERFLOWS:
        i, value = OVERFLOWS[k]
        grads[i].view(-1)[0] = value
    return grads


def make_optimizer(kind, params, options):
    options = dict(options)
    decoupled = options.pop("decoupled", False)
    if kind == "adamx":
        cls = adamx.AdamW if decoupled else adamx.Adam
        return cls(params, lr=LR, **options)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=LR, fused=True, **options)


def scaled_steps(kind, p0, grad_seq, options, mode, device="cpu", each_step=None):
    """Runs STEPS GradScaler'd steps of adamx or torch's fused Adam; calls
    ``each_step(k, params, opt, scaler)`` after each."""
    params = [p.clone().to(device).requires_grad_() for p in p0]
    opt = make_optimizer(kind, params, options)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
    for k in range(STEPS):
        scaler.scale(torch.ones((), device=device))  # makes the scale, as a loss would
        for p, g in zip(params, grads_at(k, grad_seq, scaler.get_scale(), p0[0].dtype)):
            p.grad = g.to(device)
        if mode != "step":
            scaler.unscale_(opt)
        if mode == "unscale_+clip":
            torch.nn.utils.clip_grad_norm_(params, max_norm=5.0)
        scaler.step(opt)
        scaler.update()
        if each_step:
            each_step(k, params, opt, scaler)
    return params, opt


def compare_with_torch(dtype, options, mode, device="cpu"):
    p0 = make_tensors(SHAPES, dtype, seed=1)
    grad_seq = make_grad_seq(SHAPES, torch.float64, STEPS, seed=2)
    seen = {}

    def record(kind):
        def each_step(k, params, opt, scaler):
            seen[kind, k] = ([p.detach().clone() for p in params],
                             [p.grad.clone() for p in params],
                             [{key: t.clone() for key, t in opt.state[p].items()}
                              for p in params], scaler.get_scale())
        return each_step

    scaled_steps("adamx", p0, grad_seq, options, mode, device, record("adamx"))
    scaled_steps("torch", p0, grad_seq, options, mode, device, record("torch"))
    # Bitwise where adamx's unscaled step is bitwise with torch's fused CPU kernel for these
    # inputs (reduced precision), else TOL. Not after clipping: there one bfloat16 element
    # of 1031 lands one ulp apart (adamx's reciprocal bias correction, conftest.py), with
    # or without a GradScaler.
    exact = dtype in REDUCED and device == "cpu" and mode != "unscale_+clip"
    for k in range(STEPS):
        ours, theirs = seen["adamx", k], seen["torch", k]
        assert ours[3] == theirs[3], f"step {k}: scale"
        for i in range(len(SHAPES)):
            for what, a, b in (("param", ours[0][i], theirs[0][i]),
                               ("grad", ours[1][i], theirs[1][i])):
                if exact:
                    assert same_bits(a.cpu(), b.cpu()), f"step {k} {what} {i}"
                else:
                    assert_close(a.cpu(), b.cpu(), TOL[dtype], f"step {k} {what} {i}")
            sa, sb = ours[2][i], theirs[2][i]
            assert sa.keys() == sb.keys()
            for key in sa:
                if key == "step":
                    assert float(sa[key]) == float(sb[key]), f"step {k}: step count {i}"
                elif exact:
                    assert same_bits(sa[key].cpu(), sb[key].cpu()), f"step {k} {key} {i}"
                else:
                    assert_close(sa[key].cpu(), sb[key].cpu(), TOL[dtype], f"step {k} {key} {i}")
    skipped = sum(1 for k in OVERFLOWS if k < STEPS)
    assert float(seen["adamx", STEPS - 1][2][0]["step"]) == STEPS - skipped


# --------------------------------------------------------------------------------------
# The optimizer with GradScaler, against torch's fused Adam
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", OPTIMIZER_OPTIONS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("dtype", SCALER_DTYPES, ids=str)
def test_grad_scaler_matches_torch_fused(dtype, options, mode):
    if dtype == torch.float16 and mode != "step":
        pytest.skip("GradScaler.unscale_ refuses float16 grads (for every optimizer)")
    compare_with_torch(dtype, options, mode)


def test_unscale_of_float16_grads_is_refused_as_for_torch():
    p = [torch.ones(3, dtype=torch.float16, requires_grad=True)]
    for opt in (adamx.Adam(p, lr=LR), torch.optim.Adam(p, lr=LR, fused=True)):
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.ones(()))
        p[0].grad = torch.ones(3, dtype=torch.float16)
        with pytest.raises(ValueError, match="FP16"):
            scaler.unscale_(opt)


def test_step_takes_no_grad_scaler_argument():
    """GradScaler passes itself to a step() with a grad_scaler parameter (its legacy path,
    with a FutureWarning); adamx takes grad_scale and found_inf as attributes instead."""
    assert adamx.Adam._step_supports_amp_scaling
    assert "grad_scaler" not in inspect.signature(adamx.Adam.step).parameters


def test_fast_and_list_paths_and_several_groups():
    """Two param groups (the fast path checks every group first), the first step making
    the state (the list path), later steps on the fast path: the same as torch."""
    p0 = make_tensors(SHAPES, torch.float32, seed=3)
    grad_seq = make_grad_seq(SHAPES, torch.float64, STEPS, seed=4)
    results = []
    for kind in ("adamx", "torch"):
        params = [p.clone().requires_grad_() for p in p0]
        groups = [{"params": params[:3]}, {"params": params[3:], "lr": LR / 3}]
        opt = adamx.Adam(groups, lr=LR) if kind == "adamx" else \
            torch.optim.Adam(groups, lr=LR, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
        for k in range(STEPS):
            scaler.scale(torch.ones(()))
            for p, g in zip(params, grads_at(k, grad_seq, scaler.get_scale(), torch.float32)):
                p.grad = g
            scaler.step(opt)
            scaler.update()
        results.append((params, opt))
    (a, opt_a), (b, opt_b) = results
    for pa, pb in zip(a, b):
        assert_close(pa.detach(), pb.detach(), TOL[torch.float32])
        assert_close(pa.grad, pb.grad, TOL[torch.float32])
        assert float(opt_a.state[pa]["step"]) == float(opt_b.state[pb]["step"]) == STEPS - 3


# --------------------------------------------------------------------------------------
# The op: semantics against the float64 reference, CPU kernel and emulated CUDA kernel
# --------------------------------------------------------------------------------------
def scaler_tensors(scale, found=None):
    return dict(grad_scale=None if scale is None else torch.tensor(scale),
                found_inf=None if found is None else torch.tensor(found))


# conftest.BACKENDS: the CPU kernel, the emulated CUDA kernel with a small geometry (scalars
# on the host), and the same reading step counts, lr and the scaler in the kernel.
BACKEND_NAMES = ["cpu", "emulated_cuda_small", "emulated_cuda_in_kernel"]
# The emulated CUDA kernel reading found_inf and grad_scale in the kernel ("on the device")
# and the step counts on the host, a mix that no BACKENDS entry has.
HOST_STEPS = op_backends(**SMALL_GEOMETRY, scaler_in_kernel=True)["emulated_cuda"]


@pytest.mark.parametrize("kernel", BACKEND_NAMES)
@pytest.mark.parametrize("options", OPTION_GRID, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16], ids=str)
def test_op_unscales_before_maximize_and_weight_decay(dtype, options, kernel):
    """The grad is divided by grad_scale before maximize and weight decay, the quotient
    written back to the grad, and the update is the reference's of the unscaled grad."""
    scale = 3.0  # not a power of two: a multiplication by 1/3 would round differently
    params = make_tensors(SHAPES, dtype, seed=5)
    state = OpState(params, options["amsgrad"])
    ref = RefAdam(params, dtype, lr=LR, weight_decay=0.1, amsgrad=options["amsgrad"],
                  maximize=options["maximize"], decoupled=options["decoupled_weight_decay"],
                  eps_inside_sqrt=options["eps_inside_sqrt"])
    hyper = dict(op_hyper(weight_decay=0.1, **options), **scaler_tensors(scale))
    for grads in make_grad_seq(SHAPES, torch.float64, 4, seed=6):
        scaled = [(g * scale).to(dtype) for g in grads]
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        quotients = [(g.to(compute) / scale).to(dtype) for g in scaled]
        expected_grads = ref.step([g.double() for g in scaled], grad_scale=scale)
        BACKENDS[kernel](*state.lists(scaled), **hyper)
        for i, (p, g) in enumerate(zip(state.params, scaled)):
            assert_close(p, ref.p[i], TOL[dtype], f"param {i}")
            assert_close(g, expected_grads[i], TOL[dtype], f"grad {i}")
            assert same_bits(g, quotients[i]), f"grad {i}: not a division in {compute}"
        assert all(float(s) == ref.t for s in state.steps)


@pytest.mark.parametrize("kernel", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_scaled_kernels_agree_bitwise(dtype, kernel):
    """The CPU kernel and the emulated CUDA kernel (scalars on the host or read in the
    kernel) give the same bits for a scaled step."""
    params = make_tensors(SHAPES, dtype, seed=7)
    grads = make_tensors(SHAPES, dtype, seed=8, scale=1000.0)
    a, b = OpState(params, True), OpState([p.clone() for p in params], True)
    ga, gb = [g.clone() for g in grads], [g.clone() for g in grads]
    hyper = dict(op_hyper(weight_decay=0.1, amsgrad=True), **scaler_tensors(512.0, 0.0))
    BACKENDS["cpu"](*a.lists(ga), **hyper)
    BACKENDS[kernel](*b.lists(gb), **hyper)
    assert_bitwise(a, b, kernel)
    assert all(same_bits(x, y) for x, y in zip(ga, gb))


@pytest.mark.parametrize("found", [1.0, 2.0, float("inf"), -1.0])
@pytest.mark.parametrize("kernel", BACKEND_NAMES + ["emulated_cuda_host_steps"])
def test_op_found_inf_writes_nothing(kernel, found):
    """Any non-zero found_inf (2.0: summed over two devices) skips the step: params,
    state, step counts and grads keep their bits."""
    params = make_tensors(SHAPES, torch.float32, seed=9)
    state = OpState(params, True, steps=[3.0] * len(SHAPES))
    grads = make_tensors(SHAPES, torch.float32, seed=10, scale=100.0)
    before, grads_before = state.clone(), [g.clone() for g in grads]
    hyper = dict(op_hyper(amsgrad=True), **scaler_tensors(100.0, found))
    run = HOST_STEPS if kernel == "emulated_cuda_host_steps" else BACKENDS[kernel]
    run(*state.lists(grads), **hyper)
    assert_bitwise(state, before, kernel)
    assert all(same_bits(a, b) for a, b in zip(grads, grads_before))


@pytest.mark.parametrize("kernel", BACKEND_NAMES)
def test_op_zero_found_inf_and_no_grad_scale(kernel):
    """found_inf=0 steps as without it; found_inf alone (no grad_scale) leaves the grads
    unwritten and steps as an unscaled step does."""
    params = make_tensors(SHAPES, torch.float32, seed=11)
    grads = make_tensors(SHAPES, torch.float32, seed=12)
    plain, with_zero = OpState(params, False), OpState([p.clone() for p in params], False)
    BACKENDS[kernel](*plain.lists(grads), **op_hyper())
    g = [x.clone() for x in grads]
    BACKENDS[kernel](*with_zero.lists(g), **op_hyper(), **scaler_tensors(None, 0.0))
    assert_bitwise(plain, with_zero, kernel)
    assert all(same_bits(a, b) for a, b in zip(g, grads))


def test_op_writes_back_into_grads_laid_out_unlike_their_params():
    """A grad with other strides than its param runs on a temporary; the unscaled grad is
    copied back into the user's grad."""
    p = [torch.randn(6, 5)]
    g = [torch.randn(5, 6).t() * 8]
    expected = g[0] / 8
    state = OpState(p, False)
    torch.ops.adamx.adam_(*state.lists(g), **op_hyper(), **scaler_tensors(8.0))
    assert torch.equal(g[0], expected)


def test_op_bumps_the_grads_version_only_when_it_writes_them():
    state = OpState([torch.randn(4)], False)
    g = [torch.randn(4)]
    v = g[0]._version
    torch.ops.adamx.adam_(*state.lists(g), **op_hyper())
    assert g[0]._version == v
    torch.ops.adamx.adam_(*state.lists(g), **op_hyper(), **scaler_tensors(2.0))
    assert g[0]._version > v


@pytest.mark.parametrize("bad, match", [
    (dict(grad_scale=torch.ones(2)), "grad_scale must hold one floating-point value"),
    (dict(grad_scale=torch.tensor(2)), "grad_scale must hold one floating-point value"),
    (dict(found_inf=torch.zeros(3)), "found_inf must hold one floating-point value"),
    (dict(found_inf=torch.tensor(0.0, device="meta")), "found_inf"),
], ids=["grad_scale-shape", "grad_scale-int", "found_inf-shape", "found_inf-meta"])
def test_op_refuses_bad_scaler_tensors_before_any_write(bad, match):
    state = OpState(make_tensors(SHAPES, torch.float32, seed=13), False)
    grads = make_tensors(SHAPES, torch.float32, seed=14)
    before, grads_before = state.clone(), [g.clone() for g in grads]
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.ops.adamx.adam_(*state.lists(grads), **op_hyper(), **bad)
    assert_bitwise(state, before)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_before))


def test_op_refuses_a_grad_that_shares_memory_with_a_param_when_it_writes_grads():
    p = torch.randn(8)
    state = OpState([p], False)
    torch.ops.adamx.adam_(*state.lists([p]), **op_hyper())  # read only: allowed
    with pytest.raises(RuntimeError, match="share memory"):
        torch.ops.adamx.adam_(*state.lists([p]), **op_hyper(), **scaler_tensors(2.0))


def test_functional_adam_takes_grad_scale_and_found_inf():
    state = OpState([torch.randn(5)], False)
    g = [torch.randn(5) * 4]
    expected = g[0] / 4
    adamx.functional.adam(*state.lists(g), lr=LR, beta1=0.9, beta2=0.999, weight_decay=0.0,
                          eps=1e-8, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    assert torch.equal(g[0], expected) and float(state.steps[0]) == 1
    adamx.functional.adam(*state.lists(g), lr=LR, beta1=0.9, beta2=0.999, weight_decay=0.0,
                          eps=1e-8, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))
    assert torch.equal(g[0], expected) and float(state.steps[0]) == 1


# --------------------------------------------------------------------------------------
# On a GPU (each test skips without one)
# --------------------------------------------------------------------------------------
@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("capturable", [False, True], ids=["host-steps", "device-steps"])
@pytest.mark.parametrize("dtype", SCALER_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["step", "unscale_+clip"])
def test_grad_scaler_matches_torch_fused_on_cuda(mode, dtype, capturable):
    if dtype == torch.float16 and mode != "step":
        pytest.skip("GradScaler.unscale_ refuses float16 grads (for every optimizer)")
    compare_with_torch(dtype, dict(amsgrad=True, weight_decay=0.1, capturable=capturable),
                       mode, device="cuda")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scaled_step_in_a_cuda_graph(dtype):
    """A scaled step with step counts, lr, grad_scale and found_inf on the GPU, captured
    once and replayed with new grads, scales and found_inf values: the same numbers as
    eager steps; skipped replays leave everything, step counts included, unchanged."""
    p0 = [p.cuda() for p in make_tensors([(129,), (70000,), (8, 9)], dtype, seed=15)]
    grad_seq = make_grad_seq([(129,), (70000,), (8, 9)], torch.float64, 5, seed=16)
    schedule = [(1024.0, 0.0), (512.0, 1.0), (512.0, 0.0), (2048.0, 2.0), (256.0, 0.0)]
    eager, graphed = OpState([p.clone() for p in p0], True), OpState(
        [p.clone() for p in p0], True)
    for s in (eager, graphed):
        s.exp_avgs, s.exp_avg_sqs, s.max_exp_avg_sqs = (
            [t.cuda() for t in ts] for ts in (s.exp_avgs, s.exp_avg_sqs, s.max_exp_avg_sqs))
        s.steps = [t.cuda() for t in s.steps]
    static_grads = [torch.zeros_like(p) for p in p0]
    scale, found = torch.zeros((), device="cuda"), torch.zeros((), device="cuda")
    hyper = op_hyper(lr=torch.tensor(LR, device="cuda"), weight_decay=0.1, amsgrad=True)
    graph = None
    for k, (sc, fi) in enumerate(schedule):
        grads = [(g * sc).to(dtype).cuda() for g in grad_seq[k]]
        eager_grads = [g.clone() for g in grads]
        torch.ops.adamx.adam_(*eager.lists(eager_grads), **hyper,
                              grad_scale=torch.tensor(sc, device="cuda"),
                              found_inf=torch.tensor(fi, device="cuda"))
        for s, g in zip(static_grads, grads):
            s.copy_(g)
        scale.fill_(sc)
        found.fill_(fi)
        if graph is None:
            warm = graphed.clone()  # a warm-up step on copies, on a side stream
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch.ops.adamx.adam_(*warm.lists([g.clone() for g in static_grads]), **hyper,
                                      grad_scale=scale, found_inf=found)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                torch.ops.adamx.adam_(*graphed.lists(static_grads), **hyper, grad_scale=scale,
                                      found_inf=found)
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise(graphed, eager, f"replay {k}")
        assert all(same_bits(a.cpu(), b.cpu()) for a, b in zip(static_grads, eager_grads))
    assert float(eager.steps[0]) == 3


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("which", ["grad_scale", "found_inf"])
def test_capture_with_a_cpu_scaler_tensor_is_refused(which):
    """A CPU grad_scale or found_inf would be read once, at capture: refused, as a CPU lr."""
    state = OpState([torch.randn(10, device="cuda")], False)
    state.exp_avgs, state.exp_avg_sqs = [torch.zeros(10, device="cuda")], [
        torch.zeros(10, device="cuda")]
    state.steps = [torch.zeros((), device="cuda")]
    grads = [torch.randn(10, device="cuda")]
    scaler = dict(grad_scale=torch.tensor(2.0, device="cuda"),
                  found_inf=torch.tensor(0.0, device="cuda"))
    scaler[which] = scaler[which].cpu()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=which):
        with torch.cuda.graph(graph):
            torch.ops.adamx.adam_(*state.lists(grads), **op_hyper(), **scaler)
