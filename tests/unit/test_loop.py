"""When the worker loop logs, evaluates and checkpoints (the due-ness rules `maybe_*` decide by); which files a
resuming rank fetches; what a resume must agree with."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from bigray.config import load_config
from bigray.errors import BigrayError
from bigray.train.loop import (
    check_resume,
    checkpoint_due,
    eval_due,
    fetch_rank_files,
    rank_files,
    rank_of,
    report_due,
    resume_keys,
)


def test_eval_and_checkpoint_are_due_on_their_period_and_on_the_last_step():
    t = load_config(overrides=["train.max_steps=33", "train.log_every=7", "train.eval_every=10",
                               "train.checkpoint_every=25"]).train
    steps = range(1, t.max_steps + 1)
    assert [s for s in steps if eval_due(s, t)] == [10, 20, 30, 33]
    assert [s for s in steps if checkpoint_due(s, t)] == [25, 33]
    # Every eval or checkpoint step is also logged and reported, so Tune and the printer see its metrics.
    assert [s for s in steps if report_due(s, t, has_val=True)] == [7, 10, 14, 20, 21, 25, 28, 30, 33]
    assert [s for s in steps if report_due(s, t, has_val=False)] == [7, 14, 21, 25, 28, 33]


# --- restore: which files a rank fetches, and what a resume must agree with -----------------------

# A ZeRO-2 checkpoint of 2 ranks as DeepSpeed and save_checkpoint write it (file name: size in bytes).
ZERO2 = {"bigray.json": 300, "latest": 2, "probe.pt": 2_000, "hf/config.json": 700, "tokenizer/tokenizer.json": 50_000,
         "zero_to_fp32.py": 30_000, "zero_to_torch.py": 3_000,
         "ds/mp_rank_00_model_states.pt": 400_000, "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt": 1_600_000,
         "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": 1_600_000, "rng/rank_0.pt": 9_000, "rng/rank_1.pt": 9_000}
# ZeRO-3 bf16 of 3 ranks: every rank has its own model states too.
ZERO3 = ["bigray.json", *(f"ds/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(3)),
         *(f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(3)),
         *(f"rng/rank_{r}.pt" for r in range(3))]


def test_a_rank_needs_its_own_shards_and_the_shared_files_only():
    assert rank_files(sorted(ZERO2), 1) == ["bigray.json", "ds/mp_rank_00_model_states.pt",
                                           "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "latest", "rng/rank_1.pt"]
    # The universal form an elastic resume left in the checkpoint is for the next elastic resume only.
    universal = ["universal/ds/mp_rank_00_model_states.pt", "universal/ds/zero/lm_head.weight/exp_avg.pt",
                 "universal/latest_universal", "universal/complete"]
    assert rank_files(sorted([*ZERO2, *universal]), 1) == rank_files(sorted(ZERO2), 1)
    assert rank_files(ZERO3, 2) == ["bigray.json", "ds/bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
                                    "ds/zero_pp_rank_2_mp_rank_00_model_states.pt", "rng/rank_2.pt"]
    assert rank_of("ds/mp_rank_00_model_states.pt") is None  # the model-parallel rank is not a data-parallel one


def test_fetch_copies_this_ranks_files_only(tmp_path):
    src = tmp_path / "checkpoint_2026-01-01_10-00-00.000000"
    for name, size in ZERO2.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(os.urandom(size))
    dest = tmp_path / "rank1"
    fetched = fetch_rank_files(pafs.LocalFileSystem(), str(src), 1, str(dest))
    assert [name for name, _ in fetched] == rank_files(sorted(ZERO2), 1)
    on_disk = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert on_disk == [name for name, _ in fetched]
    assert all((dest / n).read_bytes() == (src / n).read_bytes() for n in on_disk)
    # 2.0 of 3.7 MB: the other rank's optimizer shard and export's files stay in storage.
    assert sum(size for _, size in fetched) == 2_009_302 < sum(ZERO2.values()) == 3_704_002


def test_resume_keys_name_what_disagrees():
    manifest = {"seq_len": 64, "splits": {"train": {"rows": 100}}}
    t = load_config(overrides=["train.num_workers=2", "train.micro_batch_size=4", "train.grad_accum_steps=2"]).train
    recorded = resume_keys(t, 2, manifest, "bf16")
    assert recorded["global_batch_rows"] == 16 and len(recorded["manifest_sha"]) == 64
    check_resume(recorded, resume_keys(t, 2, manifest, "bf16"), "ckpt")  # same settings: no error
    check_resume(recorded, resume_keys(t, 2, manifest), "ckpt")  # the driver knows no precision yet: not compared
    with pytest.raises(BigrayError, match=r"precision: checkpoint 'bf16', this run 'fp32'"):
        check_resume(recorded, resume_keys(t, 2, manifest, "fp32"), "ckpt")
    with pytest.raises(BigrayError, match=r"manifest_sha: .*seed: checkpoint 0, this run 1"):
        check_resume(recorded, resume_keys(t.model_copy(update={"seed": 1}), 2, {**manifest, "seq_len": 128}), "c")
    # Another number of workers resumes (elastic) as long as a global batch keeps its rows.
    check_resume(recorded, resume_keys(t.model_copy(update={"grad_accum_steps": 4}), 1, manifest, "bf16"), "ckpt")
    with pytest.raises(BigrayError, match=r"global_batch_rows: checkpoint 16, this run 8.*double grad_accum_steps"):
        check_resume(recorded, resume_keys(t, 1, manifest, "bf16"), "ckpt")


def test_resume_keys_record_the_model_shape():
    from transformers import LlamaConfig

    t = load_config().train
    small, wide = LlamaConfig(hidden_size=64, num_hidden_layers=2), LlamaConfig(hidden_size=128, num_hidden_layers=2)
    recorded = resume_keys(t, 2, {}, "fp32", small)
    assert recorded["model.hidden_size"] == 64 and recorded["model.num_hidden_layers"] == 2
    with pytest.raises(BigrayError, match=r"model.hidden_size: checkpoint 64, this run 128"):
        check_resume(recorded, resume_keys(t, 2, {}, "fp32", wide), "ckpt")


def test_stale_local_dirs_of_exited_workers_are_removed(tmp_path):
    import subprocess
    import sys

    from bigray.train.loop import remove_stale_dirs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    names = [f"bigray-ckpt-{dead}-ab_c1", f"bigray-restore-{dead}-x9", f"bigray-ckpt-{os.getpid()}-live",
             "bigray-ckpt-nopid", f"other-{dead}-x"]
    for name in names:
        (tmp_path / name / "ds").mkdir(parents=True)
    assert sorted(remove_stale_dirs(str(tmp_path))) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])
