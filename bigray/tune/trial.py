"""One trial of `bigray tune`: the very same Ray Train + DeepSpeed run as `bigray train`, its reports forwarded to Tune.

Ray Train v2 inside Tune: a small Tune trainable (a token 0.01 CPU, pinned to the head node)
builds `bigray.train.trainer.trainer(...)` and forwards what the training reports to Tune. A Train
checkpoint becomes a Tune checkpoint holding only its URI (a "pointer"), which is what PBT's exploit
and `Tuner.restore` hand back to a (re)started trial to resume from. A class trainable rather than
Ray's usual Tune function around a TorchTrainer, so that stopping a trial (ASHA, PBT, Ctrl-C) runs
`cleanup`, which aborts the Train run: its workers and placement group go with it.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
import time

from ray.tune import Trainable

from bigray.config import Config, TrainConfig, TuneConfig, apply_overrides
from bigray.errors import BigrayError
from bigray.storage import Store, join
from bigray.tune.reports import ForwardToTune

POINTER = "bigray-tune.json"
# Ray gives the head node this resource (checked on Ray 2.60; Ray Train's state actor and Ray Data
# pin themselves to the head with it too). Tune takes resources, not a scheduling strategy, for a trial.
HEAD_NODE_RESOURCE = "node:__internal_head__"


def trial_resources(pin_to_head: bool):
    """What a trial's driver reserves: a token CPU share, on the head node when the cluster has one to pin to.

    The driver only waits on its Train run, whose workers reserve their own resources (Tune refuses
    an all-zero request). On the head it does not die with a spot GPU node, and Ray Train attaches
    the run's controller to the driver's node, so the controller stays on the head as well.
    """
    from ray.tune import PlacementGroupFactory

    return PlacementGroupFactory([{"CPU": 0.01, **({HEAD_NODE_RESOURCE: 0.001} if pin_to_head else {})}])


def pointers_kept(tc: TuneConfig, t: TrainConfig) -> int:
    """How many checkpoint pointers Tune keeps per trial (`Trial._start` keeps one more Train checkpoint).

    Under PBT the pointer a top trial saved at its last perturbation is what a lower trial clones, until
    the top trial's next perturbation. Meanwhile it adds perturbation_interval / checkpoint_every pointers
    plus PBT's own save at the next perturbation; twice that leaves room for a clone still restoring.
    """
    if tc.scheduler != "pbt":
        return t.keep_checkpoints
    interval = tc.perturbation_interval or t.checkpoint_every
    return max(t.keep_checkpoints, 2 * (interval // t.checkpoint_every + 1))


class Trial(Trainable):
    """One trial: `bigray train` with the trial's params applied, its reports forwarded to Tune."""

    def setup(self, config: dict, base: dict, store: Store):
        self.base, self.store = base, store
        self.queue = None  # made at the first Train run, kept for the next trials this actor runs
        self._reset(config)

    def reset_config(self, new_config: dict) -> bool:
        """Tune reuses this actor for another trial (`reuse_actors`): end this one's Train run, start afresh.

        The actor's imports (Ray Train, DeepSpeed's and bigray's trainer modules) then cost once per slot,
        not once per trial.
        """
        self._stop_run(wait_if_done=False)
        self._reset(new_config)
        return True

    def _reset(self, config: dict) -> None:
        self.cfg = apply_overrides(Config.model_validate(self.base), config, "tune.search_space")
        self.resume_from, self.resume_step = None, 0
        self.thread = self.controller = self.last_checkpoint = None
        self.new_checkpoint = self.done = False
        self.outcome: dict = {}

    def load_checkpoint(self, checkpoint_dir: str):
        with open(os.path.join(checkpoint_dir, POINTER)) as f:
            pointer = json.load(f)
        if pointer is None:  # Tune saved the trial before its Train run wrote any checkpoint: start afresh
            return
        self._check_exists(pointer["checkpoint"])
        self.resume_from, self.resume_step = pointer["checkpoint"], pointer["step"]
        if not posixpath.basename(posixpath.dirname(self.resume_from.rstrip("/"))).startswith(self.trial_id):
            # PBT's exploit of another trial, which keeps training and rotating its checkpoints while this
            # trial's Train run starts (a minute): copy the checkpoint now, while it is sure to exist.
            seed = join(self.cfg.train.storage_path, f"{self.trial_id}-seed-{self.resume_step}")
            self.store.copy_dir(self.resume_from, seed)
            self.resume_from = seed
            pointer = {**pointer, "checkpoint": seed}
        self.last_checkpoint = pointer

    def save_checkpoint(self, checkpoint_dir: str):
        # Only a pointer (and the result it came with): the Train checkpoint itself is already in storage.
        with open(os.path.join(checkpoint_dir, POINTER), "w") as f:
            json.dump(self.last_checkpoint, f)

    def _check_exists(self, checkpoint: str) -> None:
        if not self.store.exists(join(checkpoint, "bigray.json")):
            raise BigrayError(
                f"trial {self.trial_id}: the Train checkpoint {checkpoint} that Tune's pointer refers to is gone "
                "(deleted by its run's checkpoint rotation, or by hand); under PBT raise train.keep_checkpoints "
                "or lower tune.perturbation_interval / train.checkpoint_every so it is kept until it is exploited"
            )

    def _start(self):
        from ray.train import CheckpointConfig
        from ray.util.queue import Queue

        from bigray.train.trainer import plan_run, trainer

        # Every start of a trial is a fresh Train run, from Tune's checkpoint of the trial if it has
        # one: reusing a run name would make Ray Train continue that run from its own latest
        # checkpoint, which can be past what Tune knows (a sweep whose driver died while trials ran).
        name = f"{self.trial_id}-from-{self.resume_step}" if self.resume_from else self.trial_id
        if self.store.exists(join(self.cfg.train.storage_path, name)):
            name += time.strftime("-%Y%m%d-%H%M%S")
        self.cfg.train.run_name = name
        self.run = plan_run(self.cfg)
        if self.resume_from:  # it may have rotated out while this trial's actor started
            self._check_exists(self.resume_from)
        if self.queue is None:
            # Unbounded: ForwardToTune runs on the controller's event loop, so a put that waited for room
            # would stall the controller, and with it the abort that stopping this trial sends.
            self.queue = Queue(actor_options={"num_cpus": 0})
        # Tune's pointers must outlive Ray Train's own checkpoint rotation: Tune snapshots its state
        # once a trial has checkpointed num_to_keep times since the last snapshot, so one more kept
        # covers the pointer in the snapshot still in storage until the next one.
        keep = pointers_kept(self.cfg.tune, self.cfg.train) + 1
        train = trainer(
            self.run,
            resume_from=self.resume_from,
            callbacks=[ForwardToTune(self.queue, name)],
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
        )

        outcome = self.outcome  # this run's: a reused actor's next trial gets a fresh dict

        def fit():
            try:
                outcome["result"] = train.fit()
            except BaseException as exc:  # noqa: BLE001 - raised in step()
                outcome["error"] = exc

        self.thread = threading.Thread(target=fit, daemon=True)
        self.thread.start()

    def step(self) -> dict:
        from ray.util.queue import Empty

        if self.thread is None:
            if self.resume_step >= self.cfg.train.max_steps and self.last_checkpoint.get("result"):
                # Restored from its final checkpoint (the sweep stopped before Tune marked it done): nothing to train.
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
                raise (
                    error
                    or BigrayError(f"trial {self.trial_id}: training ended before step {self.cfg.train.max_steps}")
                ) from None
            if metrics.pop("_run") != self.run.run_name:
                continue  # a late report of the Train run of the trial this actor ran before
            if "_controller" in metrics:
                self.controller = metrics["_controller"]
                continue
            name = metrics.pop("_checkpoint")
            if name:
                # A background-written checkpoint holds an earlier step than the report it rides on.
                step = metrics.get("checkpoint_step", metrics["step"])
                self.last_checkpoint = {"checkpoint": join(self.run.run_dir, name), "step": step}
                self.new_checkpoint = True
            done = metrics["step"] >= self.cfg.train.max_steps
            if self.cfg.tune.metric not in metrics and not done:
                # Tune wants its metric in every result, and val_loss comes only every train.eval_every
                # steps: a log-only report waits, its checkpoint (if any) goes out with the next result.
                continue
            metrics |= {"run_dir": self.run.run_dir, "done": done}
            self.done = done
            if self.new_checkpoint:  # a trial restored from this pointer at its last step returns this result again
                self.last_checkpoint["result"] = metrics
            metrics = {**metrics, "should_checkpoint": self.new_checkpoint}
            self.new_checkpoint = False
            return metrics

    def cleanup(self):
        self._stop_run(wait_if_done=True)

    def _stop_run(self, wait_if_done: bool) -> None:
        """Abort this trial's Train run if it is still training; a run that reported its last step is left to
        return from fit() (waited for when the actor goes away, not when it is reused)."""
        import ray

        if self.thread is None or (self.done and not wait_if_done):
            return
        if self.done or self.controller is None:
            # A finished run is just returning from fit(); one stopped before its first report has no controller
            # to abort yet. A run still training is aborted at once: waiting for it would idle the slot.
            self.thread.join(timeout=10)
        if not self.thread.is_alive() or self.controller is None:
            return
        # Stopped early (ASHA, PBT, Ctrl-C): the controller stops its workers and placement group, then exits.
        if not ray.wait([self.controller.abort.remote()], timeout=120)[0]:
            ray.kill(self.controller)  # its workers go with it; Train's placement group cleaner removes the group
        self.thread.join(timeout=30)
