"""Adam.clip_grad_norm_: the norm torch's clip_grad_norm_ returns, and the clipped step of
torch's loop (clip, then the fused step), with the clip applied inside adamx's one pass;
with GradScaler, without its unscale pass."""

import pytest
import torch

import adamx
from conftest import (TOL, assert_close, assert_norm_close, make_grad_seq, make_tensors,
                      needs_build)

pytestmark = needs_build

SHAPES = [(37, 11), (300,), (5, 4, 3)]
GRAD_SCALE = 2.0 ** 12


def _pair(dtype, seed, **options):
    """Params for adamx and a copy for torch, and their optimizers."""
    p0 = make_tensors(SHAPES, dtype, seed=seed)
    mine = [p.clone().requires_grad_() for p in p0]
    ref = [p.clone().requires_grad_() for p in p0]
    return mine, ref, adamx.Adam(mine, lr=0.01, **options), \
        torch.optim.Adam(ref, lr=0.01, fused=True)


def _set_grads(params, grads, scale=1.0):
    for p, g in zip(params, grads):
        p.grad = (g.float() * scale).to(p.dtype)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fraction", [0.3, None])  # clipping to 0.3 of the norm, and not
def test_clipped_steps_match_torch(dtype, norm_type, fraction):
    # (a moderate clip: clipping float16 grads to 1e-4 of their size would underflow
    # torch's float16 moments and compare the two ways of dividing by eps)
    mine, ref, opt, torch_opt = _pair(dtype, 700)
    for grads in make_grad_seq(SHAPES, dtype, 4, seed=701, scale=3.0):
        _set_grads(mine, grads)
        _set_grads(ref, grads)
        max_norm = 1e9 if fraction is None else fraction * float(
            torch.nn.utils.get_total_norm([p.grad for p in ref], norm_type))
        backward = [p.grad.clone() for p in ref]
        norm = opt.clip_grad_norm_(max_norm, norm_type)
        torch_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
        assert_norm_close(norm, torch_norm, backward, norm_type)
        opt.step()
        torch_opt.step()
        for a, b in zip(mine, ref):
            assert_close(a, b, TOL[dtype], "param")
            assert_close(a.grad, b.grad, TOL[dtype], "grad after the step (the clipped one)")


def test_grads_unchanged_until_the_step_and_no_extra_pass():
    mine, _, opt, _ = _pair(torch.float32, 702)
    grads = make_grad_seq(SHAPES, torch.float32, 1, seed=703, scale=5.0)[0]
    _set_grads(mine, grads)
    opt.clip_grad_norm_(0.1)
    for p, g in zip(mine, grads):
        assert torch.equal(p.grad, g)  # nothing written by the clip call
    opt.step()
    assert getattr(opt, "_clip_divisor", None) is None  # used by one step only
    before = [p.detach().clone() for p in mine]
    _set_grads(mine, grads)
    opt.step()  # unclipped: a larger move than a clipped step would make
    moved = max((p - b).abs().max() for p, b in zip(mine, before))
    assert moved > 0.005


def test_factor_one_leaves_the_step_bitwise_unchanged():
    mine, _, opt, _ = _pair(torch.float32, 704)
    plain = [p.detach().clone().requires_grad_() for p in mine]
    plain_opt = adamx.Adam(plain, lr=0.01)
    for grads in make_grad_seq(SHAPES, torch.float32, 3, seed=705):
        _set_grads(mine, grads)
        _set_grads(plain, grads)
        opt.clip_grad_norm_(1e9)
        opt.step()
        plain_opt.step()
        for a, b in zip(mine, plain):
            assert torch.equal(a, b)


def _scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=GRAD_SCALE, growth_interval=2**30)
    scaler.scale(torch.ones(()))  # makes the scale, as scaling a loss does
    return scaler


@pytest.mark.parametrize("dtype,options", [
    (torch.float32, {}),
    (torch.bfloat16, {}),
    (torch.bfloat16, dict(master_weights=True)),
    (torch.float32, dict(state_dtype="bfloat16")),
])
def test_with_grad_scaler_matches_torchs_loop(dtype, options, monkeypatch):
    """adamx: clip_grad_norm_(grad_scaler=scaler), scaler.step, update. torch: unscale_,
    clip_grad_norm_, scaler.step, update, with its fused Adam. Against an adamx run that
    follows torch's loop (unscale_ and torch's clip, then the step), so that master weights
    and lean state compare like with like."""
    sizes = [(70, 70), (64,)]  # 4900 elements: compact with state_dtype
    p0 = make_tensors(sizes, dtype, seed=706)
    mine = [p.clone().requires_grad_() for p in p0]
    ref = [p.clone().requires_grad_() for p in p0]
    torch.manual_seed(0)  # the same drawn seed for both (state_dtype: random bits)
    opt = adamx.Adam(mine, lr=0.01, **options)
    torch.manual_seed(0)
    ref_opt = adamx.Adam(ref, lr=0.01, **options)
    scaler, ref_scaler = _scaler(), _scaler()
    unscale_calls = []
    original = torch.amp.GradScaler._unscale_grads_

    def counting(self, *args, **kwargs):
        unscale_calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "_unscale_grads_", counting)
    for grads in make_grad_seq(sizes, dtype, 3, seed=707, scale=2.0):
        _set_grads(mine, grads, GRAD_SCALE)
        _set_grads(ref, grads, GRAD_SCALE)
        norm = opt.clip_grad_norm_(1.0, grad_scaler=scaler)
        scaler.step(opt)
        scaler.update()
        ref_scaler.unscale_(ref_opt)
        unscaled = [p.grad.clone() for p in ref]
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        # power-of-two scale: the unscaled norm, rounded as adamx rounds it
        assert_norm_close(norm, ref_norm, unscaled, 2.0)
        for a, b in zip(mine, ref):
            assert_close(a, b, TOL[dtype], "param")
    assert all(s is ref_scaler for s in unscale_calls)  # adamx's scaler made no pass


def test_inf_grad_with_grad_scaler_skips_and_backs_off():
    mine, _, opt, _ = _pair(torch.float32, 708)
    scaler = _scaler()
    grads = make_grad_seq(SHAPES, torch.float32, 2, seed=709)
    _set_grads(mine, grads[0], GRAD_SCALE)
    opt.clip_grad_norm_(1.0, grad_scaler=scaler)
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in mine]
    state_before = {k: v.clone() for k, v in opt.state[mine[0]].items()}
    _set_grads(mine, grads[1], GRAD_SCALE)
    mine[1].grad[3] = float("inf")
    norm = opt.clip_grad_norm_(1.0, grad_scaler=scaler)
    assert torch.isinf(norm)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(mine, before))
    assert all(torch.equal(opt.state[mine[0]][k], v) for k, v in state_before.items())
    assert scaler.get_scale() == GRAD_SCALE / 2  # backed off, as torch's loop does


def test_error_if_nonfinite_as_torch():
    mine, ref, opt, _ = _pair(torch.float32, 710)
    grads = make_grad_seq(SHAPES, torch.float32, 1, seed=711)[0]
    grads[0][0, 0] = float("nan")
    _set_grads(mine, grads)
    _set_grads(ref, grads)
    with pytest.raises(RuntimeError, match="non-finite") as mine_err:
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as torch_err:
        torch.nn.utils.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
    assert str(mine_err.value) == str(torch_err.value)
    assert getattr(opt, "_clip_divisor", None) is None
    # without the error, as torch: a NaN norm makes every grad NaN
    opt.clip_grad_norm_(1.0)
    opt.step()
    assert all(torch.isnan(p).all() for p in mine)


def test_no_grads_returns_zero_as_torch():
    p = torch.zeros(3, requires_grad=True)
    opt = adamx.Adam([p])
    assert torch.equal(opt.clip_grad_norm_(1.0), torch.nn.utils.clip_grad_norm_([p], 1.0))


def test_grad_scaler_after_unscale_is_refused():
    mine, _, opt, _ = _pair(torch.float32, 712)
    _set_grads(mine, make_grad_seq(SHAPES, torch.float32, 1, seed=713)[0], GRAD_SCALE)
    scaler = _scaler()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already unscaled"):
        opt.clip_grad_norm_(1.0, grad_scaler=scaler)
    opt.clip_grad_norm_(1.0)  # torch's habit still works: unscale_, then clip
    scaler.step(opt)


def test_float16_grads_with_grad_scaler_do_not_overflow_the_norm():
    """Scaled float16 grads whose norm passes float16's range while every grad is finite:
    the step is taken (no false overflow, no back-off), with the norm in float32. torch's
    loop cannot clip these at all (GradScaler refuses to unscale float16 grads)."""
    p = torch.full((4096,), 1.0, dtype=torch.float16, requires_grad=True)
    opt = adamx.Adam([p], lr=0.01, master_weights=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2**30)
    scaler.scale(torch.ones(()))
    g = torch.full((4096,), 2.0)  # scaled: 2048 each, norm 131072 > 65504
    p.grad = (g * 2.0 ** 10).to(torch.float16)
    norm = opt.clip_grad_norm_(1.0, grad_scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 10  # no overflow found
    assert int(opt.state[p]["step"]) == 1 and not torch.equal(p.detach(), torch.ones_like(p))
    assert norm.dtype == torch.float32 and norm.item() == torch.linalg.vector_norm(g).item()


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scaler"])
@pytest.mark.parametrize("dtype,options", [
    (torch.float32, {}),
    (torch.bfloat16, dict(master_weights=True)),
    (torch.float32, dict(state_dtype="int8")),
    (torch.float32, dict(two_groups=True)),
], ids=["float32", "bf16-master", "int8-moments", "two-groups"])
def test_keep_grads_steps_alike_and_leaves_the_grads(dtype, options, scaled):
    """clip_grad_norm_(keep_grads=True): the same clipped step, bit for bit, without the
    write of the grads: .grad keeps what backward left (scaled, with a GradScaler)."""
    options = dict(options)
    two_groups = options.pop("two_groups", False)
    sizes = [(70, 70), (64,)]  # 4900 elements: compact with state_dtype
    p0 = make_tensors(sizes, dtype, seed=720)
    runs = []
    for keep in (False, True):
        params = [p.clone().requires_grad_() for p in p0]
        groups = [{"params": [p]} for p in params] if two_groups else params
        torch.manual_seed(0)  # the same drawn seed (state_dtype: random bits)
        runs.append((params, adamx.Adam(groups, lr=0.01, **options),
                     _scaler() if scaled else None, keep))
    for grads in make_grad_seq(sizes, dtype, 3, seed=721, scale=2.0):
        after = []
        for params, opt, scaler, keep in runs:
            _set_grads(params, grads, GRAD_SCALE if scaled else 1.0)
            backward = [p.grad.clone() for p in params]
            opt.clip_grad_norm_(1.0, grad_scaler=scaler, keep_grads=keep)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            assert not getattr(opt, "_keep_grads", False)  # for one step only
            after.append([p.grad for p in params])
            if keep:
                for g, b in zip(after[-1], backward):
                    assert torch.equal(g, b), "keep_grads: a grad was written"
        for g_written, g_kept in zip(*after):
            assert not torch.equal(g_written, g_kept)  # the clipped (unscaled) grads
        for a, b in zip(runs[0][0], runs[1][0]):
            assert torch.equal(a, b), "keep_grads changed the step"
