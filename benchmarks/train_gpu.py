"""Tokens/s, MFU and peak memory of bigray's presets on one GPU, engine alone, beside `bigray plan`'s prediction.

Uses the workers' own engine code (`bigray.train.loop.setup_engine`: model, AdamW groups, LR schedule, DeepSpeed
config) and loss (`bigray.train.loss.lm_loss`) in one process, without Ray, on random token ids (throughput does
not depend on token values). `bigray train` through Ray on the same settings is the product path; this is the
reference it is held to (>= 0.97x of these tokens/s). The planner's column is `MemoryPlan.peak_allocated`, the
figure comparable with torch's max_memory_allocated.

    python benchmarks/train_gpu.py --presets 125m 1b --stages 2 --loss-impls plain chunked --micro-batch 16 --compile
    python benchmarks/train_gpu.py --presets 1b --micro-batch plan     # the largest micro batch bigray plan proposes
    python benchmarks/train_gpu.py --presets tiny --device cpu --seq-len 128 --steps 2   # a smoke run without a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bigray.config import load_config
from bigray.plan import GIB, gpu_memory, memory_plan, model_shape, propose
from bigray.storage import Store
from bigray.train.loop import setup_engine
from bigray.train.loss import lm_loss, resolve_loss_impl
from bigray.train.metrics import mfu, peak_flops
from bigray.train.model import flops_per_token


def measure(preset: str, stage: int, impl: str, args, device: torch.device) -> dict:
    on_gpu = device.type == "cuda"
    cfg = load_config(overrides=[
        f"model.preset={preset}", f"train.zero_stage={stage}", "train.precision=bf16",
        f"train.use_gpu={str(on_gpu).lower()}",
        "train.num_workers=1", "train.warmup_steps=10", f"train.max_steps={args.steps + args.warmup}",
        f"train.activation_checkpointing={str(args.ac).lower()}", f"train.compile={str(args.compile).lower()}",
        f"train.loss_impl={impl}", f"data.seq_len={args.seq_len}",
    ])
    t, shape = cfg.train, model_shape(cfg.model, args.vocab, args.seq_len)
    if args.micro_batch == "plan":
        memory, _ = gpu_memory(t)
        proposal = propose(t.model_copy(update={"micro_batch_size": 1, "grad_accum_steps": 256}), shape, memory)
        t = t.model_copy(update={"micro_batch_size": proposal.micro_batch_size, "grad_accum_steps": 1,
                                 "activation_checkpointing": proposal.activation_checkpointing})
    else:
        t = t.model_copy(update={"micro_batch_size": int(args.micro_batch)})
    predicted = memory_plan(t, shape, on_gpu=on_gpu)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    engine, hf_cfg, precision = setup_engine(t, cfg.model, Store(), args.vocab, args.seq_len, 0, 1, device)
    ran = resolve_loss_impl(impl, device.type, stage)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, args.vocab, (t.micro_batch_size, args.seq_len + 1), generator=gen).to(device)
    times = []
    for step in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        loss = lm_loss(engine, rows[:, :-1], rows[:, 1:], ran)
        engine.backward(loss)
        engine.step()
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    tps = t.micro_batch_size * args.seq_len / step_time
    flops = flops_per_token(hf_cfg, n_params, args.seq_len)
    peak = peak_flops(torch.cuda.get_device_name(0)) if on_gpu else None
    out = {"preset": preset, "zero": stage, "mb": t.micro_batch_size, "ac": t.activation_checkpointing,
           "loss_impl": ran,
           "precision": precision, "params_M": n_params / 1e6, "step_s": step_time, "tokens_per_s": tps,
           "mfu": mfu(tps, flops, peak), "mem_GiB": torch.cuda.max_memory_allocated() / GIB if on_gpu else None,
           "planned_GiB": predicted.peak_allocated / GIB, "loss": loss.item()}
    engine.destroy()
    del engine
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["125m", "1b"])
    parser.add_argument("--stages", nargs="+", type=int, default=[2])
    parser.add_argument("--loss-impls", nargs="+", default=["plain", "chunked"], help="plain chunked liger auto")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", default="8", help="an integer, or `plan`: the largest the planner proposes")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device.type == "cuda":
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        torch.distributed.init_process_group("gloo")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"device: {name}, seq_len {args.seq_len}, vocab {args.vocab}, compile {args.compile}, "
          f"activation checkpointing {args.ac}")
    print("| preset | ZeRO | micro batch | loss | tokens/s | MFU | peak GiB | planned GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        for stage in args.stages:
            for impl in args.loss_impls:
                r = measure(preset, stage, impl, args, device)
                mem = "-" if r["mem_GiB"] is None else f"{r['mem_GiB']:.1f}"
                util = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
                print(f"| {r['preset']} | {r['zero']} | {r['mb']}{' (+ac)' if r['ac'] else ''} | {r['loss_impl']} | "
                      f"{r['tokens_per_s']:,.0f} | {util} | {mem} | {r['planned_GiB']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
