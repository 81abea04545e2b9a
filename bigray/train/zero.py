"""DeepSpeed ZeRO pieces, each a small pure function: the engine config, param groups, the LR schedule."""

from __future__ import annotations

import copy
import math

from bigray.config import TrainConfig, deep_merge


def deepspeed_config(t: TrainConfig, world_size: int, precision: str, on_gpu: bool) -> dict:
    """The DeepSpeed config bigray runs with; `train.deepspeed` reaches any other option."""
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        # Overlap and big buckets pay off with NCCL; with gloo on CPU overlap only adds threads.
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_bucket_size=5e7, allgather_bucket_size=5e7)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if t.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e5,
                    stage3_max_live_parameters=1e9)
        if t.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # Dynamic loss scaling (loss_scale 0) so fp16 gradients neither overflow nor vanish.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        # bigray logs its own metrics; DeepSpeed's prints would only duplicate them.
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # A plain torch AdamW on CPU; on GPU offload DeepSpeed swaps in its CPU Adam itself.
        "zero_force_ds_cpu_optimizer": False,
        # Checkpoints go to node-local temp dirs that Ray Train uploads; DeepSpeed's default (not
        # use_node_local_storage) has only global rank 0 write the shared model-states file, so no two
        # nodes upload the same file. Every rank fetches its own copy on restore (loop.restore).
        "checkpoint": {"use_node_local_storage": False},
    }
    if precision == "bf16":
        # bf16 keeps 8 mantissa bits: summed in bf16, the small micro-batch and rank contributions to a gradient
        # round away. Reduce (2x the traffic of bf16) and accumulate in fp32; accumulation needs ZeRO >= 1, as
        # DeepSpeed has no bf16 engine with fp32 accumulation without ZeRO.
        cfg["communication_data_type"] = "fp32"
        if t.zero_stage >= 1:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    # A copy: DeepSpeed and HfDeepSpeedConfig may fill in the dict they get; the config keeps its own.
    return deep_merge(cfg, copy.deepcopy(t.deepspeed))


def worker_env_vars(t: TrainConfig) -> dict[str, str]:
    """Environment for each Ray Train worker: OpenMP threads (torch's CPU ops, DeepSpeed's CPU Adam) per its CPUs.

    Ray leaves an inherited OMP_NUM_THREADS alone, and nodes started by its cluster launcher inherit 1, which
    would leave an offloaded optimizer step on one core of the cpus_per_worker reserved for it.
    """
    return {"OMP_NUM_THREADS": str(max(1, int(t.cpus_per_worker)))}


def resolve_precision(requested: str, on_gpu: bool, bf16_ok: bool) -> str:
    """fp32 where the device lacks the requested low precision."""
    if requested == "bf16" and not bf16_ok:
        return "fp32"
    if requested == "fp16" and not on_gpu:
        return "fp32"
    return requested


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay for norms and biases (1-D tensors).

    Under ZeRO-3 a parameter is partitioned and looks empty; `ds_shape` keeps its real shape.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        (decay if len(shape) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Empty groups dropped (LoRA's adapters are all matrices): DeepSpeed's ZeRO optimizers drop them, which would
    # leave the LR scheduler, built over the groups given, with one LR too many. The decay group stays first.
    return [g for g in groups if g["params"]]


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))
