"""The per-worker training function that Ray Train runs: ordinary DeepSpeed plus `ray.train.report`."""

from __future__ import annotations

import itertools
import json
import os
import random
import tempfile
import time

import numpy as np

from bigray import storage
from bigray.config import Config
from bigray.train.data import epoch_batches, global_batches, micro_slice, table_rows
from bigray.train.metrics import MetricsLog, memory_gb, mfu, peak_flops
from bigray.train.model import build_model, flops_per_token, model_config
from bigray.train.zero import deepspeed_config, lr_at, param_groups, resolve_precision

CKPT_TAG = "ds"
PROBE_TOKENS = 16


def train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(config["cfg"])
    t, manifest, run_dir = cfg.train, config["manifest"], config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tok = manifest["tokenizer"]
    engine, hf_cfg, precision = setup_engine(cfg, tok["vocab_size"], manifest["seq_len"], tok["eos_id"], world, device)
    step = restore(engine, rank, config.get("resume_from"), cfg.storage)
    # The checkpoint's scheduler state carries the peak LR of the run that wrote it; this run's own
    # train.lr wins (a PBT trial restarts from another trial's checkpoint with a perturbed LR).
    engine.lr_scheduler.base_lrs = [t.lr] * len(engine.lr_scheduler.base_lrs)
    log = MetricsLog(run_dir, step, cfg.storage) if rank == 0 else None

    seq_len = manifest["seq_len"]
    rows_per_step = world * t.micro_batch_size * t.grad_accum_steps
    steps_per_epoch = manifest["splits"]["train"]["rows"] // rows_per_step
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    flops = flops_per_token(hf_cfg, n_params, seq_len)
    peak = peak_flops(_device_name(device), t.peak_tflops)
    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard("val") if "val" in config["datasets"] else None
    val_batches = None

    epoch, skip = divmod(step, steps_per_epoch)
    batches = epoch_batches(train_it, t.shuffle_window, t.seed, epoch, rows_per_step, skip)
    loss_acc, steps_since, clock = 0.0, 0, time.perf_counter()
    while step < t.max_steps:
        batch = next(batches, None)
        if batch is None:
            epoch += 1
            batches = epoch_batches(train_it, t.shuffle_window, t.seed, epoch, rows_per_step)
            continue
        for m in range(t.grad_accum_steps):
            loss = lm_loss(engine, micro_slice(batch, m, rank, world, t.micro_batch_size), device)
            engine.backward(loss)
            engine.step()
            loss_acc += loss.detach()
        step += 1
        steps_since += 1

        evaluate_now = val_it is not None and (step % t.eval_every == 0 or step == t.max_steps)
        checkpoint_now = step % t.checkpoint_every == 0 or step == t.max_steps
        if not (step % t.log_every == 0 or evaluate_now or checkpoint_now):
            continue
        elapsed = time.perf_counter() - clock
        tokens_per_s = steps_since * rows_per_step * seq_len / elapsed
        metrics = {
            "step": step, "epoch": epoch, "loss": _mean_across_ranks(loss_acc / (steps_since * t.grad_accum_steps), device),
            "lr": lr_at(step - 1, t), "grad_norm": _float(engine.get_global_grad_norm()),
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_worker": tokens_per_s / world,
            "mfu": mfu(tokens_per_s / world, flops, peak), "step_time_s": elapsed / steps_since, "memory_gb": memory_gb(),
        }
        if evaluate_now:
            val_batches = val_batches or load_val(val_it, t, world)
            metrics["val_loss"] = evaluate(engine, val_batches, t, rank, world, device)
        if log:
            log.log(metrics)
        if checkpoint_now:
            save_checkpoint(engine, cfg, config, metrics, rank, hf_cfg, precision, device, log)
        else:
            ray.train.report({k: v for k, v in metrics.items() if v is not None})
        loss_acc, steps_since, clock = 0.0, 0, time.perf_counter()
    if log:
        log.flush_tensorboard()


def setup_engine(cfg: Config, vocab_size: int, seq_len: int, eos_id: int, world: int, device):
    """Build the model (inside zero.Init under ZeRO-3), AdamW, the LR schedule and the DeepSpeed engine.

    Needs torch.distributed initialised (Ray Train does it); nothing here depends on Ray.
    """
    t = cfg.train
    if device.type != "cuda":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's comm layer wraps the existing process group (ZeRO-3's zero.Init reads the world
    # size from it while the model is built).
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    on_gpu = device.type == "cuda"
    precision = resolve_precision(t.precision, on_gpu, get_accelerator().is_bf16_supported())
    ds_cfg = deepspeed_config(t, world, precision, on_gpu)
    # One local copy of an s3:// pretrained dir serves both the config and the weights.
    pretrained_dir = storage.local_dir(cfg.model.pretrained, cfg.storage) if cfg.model.pretrained else None
    hf_cfg = model_config(cfg.model, vocab_size, seq_len, eos_id, pretrained_dir)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    if t.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # Must stay alive while the model is built: transformers then builds inside deepspeed.zero.Init.
        ds_hint = HfDeepSpeedConfig(ds_cfg)  # noqa: F841
    model = build_model(hf_cfg, pretrained_dir)
    if t.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = param_groups(model, t.weight_decay)
    if t.offload_optimizer and on_gpu:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=t.lr, betas=(0.9, 0.95), eps=1e-8, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), eps=1e-8, fused=on_gpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, t) / t.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    if t.compile:
        engine.compile()
    return engine, hf_cfg, precision


def lm_loss(engine, rows: np.ndarray, device):
    """Next-token cross-entropy: inputs rows[:, :-1], labels rows[:, 1:]."""
    import torch
    import torch.nn.functional as F

    tokens = torch.from_numpy(rows.astype(np.int64)).to(device, non_blocking=True)
    logits = engine(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def load_val(val_it, t, world: int) -> list[np.ndarray]:
    """The val split (or its first `eval_batches` global batches), read once and kept: evaluation
    then costs only the forward passes, not a Ray Data execution each time."""
    tables = val_it.iter_batches(batch_size=t.shuffle_window, batch_format="pyarrow")
    return list(itertools.islice(global_batches(map(table_rows, tables), world * t.micro_batch_size), t.eval_batches))


def evaluate(engine, val_batches: list[np.ndarray], t, rank: int, world: int, device) -> float:
    """Mean val loss over the cached val batches, all ranks together."""
    import torch

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in val_batches:
            loss = lm_loss(engine, micro_slice(batch, 0, rank, world, t.micro_batch_size), device)
            total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
    engine.train()
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def save_checkpoint(engine, cfg: Config, config: dict, metrics: dict, rank: int, hf_cfg, precision: str, device, log) -> None:
    """DeepSpeed's sharded checkpoint + this rank's RNG states; rank 0 adds what export needs.

    Every rank reports its own temp dir; Ray Train merges them into one checkpoint in storage.
    """
    import ray.train
    import torch

    probe = torch.tensor([config["probe"]], device=device)
    with torch.no_grad():  # every rank runs it: under ZeRO-3 the forward pass is collective
        engine.eval()
        probe_logits = engine(input_ids=probe).logits.float().cpu()
        engine.train()
    if log:
        log.flush_tensorboard()
    with tempfile.TemporaryDirectory(prefix="bigray-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"step": metrics["step"]})
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank}.pt"))
        if rank == 0:
            hf_cfg.save_pretrained(os.path.join(tmp, "hf"))
            storage.copy_dir(config["tokenizer_dir"], os.path.join(tmp, "tokenizer"), cfg.storage)
            torch.save({"input_ids": probe.cpu(), "logits": probe_logits}, os.path.join(tmp, "probe.pt"))
            meta = {"step": metrics["step"], "precision": precision, "tag": CKPT_TAG, "zero_stage": cfg.train.zero_stage,
                    "world_size": torch.distributed.get_world_size(), "run_dir": config["run_dir"]}
            with open(os.path.join(tmp, "bigray.json"), "w") as f:
                json.dump(meta, f)
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine, rank: int, resume_from: str | None = None, storage_cfg=None) -> int:
    """Resume from Ray Train's latest checkpoint, else from `resume_from`, if any: weights, optimizer, scheduler, step, RNG."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        # This run has no checkpoint of its own yet: start from another run's (Tune's PBT exploit, a resumed trial).
        fs, path = storage.filesystem(resume_from, storage_cfg)
        checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        _, client_state = engine.load_checkpoint(d, tag=CKPT_TAG)
        rng_path = os.path.join(d, "rng", f"rank_{rank}.pt")
        if os.path.exists(rng_path):  # absent when resuming with a different world size
            _set_rng_state(torch.load(rng_path, weights_only=False))
    return client_state["step"]


def _rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _mean_across_ranks(value, device) -> float:
    import torch

    tensor = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    torch.distributed.all_reduce(tensor)
    return tensor.item() / torch.distributed.get_world_size()


def _float(value) -> float | None:
    return None if value is None else float(value)


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
