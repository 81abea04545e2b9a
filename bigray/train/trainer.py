"""`bigray train`: validate, then hand a TorchTrainer to Ray Train; plot and export when it finishes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ray.train import UserCallback

from bigray.config import Config, ModelConfig, TrainConfig, require
from bigray.data import read_manifest
from bigray.errors import BigrayError, ConfigError, DataError
from bigray.plan import check_fits
from bigray.runtime import init_ray, resolve_log_level
from bigray.storage import Store, join
from bigray.train.batches import check_data_order, val_order
from bigray.train.export import ExportResult, checkpoint_uri, committed_checkpoint, export_in_task
from bigray.train.loop import PROBE_TOKENS, check_resume, resume_keys, train_func
from bigray.train.lora import check_lora
from bigray.train.metrics import plot, read_records
from bigray.train.model import pretrained_vocab
from bigray.train.zero import worker_env_vars


@dataclass(frozen=True)
class RunPlan:
    """A training run resolved and checked before any worker starts: what `trainer` builds from."""

    train: TrainConfig
    model: ModelConfig
    store: Store
    manifest: dict
    root: str  # the prepared data's directory (holds manifest.json)
    storage_path: str
    run_name: str
    run_dir: str
    has_val: bool  # the val split fills at least one global batch
    log_level: str  # console level of Ray Train's and Ray Data's loggers (ray.log_level, resolved)


@dataclass(frozen=True)
class TrainResult:
    """What `bigray train` produced: the run dir, every logged metrics record, the export if any."""

    run_dir: str
    records: list[dict] = field(repr=False)
    export: ExportResult | None
    wall_s: float

    @property
    def first(self) -> dict:
        return self.records[0] if self.records else {}

    @property
    def last(self) -> dict:
        return self.records[-1] if self.records else {}


def plan_run(cfg: Config) -> RunPlan:
    """Everything checked and resolved before any worker starts."""
    t, store = cfg.train, Store(cfg.storage)
    manifest_uri = t.data or require(cfg.data.output, "train.data (or data.output)", "train")
    storage_path = require(t.storage_path, "train.storage_path", "train")
    manifest, root = read_manifest(manifest_uri, store)
    vocab = manifest["tokenizer"]["vocab_size"]
    if (pre_vocab := pretrained_vocab(cfg.model, store)) is not None and pre_vocab < vocab:
        raise ConfigError(f"model.pretrained: vocab_size {pre_vocab} is smaller than the tokenizer's {vocab} "
                          f"({manifest_uri})")
    check_data_order(t, manifest, manifest_uri)
    # A GPU config that cannot fit fails here, not as an OOM an hour into the run (no-op on CPU). The planner counts
    # gradients and optimizer state for every weight: under LoRA it would refuse configs that fit, so it is skipped.
    if t.lora is None:
        check_fits(t, cfg.model, vocab, manifest["seq_len"], store)
    check_lora(t.lora, cfg.model, store)
    kind = cfg.model.preset if not cfg.model.pretrained else "finetune"
    run_name = t.run_name or f"bigray-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    return RunPlan(train=t, model=cfg.model, store=store, manifest=manifest, root=root, storage_path=storage_path,
                   run_name=run_name, run_dir=join(storage_path, run_name),
                   has_val=val_order(t, manifest).epoch(0).steps > 0,
                   log_level=resolve_log_level(cfg.ray))


def check_resume_agrees(run: RunPlan) -> None:
    """Before any worker starts: when the run dir holds a committed checkpoint (Ray Train resumes from it),
    refuse settings it cannot be resumed under, naming the key (the workers check the model shape too)."""
    try:
        checkpoint = committed_checkpoint(run.run_dir, run.store)
    except DataError:  # a new run, or one that never committed a checkpoint: nothing to resume
        return
    meta = json.loads(run.store.read_bytes(join(checkpoint, "bigray.json")))
    check_resume(meta.get("resume", {}), resume_keys(run.train, run.train.num_workers, run.manifest), checkpoint)


def probe_tokens(run: RunPlan) -> list[int]:
    """A fixed short input whose logits each checkpoint stores, so export can prove it matches the engine."""
    import pyarrow.parquet as pq

    split = "val" if run.manifest["splits"]["val"]["rows"] else "train"
    fs, path = run.store.filesystem(join(run.root, run.manifest["splits"][split]["shards"][0]["path"]))
    with fs.open_input_file(path) as f:
        first = pq.ParquetFile(f).read_row_group(0, columns=["tokens"]).column("tokens")[0].as_py()
    return first[:PROBE_TOKENS]


def trainer(run: RunPlan, name: str | None = None, resume_from: str | None = None, callbacks: list | None = None,
            checkpoint_config=None):
    """The TorchTrainer for this run (also what `bigray tune` runs in each trial).

    `resume_from`: a checkpoint URI (another run's, e.g. a PBT exploit) to start from when this run has none of
    its own. `checkpoint_config`: a ray.train.CheckpointConfig instead of one keeping train.keep_checkpoints.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t, store = run.train, run.store
    fs, path = store.filesystem(run.storage_path)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}), **t.resources_per_worker}
    return TorchTrainer(
        train_func,
        # Sections as JSON plus the Store: the worker gets what it needs, not the whole config tree.
        train_loop_config={
            "train": t.model_dump(mode="json"), "model": run.model.model_dump(mode="json"), "store": store,
            "manifest": run.manifest, "run_dir": run.run_dir, "data_root": run.root, "has_val": run.has_val,
            "tokenizer_dir": join(run.root, run.manifest["tokenizer"]["path"]), "probe": probe_tokens(run),
            "resume_from": resume_from, "log_level": run.log_level,
        },
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources, placement_strategy=t.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name or run.run_name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=checkpoint_config or ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks, logging_config=ray.LoggingConfig(log_level=run.log_level),
            # Ray starts workers with OMP_NUM_THREADS=1; CPU-side work (offloaded Adam) gets the CPUs reserved.
            worker_runtime_env=worker_runtime_env(t),
        ),
        # No `datasets=`: each worker reads its own partitions' blocks with ranged reads (bigray/train/batches.py).
    )


def worker_runtime_env(t: TrainConfig) -> dict | None:
    """The Train workers' runtime env: OMP_NUM_THREADS for their CPUs (zero.worker_env_vars), or none where that is 1,
    the value Ray itself sets in a worker of fewer than 2 CPUs (a node that has one set keeps it, as Ray does).

    Any runtime env makes Ray start each worker through its setup_worker process (a second Python start, 0.5 CPU-s
    on the CI box) and never on a worker process it already has running: a start-up cost of every Train run, and of
    every trial of a sweep, for a variable that changes nothing.
    """
    env = worker_env_vars(t)
    return None if env == {"OMP_NUM_THREADS": "1"} else {"env_vars": env}


class ForwardReports(UserCallback):
    """Runs in the Ray Train controller: puts rank 0's metrics of every report on a queue the driver reads."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(metrics[0])


@contextmanager
def live_reports(progress: Callable[[dict], None] | None) -> Iterator[list | None]:
    """Train callbacks that feed `progress` each report while fit() runs; all are delivered when this exits.

    `progress` runs on a driver thread of its own, one record at a time in report order.
    """
    if progress is None:
        yield None
        return
    from ray.util.queue import Empty, Queue

    # Unbounded: the callback runs on the controller's event loop, which a put waiting for room would stall.
    queue = Queue(actor_options={"num_cpus": 0})
    done, failed = threading.Event(), []

    def pump():
        while True:
            try:
                record = queue.get(timeout=0.2)
            except Empty:
                if done.is_set():  # fit() returned: every report is already in the queue
                    return
                continue
            try:
                progress(record)
            except Exception as exc:  # noqa: BLE001 - raised on the driver once training is over
                failed.append(exc)
                return

    thread = threading.Thread(target=pump, name="bigray-progress", daemon=True)
    thread.start()
    try:
        yield [ForwardReports(queue)]
    finally:
        done.set()
        thread.join()
        queue.shutdown()
    if failed:
        raise failed[0]


def train(cfg: Config, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Run `bigray train`. `progress`, if given, is called with each metrics record (as reported to Ray Train:
    metrics.jsonl's record without its None fields) while the run goes on; after a worker restart it sees the
    replayed steps again."""
    import ray.data
    import ray.train

    run = plan_run(cfg)
    check_resume_agrees(run)
    init_ray(cfg.ray)
    # Workers each run their own Ray Data stream; their progress bars would interleave into noise.
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    with live_reports(progress) as callbacks:
        try:
            result = trainer(run, callbacks=callbacks).fit()
        except ray.train.TrainingFailedError as exc:  # Ray Train v2 raises the error it also puts in result.error
            raise BigrayError(f"training failed after {run.train.max_failures} restarts: {exc}; its committed "
                              f"checkpoints stay: run again with train.run_name={run.run_name} to resume from the "
                              "latest") from exc
    records = read_records(run.run_dir, run.store)
    plot(records, join(run.run_dir, "loss.png"), run.store)
    # The checkpoint fit() reports is the latest Ray committed, never a newer dir still (or half) uploaded.
    exported = None
    if run.train.export and result.checkpoint is not None:
        exported = export_in_task(run.run_dir, join(run.run_dir, "export"), run.store,
                                  checkpoint=checkpoint_uri(run.run_dir, result.checkpoint),
                                  adapter_only=run.train.lora is not None and run.train.lora.export == "adapter")
    return TrainResult(run_dir=run.run_dir, records=records, export=exported, wall_s=time.perf_counter() - start)
