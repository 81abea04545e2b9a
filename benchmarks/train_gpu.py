"""Tokens/s and MFU of bigray's presets under DeepSpeed ZeRO in bf16 on one GPU.

Uses bigray's own engine code (`bigray.train.loop.setup_engine` and `lm_loss`: the model, AdamW
groups, LR schedule and DeepSpeed config that `bigray train` runs on each worker) in one
process, without Ray, on random token ids (throughput does not depend on token values).

    python benchmarks/train_gpu.py --presets 125m 1b --stages 2 3 --seq-len 2048 --micro-batch 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from bigray.config import load_config
from bigray.train.loop import lm_loss, setup_engine
from bigray.train.metrics import mfu, peak_flops
from bigray.train.model import flops_per_token


def measure(preset: str, stage: int, args) -> dict:
    cfg = load_config(overrides=[
        f"model.preset={preset}", f"train.zero_stage={stage}", "train.precision=bf16", "train.use_gpu=true",
        f"train.micro_batch_size={args.micro_batch}", "train.warmup_steps=10", f"train.max_steps={args.steps + args.warmup}",
        f"train.activation_checkpointing={str(args.ac).lower()}", f"train.compile={str(args.compile).lower()}",
    ])
    device = torch.device("cuda", 0)
    torch.cuda.reset_peak_memory_stats()
    engine, hf_cfg, _ = setup_engine(cfg, args.vocab, args.seq_len, 0, 1, device)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    rng = np.random.default_rng(0)
    rows = rng.integers(0, args.vocab, size=(args.micro_batch, args.seq_len + 1), dtype=np.int64)
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = lm_loss(engine, rows, device)
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    tps = args.micro_batch * args.seq_len / step_time
    flops = flops_per_token(hf_cfg, n_params, args.seq_len)
    out = {"preset": preset, "zero": stage, "params_M": n_params / 1e6, "step_s": step_time, "tokens_per_s": tps,
           "mfu": mfu(tps, flops, peak_flops(torch.cuda.get_device_name(0))), "mem_GB": torch.cuda.max_memory_allocated() / 2**30,
           "loss": loss.item()}
    engine.destroy()
    del engine
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["125m", "1b"])
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", 0))
    print(f"device: {torch.cuda.get_device_name(0)}, seq_len {args.seq_len}, micro batch {args.micro_batch}, vocab {args.vocab}, "
          f"compile {args.compile}, activation checkpointing {args.ac}")
    for preset in args.presets:
        for stage in args.stages:
            r = measure(preset, stage, args)
            print(f"{r['preset']:>5} ZeRO-{r['zero']}: {r['params_M']:.0f}M params, {r['tokens_per_s']:,.0f} tokens/s, "
                  f"MFU {r['mfu']:.1%}, step {r['step_s'] * 1e3:.0f} ms, peak mem {r['mem_GB']:.1f} GB, loss {r['loss']:.3f}", flush=True)


if __name__ == "__main__":
    main()
