"""`bigray train` on real Ray Train + DeepSpeed (CPU, gloo), shards from `prepare`, storage in local S3.

Checked against independent references: HF `from_pretrained` + its logits, boto3 listings, and an
uninterrupted run for the killed-worker resume.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pyarrow.fs as pafs
import pytest

from bigray.config import load_config
from bigray.errors import ConfigError
from bigray.storage import Store, join
from bigray.train.metrics import read_records

TINY = ["train.num_workers=2", "train.micro_batch_size=4", "train.precision=fp32", "train.lr=3e-3", "train.min_lr=3e-4",
        "train.warmup_steps=5", "train.log_every=5", "train.max_failures=0"]
STORE = Store()  # S3 through AWS_ENDPOINT_URL, which the s3 fixture sets


def run_cfg(shards, storage_path, run_name, *extra):
    return load_config(overrides=[f"data.output={shards}", f"train.storage_path={storage_path}",
                                  f"train.run_name={run_name}", *TINY, *extra])


def metrics_of(run_dir):
    return read_records(run_dir, STORE)


def hf_logits_match_probe(export_dir, run_dir, s3=None):
    """Load the export with plain HF (offline) and compare with the engine's logits stored in the last checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigray.train.export import committed_checkpoint

    local = STORE.local_dir(export_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(local))
    model = AutoModelForCausalLM.from_pretrained(local, local_files_only=True, dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(local, local_files_only=True).eos_token_id is not None
    checkpoint = STORE.local_dir(committed_checkpoint(run_dir, STORE))
    probe = torch.load(os.path.join(checkpoint, "probe.pt"), weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-4, rtol=1e-4)  # fp32 engine: only kernel-order noise
    return model


@pytest.fixture(scope="module")
def reference_run(shards, s3):
    """ZeRO-2, 2 workers, everything in S3: the uninterrupted run other tests compare with.

    Its live progress is recorded too: each record with the last step metrics.jsonl held when it arrived.
    """
    from bigray.train.trainer import train

    cfg = run_cfg(shards, s3.uri("runs"), "zero2", "train.zero_stage=2", "train.max_steps=60", "train.eval_every=20",
                  "train.checkpoint_every=20", "train.keep_checkpoints=2", "train.micro_batch_size=8")
    run_dir = join(cfg.train.storage_path, "zero2")
    arrived = []
    out = train(cfg, progress=lambda record: arrived.append((record, metrics_of(run_dir)[-1]["step"])))
    return cfg, out, arrived


def test_zero2_on_s3_writes_metrics_checkpoints_and_export(reference_run, s3):
    cfg, out, _ = reference_run
    records = metrics_of(out.run_dir)
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, "loss must fall visibly"
    logged = {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_worker", "mfu", "step_time_s", "memory_gb"}
    assert logged <= set(records[-1])
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40, 60]
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="runs/zero2/")["Contents"]}
    checkpoints = {k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_") and k.count("/") > 2}
    assert len(checkpoints) == 2, "keep_checkpoints=2 keeps the newest two of three"
    assert any(k.endswith("/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt") for k in keys), \
        "both ranks' ZeRO shards are in the checkpoint"
    assert "runs/zero2/loss.png" in keys and any("tensorboard/events.out.tfevents" in k for k in keys)
    assert out.records == records and out.export.step == 60
    hf_logits_match_probe(out.export.out_dir, out.run_dir)


def test_progress_sees_every_record_while_the_run_goes_on(reference_run):
    """`train(cfg, progress)` gets each metrics record as Ray Train reports it, not after fit() returns."""
    _, out, arrived = reference_run
    assert [record for record, _ in arrived] == [{k: v for k, v in r.items() if v is not None} for r in out.records]
    # When the first record (step 5) reached the driver, the workers had not logged much past it: the run was
    # still going, 55 steps and three checkpoints from its end.
    first_record, logged_then = arrived[0]
    assert first_record["step"] == 5 and logged_then < 60, arrived[:3]


def test_export_ignores_a_newer_partial_checkpoint(reference_run, tmp_path, caplog):
    """A newer checkpoint dir holding rank 0's files only (an upload cut short) is not what `bigray export` picks."""
    from bigray.train.export import committed_checkpoint, export

    _, out, _ = reference_run
    committed = committed_checkpoint(out.run_dir, STORE)
    partial = join(out.run_dir, "checkpoint_2099-01-01_00-00-00.000000")
    for name in ["bigray.json", "probe.pt", "hf/config.json", "ds/mp_rank_00_model_states.pt",
                 "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng/rank_0.pt"]:
        data = STORE.read_bytes(join(committed, name))
        if name == "bigray.json":  # newer than anything committed: a pick by highest step would take it
            data = json.dumps({**json.loads(data), "step": 80}).encode()
        STORE.write_bytes(join(partial, name), data)
    try:
        with caplog.at_level(logging.WARNING, logger="bigray.train.export"):
            result = export(out.run_dir, str(tmp_path / "export"), STORE)
        assert result.checkpoint == committed and result.step == 60
        assert "checkpoint_2099-01-01_00-00-00.000000" in caplog.text and "not committed" in caplog.text
    finally:
        fs, path = STORE.filesystem(partial)
        fs.delete_dir(path)


def test_a_resuming_rank_fetches_its_own_shards_only(reference_run, tmp_path):
    """On the run's real DeepSpeed checkpoint: rank 1 fetches its optimizer shard, RNG state and the shared files."""
    from bigray.train.export import committed_checkpoint
    from bigray.train.loop import fetch_rank_files

    _, out, _ = reference_run
    fs, path = STORE.filesystem(committed_checkpoint(out.run_dir, STORE))
    fetched = dict(fetch_rank_files(fs, path, 1, str(tmp_path)))
    assert set(fetched) == {"bigray.json", "latest", "ds/mp_rank_00_model_states.pt",
                            "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng/rank_1.pt"}
    stored = {i.path: i.size for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
              if i.type == pafs.FileType.File}
    assert path + "/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt" in stored
    assert sum(fetched.values()) < 0.75 * sum(stored.values()), (fetched, stored)


def test_resuming_with_other_settings_fails_before_workers_naming_the_key(reference_run):
    from bigray.errors import BigrayError
    from bigray.train.trainer import train

    ref_cfg, _, _ = reference_run
    window = ref_cfg.train.shuffle_blocks
    cases = [({"num_workers": 1}, r"global_batch_rows: checkpoint 16, this run 8.*double grad_accum_steps"),
             ({"shuffle_blocks": 7}, rf"shuffle_blocks: checkpoint {window}, this run 7")]
    for update, message in cases:
        cfg = ref_cfg.model_copy(update={"train": ref_cfg.train.model_copy(update=update)})
        with pytest.raises(BigrayError, match=message):
            train(cfg)


def test_zero3_local_storage(shards, tmp_path):
    from bigray.train.trainer import train

    out = train(run_cfg(shards, str(tmp_path), "zero3", "train.zero_stage=3", "train.max_steps=20",
                        "train.eval_every=10", "train.checkpoint_every=10"))
    records = metrics_of(out.run_dir)
    assert records[-1]["step"] == 20 and records[-1]["loss"] < records[0]["loss"]
    hf_logits_match_probe(out.export.out_dir, out.run_dir)


def test_finetune_from_non_llama_pretrained_dir(shards, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from bigray.train.trainer import train

    pretrained = tmp_path / "gpt2-tiny"
    gpt2 = GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    GPT2LMHeadModel(gpt2).save_pretrained(pretrained)
    out = train(run_cfg(shards, str(tmp_path / "runs"), "ft", f"model.pretrained={pretrained}", "train.max_steps=10",
                        "train.eval_every=10", "train.checkpoint_every=10"))
    model = hf_logits_match_probe(out.export.out_dir, out.run_dir)
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_killed_worker_resumes_exactly(reference_run, shards, s3, ray_cluster):
    """SIGKILL one training worker after the step-20 checkpoint; Ray Train restarts the group from it."""
    import psutil

    from bigray.train.trainer import train

    ref_cfg, ref, _ = reference_run
    killed_train = ref_cfg.train.model_copy(update={"run_name": "killed", "max_failures": 2})
    cfg = ref_cfg.model_copy(update={"train": killed_train})
    run_dir = join(ref_cfg.train.storage_path, "killed")
    killed = {}

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            try:
                steps = [r["step"] for r in metrics_of(run_dir)]
                if steps and steps[-1] >= 25:
                    # Ray titles actor processes "ray::<Class>..."; kill the first training worker found.
                    workers = [p.pid for p in psutil.process_iter(["cmdline"])
                               if any("ray::RayTrainWorker" in c for c in p.info["cmdline"] or [])]
                    os.kill(workers[0], signal.SIGKILL)
                    killed["at_step"] = steps[-1]
            except OSError:  # metrics.jsonl not written yet
                pass
            except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
                killed["error"] = repr(exc)
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = train(cfg)
    thread.join(timeout=5)
    assert 25 <= killed.get("at_step", 0) < 60, f"the worker must be killed mid-run (killed: {killed})"
    records, reference = metrics_of(out.run_dir), metrics_of(ref.run_dir)
    assert [r["step"] for r in records] == [r["step"] for r in reference] and records[-1]["step"] == 60
    # fp32 on CPU with gloo: same init, same data order (replayed from the checkpoint's step), same
    # reduction order, so the resumed run is the uninterrupted one up to float summation noise.
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in reference], rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in records if "val_loss" in r],
                               [r["val_loss"] for r in reference if "val_loss" in r], rtol=1e-5)


# --- config errors: all raised before any worker starts ----------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=4", r"train\.zero_stage: Input should be 0, 1, 2 or 3"),
    ("train.precision=fp16", r"fp16 needs use_gpu=true"),
    ("train.offload_params=true", r"offload_params needs zero_stage 3"),
    ("train.offload_optimizer=true train.zero_stage=0", r"offload_optimizer needs zero_stage >= 1"),
])
def test_inconsistent_settings_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=override.split())


def test_small_pretrained_vocab_and_too_few_rows_fail_before_workers(shards, tmp_path):
    from transformers import GPT2Config

    from bigray.train.trainer import plan_run

    small = tmp_path / "small-vocab"
    GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2).save_pretrained(small)
    with pytest.raises(ConfigError, match="vocab_size 100 is smaller than the tokenizer's 512"):
        plan_run(run_cfg(shards, str(tmp_path), "x", f"model.pretrained={small}"))
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        plan_run(run_cfg(shards, str(tmp_path), "x", "train.micro_batch_size=100000"))
