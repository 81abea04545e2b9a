"""`bigray tune` on real Ray Tune + Ray Train + DeepSpeed (CPU), shards and sweeps in local S3.

Each trial is a real one-worker `bigray train` run of the tiny preset; checked against Tune's own
state, boto3 listings, HF `from_pretrained` and a real `bigray train -c best.yaml`.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from bigray.config import load_config
from bigray.errors import BigrayError, ConfigError
from bigray.storage import Store, join
from bigray.tune.results import FINISHED, STOPPED

STORE = Store()

# One worker per trial and few steps; the learning rates below are far apart, so ASHA's
# decisions do not hang on noise: 3e-6 barely moves from the initial loss in 10 steps.
TRIAL = [
    "train.num_workers=1",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "train.min_lr=1e-6",
    "train.warmup_steps=2",
    "train.max_steps=30",
    "train.eval_every=5",
    "train.eval_batches=4",
    "train.log_every=5",
    "train.checkpoint_every=10",
    "train.keep_checkpoints=1",
    "train.max_failures=0",
]
LRS = "tune.search_space={train.lr: {grid: [3.0e-3, 1.0e-3, 3.0e-6, 1.0e-6]}}"


def sweep_cfg(shards, s3, name, *extra, space=LRS):
    return load_config(
        overrides=[
            f"data.output={shards}",
            f"tune.storage_path={s3.uri('sweeps')}",
            f"tune.name={name}",
            *TRIAL,
            space,
            "tune.num_samples=1",
            "tune.max_concurrent=2",
            *extra,
        ]
    )


def leftovers(ray) -> list:
    """Train workers or placement groups still holding resources once a sweep is over."""
    from ray.util import placement_group_table

    for _ in range(30):
        groups = [pg["bundles"] for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        left = groups + (
            [] if ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"] else ["CPUs in use"]
        )
        if not left:
            break
        time.sleep(1)
    return left


@pytest.fixture(scope="module")
def asha(shards, s3, ray_cluster):
    from bigray.tune import tune

    cfg = sweep_cfg(shards, s3, "asha", "tune.scheduler=asha", "tune.grace_period=10", "tune.reduction_factor=2")
    return cfg, tune(cfg)


def test_asha_sweep_stops_bad_trials_and_exports_best(asha, s3, ray_cluster):
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM

    cfg, out = asha
    trials = {t.params["train.lr"]: t for t in out.trials}
    assert sorted(trials) == [1e-6, 3e-6, 1e-3, 3e-3]
    assert trials[3e-6].status == STOPPED and trials[1e-6].status == STOPPED, "ASHA stops the hopeless rates at step 10"
    assert trials[3e-6].step < 30 and trials[1e-6].step < 30
    assert trials[3e-3].status == FINISHED and trials[3e-3].step == 30
    # Compared at step 30, the last step with checkpoints: only the trials ASHA let finish take part.
    assert out.best_step == 30 and out.best_trial == trials[3e-3].trial_id
    assert out.best_metric == trials[3e-3].metric_at(30) == trials[3e-3].metric

    results = pd.read_csv(io.BytesIO(STORE.read_bytes(out.results_csv)))
    assert len(results) == 4 and results["train.lr"].iloc[0] == 3e-3
    assert dict(zip(results["trial_id"], results["status"])) == {t.trial_id: t.status for t in out.trials}
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="sweeps/asha/")["Contents"]}
    assert {
        "sweeps/asha/results.csv",
        "sweeps/asha/best.yaml",
        "sweeps/asha/val_loss.png",
        "sweeps/asha/best/export/model.safetensors",
    } <= keys

    model = AutoModelForCausalLM.from_pretrained(
        STORE.local_dir(out.best_export), local_files_only=True, dtype=torch.float32
    )
    assert model.config.vocab_size >= 512

    assert not leftovers(ray_cluster), "stopped and finished trials leave no Train workers or placement groups behind"


def test_best_yaml_runs_with_bigray_train(asha, tmp_path, capsys):
    from bigray.cli import main

    cfg, out = asha
    path = tmp_path / "best.yaml"
    path.write_bytes(STORE.read_bytes(out.best_yaml))
    best = load_config([path])
    assert best.train.lr == 3e-3 and best.train.run_name is None and best.train.storage_path
    assert main(["train", "-c", str(path), "train.max_steps=10"]) == 0
    assert "export:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.search_space={train.lrr: {loguniform: [1e-4, 1e-3]}}", "train.lrr"),
        ("tune.metric=accuracy", "'accuracy' is never reported"),
        ("tune.grace_period=5", "step 5 is not a multiple of train.checkpoint_every"),
    ],
)
def test_bad_input_fails_before_any_trial(shards, s3, override, message):
    """The search space's own checks are unit tests (tests/unit/test_space.py); here: they run before any trial."""
    from bigray.tune import tune

    space = override if override.startswith("tune.search_space") else "tune.search_space={train.lr: {grid: [1e-3]}}"
    cfg = sweep_cfg(shards, s3, "bad", override, space=space)
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        tune(cfg)
    assert not STORE.exists(s3.uri("sweeps", "bad"))


def test_trial_restored_at_its_final_checkpoint_reports_without_training(shards, s3, ray_cluster, tmp_path):
    """A sweep stopped after a trial's last checkpoint but before Tune marked it done: no Train run again."""
    import json

    from ray import tune as rtune

    from bigray.tune.trial import POINTER, Trial

    cfg = sweep_cfg(shards, s3, "restored")
    cfg.train.storage_path = s3.uri("sweeps", "restored", "runs")
    checkpoint = s3.uri("sweeps", "restored", "runs", "t0", "checkpoint_x")
    STORE.write_text(join(checkpoint, "bigray.json"), json.dumps({"step": 30}))
    trial = rtune.with_parameters(Trial, base=cfg.model_dump(mode="json"), store=STORE)(config={"train.lr": 1e-3})
    result = {"step": 30, "val_loss": 5.25, "run_dir": s3.uri("sweeps", "restored", "runs", "t0"), "done": True}
    (tmp_path / POINTER).write_text(json.dumps({"checkpoint": checkpoint, "step": 30, "result": result}))
    trial.load_checkpoint(str(tmp_path))
    out = trial.step()
    assert out["val_loss"] == 5.25 and out["done"] and not out["should_checkpoint"]
    assert trial.thread is None, "no Train run started"
    trial.save_checkpoint(str(tmp_path))  # Tune saves it again: the pointer and its result survive
    assert json.loads((tmp_path / POINTER).read_text())["result"]["val_loss"] == 5.25
    trial.stop()


def test_trial_whose_pointer_lost_its_checkpoint_fails_clearly(shards, s3, ray_cluster, tmp_path):
    """A pointer (PBT's exploit, a restore) to a Train checkpoint that rotation deleted: an error naming it."""
    import json

    from ray import tune as rtune

    from bigray.tune.trial import POINTER, Trial

    cfg = sweep_cfg(shards, s3, "vanished")
    gone = s3.uri("sweeps", "vanished", "runs", "t0", "checkpoint_gone")
    (tmp_path / POINTER).write_text(json.dumps({"checkpoint": gone, "step": 10}))
    trial = rtune.with_parameters(Trial, base=cfg.model_dump(mode="json"), store=STORE)(config={"train.lr": 1e-3})
    with pytest.raises(BigrayError, match=f"the Train checkpoint {gone} that Tune's pointer refers to is gone"):
        trial.load_checkpoint(str(tmp_path))
    trial.stop()


def steps_done(runs: str) -> dict[str, int]:
    """Train run name -> the latest step it has a checkpoint of, from the checkpoints in storage."""
    import json

    found = {}
    for uri in STORE.expand(runs) if STORE.exists(runs) else []:
        if uri.endswith("/bigray.json"):
            run = uri.split("/runs/")[1].split("/")[0]
            try:
                step = json.loads(STORE.read_bytes(uri))["step"]
            except FileNotFoundError:  # an older checkpoint, deleted since the listing (keep_checkpoints 1)
                continue
            found[run] = max(found.get(run, 0), step)
    return found


def start_sweep(ray_cluster, shards, s3, tmp_path, name, lrs="[3.0e-3, 1.0e-3, 3.0e-4]"):
    """A real `bigray tune` driver in its own process, logging to a file (a pipe nobody reads would block it)."""
    address = ray_cluster.get_runtime_context().gcs_address
    args = [
        f"data.output={shards}",
        f"tune.name={name}",
        *TRIAL,
        "tune.num_samples=1",
        f"tune.search_space={{train.lr: {{grid: {lrs}}}}}",
        "tune.max_concurrent=2",
        "tune.scheduler=fifo",
        f"ray.address={address}",
        f"tune.storage_path={s3.uri('sweeps')}",
    ]
    log = tmp_path / "tune.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bigray", "tune", *args],
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, args, log


def wait_for(proc, log, runs: str, ready, timeout: float = 900) -> dict[str, int]:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = steps_done(runs)
        if ready(done):
            return done
        time.sleep(1)
    raise AssertionError(f"sweep never got there (exit {proc.poll()}):\n" + log.read_text()[-3000:])


def test_ctrl_c_mid_sweep_then_resume_trains_every_trial_to_its_end(shards, s3, ray_cluster, tmp_path):
    """SIGINT to a `bigray tune` driver while trials are half-trained: it says so, exports nothing; --resume finishes.

    Tune marks the trials it stops on Ctrl-C TERMINATED, like finished ones; bigray's completion record must not
    report them finished (or stopped early), and must not choose or export a best among them.
    """
    from bigray.tune import tune

    # Two trials, both running (max_concurrent 2) when the SIGINT comes; the lost-driver test has a pending third.
    proc, args, log = start_sweep(ray_cluster, shards, s3, tmp_path, "sigint", lrs="[3.0e-3, 1.0e-3]")
    runs = s3.uri("sweeps", "sigint", "runs")
    before = wait_for(proc, log, runs, lambda done: any(10 <= step < 30 for step in done.values()))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 2, log.read_text()[-3000:]
    text = log.read_text()
    assert "interrupted with" in text and "unfinished" in text and "--resume" in text, text[-3000:]
    assert not STORE.exists(s3.uri("sweeps", "sigint", "best.yaml")), "an interrupted sweep exports no best"
    assert not leftovers(ray_cluster), "an interrupted sweep leaves no Train workers or placement groups behind"

    out = tune(load_config(overrides=args), resume=True)
    assert len(out.trials) == 2
    assert [t.status for t in out.trials] == [FINISHED] * 2 and all(t.step == 30 for t in out.trials)
    after = steps_done(runs)
    half_done = {run for run, step in before.items() if step < 30}
    assert all(
        max(step for run, step in after.items() if run.startswith(h.split("-from-")[0])) == 30 for h in half_done
    )
    assert out.best_step == 30 and STORE.exists(out.best_yaml)


@pytest.mark.slow
def test_lost_driver_resumes_unfinished_trials_only(shards, s3, ray_cluster, tmp_path):
    """Kill a `bigray tune` driver once two trials are done and a third has a checkpoint; --resume finishes the rest."""
    from bigray.tune import tune

    proc, args, log = start_sweep(ray_cluster, shards, s3, tmp_path, "resume")
    runs = s3.uri("sweeps", "resume", "runs")
    before = wait_for(proc, log, runs, lambda done: sum(step == 30 for step in done.values()) >= 2 and len(done) >= 3)
    time.sleep(
        5
    )  # the driver's state sync after the checkpoint (forced: tune num_to_keep = train.keep_checkpoints = 1)
    proc.send_signal(signal.SIGKILL)  # a lost driver: its trials die with it
    proc.wait(timeout=60)
    finished_before = {run for run, step in before.items() if step == 30}
    assert not leftovers(ray_cluster), "an interrupted sweep leaves no Train workers or placement groups behind"

    out = tune(load_config(overrides=args), resume=True)
    assert len(out.trials) == 3 and all(t.status == FINISHED and t.step == 30 for t in out.trials)
    after = steps_done(runs)
    assert {run: after[run] for run in finished_before} == {run: 30 for run in finished_before}
    assert not {run.split("-from-")[0] for run in set(after) - set(before)} & finished_before, (
        "finished trials not rerun"
    )
    unfinished = {run.split("-from-")[0] for run in before if run not in finished_before}
    assert unfinished and all(max(step for run, step in after.items() if run.startswith(u)) == 30 for u in unfinished)


@pytest.mark.slow
def test_pbt_exploits_checkpoints(shards, s3, ray_cluster):
    from bigray.tune import tune

    # Perturb every 5 steps: async PBT clones only a top trial that was itself in the top quantile at
    # an earlier perturbation, so with two chances per trial the exploit could miss (seen once in 4 runs).
    cfg = sweep_cfg(
        shards,
        s3,
        "pbt",
        "tune.scheduler=pbt",
        "train.checkpoint_every=5",
        "tune.perturbation_interval=5",
        "tune.seed=0",
        "tune.search_space={train.lr: {choice: [3.0e-3, 1.0e-6]}}",
        "tune.num_samples=4",
        "tune.quantile_fraction=0.5",
    )
    out = tune(cfg)
    runs = steps_done(join(out.sweep_dir, "runs"))
    assert any("-from-" in run for run in runs), "PBT restarted a trial from another trial's checkpoint"
    assert any("-seed-" in run for run in runs), "the exploited checkpoint was copied before its source rotated it out"
    assert all(t.step == 30 and t.status == FINISHED for t in out.trials)


def test_pbt_refuses_a_model_mutation_before_any_trial(shards, s3):
    from bigray.tune import tune

    cfg = sweep_cfg(
        shards, s3, "pbt-model", "tune.scheduler=pbt", space="tune.search_space={model.preset: {choice: [tiny, 125m]}}"
    )
    with pytest.raises(ConfigError, match="pbt cannot mutate model.preset"):
        tune(cfg)
    assert not STORE.exists(s3.uri("sweeps", "pbt-model"))


@pytest.mark.slow
def test_optuna_searcher(shards, s3, ray_cluster):
    pytest.importorskip("optuna")
    from bigray.tune import tune

    cfg = sweep_cfg(
        shards,
        s3,
        "optuna",
        "tune.searcher=optuna",
        "tune.seed=0",
        "tune.scheduler=fifo",
        "tune.num_samples=3",
        "tune.search_space={train.lr: {loguniform: [1e-4, 3e-3]}, train.warmup_steps: {randint: [1, 5]}}",
    )
    out = tune(cfg)
    assert len(out.trials) == 3
    assert all(1e-4 <= t.params["train.lr"] <= 3e-3 and 1 <= t.params["train.warmup_steps"] < 5 for t in out.trials)


@pytest.fixture
def busy_head():
    """Two nodes on loopback; the head's CPU mostly held, so Ray would place elsewhere."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tests.conftest import loopback_cluster

    with loopback_cluster(head_cpus=1, node_cpus=[4]) as cluster:

        @ray.remote(num_cpus=0.9)
        class Hold:
            def ready(self):
                return True

        on_head = NodeAffinitySchedulingStrategy(cluster.head_node.node_id, soft=False)
        hold = Hold.options(scheduling_strategy=on_head).remote()
        ray.get(hold.ready.remote())
        yield cluster


@pytest.mark.slow
def test_trial_drivers_are_pinned_to_the_head_node(busy_head, tmp_path):
    """bigray's trial resources put every trial driver on the head; unpinned, Ray spreads them to the idle node."""
    import ray
    from ray import tune as rtune

    from bigray.tune.trial import HEAD_NODE_RESOURCE, trial_resources

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    assert [n["NodeID"] for n in nodes if HEAD_NODE_RESOURCE in n["Resources"]] == [busy_head.head_node.node_id]

    def where(config):
        import time

        import ray
        from ray import tune

        time.sleep(1)
        tune.report({"node": ray.get_runtime_context().get_node_id()})

    def placed(pin: bool) -> set[str]:
        grid = rtune.Tuner(
            rtune.with_resources(where, trial_resources(pin_to_head=pin)),
            param_space={"i": rtune.grid_search(list(range(6)))},
            tune_config=rtune.TuneConfig(max_concurrent_trials=6),
            run_config=rtune.RunConfig(name=f"pin-{pin}", storage_path=str(tmp_path), verbose=0),
        ).fit()
        return {result.metrics["node"] for result in grid}

    assert placed(pin=True) == {busy_head.head_node.node_id}
    assert placed(pin=False) - {busy_head.head_node.node_id}, "the control: unpinned, Ray places trials elsewhere"
