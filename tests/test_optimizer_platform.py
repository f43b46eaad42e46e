"""What must not depend on the machine: the number of threads and the SIMD instruction set
give bitwise-identical steps."""


import pytest
import torch

import adamx
from conftest import (DTYPES, LR, OpState, RefAdam, assert_opt_matches_ref,
                      assert_same_state, make_grad_seq, make_tensors, needs_build, op_hyper,
                      same_bits)

pytestmark = needs_build

# Large enough that the kernel splits work among threads, odd so that every vector width
# leaves a tail, plus small ones that fit one vector or less.
BIG_SHAPES = [(300_007,), (257, 259), (5,), (), (0,), (17,)]
VARIANTS = [
    dict(),
    dict(amsgrad=True, weight_decay=0.1),
    dict(maximize=True, weight_decay=0.1, decoupled_weight_decay=True),
    dict(eps_inside_sqrt=True, amsgrad=True, maximize=True, lr=torch.tensor(0.02)),
]


def _steps(dtype, variant, steps=4, shapes=BIG_SHAPES):
    p0 = make_tensors(shapes, dtype, seed=100)
    grad_seq = make_grad_seq(shapes, dtype, steps, seed=101)
    params = [p.clone() for p in p0]
    kw = dict(variant)
    kw.setdefault("lr", LR)
    if torch.is_tensor(kw["lr"]):
        kw["lr"] = kw["lr"].clone()
    opt = adamx.Adam(params, **kw)
    for grads in grad_seq:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return opt, params


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_identical_for_any_thread_count(dtype, variant, restore_threads):
    """Thread ranges are cut at whole vectors of the step's element space; 1, 2, 3 and 5
    threads split these sizes at different points, and must give the same bits, equal to
    the float64 reference's to its tolerance (an element missed or updated twice at a cut
    would not be)."""
    shapes = [(70_001,), (12_345,), (5,), (257, 259), ()]
    results = {}
    for threads in (1, 2, 3, 5):
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        results[threads] = _steps(dtype, VARIANTS[variant], shapes=shapes)
    for threads in (1, 3, 5):
        assert_same_state(*results[2], *results[threads], exact=True)
    opt, params = results[2]
    kw = dict(VARIANTS[variant])
    kw.setdefault("lr", LR)
    ref = RefAdam(make_tensors(shapes, dtype, seed=100), dtype, lr=float(kw.pop("lr")),
                  decoupled=kw.pop("decoupled_weight_decay", False), **kw)
    for grads in make_grad_seq(shapes, dtype, 4, seed=101):
        ref.step(grads)
    assert_opt_matches_ref(opt, params, ref, dtype)


def test_cpu_capability_api(restore_cpu_capability):
    supported = adamx.supported_cpu_capabilities()
    assert isinstance(supported, list) and supported
    assert set(supported) <= {"default", "avx2", "avx512"}
    assert "default" in supported
    assert adamx.cpu_capability() in supported
    for name in supported:
        adamx.set_cpu_capability(name)
        assert adamx.cpu_capability() == name
    with pytest.raises(ValueError):
        adamx.set_cpu_capability("not-an-isa")
    assert adamx.cpu_capability() == supported[-1]  # a failed switch changes nothing
    for name in {"default", "avx2", "avx512"} - set(supported):
        with pytest.raises(ValueError):
            adamx.set_cpu_capability(name)
    info = adamx.build_info()
    assert info["compiled"] is True and info["supported_cpu_capabilities"] == supported


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_capability_gives_the_same_bits(dtype, variant, restore_cpu_capability):
    supported = adamx.supported_cpu_capabilities()
    if len(supported) < 2:
        pytest.skip(f"this machine supports only {supported}: nothing to compare")
    # Small odd shapes: each ISA's vector loop and its tail; one medium tensor.
    shapes = [(1,), (3,), (7,), (15,), (16,), (17,), (31,), (33,), (65,), (1000,), (3, 11)]
    results = {}
    for name in supported:
        adamx.set_cpu_capability(name)
        results[name] = _steps(dtype, VARIANTS[variant], steps=6, shapes=shapes)
    first = supported[0]
    for name in supported[1:]:
        assert_same_state(*results[first], *results[name], exact=True)


def test_cpu_capability_from_environment():
    import os
    import subprocess
    import sys

    supported = adamx.supported_cpu_capabilities()
    want = supported[0]  # the narrowest, so it differs from the default choice if possible
    env = dict(os.environ, ADAMX_CPU_CAPABILITY=want)
    # Run where the adamx under test is importable first (installed or in-tree build),
    # not from the source tree, whose adamx/ may have no compiled module.
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(adamx.__file__)))
    out = subprocess.run(
        [sys.executable, "-c", "import adamx; print(adamx.cpu_capability())"],
        env=env, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == want


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_payloads_are_the_same_on_every_cpu_capability(dtype, restore_cpu_capability):
    """Grads holding NaNs of several payloads, infinities and normal values, with amsgrad:
    the AVX2 and AVX-512 kernels give the same bit patterns in every tensor, NaNs included,
    for float32 and float64. The exceptions (stated in the README) are NaN payloads alone:
    for float16 and bfloat16 the conversion to the storage type sets them (F16C keeps the
    payload, ATen's bfloat16 vector conversion writes 0xFFFF, the scalar conversions a
    canonical NaN); where two NaNs meet in an addition, the portable kernel and the CUDA
    kernel body keep the payload their compiler's operand order picks (and a GPU returns a
    canonical NaN from any operation). Which elements are NaN, and every other bit, agree
    everywhere."""
    supported = adamx.supported_cpu_capabilities()
    n = 203
    bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    payloads = torch.tensor([0x7FC00001, 0x7FC01234, 0xFFC00077, 0x7FA00001]
                            if dtype == torch.float32 else [0x7FC1, 0x7E12, 0xFE34, 0x7C01]
                            if dtype != torch.float64 else
                            [0x7FF8000000000001, 0x7FF8000000ABCDEF], dtype=torch.int64)

    def run(step):
        g = torch.Generator().manual_seed(110)
        p = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        grads = []
        for k in range(4):
            x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
            raw = x.view(bits)
            idx = torch.randint(0, n, (12,), generator=g)
            width = 8 * x.element_size()
            for j, i in enumerate(idx.tolist()):
                value = int(payloads[j % len(payloads)]) if j % 3 else 0
                raw[i] = value - (1 << width) if value >= 1 << (width - 1) else value
                if j % 3 == 0:
                    x[i] = float("inf") if j % 2 else float("-inf")
            grads.append([x])
        st = OpState([p], amsgrad=True)
        for gk in grads:
            step(*st.lists(gk), **op_hyper(amsgrad=True, weight_decay=0.1))
        return st

    results = {}
    for name in supported:
        adamx.set_cpu_capability(name)
        results[name] = run(torch.ops.adamx.adam_)
    results["emulated_cuda"] = run(torch.ops.adamx._adam_emulated_cuda_)
    first = results[supported[-1]]
    assert torch.isnan(first.max_exp_avg_sqs[0]).any() and torch.isnan(first.params[0]).any()
    # Payloads are compared between the x86 SIMD kernels only: where two NaNs meet in an
    # addition, which one's payload survives is the compiler's operand order, which the
    # portable kernel's element loops (and a GPU) do not fix.
    exact = {"avx2", "avx512"}
    for name, st in results.items():
        for i, (a, b) in enumerate(zip(first.tensors(), st.tensors())):
            if a.dtype in (torch.float16, torch.bfloat16) or name not in exact:
                assert torch.equal(a.isnan(), b.isnan()), f"{name}: tensor {i}"
                a, b = a[~a.isnan()], b[~b.isnan()]
            assert same_bits(a, b), f"{name}: tensor {i} has other bits than {supported[-1]}'s"
