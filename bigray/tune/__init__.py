"""`bigray tune`: Ray Tune sweeps whose trials are `bigray train` runs.

space.py checks the search space and makes Tune's distributions; trial.py is the trial trainable;
reports.py the Train callback that forwards a trial's reports; sweep.py drives the sweep (`tune`);
results.py turns Tune's ResultGrid into typed results and files.
"""

from __future__ import annotations

__all__ = ["TrialResult", "TuneResult", "tune"]


def __getattr__(name: str):
    # Loaded on first use: Ray Train unpickles bigray.tune.reports in every Train worker and controller, which
    # imports this package; importing the sweep here would pull all of ray.tune into each of them.
    if name == "tune":
        from bigray.tune.sweep import tune

        return tune
    if name in ("TrialResult", "TuneResult"):
        from bigray.tune import results

        return getattr(results, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
