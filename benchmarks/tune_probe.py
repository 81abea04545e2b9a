"""benchmarks/tune.py's start-up probe: timestamps each trial's start-up phases in whichever process runs them.

Installed in every process of the benchmark's local Ray cluster by a `sitecustomize` on PYTHONPATH (benchmarks/tune.py
writes it), not by a runtime env's worker_process_setup_hook: any runtime env makes Ray start each worker through its
setup_worker process (a second Python start) and keeps it off the idle workers Ray has already started, which would
add to every trial's start-up what the probe measures. No bigray code changes: it patches, when they are imported,
the trial's `_start`, the Train worker's named steps in bigray.train.loop (which train_func looks up at call time) and
DeepSpeed's entry points, to append (run, mark, time) lines to `log_path`.
"""

from __future__ import annotations

from import_patches import patch_on_import  # benchmarks/ is on sys.path while this module is imported


def install(log_path: str) -> None:
    """Patch the modules named below when (if ever) this process imports them."""
    import json
    import time

    def mark(run: str, what: str, t: float | None = None) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps({"run": run.split("-from-")[0], "mark": what, "t": t or time.time()}) + "\n")

    def worker_run() -> str:
        import ray.train

        return ray.train.get_context().get_experiment_name()

    def patch_trial(module):
        setup, reset, start = module.Trial.setup, module.Trial.reset_config, module.Trial._start

        def trial_setup(self, *a, **k):
            mark(self.trial_id, "actor")
            return setup(self, *a, **k)

        def reset_config(self, *a, **k):
            mark(self.trial_id, "actor")  # a reused actor: the new trial's id is already set
            return reset(self, *a, **k)

        def _start(self):
            mark(self.trial_id, "trial")
            return start(self)

        step = module.Trial.step

        def trial_step(self):
            out = step(self)
            if getattr(self, "_probe_reported", None) != self.trial_id:  # once per trial, reused actor too
                self._probe_reported = self.trial_id
                mark(self.trial_id, "first_report")
            return out

        module.Trial.setup, module.Trial.reset_config = trial_setup, reset_config
        module.Trial._start, module.Trial.step = _start, trial_step

    def patch_trainer(module):
        build = module.trainer

        def trainer(run, *a, **k):
            out = build(run, *a, **k)
            mark(run.run_name, "trainer")
            return out

        module.trainer = trainer

    def patch_loop(module):
        quiet, setup, batches, step = (module.quiet_ray_console, module.setup_engine, module.train_batches,
                                       module.train_step)
        first = {}

        def quiet_ray_console(*a, **k):
            import psutil

            mark(worker_run(), "worker", psutil.Process().create_time())  # this Train worker's process start
            mark(worker_run(), "train_func")
            return quiet(*a, **k)

        def setup_engine(*a, **k):
            out = setup(*a, **k)
            mark(worker_run(), "engine")
            return out

        def train_batches(*a, **k):
            for i, item in enumerate(batches(*a, **k)):
                if i == 0:
                    mark(worker_run(), "first_batch")
                yield item

        def train_step(*a, **k):
            out = step(*a, **k)
            if not first:
                first[1] = True
                mark(worker_run(), "first_step")
            return out

        module.quiet_ray_console, module.setup_engine = quiet_ray_console, setup_engine
        module.train_batches, module.train_step = train_batches, train_step

    def patch_deepspeed(module):
        init_distributed, initialize = module.init_distributed, module.initialize

        def init_dist(*a, **k):
            out = init_distributed(*a, **k)
            mark(worker_run(), "ds_comm")
            return out

        def init(*a, **k):
            mark(worker_run(), "model")
            return initialize(*a, **k)

        module.init_distributed, module.initialize = init_dist, init

    patches = {
        "deepspeed": patch_deepspeed,
        "bigray.tune.trial": patch_trial,
        "bigray.train.trainer": patch_trainer,
        "bigray.train.loop": patch_loop,
    }

    patch_on_import(patches)

