"""Do two builds of adamx compute the same bits? For refactors that must not change results.

`dump OUT.pt` runs a fixed set of steps with the adamx that Python imports (the CPU kernel
on every supported ISA with 1 and 2 threads, and the CUDA kernel body emulated on the CPU,
over every combination of the switches, 4 dtypes, two hyper-parameter settings; then an
optimizer with two param groups) and saves every tensor they produced. `compare A.pt B.pt`
compares two such files bit for bit (NaN payloads included) and prints what differs.

    PYTHONPATH=/path/to/old python diagnostics/bitwise_dump.py dump old.pt
    PYTHONPATH=/path/to/new python diagnostics/bitwise_dump.py dump new.pt
    python diagnostics/bitwise_dump.py compare old.pt new.pt
"""

import itertools
import sys

import torch

SHAPES = [(), (1,), (7,), (3, 5), (17, 33), (1031,), (70001,), (2, 3, 4, 5)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SWITCHES = ("amsgrad", "maximize", "decoupled_weight_decay", "eps_inside_sqrt")


def tensors(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]


def run(adamx, emulated, dtype, switches, weight_decay, tensor_lr):
    params = tensors(dtype, 1)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    x = [torch.zeros_like(p) for p in params] if switches["amsgrad"] else []
    steps = [torch.tensor(0.0) for _ in params]
    lr = torch.tensor(0.03, dtype=torch.float64) if tensor_lr else 0.03
    for k in range(3):
        kw = adamx.functional.op_kwargs(lr=lr, beta1=0.9, beta2=0.999, weight_decay=weight_decay,
                                        eps=1e-8, **switches)
        lists = (params, tensors(dtype, 10 + k), m, v, x, steps)
        if emulated:
            torch.ops.adamx._adam_emulated_cuda_(*lists, **kw, chunk_size=96, block_dim=8)
        else:
            torch.ops.adamx.adam_(*lists, **kw)
    return params + m + v + x + steps


def dump(path):
    import adamx

    out = {}
    for bits in itertools.product([False, True], repeat=len(SWITCHES)):
        switches = dict(zip(SWITCHES, bits))
        for dtype in DTYPES:
            for weight_decay, tensor_lr in ((0.0, False), (0.1, True)):
                key = f"{''.join(str(int(b)) for b in bits)}-{dtype}-{weight_decay}-{tensor_lr}"
                for isa in adamx.supported_cpu_capabilities():
                    adamx.set_cpu_capability(isa)
                    for threads in (1, 2):
                        torch.set_num_threads(threads)
                        out[f"cpu-{isa}-{threads}-{key}"] = run(adamx, False, dtype, switches,
                                                                weight_decay, tensor_lr)
                out[f"emulated-{key}"] = run(adamx, True, dtype, switches, weight_decay, tensor_lr)
    params = tensors(torch.float32, 5)
    opt = adamx.AdamW([{"params": params[:4]},
                       {"params": params[4:], "lr": torch.tensor(0.01), "amsgrad": True}], lr=0.02)
    for k in range(4):
        for p, g in zip(params, tensors(torch.float32, 20 + k)):
            p.grad = g
        opt.step()
    out["optimizer"] = params + [t for p in params for t in opt.state[p].values()]
    torch.save(out, path)
    print(f"{len(out)} runs saved to {path} (adamx from {adamx.__file__})")


def bits(t):
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def compare(path_a, path_b):
    a, b = torch.load(path_a), torch.load(path_b)
    if a.keys() != b.keys():
        sys.exit(f"the files hold different runs: {sorted(a.keys() ^ b.keys())[:5]} ...")
    count = differ = 0
    for key in a:
        for x, y in zip(a[key], b[key]):
            count += 1
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(bits(x), bits(y)):
                differ += 1
                print("differs:", key)
    print(f"{len(a)} runs, {count} tensors compared bit for bit: {differ} differ")
    return differ


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "dump":
        dump(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
    else:
        sys.exit(__doc__)
