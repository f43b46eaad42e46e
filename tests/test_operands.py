"""The operand layer (csrc/op/operands.cpp), shared by the CPU kernel and the CUDA path:
dense temporaries for tensors laid out unlike their param and their copy-back, and writes
that stay inside each tensor. Every test runs on the CPU kernel and on the CUDA path
(emulated on the CPU), against a step of the other backend (they agree bit for bit) on
plainly laid-out copies of the same values, so that a bug in one is reported by an
assertion rather than by the heap corruption it may cause."""

import pytest
import torch

from conftest import (DTYPES, OpState, assert_bitwise, make_grad_seq, make_tensors,
                      needs_build, op_backends, op_hyper)

pytestmark = needs_build


BACKENDS = op_backends(chunk_size=32, block_dim=4)
OTHER = {"cpu": BACKENDS["emulated_cuda"], "emulated_cuda": BACKENDS["cpu"]}


def contiguous_copy(st):
    plain = st.clone()
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        setattr(plain, name, [t.contiguous() for t in getattr(plain, name)])
    return plain


@pytest.mark.parametrize("which", ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_one_state_tensor_laid_out_unlike_its_param(backend, which):
    """A (4, 6) param whose state tensor alone is the transpose of a (6, 4) one: the step
    runs on a dense temporary for it and copies it back (forgetting one of the three in
    the "needs a temporary" decision would leave it unchanged, or transposed)."""
    dtype = torch.float32
    st = OpState(make_tensors([(4, 6), (5,)], dtype, seed=700), amsgrad=True)
    for name in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        getattr(st, name)[0] = make_tensors([(4, 6)], dtype, seed=701)[0].abs()
    odd = torch.zeros(6, 4, dtype=dtype).t()
    odd.copy_(getattr(st, which)[0])
    getattr(st, which)[0] = odd
    assert not odd.is_contiguous()
    plain = contiguous_copy(st)
    for grads in make_grad_seq([(4, 6), (5,)], dtype, 2, seed=702):
        BACKENDS[backend](*st.lists(grads), **op_hyper(amsgrad=True, weight_decay=0.1))
        OTHER[backend](*plain.lists(grads), **op_hyper(amsgrad=True, weight_decay=0.1))
    assert getattr(st, which)[0].data_ptr() == odd.data_ptr()  # the user's tensor, updated
    assert_bitwise(contiguous_copy(st), plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_writes_stay_inside_views_of_larger_buffers(backend, dtype):
    """Each tensor is a view into a larger buffer, of a length that is no multiple of any
    vector width, starting at an odd offset or not: the elements around it never change."""
    lengths = [1, 7, 33, 100, 257]
    offsets = [0, 1, 3, 8, 5]
    pad = 70  # more than the widest SIMD vector (64 elements), so an overrun stays inside
    bufs = {name: [make_tensors([(n + off + pad,)], dtype, seed=710 + 10 * k + j)[0].abs()
                   for j, (n, off) in enumerate(zip(lengths, offsets))]
            for k, name in enumerate(("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                                      "grads"))}
    before = {name: [b.clone() for b in bs] for name, bs in bufs.items()}

    def views(name):
        return [b[off:off + n] for b, n, off in zip(bufs[name], lengths, offsets)]

    st = OpState(views("params"), amsgrad=True)
    st.exp_avgs, st.exp_avg_sqs = views("exp_avgs"), views("exp_avg_sqs")
    st.max_exp_avg_sqs = views("max_exp_avg_sqs")
    for t in st.exp_avg_sqs + st.max_exp_avg_sqs:  # so that every element visibly changes
        t.zero_()
    before = {name: [b.clone() for b in bs] for name, bs in bufs.items()}
    grads = views("grads")
    plain = contiguous_copy(st)
    BACKENDS[backend](*st.lists(grads), **op_hyper(amsgrad=True))
    OTHER[backend](*plain.lists([g.clone() for g in grads]), **op_hyper(amsgrad=True))
    assert_bitwise(contiguous_copy(st), plain)
    for name, bs in bufs.items():
        for b, b0, n, off in zip(bs, before[name], lengths, offsets):
            outside = torch.ones(b.numel(), dtype=torch.bool)
            outside[off:off + n] = False
            assert torch.equal(b[outside], b0[outside]), f"{name}: written outside its view"
            if name != "grads":
                assert not torch.equal(b[off:off + n], b0[off:off + n]), name
