"""What a sweep leaves behind: per-trial results from Tune's ResultGrid, the best trial, results.csv and the plot."""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bigray.config import Config
from bigray.errors import BigrayError
from bigray.storage import Store
from bigray.tune.trial import POINTER

# Trial outcomes as bigray reports them; "unfinished" is a trial Tune never saw complete (an interrupted sweep).
FINISHED, STOPPED, ERROR, UNFINISHED = "finished", "stopped early", "error", "unfinished"


@dataclass
class TrialResult:
    """One trial of a sweep, from Tune's ResultGrid and the sweep's completion record."""

    trial_id: str
    params: dict[str, Any]
    status: str  # FINISHED, STOPPED, ERROR or UNFINISHED
    step: int  # the last step it reported
    metric: float  # its last value of tune.metric (nan if it never reported one)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) as reported
    checkpoints: dict[int, str] = field(default_factory=dict)  # step -> Train checkpoint URI still pointed at
    run_dir: str | None = None
    error: str | None = None

    @property
    def stopped_early(self) -> bool:
        return self.status == STOPPED

    def metric_at(self, step: int) -> float:
        return next((value for s, value in reversed(self.curve) if s == step), math.nan)


@dataclass
class TuneResult:
    """A finished sweep: its trials (best first), the best one and where everything was written."""

    sweep_dir: str
    metric: str
    mode: str
    scheduler: str
    trials: list[TrialResult]
    best: TrialResult
    best_step: int  # the step all candidates were compared at, and the exported checkpoint's
    best_metric: float  # best's metric at best_step
    best_config: Config
    best_yaml: str
    best_export: str
    results_csv: str
    plot: str
    wall_s: float

    @property
    def best_trial(self) -> str:
        return self.best.trial_id

    @property
    def best_params(self) -> dict[str, Any]:
        return self.best.params


def collect(grid, record: dict[str, str], metric: str, max_steps: Callable[[dict], int]) -> list[TrialResult]:
    """TrialResults from Tune's ResultGrid; statuses from the completion record (trial_id -> event), `max_steps`
    of a trial's params telling a finished trial from one its scheduler stopped."""
    trials = []
    for result in grid:
        trial_id = posixpath.basename(result.path.rstrip("/"))  # the trial's dir is named after its id
        df = result.metrics_dataframe
        curve = []
        if df is not None and metric in df and "step" in df:
            curve = [(int(s), float(v)) for s, v in zip(df["step"], df[metric]) if not (math.isnan(s) or math.isnan(v))]
        step = int(df["step"].dropna().iloc[-1]) if df is not None and "step" in df and df["step"].notna().any() else 0
        params = dict(result.config or {})  # None for a trial that failed before it started
        event, trained = record.get(trial_id), step >= max_steps(params)
        if (result.metrics or {}).get("done") and trained:
            # Its final result reached Tune; the completion event may not have (a driver lost right after it).
            event = "complete"
        status = ERROR if event == "error" else UNFINISHED if event != "complete" else FINISHED if trained else STOPPED
        run_dir = (
            df["run_dir"].dropna().iloc[-1]
            if df is not None and "run_dir" in df and df["run_dir"].notna().any()
            else None
        )
        trials.append(
            TrialResult(
                trial_id=trial_id,
                params=params,
                status=status,
                step=step,
                metric=curve[-1][1] if curve else math.nan,
                curve=curve,
                run_dir=run_dir,
                checkpoints=pointed_checkpoints(result),
                error=str(result.error) if result.error else None,
            )
        )
    return trials


def pointed_checkpoints(result) -> dict[int, str]:
    """step -> Train checkpoint URI, for every pointer Tune still keeps for this trial."""
    out = {}
    for checkpoint, _ in result.best_checkpoints or []:
        with checkpoint.filesystem.open_input_stream(posixpath.join(checkpoint.path, POINTER)) as f:
            pointer = json.loads(f.read())
        if pointer:
            out[int(pointer["step"])] = pointer["checkpoint"]
    return out


def choose_best(trials: list[TrialResult], mode: str) -> tuple[TrialResult, int]:
    """The best trial compared at one step: the latest step at which any trial has both the metric and a checkpoint.

    A trial's last value alone would compare a trial ASHA stopped at step 20 with one trained to
    step 100, and could export a checkpoint older than the value it won with.
    """
    steps = {s for t in trials for s in t.checkpoints if not math.isnan(t.metric_at(s))}
    if not steps:
        raise BigrayError(
            "no trial has a checkpoint at a step where it reported the metric; "
            "make train.checkpoint_every a multiple of train.eval_every"
        )
    step = max(steps)
    candidates = [t for t in trials if step in t.checkpoints and not math.isnan(t.metric_at(step))]
    sign = 1 if mode == "min" else -1
    return min(candidates, key=lambda t: sign * t.metric_at(step)), step


def rank(trials: list[TrialResult], best: TrialResult, mode: str) -> list[TrialResult]:
    """Best first, then trials that went furthest, each group by its last metric; no metric last."""
    sign = 1 if mode == "min" else -1
    rest = sorted(
        (t for t in trials if t is not best),
        key=lambda t: (math.isnan(t.metric), -t.step, sign * t.metric if not math.isnan(t.metric) else 0),
    )
    return [best, *rest]


def write_csv(store: Store, uri: str, trials: list[TrialResult], metric: str) -> None:
    import pandas as pd

    rows = [
        {
            "trial_id": t.trial_id,
            **t.params,
            metric: t.metric,
            "step": t.step,
            "status": t.status,
            "stopped_early": t.stopped_early,
        }
        for t in trials
    ]
    store.write_bytes(uri, pd.DataFrame(rows).to_csv(index=False).encode())


def plot_trials(store: Store, uri: str, trials: list[TrialResult], metric: str) -> None:
    """One curve of `metric` against step per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bigray.train.metrics import write_figure

    fig, ax = plt.subplots(figsize=(8, 5))
    for t in trials:
        if t.curve:
            params = ", ".join(
                f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                for k, v in t.params.items()
            )
            ax.plot(*zip(*t.curve), "o-", markersize=3, label=f"{t.trial_id} {params}")
    ax.set(title=metric, xlabel="step")
    ax.legend(fontsize=7)
    write_figure(fig, uri, store)
