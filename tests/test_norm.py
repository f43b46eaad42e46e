"""adamx::norm_accumulate, the norm kernel behind Adam.clip_grad_norm_: the CPU kernel on
every instruction set and the CUDA body emulated on the CPU, against a float64 reference;
deterministic for any thread count and launch split; NaN and inf as torch's norms;
clear errors; its fake kernel (opcheck)."""

import math

import pytest
import torch

import adamx
from conftest import needs_build

pytestmark = needs_build

ORDERS = [1.0, 2.0, float("inf"), 3.5, 0.5]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _cpu_capabilities():
    return adamx.supported_cpu_capabilities() if adamx.is_compiled() else []


def _tensors(dtype, seed):
    """Odd sizes and layouts: a tensor of several CPU chunks (16384) and emulated ones,
    a transposed (dense, not contiguous) one, a strided view, empty ones, a scalar."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    return [rand(40001), rand(37, 11).t(), rand(0), rand(64, 9)[:, ::2], rand(()),
            rand(3, 0, 2), rand(129), rand(1)]


def _reference(tensors, p):
    """The accumulator in float64 from the float64 values of the elements."""
    xs = [t.double().abs().reshape(-1) for t in tensors]
    if math.isinf(p):
        return max((x.max().item() for x in xs if x.numel()), default=0.0)
    return math.fsum(math.fsum((x ** p).tolist()) for x in xs)


def _backends():
    out = [(f"cpu-{isa}", isa, None) for isa in _cpu_capabilities()]
    out += [("emulated", None, dict(chunk_size=1000, max_tensors=2, block_dim=64)),
            ("emulated-default-geometry", None, {})]
    return out


def _run(backend, tensors, p):
    _, isa, geometry = backend
    if geometry is None:
        adamx.set_cpu_capability(isa)
        return torch.ops.adamx.norm_accumulate(tensors, p)
    return torch.ops.adamx._norm_accumulate_emulated_cuda(tensors, p, **geometry)


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", ORDERS)
def test_matches_float64_reference(backend, dtype, p, restore_cpu_capability):
    tensors = _tensors(dtype, seed=ORDERS.index(p) * 10 + DTYPES.index(dtype))
    got = _run(backend, tensors, p)
    assert got.dtype == torch.float64 and got.shape == ()
    want = _reference(tensors, p)
    if math.isinf(p):
        assert got.item() == want  # a max: exact
    else:
        # the sum's rounding in double; order p also pow's last bit per element
        assert got.item() == pytest.approx(want, rel=1e-13, abs=0)


@pytest.mark.parametrize("p", ORDERS)
def test_independent_of_threads_and_launch_split(p, restore_threads):
    tensors = _tensors(torch.float32, seed=5) * 3
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(torch.ops.adamx.norm_accumulate(tensors, p))
    assert torch.equal(results[0], results[1])
    # The emulated CUDA launches: the same chunks and one join order, however the tensors
    # are split between launches.
    split = [torch.ops.adamx._norm_accumulate_emulated_cuda(tensors, p, chunk_size=1000,
                                                            max_tensors=k, block_dim=32)
             for k in (1, 3, 64)]
    assert torch.equal(split[0], split[1]) and torch.equal(split[1], split[2])


def test_float64_accumulation_keeps_the_float32_norm_exact():
    """4M elements of 1.1: each square is exact in float64, and the sums of chunks, then of
    chunk accumulators, stay within about 1e-12 of the exact sum (each addition rounds by
    at most 2^-53 of the running sum): far inside float32's half ulp (3e-8), so the norm
    rounds to the correctly rounded float32. (A float32 running sum of the same squares
    drifts by far more: see diagnostics/norm_precision.py.)"""
    x = torch.full((1 << 22,), 1.1)
    want = float(x[0].double()) ** 2 * x.numel()  # exact: a power of two times a square
    for backend in _backends():
        got = _run(backend, [x], 2.0).item()
        assert got == pytest.approx(want, rel=1e-11), backend[0]
        assert torch.tensor(got).sqrt().float().item() == \
            torch.tensor(math.sqrt(want)).float().item(), backend[0]


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b[0])
@pytest.mark.parametrize("p", ORDERS)
def test_nan_and_inf_propagate(backend, p, restore_cpu_capability):
    for poison, where in [(math.nan, 5), (math.nan, 39999), (math.inf, 7), (-math.inf, 0)]:
        tensors = _tensors(torch.float32, seed=9)
        tensors[0][where] = poison
        got = _run(backend, tensors, p).item()
        want = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in tensors]), p).item()
        assert (math.isnan(got) and math.isnan(want)) or got == want == math.inf, (poison, where)
    # order inf: a NaN stays NaN beside a larger inf, in either order of the two
    for first, second in [(math.nan, math.inf), (math.inf, math.nan)]:
        t = torch.ones(50000)
        t[100], t[45000] = first, second
        assert math.isnan(_run(backend, [t], p).item())


def test_errors():
    x = torch.ones(3)
    for bad in (0.0, -1.0, -math.inf, math.nan):
        with pytest.raises(ValueError, match="norm_type 1, 2, inf or a finite p > 0"):
            torch.ops.adamx.norm_accumulate([x], bad)
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype Int"):
        torch.ops.adamx.norm_accumulate([x, torch.ones(2, dtype=torch.int32)], 2.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has layout Sparse"):
        torch.ops.adamx.norm_accumulate([x, torch.ones(2).to_sparse()], 2.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on meta"):
        torch.ops.adamx.norm_accumulate([x, torch.ones(2, device="meta")], 2.0)


def test_opcheck():
    """Schema, fake kernel and dispatch registrations (torch.compile traces the op through
    its fake kernel)."""
    tensors = [torch.randn(300), torch.randn(7, 5).t(), torch.randn(9).bfloat16()]
    torch.library.opcheck(torch.ops.adamx.norm_accumulate.default, (tensors, 2.0))
    compiled = torch.compile(lambda ts: torch.ops.adamx.norm_accumulate(ts, 2.0).sqrt(),
                             backend="eager", fullgraph=True)
    assert torch.equal(compiled(tensors), torch.ops.adamx.norm_accumulate(tensors, 2.0).sqrt())
