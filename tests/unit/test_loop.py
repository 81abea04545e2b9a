"""When the worker loop logs, evaluates and checkpoints: the due-ness rules `maybe_*` decide by."""

from __future__ import annotations

from bigray.config import load_config
from bigray.train.loop import checkpoint_due, eval_due, report_due


def test_eval_and_checkpoint_are_due_on_their_period_and_on_the_last_step():
    t = load_config(overrides=["train.max_steps=33", "train.log_every=7", "train.eval_every=10",
                               "train.checkpoint_every=25"]).train
    steps = range(1, t.max_steps + 1)
    assert [s for s in steps if eval_due(s, t)] == [10, 20, 30, 33]
    assert [s for s in steps if checkpoint_due(s, t)] == [25, 33]
    # Every eval or checkpoint step is also logged and reported, so Tune and the printer see its metrics.
    assert [s for s in steps if report_due(s, t, has_val=True)] == [7, 10, 14, 20, 21, 25, 28, 30, 33]
    assert [s for s in steps if report_due(s, t, has_val=False)] == [7, 14, 21, 25, 28, 33]
