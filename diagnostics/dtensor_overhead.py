"""What a step over DTensor params costs beyond the same step over their local tensors:
torch's fused Adam (whose op has a DTensor sharding strategy, so every step runs DTensor's
dispatch and sharding propagation) and adamx (which swaps the DTensors for their local
tensors in Python, adamx/_sharded.py), each against itself on the local tensors.

    python diagnostics/dtensor_overhead.py --tensors 24 --numel 1000 --steps 300

One process, a 1-rank gloo group (the dispatch cost does not depend on the world size),
--tensors Shard(0) DTensor params of --numel elements each, 1 thread; medians of --steps
timed steps after 20, the four variants taking turns step by step.
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

import adamx

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tensors", type=int, default=24)
parser.add_argument("--numel", type=int, default=1000)
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--port", type=int, default=29533)
args = parser.parse_args()

torch.set_num_threads(1)
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", str(args.port))
dist.init_process_group("gloo", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))


def make(sharded):
    g = torch.Generator().manual_seed(0)
    params = []
    for _ in range(args.tensors):
        t = torch.randn(args.numel, generator=g)
        p = torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)]) if sharded else t)
        p.grad = (distribute_tensor(torch.randn(args.numel, generator=g), mesh, [Shard(0)])
                  if sharded else torch.randn(args.numel, generator=g))
        params.append(p)
    return params


variants = {
    "torch fused, DTensor": torch.optim.Adam(make(True), fused=True),
    "torch fused, local": torch.optim.Adam(make(False), fused=True),
    "adamx, DTensor": adamx.Adam(make(True)),
    "adamx, local": adamx.Adam(make(False)),
}
times = {name: [] for name in variants}
for i in range(20 + args.steps):
    for name, opt in variants.items():
        start = time.perf_counter()
        opt.step()
        elapsed = time.perf_counter() - start
        if i >= 20:
            times[name].append(elapsed)
print(f"{args.tensors} tensors x {args.numel} elements, 1 thread, median of {args.steps}")
for name, ts in times.items():
    print(f"{name:22s} {statistics.median(ts) * 1e6:9.1f} us")
for peer in ("torch fused", "adamx"):
    extra = (statistics.median(times[f"{peer}, DTensor"])
             - statistics.median(times[f"{peer}, local"]))
    print(f"{peer}: DTensor costs {extra * 1e6:.1f} us per step, "
          f"{extra / args.tensors * 1e6:.2f} us per tensor")
dist.destroy_process_group()
