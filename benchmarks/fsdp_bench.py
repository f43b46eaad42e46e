"""optimizer.step() under FSDP2 on the CPU: adamx against torch's fused CPU step and
torch's default, each rank stepping its own shards.

    python benchmarks/fsdp_bench.py --ranks 2 --threads 1 --layers 2 --out out/fsdp

The script starts --ranks processes itself (gloo on 127.0.0.1, a free port), each with
--threads torch threads: on a machine with few cores, ranks x threads should not exceed
them (2 ranks x 1 thread on 2 cores), or the ranks take turns and the times measure the
scheduler. The model is a GPT-2-small-like layer set: --layers transformer blocks of
width --width (768: 7,087,872 params per block: ln_1, attention c_attn/c_proj, ln_2,
MLP c_fc/c_proj, as GPT-2's), each block and the root wrapped by ``fully_shard``, so
every rank holds 1/ranks of every tensor. One model per optimizer (the same initial
weights); the peers take turns, one training step each per round, so that they share
the machine's slow and fast moments alike:

    adamx        adamx.Adam()
    torch-fused  torch.optim.Adam(fused=True)  (torch's fused CPU kernel)
    torch        torch.optim.Adam()            (defaults: on CPU DTensors, the for-loop)

A training step is forward + backward (with FSDP2's all-gathers and reduce-scatters) +
``optimizer.step()``; after --warmup untimed rounds, --repeats timed ones. Per rank the
medians of the step's time and of the whole training step's are taken; the table shows
the slowest rank's (the ranks wait for each other at the next all-gather), the step's
share of the training step, and adamx's step time as a ratio of each peer's. Writes
fsdp_bench.json into --out.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import bench_common as bc

PEERS = ["adamx", "torch-fused", "torch"]


class Block(nn.Module):
    """A GPT-2 block (pre-norm attention and MLP, as in GPT-2 small)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x))))


def make_model(args):
    torch.manual_seed(0)
    return nn.Sequential(*[Block(args.width, args.heads) for _ in range(args.layers)])


def make_optimizer(name, params, lr):
    if name == "adamx":
        return bc.make_optimizer("adamx", params, lr=lr)
    if name == "torch-fused":
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr)


def rank_main(args):
    """One rank: returns {peer: {"step": [s...], "train": [s...]}}."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                            rank=args.rank, world_size=args.ranks)
    bc.prime_allocator()
    runs = {}
    for name in args.peers:
        model = make_model(args)
        for block in model:
            fully_shard(block)
        fully_shard(model)
        runs[name] = (model, make_optimizer(name, model.parameters(), args.lr))
    g = torch.Generator().manual_seed(args.rank)
    x = torch.randn(args.batch, args.tokens, args.width, generator=g)
    times = {name: {"step": [], "train": []} for name in args.peers}
    for round_ in range(args.warmup + args.repeats):
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            model(x).square().mean().backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad()
            if round_ >= args.warmup:
                times[name]["step"].append(t2 - t1)
                times[name]["train"].append(t2 - t0)
    local = sum(p.to_local().numel() for p in runs[args.peers[0]][0].parameters())
    total = sum(p.numel() for p in runs[args.peers[0]][0].parameters())
    # Both ranks done before either tears gloo down: a rank destroying the group while its
    # peer still waits on the last collective aborted that peer once in CI
    # ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    return dict(times=times, local_params=local, params=total,
                tensors=len(list(runs[args.peers[0]][0].parameters())))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, out):
    """Starts the ranks (this script with --rank), waits, returns their results."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    argv = [a for a in sys.argv[1:]]
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--rank", str(rank),
                               "--port", str(port), "--out", str(out)], env=env)
             for rank in range(args.ranks)]
    codes = [proc.wait(timeout=args.timeout) for proc in procs]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(args.ranks)]


def summarize(args, ranks):
    peers = {}
    for name in args.peers:
        step = max(statistics.median(r["times"][name]["step"]) for r in ranks)
        train = max(statistics.median(r["times"][name]["train"]) for r in ranks)
        peers[name] = dict(step_median_s=step, train_median_s=train, share=step / train,
                           step_median_per_rank_s=[statistics.median(r["times"][name]["step"])
                                                   for r in ranks])
    return peers


def table(peers):
    """The summary table of ``peers`` (summarize's, or fsdp_bench.json's)."""
    rows = []
    base = peers.get("adamx")
    for name, res in peers.items():
        ratio = f"{base['step_median_s'] / res['step_median_s']:.2f}x" if base else "-"
        rows.append([name, bc.fmt_time(res["step_median_s"]), bc.fmt_time(res["train_median_s"]),
                     f"{100 * res['share']:.1f}%", ratio])
    return bc.format_table(["optimizer", "step", "train step", "step share", "adamx / this"],
                           rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64, help="sequence length")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds, for all ranks")
    parser.add_argument("--out", default="out/fsdp")
    parser.add_argument("--quick", action="store_true",
                        help="tiny run for tests: width 64, 1 layer, 2+3 rounds")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.peers = bc.parse_list(args.peers, PEERS, "peers")
    if args.quick:
        args.width, args.heads, args.layers, args.tokens = 64, 4, 1, 16
        args.warmup, args.repeats = 2, 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rank is not None:
        result = rank_main(args)
        (out / f"rank{args.rank}.json").write_text(json.dumps(result))
        return 0

    torch.set_num_threads(args.threads)
    facts = bc.machine_facts()
    bc.print_header("adamx FSDP2 step benchmark (CPU, gloo)", facts)
    t_start = time.perf_counter()
    ranks = launch(args, out)
    peers = summarize(args, ranks)
    config = dict(ranks=args.ranks, threads_per_rank=args.threads, layers=args.layers,
                  width=args.width, heads=args.heads, batch=args.batch, tokens=args.tokens,
                  warmup=args.warmup, repeats=args.repeats, params=ranks[0]["params"],
                  tensors=ranks[0]["tensors"],
                  local_params_per_rank=[r["local_params"] for r in ranks])
    print(f"# config: {args.ranks} ranks x {args.threads} threads, {args.layers} blocks of "
          f"width {args.width} ({config['params']:,} params in {config['tensors']} tensors, "
          f"{config['local_params_per_rank']} per rank), batch {args.batch} x {args.tokens} "
          f"tokens, {args.warmup} + {args.repeats} rounds")
    print()
    print("**optimizer.step() under FSDP2 (slowest rank's median)**")
    print()
    print(table(peers))
    wall = time.perf_counter() - t_start
    print(f"\n# wall {wall:.1f} s")
    bc.write_json(out / "fsdp_bench.json", dict(benchmark="fsdp_bench", config=config,
                                               machine=facts, peers=peers, wall_s=wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
