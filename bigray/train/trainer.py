"""`bigray train`: validate, then hand a TorchTrainer to Ray Train; plot and export when it finishes."""

from __future__ import annotations

import json
import time

from bigray import storage
from bigray.config import Config, require
from bigray.data import load_split, read_manifest
from bigray.errors import BigrayError, ConfigError
from bigray.runtime import init_ray
from bigray.train.export import export
from bigray.train.loop import PROBE_TOKENS, train_func
from bigray.train.metrics import plot
from bigray.train.model import pretrained_vocab


def plan(cfg: Config) -> dict:
    """Everything checked and resolved before any worker starts."""
    t = cfg.train
    manifest_uri = t.data or require(cfg.data.output, "train.data (or data.output)", "train")
    storage_path = require(t.storage_path, "train.storage_path", "train")
    manifest, root = read_manifest(manifest_uri, cfg.storage)
    vocab = manifest["tokenizer"]["vocab_size"]
    if (pre_vocab := pretrained_vocab(cfg.model, cfg.storage)) is not None and pre_vocab < vocab:
        raise ConfigError(f"model.pretrained: vocab_size {pre_vocab} is smaller than the tokenizer's {vocab} ({manifest_uri})")
    rows_per_step = t.num_workers * t.micro_batch_size * t.grad_accum_steps
    train_rows = manifest["splits"]["train"]["rows"]
    if train_rows < rows_per_step:
        raise ConfigError(f"train split of {manifest_uri} has {train_rows} rows, fewer than one global batch "
                          f"(num_workers {t.num_workers} x micro_batch_size {t.micro_batch_size} x grad_accum_steps {t.grad_accum_steps})")
    run_name = t.run_name or f"bigray-{cfg.model.preset if not cfg.model.pretrained else 'finetune'}-{time.strftime('%Y%m%d-%H%M%S')}"
    return {"manifest": manifest, "root": root, "storage_path": storage_path, "run_name": run_name,
            "run_dir": storage.join(storage_path, run_name), "has_val": manifest["splits"]["val"]["rows"] >= t.num_workers * t.micro_batch_size}


def _probe(root: str, manifest: dict, storage_cfg) -> list[int]:
    """A fixed short input whose logits each checkpoint stores, so export can prove it matches the engine."""
    import pyarrow.parquet as pq

    split = "val" if manifest["splits"]["val"]["rows"] else "train"
    fs, path = storage.filesystem(storage.join(root, manifest["splits"][split]["shards"][0]["path"]), storage_cfg)
    with fs.open_input_file(path) as f:
        first = pq.ParquetFile(f).read_row_group(0, columns=["tokens"]).column("tokens")[0].as_py()
    return first[:PROBE_TOKENS]


def trainer(cfg: Config, p: dict, name: str | None = None, resume_from: str | None = None, callbacks: list | None = None,
            checkpoint_config=None):
    """The TorchTrainer for this config (also what `bigray tune` runs in each trial).

    `resume_from`: a checkpoint URI (another run's, e.g. a PBT exploit) to start from when this run has none of its own.
    `checkpoint_config`: a ray.train.CheckpointConfig instead of one keeping train.keep_checkpoints.
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    datasets = {"train": load_split(p["root"], "train", cfg.storage)}
    if p["has_val"]:
        datasets["val"] = load_split(p["root"], "val", cfg.storage)
    fs, path = storage.filesystem(p["storage_path"], cfg.storage)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}), **t.resources_per_worker}
    return TorchTrainer(
        train_func,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"), "manifest": p["manifest"], "run_dir": p["run_dir"], "datasets": sorted(datasets),
            "tokenizer_dir": storage.join(p["root"], p["manifest"]["tokenizer"]["path"]), "probe": _probe(p["root"], p["manifest"], cfg.storage),
            "resume_from": resume_from,
        },
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources,
                                               placement_strategy=t.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name or p["run_name"], storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=checkpoint_config or ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # Not split: every worker streams the whole split in the same preserved order and takes
        # its slice of each global batch (bigray/train/data.py), which makes resume exact.
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )


def train(cfg: Config) -> dict:
    """Run `bigray train`; returns the run dir, final metrics and export facts."""
    import ray.data

    p = plan(cfg)
    init_ray(cfg.ray)
    # Workers each run their own Ray Data stream; their progress bars would interleave into noise.
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    result = trainer(cfg, p).fit()
    if result.error:
        raise BigrayError(f"training failed after {cfg.train.max_failures} restarts: {result.error}") from result.error
    records = [json.loads(line) for line in storage.read_bytes(storage.join(p["run_dir"], "metrics.jsonl"), cfg.storage).decode().splitlines() if line]
    plot(records, storage.join(p["run_dir"], "loss.png"), cfg.storage)
    exported = export(p["run_dir"], storage.join(p["run_dir"], "export"), storage_cfg=cfg.storage) if cfg.train.export else None
    return {"run_dir": p["run_dir"], "metrics": records[-1] if records else {}, "first": records[0] if records else {},
            "export": exported, "wall_s": time.perf_counter() - start}
