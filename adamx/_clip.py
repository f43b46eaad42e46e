"""Gradient clipping by the global norm, folded into the next step.

``torch.nn.utils.clip_grad_norm_`` reads every grad for the norm, then reads and writes
every grad again to scale it; with GradScaler, ``scaler.unscale_`` adds a read and a write
of its own before that. adamx's step already divides each grad by a scale in its one pass
(GradScaler's unscale, ``grad_scale``), so ``Adam.clip_grad_norm_`` only reads the grads
once, for the norm, and hands the step a scale that includes the clip: the grads are
scaled where the step reads them anyway.

The norm is adamx's own multi-tensor kernel (``torch.ops.adamx.norm_accumulate``, one pass
over all grads, accumulated in float64: csrc/math/norm.h) for norm types 1, 2, inf and any
finite p > 0, with the root taken once and rounded to the dtype torch's norm returns; other
norm types (0, -inf, negative p) and builds without the kernels take torch's
``get_total_norm``. The clip factor is torch's ``min(max_norm / (norm + 1e-6), 1)``, kept
on the device: no host sync, unless ``error_if_nonfinite`` asks for one (as in torch).

DTensor grads of one mesh whose placements are ``Shard`` or ``Replicate`` (FSDP2, tensor
parallel) take the kernel over their local shards, each shard counted on the ranks whose
coordinate on its replicated mesh dimensions is 0 only, and the accumulators summed (order
inf: their largest) over the mesh; ``Partial`` grads take torch's DTensor norm. The global
norm, the same on every rank, drives every rank's factor. (torch's own inf norm of DTensor
grads fails on a rank whose shard is empty: ``_foreach_norm`` has no identity for it.)

With a GradScaler passed as ``grad_scaler``, the grads are still scaled: the norm of the
scaled grads times GradScaler's inverse scale is the unscaled norm (exactly, for its
power-of-two scales), a non-finite norm is GradScaler's found-inf flag, and the
scaler's record of this optimizer is marked unscaled with that flag, so ``scaler.step``
neither unscales nor checks the grads again: it hands the step the scale divided by the
clip factor, and ``scaler.update`` backs off on the flag as usual.

The step writes the grads it scaled back to ``.grad`` (clipped, unscaled), as torch's
loop leaves them, unless ``keep_grads=True``: then ``.grad`` keeps what backward left, and
the step saves a write of every grad (with the norm's read, 32 bytes per float32 element
instead of 36; torch's loop moves 40, or 48 with GradScaler's unscale).
"""

import functools
import math

import torch
from torch.amp.grad_scaler import OptState

from . import _ops, _sharded

__all__ = ["clip_grad_norm_"]


def _total_norm(grads, norm_type, dtype=None, foreach=None):
    """The norm torch's ``get_total_norm(grads, norm_type)`` computes (with ``dtype``: of
    the grads taken in that dtype), by adamx's kernel where it applies: a plain tensor,
    or, from torch's DTensor norm, a DTensor."""
    acc = None
    if _kernel_takes(grads, norm_type):
        if not _sharded.is_dtensor(grads[0]):
            acc = torch.ops.adamx.norm_accumulate(grads, norm_type)
        else:
            acc = _sharded_accumulator(grads, norm_type)
    if acc is None:  # torch's norm
        if dtype is None:
            return torch.nn.utils.get_total_norm(grads, norm_type, False, foreach)
        return torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(g, norm_type, dtype=dtype) for g in grads]), norm_type)
    if norm_type == 2.0:
        acc = acc.sqrt()
    elif norm_type != 1.0 and not math.isinf(norm_type):
        acc = acc.pow(1.0 / norm_type)
    return acc.to(dtype or functools.reduce(torch.promote_types, [g.dtype for g in grads]))


def _kernel_takes(grads, norm_type):
    return (_ops.is_compiled() and (norm_type > 0 and not math.isnan(norm_type))
            and all(g.dtype in _KERNEL_DTYPES and g.layout == torch.strided for g in grads))


_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _sharded_accumulator(grads, norm_type):
    """The accumulator of the global norm of DTensor grads of one mesh, the same on every
    rank: each rank's kernel over the local shards it counts (a replicated one on the
    first rank of each replicated mesh dimension only), summed over the mesh (order inf:
    the largest, with a NaN anywhere kept). None for grads with Partial placements, which
    torch's DTensor norm reduces."""
    mesh = grads[0].device_mesh
    coordinate = mesh.get_coordinate()
    counted = []
    for g in grads:
        placements = g.placements
        if any(not (p.is_shard() or p.is_replicate()) for p in placements):
            return None
        if all(coordinate[d] == 0 for d, p in enumerate(placements) if p.is_replicate()):
            counted.append(g.to_local())
    device = grads[0].to_local().device
    acc = (torch.ops.adamx.norm_accumulate(counted, norm_type) if counted
           else torch.zeros((), dtype=torch.float64, device=device))
    dist = torch.distributed
    if math.isinf(norm_type):
        # the largest |x| and whether some rank saw a NaN (a max all-reduce need not keep
        # a NaN), in one all-reduce
        pair = torch.stack([torch.nan_to_num(acc, nan=0.0), acc.isnan().double()])
        for d in range(mesh.ndim):
            dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=mesh.get_group(d))
        return torch.where(pair[1] > 0, torch.full_like(pair[0], math.nan), pair[0])
    for d in range(mesh.ndim):
        dist.all_reduce(acc, group=mesh.get_group(d))
    return acc


def _params_with_grads(optimizer):
    seen, out = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _nonfinite_error(norm_type):
    # torch.nn.utils.clip_grad_norm_'s message
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is "
        "non-finite, so it cannot be clipped. To disable this error and scale the "
        "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")


def clip_grad_norm_(optimizer, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None, grad_scaler=None, keep_grads=False):
    """See ``adamx.Adam.clip_grad_norm_``."""
    params = _params_with_grads(optimizer)
    max_norm, norm_type = float(max_norm), float(norm_type)
    scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
    if not params:
        return torch.tensor(0.0)
    grads = [p.grad for p in params]
    mesh = _one_mesh(grads)
    if mesh is False or len({g.device for g in grads}) > 1:
        # Grads on several devices, or DTensors mixed with plain tensors or on several
        # meshes: torch's own clip, at the cost of its passes; the step then takes the
        # grads as they are.
        if scaler is not None:
            scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type,
                                              error_if_nonfinite, foreach)
    with torch.no_grad():
        # Scaled float16 grads: their norm can pass float16's range (65504) where no grad
        # does, which would read as an overflow and skip the step; take it in float32.
        # (torch's loop cannot clip these: GradScaler refuses to unscale float16 grads.)
        wide = scaler is not None and any(g.dtype == torch.float16 for g in grads)
        norm = _total_norm(grads, norm_type, torch.float32 if wide else None, foreach)
        if _sharded.is_dtensor(norm):
            # torch's DTensor norm (each rank's partial norms reduced over the mesh,
            # replicated shards counted once): its value, the same on every rank, drives
            # the clip, so every rank folds the same factor (and GradScaler's found-inf)
            # into its step.
            norm = norm.full_tensor()
        if scaler is not None:
            record = scaler._per_optimizer_states[id(optimizer)]
            if record["stage"] is OptState.UNSCALED:
                raise RuntimeError(
                    "adamx: clip_grad_norm_(grad_scaler=...) after scaler.unscale_(opt): the "
                    "grads are already unscaled; leave out grad_scaler (or the unscale_ "
                    "call, which costs a pass over the grads)")
            if record["stage"] is OptState.STEPPED:
                raise RuntimeError("adamx: clip_grad_norm_(grad_scaler=...) after "
                                   "scaler.step(opt) and before scaler.update()")
            scale = scaler._scale  # GradScaler's scale tensor (made by scaler.scale())
            if scale is None:
                raise RuntimeError("adamx: clip_grad_norm_(grad_scaler=...) before the "
                                   "scaler has scaled anything (scaler.scale(loss))")
            found_inf = (~torch.isfinite(norm)).to(torch.float32).to(scale.device)
            inv_scale = scale.double().reciprocal().float()
            norm = norm * inv_scale.to(norm.device, norm.dtype)
        if error_if_nonfinite and torch.logical_or(norm.isnan(), norm.isinf()):
            raise _nonfinite_error(norm_type)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        divisor = coef.to(torch.float32).reciprocal().to(grads[0].device)
        if scaler is not None:
            record["found_inf_per_device"] = {scale.device: found_inf}
            record["stage"] = OptState.UNSCALED
            # scaler.step hands an unscaled optimizer's own grad_scale to its step
            optimizer.grad_scale = scale.to(divisor.device) * divisor
        else:
            optimizer._clip_divisor = divisor
        optimizer._keep_grads = bool(keep_grads)
    if mesh is not None:
        from torch.distributed.tensor import DTensor, Replicate
        norm = DTensor.from_local(norm, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return norm


def _one_mesh(grads):
    """None when no grad is a DTensor; the mesh when all are DTensors of one mesh; False
    otherwise."""
    dtensors = [g for g in grads if _sharded.is_dtensor(g)]
    if not dtensors:
        return None
    mesh = dtensors[0].device_mesh
    if len(dtensors) != len(grads) or any(g.device_mesh != mesh for g in dtensors):
        return False
    return mesh
