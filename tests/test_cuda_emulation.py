"""The CUDA kernel, tested without a GPU.

torch.ops.adamx._adam_emulated_cuda_ runs the CUDA backend's own host code (checks, the
multi-tensor launch tables) on CPU tensors and then calls the CUDA kernel's body, the
__host__ __device__ function that the __global__ kernel forwards blockIdx/threadIdx to,
for every block and thread of every launch. Its extra arguments shrink the launch
geometry (chunk size, threads per block, tensors and blocks per launch table) so that
small tensors exercise several chunks per tensor, several launches, vector and scalar
paths; steps_in_kernel / lr_in_kernel make the kernel body read the step counts and the
lr from memory, as it does for capturable steps on a GPU.

The emulated kernel computes with the same formula, in the same type (float32, or
float64 for float64 params), with the same scalars as the CPU kernel, and neither
contracts multiplies and adds into FMAs: so the two agree bitwise, and that is what most
tests check. Comparisons with torch.optim use the tolerances of conftest.py.
"""

import pytest
import torch

import adamx
from conftest import (DTYPES, LR, OPTION_GRID, OPTION_IDS, REDUCED, TOL, OpState, RefAdam,
                      assert_bitwise, assert_close, make_grad_seq, make_tensors, needs_build,
                      op_hyper)

pytestmark = needs_build
CUDA = adamx._ops._C  # the launch geometry's defaults (CUDA_MAX_TENSORS, ...)

# Odd lengths, empties, and tensors of several chunks at the small chunk sizes below.
SHAPES = [(), (0,), (1,), (7,), (3, 5), (17, 33), (2, 0, 3), (1031,), (4, 250)]


def emulated(*lists, hyper, **geometry):
    """One emulated CUDA step; returns [launches, vectorized blocks, blocks run]."""
    return list(torch.ops.adamx._adam_emulated_cuda_(*lists, **hyper, **geometry))


def run_both(state, grad_seq, hyper, **geometry):
    """Steps `state` with the emulated CUDA kernel and a clone with the CPU kernel;
    returns (emulated state, CPU state, counts of the last emulated step)."""
    cpu = state.clone()
    counts = None
    for grads in grad_seq:
        counts = emulated(*state.lists(grads), hyper=hyper, **geometry)
        torch.ops.adamx.adam_(*cpu.lists(grads), **hyper)
    return state, cpu, counts


# ---------------------------------------------------------------------------------------
# Agreement with the CPU kernel, bitwise, over options, dtypes and launch geometries.
# ---------------------------------------------------------------------------------------
GEOMETRIES = {
    # several chunks per tensor, chunk starts 16-byte aligned for every dtype
    "chunks": dict(chunk_size=96, block_dim=8),
    # odd chunk size: chunk starts that are not whole vectors (scalar path), and a thread
    # count that does not divide it
    "odd": dict(chunk_size=37, block_dim=5),
    # tiny tables: many launches; a tensor's chunks split across launches
    "tables": dict(chunk_size=64, block_dim=4, max_tensors=3, max_blocks=5),
    # the real geometry (one chunk per tensor here)
    "default": dict(),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("options", OPTION_GRID, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_option_grid_matches_cpu_kernel_bitwise(dtype, options, geometry):
    params = make_tensors(SHAPES, dtype, seed=1)
    grad_seq = make_grad_seq(SHAPES, dtype, 3, seed=2)
    hyper = op_hyper(weight_decay=0.1, **options)
    emu, cpu, counts = run_both(OpState(params, options["amsgrad"]), grad_seq, hyper,
                                **GEOMETRIES[geometry])
    assert_bitwise(emu, cpu, f"{dtype} {options} {geometry}")
    assert all(float(s) == 3 for s in emu.steps)
    if geometry == "tables":
        assert counts[0] > 5  # launches
    if geometry == "chunks":
        assert counts[1] == counts[2] > len(SHAPES)  # all vectorized, several chunks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 0.25])
def test_many_steps_match_float64_reference(dtype, weight_decay):
    shapes = [(5,), (300,), (2, 77)]
    p0 = make_tensors(shapes, dtype, seed=3)
    st = OpState([p.clone() for p in p0], amsgrad=True)
    ref = RefAdam(p0, dtype, lr=LR, weight_decay=weight_decay, amsgrad=True)
    hyper = op_hyper(weight_decay=weight_decay, amsgrad=True)
    for grads in make_grad_seq(shapes, dtype, 15, seed=4):
        emulated(*st.lists(grads), hyper=hyper, chunk_size=64, block_dim=16)
        ref.step(grads)
    for i, p in enumerate(st.params):
        assert_close(p, ref.p[i], TOL[dtype], f"param {i}")
        assert_close(st.exp_avgs[i], ref.m[i], TOL[dtype], f"exp_avg {i}")
        assert_close(st.exp_avg_sqs[i], ref.v[i], TOL[dtype], f"exp_avg_sq {i}")
        assert_close(st.max_exp_avg_sqs[i], ref.vmax[i], TOL[dtype], f"vmax {i}")


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch_optim(dtype, decoupled, amsgrad):
    """Against torch.optim.Adam/AdamW (their fused CPU kernel for float16/bfloat16, whose
    for-loop computes in the reduced dtype; see TOL in conftest.py)."""
    shapes = [(3,), (129,), (8, 33)]
    params = make_tensors(shapes, dtype, seed=5)
    tparams = [p.clone().requires_grad_(True) for p in params]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    impl = {"fused": True} if dtype in REDUCED else {"foreach": False}
    topt = cls(tparams, lr=LR, weight_decay=0.1, amsgrad=amsgrad, **impl)
    st = OpState(params, amsgrad)
    hyper = op_hyper(weight_decay=0.1, amsgrad=amsgrad, decoupled_weight_decay=decoupled)
    for grads in make_grad_seq(shapes, dtype, 5, seed=6):
        for tp, g in zip(tparams, grads):
            tp.grad = g.clone()
        topt.step()
        emulated(*st.lists(grads), hyper=hyper, chunk_size=48, block_dim=8)
    for i, tp in enumerate(tparams):
        assert_close(st.params[i], tp.detach(), TOL[dtype], f"param {i}")
        tstate = topt.state[tp]
        assert_close(st.exp_avgs[i], tstate["exp_avg"], TOL[dtype], f"exp_avg {i}")
        assert_close(st.exp_avg_sqs[i], tstate["exp_avg_sq"], TOL[dtype], f"v {i}")
        if amsgrad:
            assert_close(st.max_exp_avg_sqs[i], tstate["max_exp_avg_sq"], TOL[dtype])


def test_all_dtypes_in_one_call():
    """One launch sequence per dtype; each tensor updated as the CPU kernel does."""
    shapes = [(33,), (8, 9), (1,), (200,)]
    params = [t for dtype in DTYPES for t in make_tensors(shapes, dtype, seed=7)]
    grads = [t for dtype in DTYPES for t in make_tensors(shapes, dtype, seed=8)]
    emu, cpu, counts = run_both(OpState(params, amsgrad=True), [grads],
                                op_hyper(weight_decay=0.01, amsgrad=True), chunk_size=64,
                                block_dim=4)
    assert_bitwise(emu, cpu)
    assert counts[0] == len(DTYPES)


def test_geometry_does_not_change_results():
    shapes = [(1000,), (3, 333), (5,)]
    base = OpState(make_tensors(shapes, torch.float32, seed=9), amsgrad=True)
    grad_seq = make_grad_seq(shapes, torch.float32, 2, seed=10)
    hyper = op_hyper(amsgrad=True, weight_decay=0.1)
    results = []
    for geometry in [dict(), dict(chunk_size=1, block_dim=1), dict(chunk_size=4, block_dim=3),
                     dict(chunk_size=100, block_dim=64, max_tensors=1, max_blocks=1),
                     dict(chunk_size=65536, block_dim=1024)]:
        st = base.clone()
        for grads in grad_seq:
            emulated(*st.lists(grads), hyper=hyper, **geometry)
        results.append(st)
    for st in results[1:]:
        assert_bitwise(st, results[0])


# ---------------------------------------------------------------------------------------
# Vector and scalar paths
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_views_take_the_scalar_path(dtype):
    """Views that start one element into their storage cannot use 16-byte accesses; the
    blocks holding them run the scalar path, and every element is still updated."""
    n = 301

    def views(seed):
        return [t[1:] for t in make_tensors([(n + 1,), (2 * n + 1,)], dtype, seed)]

    params, grads = views(11), views(12)
    st = OpState(params, amsgrad=True)
    st.exp_avgs = [torch.zeros(t.numel() + 1, dtype=dtype)[1:] for t in params]
    st.exp_avg_sqs = [torch.zeros(t.numel() + 1, dtype=dtype)[1:] for t in params]
    st.max_exp_avg_sqs = [torch.zeros(t.numel() + 1, dtype=dtype)[1:] for t in params]
    assert all(t.storage_offset() == 1 for t in st.params + grads + st.exp_avgs)
    hyper = op_hyper(amsgrad=True, weight_decay=0.1)
    cpu = st.clone()
    before = [p.clone() for p in params]
    counts = emulated(*st.lists(grads), hyper=hyper, chunk_size=64, block_dim=8)
    torch.ops.adamx.adam_(*cpu.lists(grads), **hyper)
    assert counts[1] == 0 and counts[2] > 2  # no block vectorized
    assert_bitwise(st, cpu)
    for p, b in zip(params, before):
        assert (p != b).all()  # every element moved (lr is large)


@pytest.mark.parametrize("which", ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_one_misaligned_pointer_disables_vectors(which):
    """The vector path needs every pointer aligned, not just the param's."""
    n = 256
    dtype = torch.float32

    def buf(seed=None, misaligned=False):
        if seed is None:
            t = torch.zeros(n + 1, dtype=dtype)
        else:
            t = make_tensors([(n + 1,)], dtype, seed)[0]
        return t[1:] if misaligned else t[:n]

    st = OpState([buf(13, which == "param")], amsgrad=True)
    grads = [buf(14, which == "grad")]
    st.exp_avgs = [buf(misaligned=which == "exp_avg")]
    st.exp_avg_sqs = [buf(misaligned=which == "exp_avg_sq")]
    st.max_exp_avg_sqs = [buf(misaligned=which == "max_exp_avg_sq")]
    cpu = st.clone()
    hyper = op_hyper(amsgrad=True)
    counts = emulated(*st.lists(grads), hyper=hyper, chunk_size=64, block_dim=8)
    torch.ops.adamx.adam_(*cpu.lists(grads), **hyper)
    assert counts == [1, 0, 4]
    assert_bitwise(st, cpu)
    # the same with everything aligned: all four blocks vectorized
    st2 = OpState([buf(13)], amsgrad=True)
    assert emulated(*st2.lists([buf(14)]), hyper=hyper, chunk_size=64, block_dim=8) == [1, 4, 4]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_vector_and_scalar_blocks(dtype):
    """chunk_size * itemsize not a multiple of 16: chunk starts alternate between
    vectorizable and not; lengths leave a scalar tail in the vectorized blocks."""
    shapes = [(1001,), (515,)]
    emu, cpu, counts = run_both(OpState(make_tensors(shapes, dtype, seed=15), amsgrad=False),
                                make_grad_seq(shapes, dtype, 2, seed=16),
                                op_hyper(), chunk_size=101, block_dim=7)
    assert_bitwise(emu, cpu)
    assert 0 < counts[1] < counts[2]


# ---------------------------------------------------------------------------------------
# Step counts and lr read by the kernel body (the capturable path)
# ---------------------------------------------------------------------------------------
KERNEL_SCALAR_CASES = [(where, lr_dtype)
                       for where in ("steps", "lr", "both")
                       for lr_dtype in (None, torch.float32, torch.float64, torch.bfloat16)
                       if not (where == "lr" and lr_dtype is None)]


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("where,lr_dtype", KERNEL_SCALAR_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scalars_read_in_the_kernel_match_host_scalars(dtype, where, lr_dtype, step_dtype):
    """The kernel body computes the bias corrections itself (in float64, as the host does)
    from step counts incremented before it runs: the same bits as host scalars. "lr" alone
    is a device lr with host step counts (the kernel computes the scalars from both)."""
    shapes = [(7,), (130,), (3, 50)]
    lr = LR if lr_dtype is None else torch.tensor(LR, dtype=lr_dtype)
    hyper = op_hyper(lr=lr, amsgrad=True, weight_decay=0.1, eps_inside_sqrt=where == "both")
    base = OpState(make_tensors(shapes, dtype, seed=17), amsgrad=True, step_dtype=step_dtype,
                 steps=[0, 0, 4])
    host, kernel = base.clone(), base.clone()
    flags = dict(steps_in_kernel=where in ("steps", "both"), lr_in_kernel=where in ("lr", "both"))
    for grads in make_grad_seq(shapes, dtype, 3, seed=18):
        emulated(*host.lists(grads), hyper=hyper, chunk_size=64, block_dim=4)
        emulated(*kernel.lists(grads), hyper=hyper, chunk_size=64, block_dim=4, **flags)
    assert_bitwise(kernel, host)
    assert [float(s) for s in kernel.steps] == [3, 3, 7]
    assert all(s.dtype == step_dtype for s in kernel.steps)


def test_different_step_counts_per_tensor():
    """Params whose step counts differ (added to the optimizer later) get their own bias
    corrections; more distinct counts than a table's scalar sets start new launches."""
    shapes = [(40,)] * 6
    steps = [0, 0, 3, 9, 3, 100]
    st = OpState(make_tensors(shapes, torch.float32, seed=19), amsgrad=False, steps=steps)
    emu, cpu, counts = run_both(st, make_grad_seq(shapes, torch.float32, 2, seed=20),
                                op_hyper(), chunk_size=16, block_dim=4, max_scalar_sets=2)
    assert_bitwise(emu, cpu)
    assert counts[0] == 3  # {0, 3}, {9, 3}, {100}
    assert [float(s) for s in emu.steps] == [s + 2 for s in steps]


# ---------------------------------------------------------------------------------------
# Layouts, empty inputs, errors
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_dense_and_mismatched_layouts(dtype):
    """Params that are not dense, or state laid out unlike its param, run on dense
    temporaries that are copied back."""
    g = torch.Generator().manual_seed(21)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    params = [rnd(40, 30).t(), rnd(50, 4)[:, ::2], rnd(3, 4, 5).permute(2, 0, 1), rnd(64)]
    grads = [rnd(30, 40), rnd(50, 2), rnd(5, 3, 4), rnd(128)[::2]]
    st = OpState(params, amsgrad=True)
    st.exp_avgs[0] = torch.zeros(30, 40, dtype=dtype)  # contiguous, param transposed
    ids = [id(p) for p in st.params]
    emu, cpu, _ = run_both(st, [grads, [x * 0.5 for x in grads]], op_hyper(amsgrad=True),
                           chunk_size=64, block_dim=8)
    assert [id(p) for p in emu.params] == ids
    assert_bitwise(emu, cpu)


def test_empty_lists_and_empty_tensors():
    assert emulated([], [], [], [], [], [], hyper=op_hyper()) == [0, 0, 0]
    st = OpState([torch.zeros(0), torch.zeros(3, 0)], amsgrad=True)
    counts = emulated(*st.lists([torch.zeros(0), torch.zeros(3, 0)]),
                      hyper=op_hyper(amsgrad=True))
    assert counts == [0, 0, 0]  # no launch
    assert [float(s) for s in st.steps] == [1, 1]  # but the steps count


def test_invalid_input_is_refused_before_anything_is_written():
    shapes = [(10,), (20,)]
    st = OpState(make_tensors(shapes, torch.float32, seed=22), amsgrad=False)
    before = st.clone()
    bad_grads = [torch.ones(10), torch.ones(21)]
    with pytest.raises(RuntimeError, match="shape"):
        emulated(*st.lists(bad_grads), hyper=op_hyper())
    assert_bitwise(st, before)
    with pytest.raises(RuntimeError, match="chunk_size"):
        emulated(*st.lists([torch.ones(10), torch.ones(20)]), hyper=op_hyper(), chunk_size=0)
    with pytest.raises(RuntimeError, match="max_tensors"):
        emulated(*st.lists([torch.ones(10), torch.ones(20)]), hyper=op_hyper(), max_tensors=37)
    assert_bitwise(st, before)


# ---------------------------------------------------------------------------------------
# 64-bit sizes and offsets
# ---------------------------------------------------------------------------------------
def plan(numels, **geometry):
    flat = torch.ops.adamx._cuda_launch_plan(numels, **geometry)
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


@pytest.mark.parametrize("geometry", [dict(),
                                      dict(chunk_size=1 << 20, max_tensors=2, max_blocks=7)])
def test_launch_plan_covers_tensors_of_more_than_2_31_elements(geometry):
    numels = [0, 2**31 + 17, 5, 2**33 + 1, 1, 0, 3 * 2**30]
    chunk = geometry.get("chunk_size", 65536)
    blocks = plan(numels, **geometry)
    seen = {}
    per_launch = {}
    for launch, tensor, c in blocks:
        seen.setdefault(tensor, []).append(c)
        per_launch.setdefault(launch, set()).add(tensor)
        assert len(per_launch[launch]) <= geometry.get("max_tensors", CUDA.CUDA_MAX_TENSORS)
    for tensor, n in enumerate(numels):
        expected = list(range((n + chunk - 1) // chunk))
        assert seen.get(tensor, []) == expected, tensor  # every chunk once, in order
    counts = [sum(1 for b in blocks if b[0] == k) for k in per_launch]
    assert max(counts) <= geometry.get("max_blocks", CUDA.CUDA_MAX_BLOCKS)
    assert sorted(per_launch) == list(range(len(per_launch)))


def test_launch_plan_refuses_chunk_indices_beyond_int32():
    with pytest.raises(RuntimeError, match="chunks"):
        plan([2**40], chunk_size=1)


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.slow
@pytest.mark.skipif(_mem_available() < 8 * 2**30,
                    reason="needs ~8 GiB of free memory (4 bfloat16 tensors of 2**31+17 "
                           "elements are allocated, but only their first and last chunks "
                           "are touched)")
def test_tensor_of_more_than_2_31_elements_first_and_last_chunks():
    """A bfloat16 param of 2**31 + 17 elements: its last chunk starts at element 2**31,
    past any 32-bit offset. The emulation runs the first and last chunk of it (all of it
    would take minutes) and they must match the CPU kernel on the same values."""
    n = 2**31 + 17
    dtype = torch.bfloat16
    edge = 65536  # the default chunk size
    tensors = [torch.empty(n, dtype=dtype) for _ in range(4)]  # untouched pages stay free
    p, g, m, v = tensors
    g0 = torch.Generator().manual_seed(23)
    sl = [slice(0, edge), slice(2**31, n)]
    for s in sl:
        k = s.stop - s.start
        p[s] = torch.randn(k, generator=g0).to(dtype)
        g[s] = torch.randn(k, generator=g0).to(dtype)
        m[s] = 0
        v[s] = 0
    sentinel = slice(2**31 - 4, 2**31)
    p[sentinel] = 7
    expected = []
    for s in sl:
        small = OpState([p[s].clone()], amsgrad=False)
        torch.ops.adamx.adam_(*small.lists([g[s].clone()]), **op_hyper())
        expected.append(small)
    step = torch.tensor(0.0)
    counts = emulated([p], [g], [m], [v], [], [step], hyper=op_hyper(), edge_blocks_only=True,
                      block_dim=256)
    # 2**15 + 1 chunks in launches of CUDA_MAX_BLOCKS blocks; two run, both vectorized
    blocks = CUDA.CUDA_MAX_BLOCKS
    assert counts == [(2**15 + 1 + blocks - 1) // blocks, 2, 2]
    for s, small in zip(sl, expected):
        assert torch.equal(p[s], small.params[0])
        assert torch.equal(m[s], small.exp_avgs[0])
        assert torch.equal(v[s], small.exp_avg_sqs[0])
    assert (p[sentinel] == 7).all()  # blocks not run left alone
    assert float(step) == 1
    del tensors, p, g, m, v
