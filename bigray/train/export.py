"""`bigray export`: a ZeRO checkpoint consolidated into a Hugging Face model dir, checked against the engine."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import tempfile

import pyarrow.fs as pafs

from bigray.data.tokenizer import copy_tokenizer
from bigray.errors import BigrayError, DataError
from bigray.storage import Store, join
from bigray.train import lora

# Max |logit difference| allowed between the exported model (fp32) and the engine that wrote the
# checkpoint: fp32 engines differ only by kernel order; bf16/fp16 engines round activations to
# 8/11 mantissa bits, so their logits carry ~1e-2 relative error per layer.
PROBE_TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "fp16": 0.05}

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `bigray export` wrote and how closely it matches the engine that trained it."""

    out_dir: str
    checkpoint: str
    step: int
    probe_max_abs_diff: float
    dtype: str
    adapter_only: bool = False  # out_dir is a peft adapter dir (LoRA run, --adapter-only), served on its base
    merge_max_abs_diff: float | None = None  # LoRA merged export: max |logit diff| merged vs adapter model (probe)
    reserved_memory_gib: float | None = None  # export_in_task: the memory its Ray task reserved (export_memory)


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
    """Full fp32 weights from the per-rank ZeRO shards (stage 0 checkpoints hold them whole).

    DeepSpeed memory-maps each rank's optimizer file and keeps only its fp32 partition (not Adam's moments),
    so the shards stream through the page cache instead of being read whole into memory.
    """
    import torch

    if meta["zero_stage"] == 0:
        states = torch.load(os.path.join(ckpt_dir, meta["tag"], "mp_rank_00_model_states.pt"), map_location="cpu",
                            mmap=True, weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=meta["tag"])


def export_memory(n_params: int, model_states_bytes: int, export_dtype_bytes: int) -> int:
    """Bytes an export holds at its peak: the fp32 weights, plus the larger of DeepSpeed's model-states file
    (read whole while the shards are parsed) and the export-dtype copy made while saving, plus 1 GiB for the
    interpreter, torch and transformers. The model itself is built on the meta device: no second copy."""
    return 4 * n_params + max(model_states_bytes, export_dtype_bytes * n_params) + 2**30


def export_files(rel_paths: list[str]) -> list[str]:
    """The checkpoint files an export reads: not the RNG states, DeepSpeed's zero_to_*.py scripts nor the universal
    form an elastic resume made."""
    return [p for p in rel_paths if not p.startswith(("rng/", "zero_to_", "universal/")) and "/zero_to_" not in p]


def export(run_dir: str, out_dir: str, store: Store, checkpoint: str | None = None,
           adapter_only: bool = False) -> ExportResult:
    """Write `out_dir` (config.json, model.safetensors, tokenizer, generation config) from the run's latest
    committed checkpoint, or from `checkpoint`; fails if the exported model's logits differ from the engine's.

    A LoRA run's checkpoint holds the adapters only: they are loaded on their base (model.pretrained) and merged
    into it (checked: the merged model's logits equal the adapter model's), or with `adapter_only` written as
    peft's adapter dir (adapter_config.json naming the base, adapter_model.safetensors) plus the tokenizer.

    Runs where it is called and holds the whole model: `export_in_task` runs it on a node that has the memory.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from bigray.train.loop import fetch_files

    ckpt_uri = checkpoint or committed_checkpoint(run_dir, store)
    with tempfile.TemporaryDirectory(prefix="bigray-export-") as work:
        local = os.path.join(work, "checkpoint")
        fs, path = store.filesystem(ckpt_uri)
        fetch_files(fs, path, local, export_files)
        with open(os.path.join(local, "bigray.json")) as f:
            meta = json.load(f)
        hf_cfg = AutoConfig.from_pretrained(os.path.join(local, "hf"), local_files_only=True)
        adapter = lora.checkpoint_adapter(local)  # a LoRA run's peft config, None for full fine-tuning
        if adapter_only and adapter is None:
            raise BigrayError(f"{ckpt_uri}: --adapter-only needs a LoRA run's checkpoint; this run trained every "
                              "weight (train.lora was null)")
        if adapter is not None:
            model = lora.adapter_model(adapter, consolidated_state_dict(local, meta), store, ckpt_uri)
        else:
            # Parameters on the meta device, then the consolidated tensors assigned in place: one copy of the
            # weights. Buffers stay real: non-persistent ones (rotary frequencies) are not in the checkpoint.
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, attn_implementation="sdpa")
            state = consolidated_state_dict(local, meta)
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
            del state
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
        merge_diff = None
        if adapter is not None and not adapter_only:
            model, merge_diff = lora.merge(model, probe["input_ids"])
            if merge_diff > PROBE_TOLERANCE["fp32"]:
                raise BigrayError(f"{ckpt_uri}: the merged model's logits differ from the adapter model's by "
                                  f"{merge_diff:.3g}; merge is wrong")

        dtype = EXPORT_DTYPE[meta["precision"]]
        generation = GenerationConfig(bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id,
                                      pad_token_id=hf_cfg.pad_token_id, do_sample=False, max_new_tokens=256)
        out = os.path.join(work, "export")
        model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)  # peft: the adapter only
        generation.save_pretrained(out)
        # Tokenizer files only: a checkpoint of a run prepared before bigray filtered them may carry the base
        # model's weights and config beside its tokenizer, which would overwrite the fine-tuned ones.
        copy_tokenizer(os.path.join(local, "tokenizer"), out, store)
        store.copy_dir(out, out_dir)
    return ExportResult(out_dir=out_dir, checkpoint=ckpt_uri, step=meta["step"], probe_max_abs_diff=diff, dtype=dtype,
                        adapter_only=adapter_only, merge_max_abs_diff=merge_diff)


# The dtype model.safetensors is written in, by the precision the engine trained in.
EXPORT_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def export_in_task(run_dir: str, out_dir: str, store: Store, checkpoint: str | None = None,
                   num_cpus: float = 1, adapter_only: bool = False) -> ExportResult:
    """`export` as a Ray task reserving the memory it needs (`export_memory`), so it runs on a node that has it,
    not on the driver's (a head node is often the smallest); the driver only waits. Needs Ray initialised."""
    import ray

    ckpt_uri = checkpoint or committed_checkpoint(run_dir, store)
    need, n_params = checkpoint_export_memory(ckpt_uri, store)
    biggest = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]), default=0)
    if need > biggest:  # not an error: an autoscaling cluster adds a node that has it
        log.warning("export of %s needs %.1f GiB of memory on one node; the largest node now has %.1f GiB: the task "
                    "waits until the cluster has a node with enough memory", ckpt_uri, need / 2**30, biggest / 2**30)
    log.info("export: consolidating %s (%.2fB parameters) in a Ray task reserving %.1f GiB memory and %g CPU",
             ckpt_uri, n_params / 1e9, need / 2**30, num_cpus)
    task = ray.remote(export).options(num_cpus=num_cpus, memory=need, max_retries=0)
    result = ray.get(task.remote(run_dir, out_dir, store, checkpoint=ckpt_uri, adapter_only=adapter_only))
    return dataclasses.replace(result, reserved_memory_gib=need / 2**30)


def checkpoint_export_memory(ckpt_uri: str, store: Store) -> tuple[int, int]:
    """(`export_memory` bytes, parameter count) of a checkpoint, from its small files only: the parameter count
    comes from its HF config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = json.loads(store.read_bytes(join(ckpt_uri, "bigray.json")))
    hf = json.loads(store.read_bytes(join(ckpt_uri, "hf", "config.json")))
    hf_cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf_cfg).parameters())
    fs, path = store.filesystem(join(ckpt_uri, meta["tag"]))
    states = sum(i.size or 0 for i in fs.get_file_info(pafs.FileSelector(path))
                 if i.type == pafs.FileType.File and i.base_name.endswith("model_states.pt"))
    dtype_bytes = getattr(torch, EXPORT_DTYPE[meta["precision"]]).itemsize
    return export_memory(n_params, states, dtype_bytes), n_params
