"""The CUDA kernel on a GPU. Every test here is marked `cuda` and skips, saying why, where
torch sees no GPU; nothing needs changing to run them where it does.

The kernel body is the one test_cuda_emulation.py runs on the CPU, and the GPU rounds as
that emulation does (IEEE float32/float64 operations, no FMA contraction: setup.py passes
-fmad=false), so on the host-scalar path (step counts on the CPU) the GPU result is
compared bitwise with the emulation. Where the GPU computes the bias corrections itself
(capturable), its pow() may differ from the host's in the last bit of a float64, so those
comparisons use the reference tolerances of conftest.py.
"""

import pytest
import torch

import adamx
import adamx.functional as F
from conftest import (DTYPES, LR, OPTION_GRID, OPTION_IDS, REDUCED, TOL, OpState,
                      assert_bitwise, assert_close, make_grad_seq, make_tensors, needs_build,
                      op_hyper)
from test_cuda_emulation import SHAPES, emulated

HAVE_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.cuda,
    needs_build,
    pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA GPU (torch.cuda.is_available() is False)"),
]


def to(state, device):
    out = state.clone()
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        setattr(out, name, [t.to(device) for t in getattr(out, name)])
    return out


def to_steps(state, device):
    state.steps = [s.to(device) for s in state.steps]
    return state


def assert_states_close(gpu, cpu, tol, what=""):
    for i, (a, b) in enumerate(zip(gpu.tensors(), cpu.tensors())):
        assert_close(a.cpu(), b, tol, f"{what}: tensor {i}")


def test_built_with_cuda_kernels():
    assert adamx.build_info()["cuda"], (
        "a GPU is present but adamx was built without its CUDA kernels; rebuild with a CUDA "
        "build of torch (ADAMX_CUDA=1 pip install .)")


@pytest.mark.parametrize("options", OPTION_GRID, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_option_grid_matches_emulation_bitwise(dtype, options):
    shapes = SHAPES + [(70001,), (3, 65537)]  # several 65536-element chunks
    params = make_tensors(shapes, dtype, seed=1)
    grad_seq = make_grad_seq(shapes, dtype, 3, seed=2)
    hyper = op_hyper(weight_decay=0.1, **options)
    cpu = OpState(params, options["amsgrad"])
    gpu = to(cpu, "cuda")  # step counts stay on the CPU: host scalars
    for grads in grad_seq:
        emulated(*cpu.lists(grads), hyper=hyper)
        torch.ops.adamx.adam_(*gpu.lists([g.cuda() for g in grads]), **hyper)
    assert_bitwise(gpu, cpu, f"{dtype} {options}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_device_steps_and_lr_match_emulation(dtype):
    shapes = [(7,), (100003,), (3, 50)]
    hyper = op_hyper(lr=torch.tensor(LR), amsgrad=True, weight_decay=0.1)
    cpu = OpState(make_tensors(shapes, dtype, seed=3), amsgrad=True, steps=[0, 0, 5])
    gpu = to_steps(to(cpu, "cuda"), "cuda")
    gpu_hyper = dict(hyper, lr_tensor=hyper["lr_tensor"].cuda())
    for grads in make_grad_seq(shapes, dtype, 3, seed=4):
        emulated(*cpu.lists(grads), hyper=hyper, steps_in_kernel=True, lr_in_kernel=True)
        torch.ops.adamx.adam_(*gpu.lists([g.cuda() for g in grads]), **gpu_hyper)
    assert [float(s) for s in gpu.steps] == [3, 3, 8]
    assert all(s.is_cuda for s in gpu.steps)
    assert_states_close(gpu, cpu, TOL[dtype])


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_matches_torch_on_cuda(dtype, decoupled, amsgrad, capturable):
    shapes = [(3,), (1031,), (64, 65)]
    p0 = make_tensors(shapes, dtype, seed=5)
    ours = [p.cuda().requires_grad_() for p in p0]
    theirs = [p.cuda().requires_grad_() for p in p0]
    kw = dict(lr=LR, weight_decay=0.1, amsgrad=amsgrad)
    impl = {"fused": True} if dtype in REDUCED else {"foreach": False}
    opt = (adamx.AdamW if decoupled else adamx.Adam)(ours, **kw, capturable=capturable)
    # The reference is torch with capturable=False whatever ours is: capturable only moves
    # where the bias corrections are computed, and adamx computes them in double on the GPU
    # as on the host. torch's capturable single-tensor loop computes them from its float32
    # step tensor in float32 (measured on an H100: float64 params then differ from torch's
    # non-capturable result by 1.7e-6 relative after 5 steps, float32 ones by ~10 ulp).
    ref = (torch.optim.AdamW if decoupled else torch.optim.Adam)(theirs, **kw, **impl)
    for grads in make_grad_seq(shapes, dtype, 5, seed=6):
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.cuda(), g.cuda()
        opt.step()
        ref.step()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a.detach().cpu(), b.detach().cpu(), TOL[dtype], f"param {i}")
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            assert_close(opt.state[a][key].cpu(), ref.state[b][key].cpu(), TOL[dtype], key)
        assert opt.state[a]["step"].is_cuda == capturable
        assert float(opt.state[a]["step"]) == 5


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_capturable_step_in_a_cuda_graph(dtype, tensor_lr):
    """A whole capturable step captured once and replayed: the same numbers as eager
    steps, step counts advancing on the GPU, a tensor lr changed between replays used."""
    shapes = [(129,), (70000,), (8, 9)]
    p0 = make_tensors(shapes, dtype, seed=7)
    grad_seq = [[g.cuda() for g in gs] for gs in make_grad_seq(shapes, dtype, 6, seed=8)]
    lrs = [LR, LR, LR / 2, LR / 2, LR / 4, LR]

    def make():
        params = [p.cuda().requires_grad_() for p in p0]
        lr = torch.tensor(LR, device="cuda") if tensor_lr else LR
        return params, adamx.Adam(params, lr=lr, amsgrad=True, weight_decay=0.05,
                                  capturable=True)

    eager_params, eager = make()
    graph_params, opt = make()
    static_grads = [torch.zeros_like(p) for p in graph_params]
    for p, g in zip(graph_params, static_grads):
        p.grad = g

    def set_lr(o, k):
        if tensor_lr:
            o.param_groups[0]["lr"].fill_(lrs[k])

    # step 1 eagerly on both (makes the state), then capture step 2 and replay it
    for k, grads in enumerate(grad_seq):
        for p, g in zip(eager_params, grads):
            p.grad = g
        set_lr(eager, k)
        eager.step()
        for s, g in zip(static_grads, grads):
            s.copy_(g)
        set_lr(opt, k)
        if k == 0:
            opt.step()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            continue
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(graph_params, eager_params):
        assert torch.equal(a.detach(), b.detach())
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(opt.state[a][key], eager.state[b][key])
        assert float(opt.state[a]["step"]) == len(grad_seq)


def test_capture_with_step_counts_on_the_cpu_is_refused():
    params = [torch.randn(10, device="cuda", requires_grad=True)]
    opt = adamx.Adam(params, lr=LR, capturable=False)
    params[0].grad = torch.randn(10, device="cuda")
    opt.step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable"):
        with torch.cuda.graph(graph):
            opt.step()


def test_runs_on_the_current_stream():
    """On a side stream, the grads are written after a long sleep and then the step runs:
    a kernel launched on any other stream would read the grads before they are written."""
    shapes = [(100000,), (33,)]
    cpu = OpState(make_tensors(shapes, torch.float32, seed=9), amsgrad=False)
    gpu = to(cpu, "cuda")
    grads = make_grad_seq(shapes, torch.float32, 1, seed=10)[0]
    emulated(*cpu.lists(grads), hyper=op_hyper())
    ready = [g.cuda() for g in grads]
    gpu_grads = [torch.zeros_like(g) for g in ready]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for dst, src in zip(gpu_grads, ready):
            dst.copy_(src)
        torch.ops.adamx.adam_(*gpu.lists(gpu_grads), **op_hyper())
    torch.cuda.synchronize()
    assert_bitwise(gpu, cpu)


@pytest.mark.skipif(HAVE_CUDA and torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_params_on_another_gpu_than_the_current_one():
    shapes = [(1000,), (7, 7)]
    cpu = OpState(make_tensors(shapes, torch.float32, seed=11), amsgrad=True)
    gpu = to(cpu, "cuda:1")
    grads = make_grad_seq(shapes, torch.float32, 1, seed=12)[0]
    emulated(*cpu.lists(grads), hyper=op_hyper(amsgrad=True))
    with torch.cuda.device(0):
        torch.ops.adamx.adam_(*gpu.lists([g.to("cuda:1") for g in grads]),
                              **op_hyper(amsgrad=True))
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    assert_bitwise(gpu, cpu)
    # and an optimizer whose params live on the second GPU, capturable
    params = [torch.randn(50, device="cuda:1", requires_grad=True)]
    opt = adamx.Adam(params, lr=LR, capturable=True)
    params[0].grad = torch.randn(50, device="cuda:1")
    with torch.cuda.device(0):
        opt.step()
    assert opt.state[params[0]]["step"].device == torch.device("cuda:1")


def same_layout_on_cuda(t):
    """A CUDA copy of `t` with its sizes, strides and storage offset."""
    storage = torch.zeros(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype,
                          device="cuda")
    out = storage.as_strided(t.shape, t.stride(), t.storage_offset())
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_and_non_dense_tensors(dtype):
    """Views starting one element into their storage (scalar path), transposed and strided
    params, grads laid out unlike their params: as the emulation, bitwise."""
    g = torch.Generator().manual_seed(13)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    params = [rnd(1001)[1:], rnd(40, 30).t(), rnd(50, 4)[:, ::2], rnd(65538)[1:]]
    grads = [rnd(1001)[1:], rnd(30, 40), rnd(50, 2), rnd(65537)]
    cpu = OpState([p.clone() for p in params], amsgrad=True)
    cpu.params = params
    gpu = OpState([same_layout_on_cuda(p) for p in params], amsgrad=True)
    assert gpu.params[0].storage_offset() == 1 and not gpu.params[2].is_contiguous()
    for grads_k in (grads, [x * 0.5 for x in grads]):
        emulated(*cpu.lists(grads_k), hyper=op_hyper(amsgrad=True))
        torch.ops.adamx.adam_(*gpu.lists([same_layout_on_cuda(x) for x in grads_k]),
                              **op_hyper(amsgrad=True))
    assert_bitwise(gpu, cpu)


def test_empty_inputs():
    F.adam([], [], [], [], [], [], lr=LR, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)
    st = OpState([torch.zeros(0, device="cuda")], amsgrad=False)
    torch.ops.adamx.adam_(*st.lists([torch.zeros(0, device="cuda")]), **op_hyper())
    assert float(st.steps[0]) == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_on_cuda(backend):
    torch._dynamo.reset()
    shapes = [(4, 6), (13,)]
    p0 = [p.cuda() for p in make_tensors(shapes, torch.float32, seed=14)]
    grads = [g.cuda() for g in make_grad_seq(shapes, torch.float32, 1, seed=15)[0]]

    def step(params, grads, m, v, steps):
        torch.ops.adamx.adam_(params, grads, m, v, [], steps, lr=LR, beta1=0.9, beta2=0.999,
                              weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                              decoupled_weight_decay=False, eps_inside_sqrt=False)

    def fresh():
        params = [p.clone() for p in p0]
        return (params, [torch.zeros_like(p) for p in params],
                [torch.zeros_like(p) for p in params],
                [torch.tensor(0.0, device="cuda") for _ in params])

    a, b = fresh(), fresh()
    step(a[0], grads, a[1], a[2], a[3])
    torch.compile(step, backend=backend, fullgraph=True)(b[0], grads, b[1], b[2], b[3])
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert torch.equal(s, t)
    torch._dynamo.reset()


def _free_gpu_bytes():
    return torch.cuda.mem_get_info()[0] if HAVE_CUDA else 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype,bytes_per", [(torch.bfloat16, 2), (torch.float16, 2),
                                             (torch.float32, 4)], ids=str)
def test_tensor_of_more_than_2_31_elements(dtype, bytes_per):
    """Every element of a param of 2**31 + 17 elements is updated, and its last elements
    (offsets past 2**31) as the CPU kernel updates them."""
    n = 2**31 + 17
    need = 5 * n * bytes_per + 2 * n  # p, g, m, v, a copy of a slice, and a bool mask
    if _free_gpu_bytes() < need + 2**30:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    p = torch.zeros(n, dtype=dtype, device="cuda")
    g = torch.randn(n, dtype=dtype, device="cuda")
    g[g == 0] = 1  # every grad nonzero
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    step = torch.tensor(0.0)
    torch.ops.adamx.adam_([p], [g], [m], [v], [], [step], **op_hyper())
    torch.cuda.synchronize()
    # p started at 0 and every grad is nonzero: each element moved by about lr
    assert bool((p != 0).all()), "some elements were not updated"
    for sl in (slice(0, 1000), slice(2**31 - 1000, n)):  # the end, across 2**31
        small = OpState([torch.zeros(sl.stop - sl.start, dtype=dtype)], amsgrad=False)
        torch.ops.adamx.adam_(*small.lists([g[sl].cpu()]), **op_hyper())
        assert torch.equal(p[sl].cpu(), small.params[0]), sl
        assert torch.equal(m[sl].cpu(), small.exp_avgs[0]), sl
        assert torch.equal(v[sl].cpu(), small.exp_avg_sqs[0]), sl
    del p, g, m, v
    torch.cuda.empty_cache()


@pytest.mark.parametrize("capturable", [False, True])
def test_compact_moments_match_the_cpu_bitwise(capturable):
    """bfloat16 moments and 8-bit codes on the GPU (the codes' warp kernel): the CPU
    kernel's bits, host or device step counts (the rounding key reads the step in the
    kernel then)."""
    from test_lean_state import CONFIGS, LeanCase, _assert_same, _op_kwargs, _run_cpu

    for k, config in enumerate(CONFIGS):
        want = LeanCase(config, seed=k)
        got = want.clone()
        for name in got._LISTS:  # the state's lists and the grads
            if name != "steps" or capturable:
                setattr(got, name, [t.cuda() for t in getattr(got, name)])
        switches = dict(decoupled_weight_decay=True, weight_decay=0.1)
        _run_cpu(want, 3, switches)
        torch.ops.adamx.adam_(*got.lists(), **_op_kwargs(got, 3, switches))
        for name in got._LISTS:
            setattr(got, name, [t.cpu() for t in getattr(got, name)])
        _assert_same(got, want)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_lean_optimizer_on_cuda_matches_cpu(state_dtype):
    torch.manual_seed(0)
    cpu = torch.nn.Linear(300, 100)
    gpu = torch.nn.Linear(300, 100).cuda()
    gpu.load_state_dict(cpu.state_dict())
    opts = []
    for m in (cpu, gpu):
        torch.manual_seed(2)  # the same drawn seed (compact moments draw random bits)
        opts.append(adamx.AdamW(m.parameters(), state_dtype=state_dtype))
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in cpu.parameters()]
        for m, opt, dev in ((cpu, opts[0], "cpu"), (gpu, opts[1], "cuda")):
            for p, g in zip(m.parameters(), grads):  # the same grads: matmuls differ
                p.grad = g.to(dev)
            opt.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(a, b.cpu())
