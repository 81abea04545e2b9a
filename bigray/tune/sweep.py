"""`bigray tune`: the sweep driver. Checks everything it can, runs Ray Tune over `bigray train` trials, then
picks the best trial at a common step and exports it."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

from ray.tune import Callback

from bigray.config import Config, TrainConfig, TuneConfig, apply_overrides, require, to_yaml
from bigray.errors import BigrayError, ConfigError
from bigray.storage import Store, is_remote, join
from bigray.tune.results import UNFINISHED, TrialResult, TuneResult, choose_best, collect, plot_trials, rank, write_csv
from bigray.tune.space import check_search_space, param_space, pbt_mutations
from bigray.tune.trial import Trial, pointers_kept, trial_resources

# What train_func (bigray/train/loop.py) reports; val_loss only when the val split fills a global batch,
# mfu only where the device's peak is known. training_iteration and time_total_s are Tune's own.
TRAIN_METRICS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens_per_s_per_worker",
    "mfu",
    "step_time_s",
    "memory_gb",
)
TUNE_METRICS = ("training_iteration", "time_total_s")
# Trials run elsewhere (Tune changes their working directory): these local paths are made absolute.
PATHS = (
    ("data", "output"),
    ("data", "tokenizer"),
    ("train", "data"),
    ("train", "storage_path"),
    ("tune", "storage_path"),
    ("model", "pretrained"),
)
COMPLETION = "bigray-completed.json"


def tune(cfg: Config, resume: bool = False, log: Callable[[str], None] | None = None) -> TuneResult:
    """Run (or with `resume`, finish) the sweep; `log` gets a line per finished trial and per adjustment."""
    import ray
    from ray import tune as rtune

    from bigray.runtime import init_ray
    from bigray.train.trainer import plan_run

    log = log or (lambda line: None)
    require(cfg.tune.storage_path, "tune.storage_path", "tune")
    raw = cfg.model_dump(mode="json")
    cfg = apply_overrides(
        cfg,
        {f"{s}.{k}": _absolute(raw[s][k]) for s, k in PATHS if raw[s][k] and not is_remote(raw[s][k])},
        "bigray tune (local paths made absolute)",
    )
    tc, store = cfg.tune, Store(cfg.storage)
    if resume and not tc.name:
        raise ConfigError("--resume needs tune.name: the name of the sweep to finish (a dir under tune.storage_path)")
    name = tc.name or f"bigray-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = join(tc.storage_path, name)
    check_search_space(tc, lambda params: apply_overrides(cfg, params, "tune.search_space"))
    # Only the best trial is exported, once the sweep is done.
    base = apply_overrides(cfg, {"train.storage_path": join(sweep_dir, "runs"), "train.export": False}, "bigray tune")
    run = plan_run(base)  # reads the manifest and checks the data once, before any trial
    check_metric(tc.metric, run.has_val, cfg.train.data or cfg.data.output)
    check_rungs(tc, base.train)
    search_alg, sched = searcher(tc), scheduler(tc, base.train)

    init_ray(cfg.ray)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    check_storage(tc.storage_path, len(nodes))
    max_concurrent, note = concurrency(tc.max_concurrent, base.train, ray.cluster_resources())
    if note:
        log(note)
    pin = any("node:__internal_head__" in node["Resources"] for node in nodes)
    trainable = rtune.with_resources(
        rtune.with_parameters(Trial, base=base.model_dump(mode="json"), store=store), trial_resources(pin_to_head=pin)
    )
    fs, path = store.filesystem(tc.storage_path)
    start = time.perf_counter()
    if resume:
        if not rtune.Tuner.can_restore(f"{path}/{name}", storage_filesystem=fs):
            raise ConfigError(f"--resume: no sweep to resume at {sweep_dir}; check tune.storage_path and tune.name")
        # The Completion callback comes back with the Tuner's own pickled state; it keeps its record in storage.
        tuner = rtune.Tuner.restore(
            f"{path}/{name}", trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        from ray.tune.utils.log import Verbosity

        tuner = rtune.Tuner(
            trainable,
            param_space=param_space(tc.search_space),
            tune_config=rtune.TuneConfig(
                metric=tc.metric,
                mode=tc.mode,
                num_samples=tc.num_samples,
                max_concurrent_trials=max_concurrent,
                scheduler=sched,
                search_alg=search_alg,
                trial_dirname_creator=_trial_dirname,
                # A trial's actor is kept for the next trial (Trial.reset_config): one actor start per slot.
                reuse_actors=True,
            ),
            run_config=rtune.RunConfig(
                name=name,
                storage_path=path,
                storage_filesystem=fs,
                # Tune's own status tables stay quiet: bigray prints a line per finished trial and its own table.
                verbose=Verbosity.V0_MINIMAL,
                callbacks=[Completion(store, join(sweep_dir, COMPLETION), log)],
                failure_config=rtune.FailureConfig(max_failures=tc.max_failures),
                checkpoint_config=rtune.CheckpointConfig(num_to_keep=pointers_kept(tc, base.train)),
                # The sweep's state reaches storage within 30 s, so a lost driver loses little.
                sync_config=rtune.SyncConfig(sync_period=30),
            ),
        )
    grid = tuner.fit()
    wall = time.perf_counter() - start
    trials = collect(
        grid,
        Completion.read(store, join(sweep_dir, COMPLETION)),
        tc.metric,
        lambda params: apply_overrides(base, params, "tune.search_space").train.max_steps,
    )
    if unfinished := [t for t in trials if t.status == UNFINISHED]:
        # Ctrl-C makes Tune mark running trials TERMINATED; only the completion record tells them apart.
        raise BigrayError(
            f"sweep {sweep_dir} interrupted with {len(unfinished)} of {len(trials)} trials unfinished "
            f"({', '.join(t.trial_id for t in unfinished)}); finish it with: "
            f"bigray tune ... tune.name={name} --resume"
        )
    if all(math.isnan(t.metric) for t in trials):
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error)
        raise BigrayError(f"no trial of {sweep_dir} reported {tc.metric}" + (f" ({errors})" if errors else ""))
    best, step = choose_best(trials, tc.mode)
    trials = rank(trials, best, tc.mode)
    results_csv, plot = join(sweep_dir, "results.csv"), join(sweep_dir, f"{tc.metric}.png")
    write_csv(store, results_csv, trials, tc.metric)
    plot_trials(store, plot, trials, tc.metric)
    best_export = export_best(store, best, step, join(sweep_dir, "best", "export"))
    # A config `bigray train -c best.yaml` runs as is: its own run name and storage, not the sweep's.
    best_cfg = apply_overrides(
        cfg,
        {
            **best.params,
            "train.storage_path": cfg.train.storage_path or join(sweep_dir, "train"),
            "train.run_name": None,
        },
        "best.yaml",
    )
    best_yaml = join(sweep_dir, "best.yaml")
    metric = best.metric_at(step)
    store.write_text(
        best_yaml,
        f"# best trial {best.trial_id} of {sweep_dir}: {tc.metric} {metric:.6g} at step {step} "
        f"({best.params})\n" + to_yaml(best_cfg),
    )
    return TuneResult(
        sweep_dir=sweep_dir,
        metric=tc.metric,
        mode=tc.mode,
        scheduler=tc.scheduler,
        trials=trials,
        best=best,
        best_step=step,
        best_metric=metric,
        best_config=best_cfg,
        best_yaml=best_yaml,
        best_export=best_export,
        results_csv=results_csv,
        plot=plot,
        wall_s=wall,
    )


def export_best(store: Store, best: TrialResult, step: int, export_dir: str) -> str:
    """The best trial's checkpoint at `step` as an HF model dir, consolidated in a Ray task that reserves the
    memory it needs (bigray.train.export.export_in_task), not on this driver."""
    from bigray.train.export import export_in_task

    export_in_task(best.run_dir, export_dir, store, checkpoint=best.checkpoints[step])
    return export_dir


class Completion(Callback):
    """Records, in the sweep's storage, which trials Tune saw complete or fail.

    On Ctrl-C Tune marks running trials TERMINATED, like finished ones, and ResultGrid keeps no status;
    `on_trial_complete` (a trial done or stopped by its scheduler) and `on_trial_error` (retries spent)
    fire only for real outcomes. Kept in storage because a resumed sweep's callback is the one Tune
    unpickles, and because the trials an earlier run finished never complete again.
    """

    def __init__(self, store: Store, uri: str, log: Callable[[str], None] | None = None):
        self.store, self.uri, self.log = store, uri, log

    def __getstate__(self):  # `log` may be a closure; a restored sweep does without its lines
        return {"store": self.store, "uri": self.uri, "log": None}

    @staticmethod
    def read(store: Store, uri: str) -> dict[str, str]:
        return json.loads(store.read_text(uri)) if store.exists(uri) else {}

    def _record(self, trial, event: str) -> None:
        record = self.read(self.store, self.uri) | {trial.trial_id: event}
        self.store.write_text(self.uri, json.dumps(record))
        if self.log:
            result = trial.last_result or {}
            metric = next((f"{k} {result[k]:.4f}" for k in ("val_loss", "loss") if k in result), "")
            self.log(
                f"trial {trial.trial_id} {'done' if event == 'complete' else 'failed'} at step "
                f"{result.get('step', 0)}{', ' + metric if metric else ''} ({len(record)} finished)"
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, "complete")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "error")


def check_metric(metric: str, has_val: bool, data: str | None) -> None:
    reported = list(TRAIN_METRICS) + (["val_loss"] if has_val else []) + list(TUNE_METRICS)
    if metric == "val_loss" and not has_val:
        raise ConfigError(
            f"tune.metric val_loss: the val split of {data} is smaller than one global batch, so "
            "training never evaluates; prepare with a larger data.val_fraction or tune on loss"
        )
    if metric not in reported:
        raise ConfigError(
            f"tune.metric {metric!r} is never reported by the training; choose one of {', '.join(reported)}"
        )


def asha_rungs(tc: TuneConfig, max_steps: int) -> list[float]:
    """The steps at which ASHA compares trials, as Ray's ASHAScheduler (one bracket) computes them."""
    grace = min(tc.grace_period, max_steps)
    count = int(math.log(max_steps / grace) / math.log(tc.reduction_factor) + 1)
    return [grace * tc.reduction_factor**k for k in range(count) if grace * tc.reduction_factor**k < max_steps]


def check_rungs(tc: TuneConfig, t: TrainConfig) -> None:
    """A trial ASHA stops at a rung must have its metric and a checkpoint at that very step."""
    if tc.scheduler != "asha":
        return
    every = t.eval_every if tc.metric == "val_loss" else t.log_every
    for rung in asha_rungs(tc, t.max_steps):
        if not float(rung).is_integer() or rung % t.checkpoint_every or rung % every:
            raise ConfigError(
                f"tune: ASHA compares trials at steps {', '.join(f'{r:g}' for r in asha_rungs(tc, t.max_steps))} "
                f"(grace_period {tc.grace_period} x reduction_factor {tc.reduction_factor:g}^k), but step {rung:g} "
                f"is not a multiple of train.checkpoint_every ({t.checkpoint_every}) and of the steps "
                f"{tc.metric} is reported at ({every}): a trial stopped there would have no checkpoint of the "
                "value it was judged on. Set train.checkpoint_every and train.eval_every to divide grace_period, "
                "with an integer reduction_factor"
            )


def scheduler(tc: TuneConfig, t: TrainConfig):
    """ASHA / FIFO / PBT over training steps (the `step` the training reports)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if tc.scheduler == "fifo":
        return FIFOScheduler()
    if tc.scheduler == "asha":
        # stop_last_trials off: a trial that reaches max_steps finishes its own run (final checkpoint), not cut.
        return ASHAScheduler(
            time_attr="step",
            max_t=t.max_steps,
            grace_period=min(tc.grace_period, t.max_steps),
            reduction_factor=tc.reduction_factor,
            stop_last_trials=False,
        )
    interval = tc.perturbation_interval or t.checkpoint_every
    if interval % t.checkpoint_every:
        raise ConfigError(
            f"tune.perturbation_interval ({interval}) must be a multiple of train.checkpoint_every "
            f"({t.checkpoint_every}): PBT copies the checkpoint a trial reports at that step"
        )
    return PopulationBasedTraining(
        time_attr="step",
        perturbation_interval=interval,
        hyperparam_mutations=pbt_mutations(tc.search_space),
        quantile_fraction=tc.quantile_fraction,
        resample_probability=tc.resample_probability,
        synch=False,
    )


def searcher(tc: TuneConfig):
    if tc.searcher == "random":
        return None  # Tune's BasicVariantGenerator: grid values crossed, the rest sampled
    if any("grid" in spec for spec in tc.search_space.values()):
        raise ConfigError("tune.searcher optuna: grid is not an Optuna distribution; use choice")
    if tc.scheduler == "pbt":
        raise ConfigError(
            "tune.searcher optuna cannot drive PBT (PBT mutates its own trials); use tune.searcher=random"
        )
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("tune.searcher optuna needs Optuna: pip install 'bigray[tune]'") from None
    return OptunaSearch(seed=tc.seed)  # metric and mode come from TuneConfig


def check_storage(storage_path: str, nodes: int) -> None:
    """On more than one node, trials and their Train workers run where a local path means another disk."""
    if nodes > 1 and not is_remote(storage_path):
        raise ConfigError(
            f"tune.storage_path {storage_path} is a local path, but the cluster has {nodes} nodes: "
            "trials and workers on other nodes would write elsewhere; use shared storage (s3://...)"
        )


def concurrency(max_concurrent: int, t: TrainConfig, cluster: dict[str, float]) -> tuple[int, str | None]:
    """tune.max_concurrent capped by how many trials the cluster can run at once, and a note when it is."""
    kind, per_trial = ("GPU", t.num_workers) if t.use_gpu else ("CPU", t.num_workers * t.cpus_per_worker)
    have = cluster.get(kind, 0.0)
    fits = max(1, int(have // per_trial))
    if fits >= max_concurrent:
        return max_concurrent, None
    return fits, (
        f"tune.max_concurrent {max_concurrent} capped to {fits}: the cluster has {have:g} {kind}s "
        f"and each trial's {t.num_workers} workers take {per_trial:g}"
    )


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def _trial_dirname(trial) -> str:
    return trial.trial_id
