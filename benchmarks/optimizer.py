"""AdamW's step on what ZeRO hands it: one flat fp32 partition per parameter group, not one tensor per weight.

torch's AdamW on CPU defaults to its per-tensor loop, whose arithmetic allocates temporaries the size of each
tensor (`exp_avg_sq.sqrt()`, the divisions): for a flat partition, hundreds of MB each, every step. glibc serves
blocks that large with mmap and returns them with munmap, so each step faults every page of them in again
(minor page faults, counted here per step). `fused=True` (torch >= 2.4 on CPU) updates in place.

Same groups, same gradients, same number of steps on each side, alternating, in one process with one torch
thread (as a 1-CPU Ray Train worker); prints the time and fault ratios and the largest difference in the updated
parameters.

    python benchmarks/optimizer.py [--params 85e6 --steps 8]
"""

from __future__ import annotations

import argparse
import resource
import time


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=85e6, help="elements of the flat partition (125m preset: ~85M)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = int(args.params)
    # Two groups as bigray builds them (decay on matrices, none on norms and biases); ZeRO flattens each into one.
    sizes = (n - n // 100, n // 100)
    torch.manual_seed(0)
    start = [torch.randn(s) for s in sizes]
    grads = [torch.randn(s) * 1e-3 for s in sizes]

    def make(**kw):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        for p, g in zip(params, grads):
            p.grad = g
        groups = [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]
        return params, torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, **kw)

    sides = {"per-tensor loop (CPU default)": make(foreach=False), "fused": make(fused=True)}
    took = {name: [] for name in sides}
    faults = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (_, opt) in sides.items():
            f0, t0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt, time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            took[name].append((time.perf_counter() - t0) / args.steps)
            faults[name].append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0) / args.steps)
    loop, fused = sides
    diff = max((a - b).abs().max().item() for a, b in zip(sides[loop][0], sides[fused][0]))
    print(f"AdamW step over a flat fp32 partition of {n / 1e6:.0f}M elements in 2 groups, 1 torch thread, "
          f"{args.rounds} rounds of {args.steps} steps per side (best round)")
    for name in sides:
        print(f"  {name:30} {min(took[name]) * 1e3:8.1f} ms/step {min(faults[name]):12,.0f} minor faults/step "
              f"({min(faults[name]) * 4096 / 2**20:,.0f} MiB of pages)")
    print(f"fused / per-tensor loop: time {min(took[fused]) / min(took[loop]):.2f}x, "
          f"faults {min(faults[fused]) / max(1.0, min(faults[loop])):.3f}x; "
          f"largest parameter difference after {args.rounds * args.steps} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
