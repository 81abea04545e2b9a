"""What a trial's Train run sends back to its trial: a Ray Train callback, unpickled in the controller and workers.

Kept apart from trial.py (a Tune trainable): Ray Train ships the run config, callbacks included, to the controller and
to every worker, and unpickling a callback imports its module. Here that costs `ray.train` (already loaded there);
defined in trial.py, it pulled all of `ray.tune` and bigray's sweep into two fresh processes per trial (0.2-0.4 CPU-s
each on the 2-core CI box).
"""

from __future__ import annotations

import posixpath

from ray.train import UserCallback


class ForwardToTune(UserCallback):
    """Runs in the Ray Train controller: passes rank 0's reports to the trial through a queue.

    Like ray.tune.integration.ray_train.TuneReportCallback, but the trial also learns which Train
    checkpoint came with a report (for Tune checkpoints) and holds the controller, so that a trial
    Tune stops can abort its Train run cleanly.
    """

    def __init__(self, queue, run_name: str):
        self.queue, self.run_name = queue, run_name
        self.introduced = False

    def after_report(self, run_context, metrics, checkpoint):
        import ray

        if not self.introduced:
            self.queue.put({"_run": self.run_name, "_controller": ray.get_runtime_context().current_actor})
            self.introduced = True
        checkpoint = posixpath.basename(checkpoint.path) if checkpoint else None
        self.queue.put({**metrics[0], "_run": self.run_name, "_checkpoint": checkpoint})
