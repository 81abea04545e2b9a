"""`bigray tune`: a Ray Tune sweep whose every trial runs the very same Ray Train + DeepSpeed job as `bigray train`.

Ray Train v2 inside Tune: each trial is a small Tune trainable (reserving a token 0.01 CPU) that
builds `bigray.train.trainer.trainer(...)` and forwards what the training reports to Tune. A Train
checkpoint becomes a Tune checkpoint holding only its URI, which is what PBT's exploit and
`Tuner.restore` hand back to a (re)started trial to resume from.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import threading
import time

from pydantic import ValidationError
from ray.train import UserCallback
from ray.tune import Trainable

from bigray import storage
from bigray.config import Config, _describe, _merge, to_yaml
from bigray.errors import BigrayError, ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
# What train_func (bigray/train/loop.py) reports; val_loss only when the val split fills a global batch,
# mfu only where the device's peak is known. training_iteration and time_total_s are Tune's own.
TRAIN_METRICS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_worker", "mfu", "step_time_s", "memory_gb")
TUNE_METRICS = ("training_iteration", "time_total_s")
# Shards are prepared once for the sweep; only what training reads may vary between trials.
SWEEPABLE = ("train.", "model.")
POINTER = "bigray-tune.json"


def with_params(cfg: Config, params: dict, source: str = "tune.search_space") -> Config:
    """`cfg` with dotted keys set (`{"train.lr": 1e-3}`), validated; errors name the key."""
    raw = cfg.model_dump(mode="json")
    origin: dict[str, str] = {}
    for key, value in params.items():
        nested = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(raw, nested, origin, source)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("invalid search space:\n  " + "\n  ".join(_describe(e, origin) for e in exc.errors())) from None


def _values_to_check(key: str, spec: dict) -> list:
    """The values of one search-space entry a trial could get at the extremes, after checking its shape."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"tune.search_space.{key}: expected one distribution, e.g. {{loguniform: [1e-4, 3e-3]}} (got {spec!r})")
    (dist, args), = spec.items()
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"tune.search_space.{key}: unknown distribution {dist!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.search_space.{key}: {dist} needs a non-empty list of values (got {args!r})")
        return args
    low, high = _bounds(key, dist, args)
    if low >= high:
        raise ConfigError(f"tune.search_space.{key}: empty range [{low}, {high}]: low must be below high")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"tune.search_space.{key}: loguniform needs low > 0 (got {low})")
    if dist == "randint":
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"tune.search_space.{key}: randint needs integer bounds (got {args!r})")
        return [low, high - 1]  # Tune's randint excludes high
    return [low, high]


def _bounds(key: str, dist: str, args) -> list:
    """[low, high] as numbers; YAML 1.1 reads 1e-4 (no dot) as a string, so numeric strings count too."""
    try:
        if not (isinstance(args, list) and len(args) == 2) or any(isinstance(a, bool) for a in args):
            raise ValueError
        return [a if isinstance(a, (int, float)) else int(a) if str(a).lstrip("-").isdigit() else float(a) for a in args]
    except (TypeError, ValueError):
        raise ConfigError(f"tune.search_space.{key}: {dist} needs [low, high] numbers (got {args!r})") from None


def check_search_space(cfg: Config) -> None:
    """Fail before any trial: unknown keys, bad ranges, and values the config itself rejects."""
    if not cfg.tune.search_space:
        raise ConfigError('tune.search_space is empty: give at least one key, e.g. tune.search_space={"train.lr": {loguniform: [1e-4, 3e-3]}}')
    for key, spec in cfg.tune.search_space.items():
        if not key.startswith(SWEEPABLE):
            raise ConfigError(f"tune.search_space.{key}: only train.* and model.* keys can be swept (shards are prepared once for the sweep)")
        for value in _values_to_check(key, spec):
            try:
                with_params(cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space.{key} = {value!r} is not a valid config: {exc}") from None


def param_space(cfg: Config) -> dict:
    """tune.search_space as Ray Tune sampling objects, keyed by the dotted config key."""
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    return {key: tune.grid_search(args) if dist == "grid" else tune.choice(args) if dist == "choice" else make[dist](*_bounds(key, dist, args))
            for key, spec in cfg.tune.search_space.items() for dist, args in spec.items()}


def check_metric(cfg: Config, p: dict) -> None:
    metric = cfg.tune.metric
    reported = list(TRAIN_METRICS) + (["val_loss"] if p["has_val"] else []) + list(TUNE_METRICS)
    if metric == "val_loss" and not p["has_val"]:
        raise ConfigError(f"tune.metric val_loss: the val split of {cfg.train.data or cfg.data.output} is smaller than one global batch, so training "
                          "never evaluates; prepare with a larger data.val_fraction or tune on loss")
    if metric not in reported:
        raise ConfigError(f"tune.metric {metric!r} is never reported by the training; choose one of {', '.join(reported)}")


def scheduler(cfg: Config):
    """ASHA / FIFO / PBT over training steps (the `step` the training reports)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    tc = cfg.tune
    if tc.scheduler == "fifo":
        return FIFOScheduler()
    if tc.scheduler == "asha":
        # stop_last_trials off: a trial that reaches max_steps finishes its own run (final checkpoint) instead of being cut.
        return ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps, grace_period=min(tc.grace_period, cfg.train.max_steps),
                             reduction_factor=tc.reduction_factor, stop_last_trials=False)
    interval = tc.perturbation_interval or cfg.train.checkpoint_every
    if interval % cfg.train.checkpoint_every:
        raise ConfigError(f"tune.perturbation_interval ({interval}) must be a multiple of train.checkpoint_every ({cfg.train.checkpoint_every}): "
                          "PBT copies the checkpoint a trial reports at that step")
    mutations = {}
    for key, spec in tc.search_space.items():
        (dist, args), = spec.items()
        mutations[key] = list(args) if dist in ("choice", "grid") else {"uniform": tune.uniform, "loguniform": tune.loguniform,
                                                                         "randint": tune.randint}[dist](*_bounds(key, dist, args))
    return PopulationBasedTraining(time_attr="step", perturbation_interval=interval,
                                   hyperparam_mutations=mutations, quantile_fraction=tc.quantile_fraction,
                                   resample_probability=tc.resample_probability, synch=False)


def searcher(cfg: Config):
    if cfg.tune.searcher == "random":
        return None  # Tune's BasicVariantGenerator: grid values crossed, the rest sampled
    if any("grid" in spec for spec in cfg.tune.search_space.values()):
        raise ConfigError("tune.searcher optuna: grid is not an Optuna distribution; use choice")
    if cfg.tune.scheduler == "pbt":
        raise ConfigError("tune.searcher optuna cannot drive PBT (PBT mutates its own trials); use tune.searcher=random")
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("tune.searcher optuna needs Optuna: pip install 'bigray[tune]'") from None
    return OptunaSearch(seed=cfg.tune.seed)  # metric and mode come from TuneConfig


class ForwardToTune(UserCallback):
    """Runs in the Ray Train controller: passes rank 0's reports to the trial through a queue.

    Like ray.tune.integration.ray_train.TuneReportCallback, but the trial also learns which Train
    checkpoint came with a report (for Tune checkpoints) and holds the controller, so that a trial
    Tune stops can abort its Train run cleanly.
    """

    def __init__(self, queue):
        self.queue = queue
        self.introduced = False

    def after_report(self, run_context, metrics, checkpoint):
        import ray

        if not self.introduced:
            self.queue.put({"_controller": ray.get_runtime_context().current_actor})
            self.introduced = True
        self.queue.put({**metrics[0], "_checkpoint": posixpath.basename(checkpoint.path) if checkpoint else None})


class Trial(Trainable):
    """One trial: `bigray train` with the trial's params applied, its reports forwarded to Tune.

    A class trainable rather than a function so that stopping a trial (ASHA, PBT, Ctrl-C) runs
    `cleanup`, which aborts the Train run: its workers and placement group go with it instead of
    lingering after the trial's actor dies.
    """

    def setup(self, config: dict, base: dict):
        self.cfg = with_params(Config.model_validate(base), config)
        self.resume_from, self.resume_step = None, 0
        self.thread = self.controller = self.last_checkpoint = None
        self.new_checkpoint = False
        self.outcome: dict = {}

    def load_checkpoint(self, checkpoint_dir: str):
        with open(os.path.join(checkpoint_dir, POINTER)) as f:
            pointer = json.load(f)
        if pointer is None:  # Tune saved the trial before its Train run wrote any checkpoint: start afresh
            return
        self.resume_from, self.resume_step = pointer["checkpoint"], pointer["step"]
        self.last_checkpoint = pointer

    def save_checkpoint(self, checkpoint_dir: str):
        # Only a pointer (and the result it came with): the Train checkpoint itself is already in storage.
        with open(os.path.join(checkpoint_dir, POINTER), "w") as f:
            json.dump(self.last_checkpoint, f)

    def _start(self):
        from ray.train import CheckpointConfig
        from ray.util.queue import Queue

        from bigray.train.trainer import plan, trainer

        # Every start of a trial is a fresh Train run, from Tune's checkpoint of the trial if it has
        # one: reusing a run name would make Ray Train continue that run from its own latest
        # checkpoint, which can be past what Tune knows (a sweep whose driver died while trials ran).
        name = f"{self.trial_id}-from-{self.resume_step}" if self.resume_from else self.trial_id
        if storage.exists(storage.join(self.cfg.train.storage_path, name), self.cfg.storage):
            name += time.strftime("-%Y%m%d-%H%M%S")
        self.cfg.train.run_name = name
        self.plan = plan(self.cfg)
        # Unbounded: ForwardToTune runs on the controller's event loop, so a put that waited for room
        # would stall the controller, and with it the abort that stopping this trial sends.
        self.queue = Queue(actor_options={"num_cpus": 0})
        # Tune's pointers must outlive Ray Train's own checkpoint rotation: Tune snapshots its state
        # once a trial has checkpointed num_to_keep times since the last snapshot, so one more kept
        # covers the pointer in the snapshot still in storage until the next one.
        keep = None if (tune_keep := pointers_kept(self.cfg)) is None else tune_keep + 1
        train = trainer(self.cfg, self.plan, resume_from=self.resume_from, callbacks=[ForwardToTune(self.queue)],
                        checkpoint_config=CheckpointConfig(num_to_keep=keep))

        def fit():
            try:
                self.outcome["result"] = train.fit()
            except BaseException as exc:  # noqa: BLE001 - raised in step()
                self.outcome["error"] = exc

        self.thread = threading.Thread(target=fit, daemon=True)
        self.thread.start()

    def step(self) -> dict:
        from ray.util.queue import Empty

        if self.thread is None:
            if self.resume_step >= self.cfg.train.max_steps and self.last_checkpoint.get("result"):
                # Restored from its final checkpoint (the sweep stopped before Tune marked it done): nothing left to train.
                return {**self.last_checkpoint["result"], "done": True, "should_checkpoint": False}
            self._start()
        while True:
            try:
                metrics = self.queue.get(timeout=1)
            except Empty:
                if self.thread.is_alive():
                    continue
                self.thread.join()
                error = self.outcome.get("error") or self.outcome["result"].error
                raise (error or BigrayError(f"trial {self.trial_id}: training ended before step {self.cfg.train.max_steps}")) from None
            if "_controller" in metrics:
                self.controller = metrics["_controller"]
                continue
            name = metrics.pop("_checkpoint")
            if name:
                self.last_checkpoint = {"checkpoint": storage.join(self.plan["run_dir"], name), "step": metrics["step"]}
                self.new_checkpoint = True
            done = metrics["step"] >= self.cfg.train.max_steps
            if self.cfg.tune.metric not in metrics and not done:
                # Tune wants its metric in every result, and val_loss comes only every train.eval_every
                # steps: a log-only report waits, its checkpoint (if any) goes out with the next result.
                continue
            metrics |= {"run_dir": self.plan["run_dir"], "done": done}
            if self.new_checkpoint:  # a trial restored from this pointer at its last step returns this result again
                self.last_checkpoint["result"] = metrics
            metrics = {**metrics, "should_checkpoint": self.new_checkpoint}
            self.new_checkpoint = False
            return metrics

    def cleanup(self):
        import ray

        if self.thread is None:
            return
        self.thread.join(timeout=10)  # a finished run is just returning from fit()
        if not self.thread.is_alive() or self.controller is None:
            return
        # Stopped early (ASHA, PBT, Ctrl-C): the controller stops its workers and placement group, then exits.
        if not ray.wait([self.controller.abort.remote()], timeout=120)[0]:
            ray.kill(self.controller)  # its workers go with it; Train's placement group cleaner removes the group
        self.thread.join(timeout=30)


def pointers_kept(cfg: Config) -> int | None:
    """Tune's num_to_keep for the trials' checkpoint pointers (Trial._start keeps Train checkpoints to match).

    PBT may exploit any checkpoint a trial reported, long after that trial moved on: it keeps them all.
    """
    return None if cfg.tune.scheduler == "pbt" else cfg.train.keep_checkpoints


def _absolute(cfg: Config) -> Config:
    """Local paths made absolute: trials run elsewhere (Tune changes their working directory)."""
    cfg = cfg.model_copy(deep=True)
    for section, key in [("data", "output"), ("data", "tokenizer"), ("train", "data"), ("train", "storage_path"), ("tune", "storage_path"),
                         ("model", "pretrained")]:
        value = getattr(getattr(cfg, section), key)
        if value and not storage.is_remote(value):
            setattr(getattr(cfg, section), key, os.path.abspath(os.path.expanduser(value.removeprefix("file://"))))
    return cfg


def tune(cfg: Config, resume: bool = False) -> dict:
    """Run (or with `resume`, finish) the sweep; returns where results went and the best trial."""
    import ray.data
    from ray import tune as rtune
    from ray.tune.utils.log import Verbosity

    from bigray.runtime import init_ray
    from bigray.train.trainer import plan

    if not cfg.tune.storage_path:
        raise ConfigError("tune.storage_path is required by `bigray tune`: set it in a config file or pass tune.storage_path=...")
    cfg = _absolute(cfg)
    name = cfg.tune.name or f"bigray-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume and not cfg.tune.name:
        raise ConfigError("--resume needs tune.name: the name of the sweep to finish (a dir under tune.storage_path)")
    sweep_dir = storage.join(cfg.tune.storage_path, name)
    check_search_space(cfg)
    base = cfg.model_copy(deep=True)
    base.train.storage_path = storage.join(sweep_dir, "runs")
    base.train.export = False  # only the best trial is exported, once the sweep is done
    p = plan(base)  # reads the manifest and checks the data once, before any trial
    check_metric(cfg, p)
    search_alg = searcher(cfg)
    sched = scheduler(cfg)

    init_ray(cfg.ray)
    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, path = storage.filesystem(cfg.tune.storage_path, cfg.storage)
    # The trial function only waits on its Train run, whose workers reserve their own resources
    # (Tune refuses an all-zero request, hence a token share of a CPU).
    trainable = rtune.with_resources(rtune.with_parameters(Trial, base=base.model_dump(mode="json")), {"cpu": 0.01})
    start = time.perf_counter()
    if resume:
        if not rtune.Tuner.can_restore(posixpath.join(path, name), storage_filesystem=fs):
            raise ConfigError(f"--resume: no sweep to resume at {sweep_dir}; check tune.storage_path and tune.name")
        tuner = rtune.Tuner.restore(posixpath.join(path, name), trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = rtune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=rtune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                         max_concurrent_trials=cfg.tune.max_concurrent, scheduler=sched, search_alg=search_alg,
                                         trial_dirname_creator=_trial_dirname),
            run_config=rtune.RunConfig(name=name, storage_path=path, storage_filesystem=fs, verbose=Verbosity.V1_EXPERIMENT,
                                       failure_config=rtune.FailureConfig(max_failures=cfg.tune.max_failures),
                                       checkpoint_config=rtune.CheckpointConfig(num_to_keep=pointers_kept(cfg)),
                                       # The sweep's state reaches storage within 30 s, so a lost driver loses little.
                                       sync_config=rtune.SyncConfig(sync_period=30)),
        )
    grid = tuner.fit()
    wall = time.perf_counter() - start
    # ResultGrid keeps no trial status; its analysis does (same order as the results). A trial that
    # never reported did not run: the sweep was interrupted (Ctrl-C marks running trials terminated).
    statuses = [trial.status if result.metrics else "PENDING" for trial, result in zip(grid._experiment_analysis.trials, grid)]
    if unfinished := sum(status not in ("TERMINATED", "ERROR") for status in statuses):
        raise BigrayError(f"sweep {sweep_dir} interrupted with {unfinished} of {len(statuses)} trials unfinished; "
                          f"finish it with: bigray tune ... tune.name={name} --resume")
    return summarise(cfg, grid, statuses, sweep_dir, wall)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _trial_summary(result, status: str, cfg: Config) -> dict:
    df = result.metrics_dataframe
    metric = cfg.tune.metric
    values = df[metric].dropna() if df is not None and metric in df else []
    steps = df["step"].dropna() if df is not None and "step" in df else []
    last = result.metrics or {}
    max_steps = with_params(cfg, result.config).train.max_steps
    checkpoints = df["run_dir"] if df is not None and "run_dir" in df else []
    return {
        "trial_id": last.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
        "params": dict(result.config), "metric": float(values.iloc[-1]) if len(values) else math.nan,
        "iterations": int(last.get("training_iteration", 0)), "step": int(steps.iloc[-1]) if len(steps) else 0,
        "status": status, "stopped_early": status == "TERMINATED" and int(steps.iloc[-1]) < max_steps,
        "error": str(result.error) if result.error else None,
        "checkpoint": result.checkpoint, "run_dir": checkpoints.iloc[-1] if len(checkpoints) else None,
        "curve": list(zip(df["step"], df[metric])) if df is not None and metric in df and "step" in df else [],
    }


def summarise(cfg: Config, grid, statuses: list[str], sweep_dir: str, wall_s: float) -> dict:
    """results.csv, val_loss.png, best.yaml and the best trial's export, from Tune's ResultGrid."""
    import pandas as pd

    trials = [_trial_summary(r, status, cfg) for r, status in zip(grid, statuses)]
    finished = [t for t in trials if not math.isnan(t["metric"])]
    if not finished:
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in trials if t["error"])
        raise BigrayError(f"no trial of {sweep_dir} reported {cfg.tune.metric}" + (f" ({errors})" if errors else ""))
    sign = 1 if cfg.tune.mode == "min" else -1
    trials.sort(key=lambda t: sign * t["metric"] if not math.isnan(t["metric"]) else math.inf)
    best = trials[0]
    if best["checkpoint"] is None:
        raise BigrayError(f"best trial {best['trial_id']} of {sweep_dir} has no checkpoint; set train.checkpoint_every <= train.max_steps")

    rows = [{"trial_id": t["trial_id"], **{k: v for k, v in t["params"].items()}, cfg.tune.metric: t["metric"], "step": t["step"],
             "iterations": t["iterations"], "status": t["status"], "stopped_early": t["stopped_early"]} for t in trials]
    results_csv = storage.join(sweep_dir, "results.csv")
    storage.write_bytes(results_csv, pd.DataFrame(rows).to_csv(index=False).encode(), cfg.storage)
    plot_trials(trials, cfg.tune.metric, storage.join(sweep_dir, f"{cfg.tune.metric}.png"), cfg.storage)

    from bigray.train.export import export

    with best["checkpoint"].as_directory() as d, open(os.path.join(d, POINTER)) as f:
        pointer = json.load(f)
    if pointer is None:
        raise BigrayError(f"best trial {best['trial_id']} of {sweep_dir} stopped before its first Train checkpoint; "
                          "set train.checkpoint_every <= tune.grace_period")
    export_dir = storage.join(sweep_dir, "best", "export")
    exported = export(best["run_dir"], export_dir, checkpoint=pointer["checkpoint"], storage_cfg=cfg.storage)

    best_cfg = with_params(cfg, best["params"])
    # A config `bigray train -c best.yaml` runs as is: its own run name and storage, not the sweep's.
    best_cfg.train.storage_path = cfg.train.storage_path or storage.join(sweep_dir, "train")
    best_cfg.train.run_name = None
    best_yaml = storage.join(sweep_dir, "best.yaml")
    header = f"# best trial {best['trial_id']} of {sweep_dir}: {cfg.tune.metric} {best['metric']:.6g} ({best['params']})\n"
    storage.write_bytes(best_yaml, (header + to_yaml(best_cfg)).encode(), cfg.storage)
    return {
        "sweep_dir": sweep_dir, "results_csv": results_csv, "best_yaml": best_yaml, "plot": storage.join(sweep_dir, f"{cfg.tune.metric}.png"),
        "best_config": best_cfg, "best_metric": best["metric"], "best_trial": best["trial_id"], "best_params": best["params"],
        "best_export": export_dir, "export": exported,
        "trials": [{k: v for k, v in t.items() if k not in ("checkpoint", "curve")} | {"curve": t["curve"]} for t in trials], "wall_s": wall_s,
    }


def plot_trials(trials: list[dict], metric: str, out_uri: str, storage_cfg=None) -> None:
    """One curve of `metric` against step per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bigray.train.metrics import write_figure

    fig, ax = plt.subplots(figsize=(8, 5))
    for t in trials:
        points = [(s, v) for s, v in t["curve"] if not (math.isnan(s) or math.isnan(v))]
        if points:
            label = f"{t['trial_id']} " + ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                                                      for k, v in t["params"].items())
            ax.plot(*zip(*points), "o-", markersize=3, label=label)
    ax.set(title=metric, xlabel="step")
    ax.legend(fontsize=7)
    write_figure(fig, out_uri, storage_cfg)
