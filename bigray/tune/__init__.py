"""`bigray tune`: Ray Tune sweeps whose trials are `bigray train` runs.

space.py checks the search space and makes Tune's distributions; trial.py is the trial trainable;
sweep.py drives the sweep (`tune`); results.py turns Tune's ResultGrid into typed results and files.
"""

from bigray.tune.results import TrialResult, TuneResult
from bigray.tune.sweep import tune

__all__ = ["TrialResult", "TuneResult", "tune"]
