"""What must not depend on the machine: the number of threads and the SIMD instruction set
give bitwise-identical steps."""


import pytest
import torch

import adamx
from conftest import DTYPES, LR, assert_same_state, make_grad_seq, make_tensors, needs_build

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
def test_bitwise_identical_with_1_and_2_threads(dtype, variant, restore_threads):
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        results.append(_steps(dtype, VARIANTS[variant]))
    (opt1, p1), (opt2, p2) = results
    assert_same_state(opt1, p1, opt2, p2, exact=True)


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
