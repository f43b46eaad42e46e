"""Sharded params in adamx's step: DTensors (FSDP2's ``fully_shard``, tensor parallel).

Adam is elementwise, and a DTensor param's grad and state are sharded exactly as the
param is (the state is made by ``torch.zeros_like(p)``, which gives a DTensor of the same
mesh and placements), so each rank steps its own local shards, with no communication:
``local_lists`` swaps every DTensor in the op's lists for its local tensor before
``torch.ops.adamx.adam_`` runs. Step counts are plain tensors, as torch keeps them for
DTensor params, or replicated DTensors (as a checkpoint may load them), whose local tensor
is the whole count. The optimizer's state stays DTensors, so ``state_dict`` and
``torch.distributed.checkpoint`` see it sharded as torch's.

Why not a DTensor sharding strategy for ``adamx::adam_`` (torch registers ``_fused_adam_``
as a pointwise list op): that route runs DTensor's dispatch and sharding propagation on
every step only to find that every placement already matches (torch's fused step pays
15.5 us per tensor for it, this module 4.3: diagnostics/dtensor_overhead.py; 16.5-19.7
against 10.6-11.0 on a slower day, 2026-12-06), and the registration APIs are
experimental or private and change between torch releases.
The local step is the same kernel on the same memory (see docs/DEVELOPING.md).

The C++ fast path (``adamx._C.step_group``) declines tensor subclasses, so sharded params
always come through here; plain tensors never pay for it.
"""

import sys
import weakref

from . import _compact

__all__ = ["local_lists", "element_offset", "is_dtensor", "agreed", "first_ranks_value"]


def _dtensor_type():
    """DTensor, or None when torch.distributed.tensor was never imported (then no DTensor
    exists, and adamx does not pay the ~0.6 s its import costs)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t):
    """Whether ``t`` is a DTensor (without importing torch.distributed.tensor)."""
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def _same_layout(a, b):
    a, b = a._spec, b._spec  # (the identity tests first: this runs thrice per param)
    return ((a.mesh is b.mesh or a.mesh == b.mesh)
            and (a.placements is b.placements or a.placements == b.placements))


def _local_row(DTensor, p, grad, states):
    """The local tensors of one DTensor param, its grad and its state tensors."""
    if not isinstance(grad, DTensor):
        raise RuntimeError(f"adamx: a DTensor param ({p.placements}) has a grad that is "
                           f"not a DTensor ({type(grad).__name__})")
    if not _same_layout(grad, p):
        # As DTensor's sharding propagation would do for torch's fused step (e.g. a
        # Partial grad of tensor parallel): bring the grad to the param's placements.
        grad = grad.redistribute(p.device_mesh, p.placements)
    for state in states:
        if not isinstance(state, DTensor) or not _same_layout(state, p):
            layout = (f"{state.device_mesh}, {state.placements}" if isinstance(state, DTensor)
                      else f"a {type(state).__name__}")
            raise RuntimeError(
                f"adamx: a DTensor param on {p.device_mesh}, {p.placements} has optimizer "
                f"state on {layout}; state must be sharded as its param (load sharded "
                "checkpoints with torch.distributed.checkpoint.state_dict."
                "set_optimizer_state_dict)")
    return p._local_tensor, grad._local_tensor, [s._local_tensor for s in states]


def _local_step(DTensor, step):
    if not isinstance(step, DTensor):
        return step
    if not all(placement.is_replicate() for placement in step.placements):
        raise RuntimeError(f"adamx: a step count is a DTensor with placements "
                           f"{step.placements}; it must be replicated")
    return step._local_tensor


_OFFSETS = {}  # element_offset's cache: id(param) -> (its weakref, spec, local tensor, offset)


def element_offset(p):
    """Where the random bits of DTensor ``p``'s local shard start (the op's
    element_offsets). An element's index is its place in its tensor's memory order, so when
    the shard is one run of the whole param's memory (its strides are the param's on every
    dim it spans: FSDP2's Shard(0), tensor parallel's ColwiseParallel weights), this is the
    index of the shard's first element in the whole param, and the shard's elements draw
    the bits they draw unsharded. Any other shard (Shard(1) of a matrix: several runs) gets
    a run past the param's own indices that no other shard shares: (1 + the shard's index
    among the param's shards) times the param's numel (replicas, which must stay equal,
    share it). 0 for a plain tensor."""
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(p, DTensor):
        return 0
    # (cached: working it out takes ~20 us, a step's whole DTensor cost per tensor ~4; an
    # entry holds what the offset depends on, the param's spec and local tensor, checked by
    # identity, and leaves with its param)
    local = p._local_tensor
    known = _OFFSETS.get(id(p))
    if known is not None and known[0]() is p and known[1] is p._spec and known[2] is local:
        return known[3]
    offset = _element_offset(p, local)
    key = id(p)
    _OFFSETS[key] = (weakref.ref(p, lambda _: _OFFSETS.pop(key, None)), p._spec, local, offset)
    return offset


def _element_offset(p, local):
    from torch.distributed.tensor import Shard
    mesh, placements = p.device_mesh, p.placements
    sharding = [d for d, placement in enumerate(placements) if placement.is_shard()]
    if len(sharding) == 0 or local.numel() == 0:
        return 0
    if all(type(placements[d]) is Shard for d in sharding) \
            and _compact.is_dense(local):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        local_shape, offsets = compute_local_shape_and_global_offset(
            tuple(p.shape), mesh, placements)
        if tuple(local_shape) == tuple(local.shape) and all(
                local.stride(d) == p.stride(d) for d in range(local.dim()) if local_shape[d] > 1):
            return sum(offset * stride for offset, stride in zip(offsets, p.stride()))
    coordinate = mesh.get_coordinate()
    index = 0
    for d in sharding:
        index = index * mesh.size(d) + coordinate[d]
    return (1 + index) * p.numel()


def _local_scales(DTensor, p, scales):
    """The op's code scales of DTensor param ``p`` with 8-bit moments: the local tensor,
    (2, local rows, blocks per row), as (2, local blocks); they must be sharded by rows as
    the param is (adamx/_state.py's code_rows)."""
    if not isinstance(scales, DTensor) or scales.device_mesh != p.device_mesh or any(
            s.is_shard() != q.is_shard() or (s.is_shard() and s.dim != 1)
            for s, q in zip(scales.placements, p.placements)):
        layout = (f"{scales.device_mesh}, {scales.placements}" if isinstance(scales, DTensor)
                  else f"a {type(scales).__name__}")
        raise RuntimeError(
            f"adamx: a DTensor param on {p.device_mesh}, {p.placements} has code_scales on "
            f"{layout}; they must be sharded by rows (Shard(1)) where the param is")
    return scales._local_tensor.reshape(2, -1)


def local_lists(lists, master_params=None, code_scales=None):
    """``lists`` (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps: the
    op's tensor lists), ``master_params`` and ``code_scales`` (None, or one per param)
    with each DTensor replaced by its local tensor (a DTensor's code scales by their
    (2, blocks) view), the DTensors the step writes (so that their version counters can be
    bumped) and the op's element_offsets (element_offset per param); the lists as given,
    an empty list and None when they hold no DTensor. Raises, having written nothing, when
    a DTensor param's state (or master copy) is not sharded like it."""
    DTensor = _dtensor_type()
    if DTensor is None:
        return lists, master_params, code_scales, [], None
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
    amsgrad = len(max_exp_avg_sqs) > 0  # (not bool(list): torch 2.11's Dynamo cannot trace it)
    if not any(isinstance(t, DTensor) for t in params + steps):
        return lists, master_params, code_scales, [], None
    local = ([], [], [], [], [], [])
    masters = None if master_params is None else []
    scales = None if code_scales is None else []
    written = []
    offsets = []
    for i, p in enumerate(params):
        states = [exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if amsgrad else []) \
            + ([master_params[i]] if masters is not None else [])
        offsets.append(element_offset(p))
        if scales is not None:
            scale = code_scales[i]
            if isinstance(p, DTensor) and scale.numel() > 0:  # (empty: no codes)
                written.append(scale)
                scale = _local_scales(DTensor, p, scale)
            scales.append(scale)
        if isinstance(p, DTensor):
            written += [p] + states
            p, grad, states = _local_row(DTensor, p, grads[i], states)
        else:
            grad = grads[i]
        local[0].append(p)
        local[1].append(grad)
        local[2].append(states[0])
        local[3].append(states[1])
        if amsgrad:
            local[4].append(states[2])
        if masters is not None:
            masters.append(states[-1])
        local[5].append(_local_step(DTensor, steps[i]))
    written += [s for s in steps if isinstance(s, DTensor)]
    return local, masters, scales, written, offsets


def _mesh_groups(params):
    """The process groups of the meshes of the DTensors among ``params`` (each mesh once,
    a group per mesh dim), in the params' order; none without DTensors or a process
    group."""
    DTensor = _dtensor_type()
    if DTensor is None:
        return []
    import torch.distributed as dist
    if not dist.is_initialized():
        return []
    meshes, groups = [], []
    for p in params:
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            if not any(mesh is m or mesh == m for m in meshes):
                meshes.append(mesh)
                groups += [mesh.get_group(dim) for dim in range(mesh.ndim)]
    return groups


def _gathered(groups, value, pick):
    """``value`` gathered over each group in turn, ``pick`` choosing one of each group's
    values (over every dim of a mesh: the same choice on all its ranks)."""
    import torch.distributed as dist
    for group in groups:
        values = [None] * dist.get_world_size(group)
        dist.all_gather_object(values, value, group=group)
        value = pick(values)
    return value


def first_ranks_value(params, value):
    """``value`` as the first rank of the meshes of the DTensors among ``params`` has it (a
    collective over each mesh dim; call it on every rank), or ``value`` itself without
    DTensor params or a process group."""
    groups = _mesh_groups(params)
    return _gathered(groups, value, lambda values: values[0]) if groups else value


_ERRORS = {"ValueError": ValueError, "NotImplementedError": NotImplementedError}


def agreed(params, settings, check):
    """The settings to load (``settings`` as the first rank of the params' meshes has
    them: rank 0, the rank a broadcast load reads the checkpoint on), checked by
    ``check(settings)`` on every rank; the first error any rank finds is raised on every
    rank. Without DTensor params: ``check(settings)``, and ``settings``.

    Why (torch.distributed.checkpoint.state_dict with broadcast_from_rank0): torch sends
    rank 0's values only for the keys each rank's own ``state_dict`` has, and adds
    the checkpoint's other keys on rank 0 alone, so ranks can differ in the group keys
    adamx leaves out at their defaults, and a checkpoint only rank 0 can see is wrong
    (compact moments) fails there alone, leaving the others to hang in their next
    collective. Two object gathers per mesh dim (load_state_dict is called on every rank
    of a sharded model, as set_optimizer_state_dict is)."""
    groups = _mesh_groups(params)
    if not groups:
        check(settings)
        return settings
    settings = _gathered(groups, settings, lambda values: values[0])
    import torch.distributed as dist
    try:
        check(settings)
        found = None
    except (ValueError, NotImplementedError) as exc:
        found = exc
    mine = None if found is None else (type(found).__name__, str(found), dist.get_rank())
    first = _gathered(groups, mine,
                      lambda values: next((v for v in values if v is not None), None))
    if first is None:
        return settings
    kind, message, rank = first
    raise _ERRORS[kind](f"{message} (found on rank {rank}, raised on every rank)") from found
