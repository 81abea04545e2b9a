"""The per-worker training function that Ray Train runs: ordinary DeepSpeed plus `ray.train.report`.

`train_func` reads like a table of contents: `setup_engine` (one function per technique), `restore`, then
per step `train_step`, and on logged steps `maybe_evaluate` and the `Checkpointer`, which decide themselves
whether they are due.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from bigray.config import ModelConfig, TrainConfig, deep_merge
from bigray.data.tokenizer import copy_tokenizer
from bigray.errors import BigrayError
from bigray.runtime import quiet_ray_console
from bigray.storage import Store
from bigray.train.batches import (
    Rows,
    micro_slice,
    open_reader,
    partitions_for,
    position,
    train_batches,
    train_order,
    val_order,
)
from bigray.train.lora import apply_lora, lora_resume_key, save_adapter_config
from bigray.train.metrics import MetricsLog, memory_gb, mfu, peak_flops
from bigray.train.model import build_model, flops_per_token, model_config, resolve_attention
from bigray.train.zero import deepspeed_config, lr_at, param_groups, resolve_precision

CKPT_TAG = "ds"
PROBE_TOKENS = 16


@dataclass(frozen=True)
class RunContext:
    """This worker's fixed facts: what stepping, evaluating and checkpointing need besides the engine."""

    train: TrainConfig
    store: Store
    rank: int
    world: int
    device: Any  # torch.device
    run_dir: str
    tokenizer_dir: str  # copied into every checkpoint, so an export is a complete HF dir
    probe: list[int]  # token ids whose logits every checkpoint stores, for export to check against
    hf_cfg: Any  # the transformers config the model was built from
    precision: str
    resume_keys: dict  # recorded in every checkpoint: what a run resuming it must agree with
    log: MetricsLog | None  # rank 0's metrics.jsonl and TensorBoard; None on other ranks
    data_order: Any = None  # the train split's DataOrder: each checkpoint records its position in it


def train_func(config: dict) -> None:
    """Ray Train's per-worker function; `config` is the train_loop_config built in trainer.py."""
    import ray.train
    import ray.train.torch

    t, store, manifest = TrainConfig.model_validate(config["train"]), config["store"], config["manifest"]
    quiet_ray_console(config["log_level"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tok, seq_len = manifest["tokenizer"], manifest["seq_len"]
    resume = find_resume(config["resume_from"], store)
    engine, hf_cfg, precision = setup_engine(engine_train_config(t, resume, world),
                                             ModelConfig.model_validate(config["model"]), store, tok["vocab_size"],
                                             seq_len, tok["eos_id"], world, device)
    agree = resume_keys(t, world, manifest, precision, hf_cfg)
    step = restore(engine, rank, world, resume, agree)
    apply_run_hyperparameters(engine, t)
    run = RunContext(train=t, store=store, rank=rank, world=world, device=device, run_dir=config["run_dir"],
                     tokenizer_dir=config["tokenizer_dir"], probe=config["probe"], hf_cfg=hf_cfg, precision=precision,
                     resume_keys=agree, log=MetricsLog(config["run_dir"], step, store) if rank == 0 else None,
                     data_order=train_order(t, manifest))
    rows_per_step = world * t.micro_batch_size * t.grad_accum_steps
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    window = Window(run, rows_per_step * seq_len, flops_per_token(hf_cfg, n_params, seq_len),
                    peak_flops(_device_name(device), t.peak_tflops))
    # Each rank reads its own partitions' blocks (bigray/train/batches.py): no Ray Data, nothing replayed.
    root = config["data_root"]
    val = ValBatches(open_reader(val_order(t, manifest), manifest, "val", root, store, 0, 1), t.eval_batches, rank,
                     world) if config["has_val"] else None
    batches = train_batches(open_reader(run.data_order, manifest, "train", root, store, rank, world), step,
                            t.max_steps)

    checkpointer = Checkpointer(run)
    for step, epoch, batch in batches:
        window.add(train_step(engine, batch, run))
        if not report_due(step, t, val is not None):
            continue
        metrics = window.metrics(engine, step, epoch)
        metrics |= maybe_evaluate(engine, val, step, run)
        clock = time.perf_counter()
        checkpoint = checkpointer.for_report(engine, step)
        if checkpoint or checkpoint_due(step, t):  # how long the step waited: the write, or the host copy
            metrics["checkpoint_s"] = time.perf_counter() - clock
        if checkpoint:
            metrics["checkpoint_step"] = checkpoint.step  # the step it holds (earlier, when written in background)
        if run.log:
            run.log.log(metrics)
        # ASYNC: Ray uploads the dir in a thread (and then deletes it) while the next steps run; the checkpoint
        # becomes the run's latest only once every rank's upload is done.
        ray.train.report({k: v for k, v in metrics.items() if v is not None},
                         checkpoint=ray.train.Checkpoint.from_directory(checkpoint.out_dir) if checkpoint else None,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode[t.checkpoint_upload.upper()],
                         delete_local_checkpoint_after_upload=True)
        window.reset()  # after the report: eval and checkpoint time are not step time
    if run.log:
        run.log.close()


def train_step(engine, rows: Rows, run: RunContext):
    """One optimizer step over a global batch: this rank's `rows`, micro slice by micro slice, accumulated inside
    DeepSpeed.

    Returns the sum of the micro steps' losses, a tensor (no device sync here).
    """
    t, total = run.train, 0.0
    normalizer = loss_normalizer(rows, run)
    for m in range(t.grad_accum_steps):
        loss = lm_loss(engine, micro_slice(rows, m, t.micro_batch_size), run.device, t.loss_impl, normalizer)
        engine.backward(loss)
        engine.step()
        total += loss.detach()
    return total


def loss_normalizer(rows: Rows, run: RunContext):
    """What each micro step's summed loss is divided by: the global batch's counted labels / (world * grad_accum).

    DeepSpeed divides each micro step's loss by grad_accum and averages gradients over ranks, so the step's
    gradient (and the logged loss) is then the token-weighted mean over every counted label of the global batch:
    a micro batch with few answer tokens weighs as little as its tokens, where a mean of per-micro means would
    weigh it as much as any other (and over-weigh the tokens of short answers). Rows without loss masks count every
    label, micro_batch * seq_len: no communication. Collective otherwise (one all-reduce of a count).
    """
    import torch

    from bigray.train.loss import count_targets

    t = run.train
    if rows.loss_mask is None and rows.segment_ids is None:
        return t.micro_batch_size * (rows.tokens.shape[1] - 1)
    count = torch.tensor(count_targets(rows.tokens, rows.loss_mask, rows.segment_ids), device=run.device)
    torch.distributed.all_reduce(count)
    return count.clamp(min=1).float() / (run.world * t.grad_accum_steps)


def eval_due(step: int, t: TrainConfig) -> bool:
    return step % t.eval_every == 0 or step == t.max_steps


def checkpoint_due(step: int, t: TrainConfig) -> bool:
    return step % t.checkpoint_every == 0 or step == t.max_steps


def report_due(step: int, t: TrainConfig, has_val: bool) -> bool:
    """Steps that are logged and reported to Ray Train: every log_every, and every eval or checkpoint step."""
    return step % t.log_every == 0 or (has_val and eval_due(step, t)) or checkpoint_due(step, t)


class Window:
    """Loss and wall time since the last reported step, turned into that step's metrics record."""

    def __init__(self, run: RunContext, tokens_per_step: int, flops_per_token: float, peak: float | None):
        self.run, self.tokens_per_step, self.flops_per_token, self.peak = run, tokens_per_step, flops_per_token, peak
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.clock = 0.0, 0, time.perf_counter()

    def add(self, loss) -> None:
        self.loss += loss
        self.steps += 1

    def metrics(self, engine, step: int, epoch: int) -> dict:
        """The metrics record of `step`; collective (the loss is averaged over ranks)."""
        t, world = self.run.train, self.run.world
        elapsed = time.perf_counter() - self.clock
        tokens_per_s = self.steps * self.tokens_per_step / elapsed
        return {
            "step": step, "epoch": epoch,
            "loss": _mean_across_ranks(self.loss / (self.steps * t.grad_accum_steps), self.run.device),
            "lr": lr_at(step - 1, t), "grad_norm": _float(engine.get_global_grad_norm()),
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_worker": tokens_per_s / world,
            "mfu": mfu(tokens_per_s / world, self.flops_per_token, self.peak), "step_time_s": elapsed / self.steps,
            "memory_gb": memory_gb(),
        }


def setup_engine(t: TrainConfig, model: ModelConfig, store: Store, vocab_size: int, seq_len: int, eos_id: int,
                 world: int, device):
    """Build the model (inside zero.Init under ZeRO-3), AdamW, the LR schedule and the DeepSpeed engine.

    Returns (engine, the transformers config, the precision it runs in). Needs torch.distributed initialised
    (Ray Train does it); nothing here depends on Ray.
    """
    if device.type != "cuda":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's comm layer wraps the existing process group (ZeRO-3's zero.Init reads the world
    # size from it while the model is built).
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    on_gpu = device.type == "cuda"
    precision = resolve_precision(t.precision, on_gpu, get_accelerator().is_bf16_supported())
    ds_cfg = deepspeed_config(t, world, precision, on_gpu)
    # One local copy of an s3:// pretrained dir serves both the config and the weights.
    pretrained_dir = store.local_dir(model.pretrained) if model.pretrained else None
    hf_cfg = model_config(model, vocab_size, seq_len, eos_id, pretrained_dir)
    seed_everything(t.seed)
    if t.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # Must stay alive while the model is built: transformers then builds inside deepspeed.zero.Init.
        ds_hint = HfDeepSpeedConfig(ds_cfg)  # noqa: F841
    module = build_model(hf_cfg, pretrained_dir, attn_implementation=resolve_attention(model.attention, on_gpu,
                                                                                      precision))
    if t.lora:
        module = apply_lora(module, t.lora, model)
    if t.activation_checkpointing:
        apply_activation_checkpointing(module)
    optimizer = build_optimizer(module, t, on_gpu)
    scheduler = build_lr_scheduler(optimizer, t)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    if t.compile:
        apply_compile(engine)
    return engine, hf_cfg, precision


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs, so every rank builds the same initial weights."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_activation_checkpointing(module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (HF's own hook)."""
    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_compile(engine) -> None:
    """torch.compile the engine's module (DeepSpeed's own entry point, so its hooks stay in place)."""
    engine.compile()


def build_optimizer(module, t: TrainConfig, on_gpu: bool):
    """AdamW over `param_groups`; DeepSpeed's CPU Adam when ZeRO offloads the optimizer from a GPU."""
    import torch

    groups = param_groups(module, t.weight_decay)
    if t.offload_optimizer and on_gpu:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=(0.9, 0.95), eps=1e-8, adamw_mode=True)
    # Fused on CPU too (torch >= 2.4): the per-tensor loop, CPU's default, allocates temporaries the size of each
    # tensor, and ZeRO's tensors are whole flat partitions: on the 125m preset 648 MiB of fresh pages faulted in per
    # step and 9x the step time of the fused kernel (benchmarks/optimizer.py).
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def build_lr_scheduler(optimizer, t: TrainConfig):
    """`lr_at` as a torch scheduler (a multiplier of train.lr), stepped by DeepSpeed once per optimizer step."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, t) / t.lr)


def lm_loss(engine, rows: Rows, device, loss_impl: str = "auto", normalizer=None):
    """Next-token cross-entropy of `rows`, computed as train.loss_impl says: inputs tokens[:, :-1], labels
    tokens[:, 1:] masked where the loss mask or a document boundary says (loss.shift_rows), per-document positions
    for packed rows. The sum over counted labels / `normalizer` (None: their mean)."""
    import torch

    from bigray.train import loss as losses

    shifted = losses.shift_rows(rows.tokens, rows.loss_mask, rows.segment_ids)
    impl = losses.resolve_loss_impl(loss_impl, device.type, engine.zero_optimization_stage())
    positions = None if shifted.position_ids is None else torch.from_numpy(shifted.position_ids).to(device)
    return losses.lm_loss(engine, torch.from_numpy(shifted.input_ids).to(device, non_blocking=True),
                          torch.from_numpy(shifted.labels).to(device, non_blocking=True), impl,
                          position_ids=positions, normalizer=normalizer)


class ValBatches:
    """The val split (or its first `limit` global batches), read on first use and kept: evaluation then costs only
    the forward passes. `reader` reads the whole split (val_order); this rank keeps every world-th row from its own."""

    def __init__(self, reader, limit: int | None, rank: int, world: int):
        self.reader, self.limit, self.rank, self.world = reader, limit, rank, world
        self.batches: list[Rows] | None = None

    def get(self) -> list[Rows]:
        """This rank's Rows of each val batch."""
        if self.batches is None:
            steps = self.reader.order.epoch(0).steps
            self.batches = [rows[self.rank::self.world]
                            for _, _, rows in self.reader.batches(0, min(steps, self.limit or steps))]
            self.reader.close()
        return self.batches


def maybe_evaluate(engine, val: ValBatches | None, step: int, run: RunContext) -> dict:
    """{"val_loss": ...} on eval steps (every train.eval_every, and the last), else {}; collective."""
    if val is None or not eval_due(step, run.train):
        return {}
    return {"val_loss": evaluate(engine, val.get(), run)}


def evaluate(engine, val_batches: list[Rows], run: RunContext) -> float:
    """Mean val loss over the counted labels of the cached val batches, all ranks together (token-weighted)."""
    import torch

    from bigray.train.loss import count_targets

    device = run.device
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for rows in val_batches:
            summed = lm_loss(engine, rows, device, run.train.loss_impl, normalizer=1.0)
            count = count_targets(rows.tokens, rows.loss_mask, rows.segment_ids)
            total += torch.stack([summed.double(), torch.tensor(count, dtype=torch.float64, device=device)])
    engine.train()
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


@dataclass
class Written:
    """One checkpoint of this rank: its local dir, and the thread still writing it (None once written)."""

    step: int
    out_dir: str
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def finish(self) -> Written:
        """Wait for the writer thread; raise what it raised."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            shutil.rmtree(self.out_dir, ignore_errors=True)
            raise BigrayError(f"writing the step-{self.step} checkpoint failed: {self.error!r}") from self.error
        return self


class Checkpointer:
    """Writes this rank's checkpoints when due (every train.checkpoint_every, and the last step) and says which
    one goes with a report. Collective: every rank must call `for_report` at every report.

    inline: the checkpoint is written before its step's report. background: the state is copied to host memory,
    a thread writes the files while training steps on, and the checkpoint goes with the first report at which
    every rank's files are complete (the last step's is written inline). Ray Train merges the dirs the ranks
    attach to the same report into one checkpoint, so all ranks attach it to the same report.
    """

    def __init__(self, run: RunContext):
        self.run = run
        self.pending: Written | None = None
        self.writer = None  # background: one HostCopyWriter for the run, its host buffers reused by each checkpoint
        remove_stale_dirs()

    def for_report(self, engine, step: int) -> Written | None:
        """The checkpoint to attach to this step's report, if any (its `step` may be earlier)."""
        due, last = checkpoint_due(step, self.run.train), step == self.run.train.max_steps
        ready = None
        if self.pending is not None and (due or _all_ranks(self.pending.done(), self.run.device)):
            ready, self.pending = self.pending.finish(), None
        if not due:
            return ready
        if self.run.train.checkpoint_write == "inline" or last:
            if ready is not None:  # superseded by the last step's own checkpoint in the same report
                shutil.rmtree(ready.out_dir, ignore_errors=True)
            return write_checkpoint(engine, step, self.run, background=False)
        if self.writer is None:
            from bigray.train.checkpoint_writer import HostCopyWriter

            self.writer = HostCopyWriter()
        self.pending = write_checkpoint(engine, step, self.run, background=True, writer=self.writer)
        return ready


def _all_ranks(flag: bool, device) -> bool:
    import torch

    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def write_checkpoint(engine, step: int, run: RunContext, background: bool, writer=None) -> Written:
    """This rank's checkpoint of `step` in a fresh local dir; with `background`, its large files are written by a
    thread from a host copy of the state (`writer`, a `checkpoint_writer.HostCopyWriter` whose previous write
    has finished). Collective."""
    from bigray.train import checkpoint_writer

    out_dir = local_dir("bigray-ckpt-")
    written = Written(step, out_dir)
    try:
        if not background:
            save_checkpoint(engine, step, run, out_dir)
            return written
        inline, engine.checkpoint_engine = engine.checkpoint_engine, writer
        try:
            save_checkpoint(engine, step, run, out_dir)
        finally:
            engine.checkpoint_engine = inline
        if writer.copied is not None:  # CUDA: copies still in flight must land before the optimizer changes states
            checkpoint_writer.before_next_step(engine.optimizer, writer.wait_copied)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise

    def write():
        try:
            # Measured on the 2-core box (README, benchmarks/checkpoint.py): the writer at nice 19 costs training
            # less, where training and the writer share the cores.
            checkpoint_writer.yield_cpu()
            writer.write_all()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread by Written.finish
            written.error = exc

    written.thread = threading.Thread(target=write, name=f"bigray-ckpt-{step}", daemon=True)
    written.thread.start()
    return written


# Local dirs a worker writes checkpoints to or restores from carry its pid: a dir whose process is gone (a worker
# killed mid-write or mid-upload, which Ray's upload would have deleted) is removed by the next worker on the node.
LOCAL_DIR_PREFIXES = ("bigray-ckpt-", "bigray-restore-")


def local_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def remove_stale_dirs(root: str | None = None) -> list[str]:
    """Remove the `local_dir`s under `root` (the temp dir) whose writing process has exited; returns them."""
    root = root or tempfile.gettempdir()
    stale = []
    for name in os.listdir(root):
        m = re.fullmatch(rf"(?:{'|'.join(LOCAL_DIR_PREFIXES)})(\d+)-\w+", name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            stale.append(name)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_checkpoint(engine, step: int, run: RunContext, out_dir: str) -> None:
    """DeepSpeed's sharded checkpoint + this rank's RNG states into `out_dir`; rank 0 adds what export needs."""
    import torch

    probe = torch.tensor([run.probe], device=run.device)
    with torch.no_grad():  # every rank runs it: under ZeRO-3 the forward pass is collective
        engine.eval()
        probe_logits = engine(input_ids=probe).logits.float().cpu()
        engine.train()
    if run.log:
        run.log.flush_tensorboard()
    # LoRA: the frozen base is not saved (a resume reloads it from model.pretrained), only the adapters.
    engine.save_checkpoint(out_dir, tag=CKPT_TAG, client_state={"step": step},
                           exclude_frozen_parameters=run.train.lora is not None)
    os.makedirs(os.path.join(out_dir, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(out_dir, "rng", f"rank_{run.rank}.pt"))
    if run.rank == 0:
        run.hf_cfg.save_pretrained(os.path.join(out_dir, "hf"))
        save_adapter_config(engine.module, out_dir)
        copy_tokenizer(run.tokenizer_dir, os.path.join(out_dir, "tokenizer"), run.store)
        torch.save({"input_ids": probe.cpu(), "logits": probe_logits}, os.path.join(out_dir, "probe.pt"))
        meta = {"step": step, "precision": run.precision, "tag": CKPT_TAG, "zero_stage": run.train.zero_stage,
                "world_size": run.world, "run_dir": run.run_dir, "resume": run.resume_keys,
                "data": position(run.data_order, step) if run.data_order else None}
        with open(os.path.join(out_dir, "bigray.json"), "w") as f:
            json.dump(meta, f)


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from and its bigray.json."""

    checkpoint: Any  # ray.train.Checkpoint
    meta: dict

    def elastic(self, world: int) -> bool:
        """Written by another number of ZeRO ranks: its optimizer partitions must be re-cut (universal checkpoint)."""
        return self.meta["zero_stage"] > 0 and self.meta["world_size"] != world


def find_resume(resume_from: str | None, store: Store) -> Resume | None:
    """Ray Train's latest committed checkpoint of this run, else `resume_from` (another run's), else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        # This run has no checkpoint of its own yet: start from another run's (Tune's PBT exploit, a resumed trial).
        fs, path = store.filesystem(resume_from)
        checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    if checkpoint is None:
        return None
    with checkpoint.filesystem.open_input_stream(checkpoint.path.rstrip("/") + "/bigray.json") as f:
        return Resume(checkpoint, json.loads(f.read()))


def engine_train_config(t: TrainConfig, resume: Resume | None, world: int) -> TrainConfig:
    """`t` with DeepSpeed told to load a universal checkpoint when `resume` was written by another world size."""
    if resume is None or not resume.elastic(world):
        return t
    return t.model_copy(update={"deepspeed": deep_merge(t.deepspeed, {"checkpoint": {"load_universal": True}})})


def restore(engine, rank: int, world: int, resume: Resume | None, agree: dict) -> int:
    """Weights, optimizer, scheduler, step and RNG from `resume`, if any. Returns the step to continue after (0
    for a fresh start).

    Raises if the checkpoint was written under settings that disagree with `agree` (this run's `resume_keys`).
    Same world size: fetches only this rank's files (`rank_files`). Another one (elastic): the checkpoint is
    converted once to DeepSpeed's universal format (`universal_checkpoint`), which every rank reads whole.
    """
    import torch

    if resume is None:
        return 0
    fs, path = resume.checkpoint.filesystem, resume.checkpoint.path.rstrip("/")
    check_resume(resume.meta.get("resume", {}), agree, path)
    d = local_dir("bigray-restore-")
    try:
        if resume.elastic(world):
            source = universal_checkpoint(fs, path, resume.meta["tag"], rank)
            fetch_files(fs, source, d, lambda rels: rels)
            fetch_files(fs, path, d, lambda rels: [r for r in rels if r == f"rng/rank_{rank}.pt"])
        else:
            fetch_rank_files(fs, path, rank, d)
        # A LoRA checkpoint holds no frozen weights: they stay as loaded from model.pretrained.
        frozen = any(not p.requires_grad for p in engine.module.parameters())
        _, client_state = engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=not frozen)
        rng = os.path.join(d, "rng", f"rank_{rank}.pt")
        if os.path.exists(rng):  # a rank the checkpoint did not have keeps its seeded RNG
            _set_rng_state(torch.load(rng, weights_only=False))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return client_state["step"]


UNIVERSAL_DIR = "universal"  # inside the checkpoint: its DeepSpeed state in universal form, made on first need


def universal_checkpoint(fs, path: str, tag: str, rank: int) -> str:
    """The path of the checkpoint's universal form, converting it first in a Ray task if no run did yet; all
    ranks return once it is complete. Collective."""
    import ray
    import torch

    done = f"{path}/{UNIVERSAL_DIR}/complete"
    if rank == 0 and fs.get_file_info(done).type == pafs.FileType.NotFound:
        convert = ray.remote(convert_to_universal).options(num_cpus=1, max_retries=1,
                                                           scheduling_strategy="DEFAULT")  # not in Train's group
        ray.get(convert.remote(fs, path, tag))
    torch.distributed.barrier()
    return f"{path}/{UNIVERSAL_DIR}"


def convert_to_universal(fs, path: str, tag: str) -> None:
    """DeepSpeed's `ds_to_universal` on the checkpoint at `path`, written back to `<path>/universal/` (a Ray task:
    it reads every rank's shards, which no training rank should hold). The `complete` marker is written last."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    with tempfile.TemporaryDirectory(prefix="bigray-universal-") as d:
        fetch_files(fs, path, os.path.join(d, "in"), lambda rels: [r for r in rels if r.startswith(f"{tag}/")])
        out = os.path.join(d, "out")
        # bigray's HF models carry no universal_checkpoint_info of their own: DeepSpeed injects its default.
        ds_to_universal.main(argparse.Namespace(
            input_folder=os.path.join(d, "in", tag), output_folder=os.path.join(out, tag), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        target = f"{path}/{UNIVERSAL_DIR}"
        fs.create_dir(target, recursive=True)
        pafs.copy_files(out, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    with fs.open_output_stream(f"{target}/complete") as f:
        f.write(b"ds_to_universal\n")


# Checkpoint files only `bigray export` reads, and the zero_to_*.py scripts DeepSpeed copies beside its shards: a
# resuming rank skips them.
EXPORT_ONLY = ("hf/", "tokenizer/", "probe.pt", "zero_to_", "adapter/")


def rank_of(rel_path: str) -> int | None:
    """The data-parallel rank a checkpoint file belongs to (a ZeRO shard, an RNG state), None if shared."""
    m = re.search(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_", rel_path) or re.fullmatch(r"rng/rank_(\d+)\.pt", rel_path)
    return int(m.group(1)) if m else None


def rank_files(rel_paths: list[str], rank: int) -> list[str]:
    """The files of a checkpoint that `rank` needs to resume: its own ZeRO shards and RNG state plus the shared
    ones (DeepSpeed's model states under ZeRO 0-2, bigray.json), not other ranks' shards, export's files nor the
    universal form an elastic resume made."""
    skip = (*EXPORT_ONLY, f"{UNIVERSAL_DIR}/")
    return [p for p in rel_paths if not p.startswith(skip) and rank_of(p) in (None, rank)]


def fetch_rank_files(fs, path: str, rank: int, dest: str) -> list[tuple[str, int]]:
    """Copy `rank_files` of the checkpoint at `path` on `fs` into `dest`; returns (relative path, bytes) of each."""
    return fetch_files(fs, path, dest, lambda rels: rank_files(rels, rank))


def fetch_files(fs, path: str, dest: str, select) -> list[tuple[str, int]]:
    """Copy the files `select(relative paths)` picks of the checkpoint at `path` on `fs` into `dest`, one at a time
    in 16 MiB chunks; returns (relative path, bytes) of each."""
    root = path.rstrip("/")
    infos = {i.path[len(root) + 1:]: i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File}
    fetched = []
    for rel in select(sorted(infos)):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with fs.open_input_stream(infos[rel].path) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 16 << 20)
        fetched.append((rel, infos[rel].size))
    return fetched


def resume_keys(t: TrainConfig, world: int, manifest: dict, precision: str | None = None, hf_cfg=None) -> dict:
    """What a run resuming a checkpoint must agree with, as recorded in its bigray.json.

    The model's shape and precision only where known (workers know them, the driver checks the rest first).
    """
    keys = {"zero_stage": t.zero_stage, "num_workers": world,
            # The data order's inputs (bigray/train/batches.py); not the number of workers.
            "global_batch_rows": world * t.micro_batch_size * t.grad_accum_steps, "seed": t.seed,
            "data_partitions": partitions_for(t, manifest), "shuffle_blocks": t.shuffle_blocks,
            "manifest_sha": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            "lora": lora_resume_key(t.lora)}
    if precision is not None:
        keys["precision"] = precision
    if hf_cfg is not None:
        shape = {k: v for k, v in hf_cfg.to_dict().items() if k in MODEL_SHAPE_KEYS}
        keys |= {f"model.{k}": v for k, v in sorted(shape.items())}
    return keys


# transformers config fields that fix the parameter shapes (Llama and GPT-2 spellings).
MODEL_SHAPE_KEYS = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "n_inner",
                    "max_position_embeddings", "n_positions", "tie_word_embeddings"}


# Recorded, but a resume may change them: another number of workers re-cuts ZeRO's partitions through DeepSpeed's
# universal checkpoint (`restore`), and global batches keep their rows while global_batch_rows is kept.
ELASTIC_KEYS = {"num_workers"}


def check_resume(recorded: dict, current: dict, where: str) -> None:
    """Raise naming every key (present in both, not elastic) on which the checkpoint and this run disagree."""
    bad = sorted(k for k in (recorded.keys() & current.keys()) - ELASTIC_KEYS if recorded[k] != current[k])
    if not bad:
        return
    lines = [f"{k}: checkpoint {recorded[k]!r}, this run {current[k]!r}" for k in bad]
    hint = ""
    if "global_batch_rows" in bad:
        hint = ("; to resume on another number of workers keep num_workers x micro_batch_size x grad_accum_steps "
                "(e.g. double grad_accum_steps when halving num_workers)")
    raise BigrayError(f"cannot resume from {where}: it was written under other settings ({'; '.join(lines)}){hint}")


def apply_run_hyperparameters(engine, t: TrainConfig) -> None:
    """This run's train.lr and train.weight_decay over those a restored checkpoint brought back.

    The scheduler state carries the peak LR of the run that wrote the checkpoint, the optimizer's param
    groups its weight decay; a PBT trial continues another trial's checkpoint with perturbed values.
    """
    engine.lr_scheduler.base_lrs = [t.lr] * len(engine.lr_scheduler.base_lrs)
    # The decay group is the first, as zero.param_groups builds them.
    engine.optimizer.param_groups[0]["weight_decay"] = t.weight_decay


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
