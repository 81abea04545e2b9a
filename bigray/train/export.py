"""`bigray export`: a ZeRO checkpoint consolidated into a Hugging Face model dir, checked against the engine."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass

import pyarrow.fs as pafs

from bigray.errors import BigrayError, DataError
from bigray.storage import Store, join

# Max |logit difference| allowed between the exported model (fp32) and the engine that wrote the
# checkpoint: fp32 engines differ only by kernel order; bf16/fp16 engines round activations to
# 8/11 mantissa bits, so their logits carry ~1e-2 relative error per layer.
PROBE_TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "fp16": 0.05}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """What `bigray export` wrote and how closely it matches the engine that trained it."""

    out_dir: str
    checkpoint: str
    step: int
    probe_max_abs_diff: float
    dtype: str


def checkpoint_uri(run_dir: str, checkpoint) -> str:
    """The URI of a ray.train.Checkpoint of the run in `run_dir` (Ray names it by filesystem path, without scheme)."""
    return join(run_dir, posixpath.basename(checkpoint.path.rstrip("/")))


def committed_checkpoint(run_dir: str, store: Store) -> str:
    """The run's latest checkpoint that Ray Train committed (every rank's upload done), from Ray's own record.

    Ray Train writes a checkpoint into the run's record (checkpoint_manager_snapshot.json, read through the
    public `ray.train.Result.from_path`) only once all ranks uploaded it; a `checkpoint_*` dir missing from
    that record is a partial upload (or one Ray was deleting): it is ignored, with a warning.
    """
    import ray.train

    fs, path = store.filesystem(run_dir)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DataError(f"{run_dir}: no such run directory")
    train_log = logging.getLogger("ray.train")
    level = train_log.level
    train_log.setLevel(logging.WARNING)  # Ray logs reading its record as if a run were resuming
    try:
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    except RuntimeError as exc:
        raise DataError(f"{run_dir}: not a Ray Train run dir with checkpoints ({exc})") from None
    finally:
        train_log.setLevel(level)
    if result.checkpoint is None:
        raise DataError(f"{run_dir}: Ray Train committed no checkpoint in this run")
    committed = {posixpath.basename(c.path.rstrip("/")) for c, _ in result.best_checkpoints or []}
    committed.add(posixpath.basename(result.checkpoint.path.rstrip("/")))
    stray = sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path))
                   if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
                   and info.base_name not in committed)
    if stray:
        log.warning("%s: ignoring %s: not committed by Ray Train (partial upload or being deleted)", run_dir,
                    ", ".join(stray))
    return checkpoint_uri(run_dir, result.checkpoint)


def consolidated_state_dict(ckpt_dir: str, meta: dict) -> dict:
    """Full fp32 weights from the per-rank ZeRO shards (stage 0 checkpoints hold them whole)."""
    import torch

    if meta["zero_stage"] == 0:
        states = torch.load(os.path.join(ckpt_dir, meta["tag"], "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=meta["tag"])


def export(run_dir: str, out_dir: str, store: Store, checkpoint: str | None = None) -> ExportResult:
    """Write `out_dir` (config.json, model.safetensors, tokenizer, generation config) from the run's latest
    committed checkpoint, or from `checkpoint`; fails if the exported model's logits differ from the engine's."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    ckpt_uri = checkpoint or committed_checkpoint(run_dir, store)
    local = store.local_dir(ckpt_uri)
    with open(os.path.join(local, "bigray.json")) as f:
        meta = json.load(f)
    hf_cfg = AutoConfig.from_pretrained(os.path.join(local, "hf"), local_files_only=True)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(consolidated_state_dict(local, meta), strict=False)
    tied = {"lm_head.weight"} if getattr(hf_cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise BigrayError(f"{ckpt_uri}: checkpoint does not fit the model config "
                          f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    model.eval()

    probe = torch.load(os.path.join(local, "probe.pt"), weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    diff = (logits - probe["logits"]).abs().max().item()
    tolerance = PROBE_TOLERANCE[meta["precision"]]
    if diff > tolerance:
        raise BigrayError(f"{ckpt_uri}: exported logits differ from the engine's by {diff:.3g} > {tolerance} "
                          f"({meta['precision']}); export is wrong")

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(meta["precision"], torch.float32)
    generation = GenerationConfig(bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id,
                                  pad_token_id=hf_cfg.pad_token_id, do_sample=False, max_new_tokens=256)
    with tempfile.TemporaryDirectory(prefix="bigray-export-") as tmp:
        model.to(dtype).save_pretrained(tmp, safe_serialization=True)
        generation.save_pretrained(tmp)
        store.copy_dir(os.path.join(local, "tokenizer"), tmp)
        store.copy_dir(tmp, out_dir)
    return ExportResult(out_dir=out_dir, checkpoint=ckpt_uri, step=meta["step"], probe_max_abs_diff=diff,
                        dtype=str(dtype).replace("torch.", ""))
