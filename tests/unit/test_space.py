"""`bigray tune`'s checks before any trial, and its choice of the best trial: pure functions, no Ray cluster."""

from __future__ import annotations

import math

import pytest

from bigray.config import apply_overrides, load_config
from bigray.errors import BigrayError, ConfigError
from bigray.tune.results import FINISHED, STOPPED, TrialResult, choose_best, rank
from bigray.tune.space import PBT_MUTABLE, check_search_space, param_space
from bigray.tune.sweep import asha_rungs, check_metric, check_rungs, check_storage, concurrency, scheduler
from bigray.tune.trial import HEAD_NODE_RESOURCE, pointers_kept, trial_resources


def check(*overrides):
    cfg = load_config(overrides=["train.min_lr=1e-4", *overrides])
    check_search_space(cfg.tune, lambda params: apply_overrides(cfg, params, "tune.search_space"))
    return cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.search_space={train.lrr: {loguniform: [1e-4, 1e-3]}}", "train.lrr"),
        ("tune.search_space={train.lr: {loguniform: [1e-3, 1e-4]}}", "empty range"),
        ("tune.search_space={train.lr: {uniform: [1e-3, 1e-3]}}", "empty range"),
        ("tune.search_space={train.lr: {loguniform: [0, 1e-3]}}", "low > 0"),
        ("tune.search_space={train.lr: {lognormal: [1e-4, 1e-3]}}", "unknown distribution 'lognormal'"),
        ("tune.search_space={train.lr: {choice: []}}", "non-empty list"),
        ("tune.search_space={train.lr: {uniform: [a, b]}}", r"needs \[low, high\] numbers"),
        ("tune.search_space={train.warmup_steps: {randint: [1.5, 4]}}", "integer bounds"),
        ("tune.search_space={data.seq_len: {choice: [32, 64]}}", r"only train\.\* and model\.\*"),
        ("tune.search_space={train.lr: {uniform: [1e-5, 1e-3]}}", "min_lr"),  # low end below train.min_lr
        ("tune.search_space={}", "tune.search_space is empty"),
    ],
)
def test_bad_search_space_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        check(override)


def test_good_search_space_becomes_tune_distributions():
    from ray import tune

    cfg = check("tune.search_space={train.lr: {loguniform: ['1e-4', 3e-3]}, train.warmup_steps: {grid: [2, 10]}}")
    space = param_space(cfg.tune.search_space)
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert (space["train.lr"].lower, space["train.lr"].upper) == (
        1e-4,
        3e-3,
    )  # YAML 1.1's string '1e-4' read as a number
    assert space["train.warmup_steps"] == {"grid_search": [2, 10]}


@pytest.mark.parametrize("key", ["model.preset", "train.num_workers", "train.micro_batch_size", "train.zero_stage"])
def test_pbt_refuses_to_mutate_anything_but_optimizer_scalars(key):
    with pytest.raises(ConfigError, match=f"pbt cannot mutate {key}"):
        check("tune.scheduler=pbt", f"tune.search_space={{{key}: {{choice: [1, 2]}}}}")


def test_pbt_mutates_optimizer_scalars():
    cfg = check(
        "tune.scheduler=pbt",
        "tune.search_space={train.lr: {loguniform: [1e-4, 1e-3]}, "
        "train.weight_decay: {choice: [0.0, 0.1]}, train.warmup_steps: {randint: [1, 5]}}",
    )
    pbt = scheduler(cfg.tune, cfg.train)
    assert set(cfg.tune.search_space) <= set(PBT_MUTABLE)
    assert type(pbt).__name__ == "PopulationBasedTraining"


def test_metric_never_reported_is_refused():
    with pytest.raises(ConfigError, match="'accuracy' is never reported"):
        check_metric("accuracy", True, "s3://b/data")
    with pytest.raises(ConfigError, match="smaller than one global batch"):
        check_metric("val_loss", False, "s3://b/data")
    check_metric("loss", False, "s3://b/data")


def test_asha_rungs_must_fall_on_checkpoints_and_evals():
    ok = load_config(
        overrides=[
            "train.max_steps=100",
            "train.eval_every=20",
            "train.checkpoint_every=20",
            "tune.grace_period=20",
            "tune.reduction_factor=2",
        ]
    )
    assert asha_rungs(ok.tune, ok.train.max_steps) == [20, 40, 80]
    check_rungs(ok.tune, ok.train)
    # The old configs/tune.yaml: the first rung at 20, checkpoints every 50, so a trial stopped at 20 had none.
    shipped = apply_overrides(ok, {"train.checkpoint_every": 50}, "test")
    with pytest.raises(ConfigError, match="step 20 is not a multiple of train.checkpoint_every"):
        check_rungs(shipped.tune, shipped.train)
    uneven = apply_overrides(ok, {"tune.reduction_factor": 1.5}, "test")  # 20, 30, 45, 67.5
    with pytest.raises(ConfigError, match="steps 20, 30, 45, 67.5 .* but step 30 is not"):
        check_rungs(uneven.tune, uneven.train)
    check_rungs(shipped.tune.model_copy(update={"scheduler": "fifo"}), shipped.train)  # no rungs, nothing to check


def test_shipped_tune_config_passes_its_own_checks():
    cfg = load_config(["bigray/demo.yaml", "configs/tune.yaml"])
    check_search_space(cfg.tune, lambda params: apply_overrides(cfg, params, "tune.search_space"))
    check_rungs(cfg.tune, cfg.train)


def trial(trial_id, curve, checkpoints, status=FINISHED):
    return TrialResult(
        trial_id=trial_id,
        params={},
        status=status,
        step=curve[-1][0],
        metric=curve[-1][1],
        curve=curve,
        checkpoints={s: f"s3://b/{trial_id}/checkpoint_{s}" for s in checkpoints},
    )


def test_best_is_chosen_among_trials_at_the_same_step_with_a_checkpoint_there():
    # `early` has the lowest last value, but at step 20, where ASHA stopped it; at step 30 `late` wins.
    early = trial("early", [(10, 3.0), (20, 2.0)], [20], STOPPED)
    late = trial("late", [(10, 3.1), (20, 2.6), (30, 2.2)], [30])
    later = trial("later", [(10, 3.2), (20, 2.7), (30, 2.4)], [30])
    best, step = choose_best([early, later, late], "min")
    assert (best.trial_id, step) == ("late", 30)
    assert [t.trial_id for t in rank([early, later, late], best, "min")] == ["late", "later", "early"]
    assert choose_best([early, later, late], "max")[0].trial_id == "later"


def test_best_is_not_compared_at_a_step_whose_checkpoint_is_gone():
    # `a` reported step 30 but its checkpoint there is not pointed at: compare at 20, where both have one.
    a = trial("a", [(10, 3.0), (20, 2.5), (30, 1.0)], [20])
    b = trial("b", [(10, 3.0), (20, 2.4)], [20])
    best, step = choose_best([a, b], "min")
    assert (best.trial_id, step, best.metric_at(step)) == ("b", 20, 2.4)
    assert math.isnan(a.metric_at(25))
    with pytest.raises(BigrayError, match="no trial has a checkpoint"):
        choose_best([trial("c", [(10, 3.0)], [5])], "min")


def test_concurrency_is_capped_by_what_the_cluster_fits():
    gpu = load_config(overrides=["train.num_workers=4", "train.use_gpu=true", "train.precision=bf16"]).train
    assert concurrency(8, gpu, {"GPU": 8.0, "CPU": 64.0}) == (
        2,
        "tune.max_concurrent 8 capped to 2: the cluster has 8 GPUs and each trial's 4 workers take 4",
    )
    assert concurrency(2, gpu, {"GPU": 16.0}) == (2, None)
    assert concurrency(2, gpu, {"GPU": 2.0})[0] == 1  # one trial still runs (an autoscaler may add nodes)
    cpu = load_config(overrides=["train.num_workers=2", "train.cpus_per_worker=2"]).train
    assert concurrency(4, cpu, {"CPU": 8.0}) == (
        2,
        "tune.max_concurrent 4 capped to 2: the cluster has 8 CPUs and each trial's 2 workers take 4",
    )


def test_local_storage_is_refused_on_a_multi_node_cluster():
    check_storage("/tmp/sweeps", 1)
    check_storage("s3://bucket/sweeps", 3)
    with pytest.raises(ConfigError, match="local path, but the cluster has 2 nodes"):
        check_storage("/tmp/sweeps", 2)


def test_trial_drivers_ask_for_the_head_node():
    assert trial_resources(pin_to_head=True).bundles == [{"CPU": 0.01, HEAD_NODE_RESOURCE: 0.001}]
    assert trial_resources(pin_to_head=False).bundles == [{"CPU": 0.01}]


def test_pbt_checkpoint_retention_is_bounded():
    cfg = load_config(
        overrides=[
            "train.checkpoint_every=10",
            "train.keep_checkpoints=1",
            "tune.scheduler=pbt",
            "tune.perturbation_interval=30",
        ]
    )
    # The pointer PBT saved at a perturbation outlives the 3 checkpoints and PBT's next save, twice over.
    assert pointers_kept(cfg.tune, cfg.train) == 8
    assert pointers_kept(cfg.tune.model_copy(update={"scheduler": "asha"}), cfg.train) == 1


def test_tune_retries_a_failed_trial_by_default():
    assert load_config().tune.max_failures >= 1
