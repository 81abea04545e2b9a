"""Wall time of an 8-trial ASHA sweep against the same 8 trials run to completion (FIFO), in one run.

    python benchmarks/tune.py [--steps 3000] [--concurrent 2] [--num-cpus 8] [k=v ...]

Both sweeps run the same grid of learning rates and warmups on the same tiny shards (Python's
json/email/logging packages, prepared once into a temp dir), one Ray Train worker per trial, local
storage. Prints each sweep's wall time and best val_loss, the ratio of wall times and the gap
between the best val_losses. Goal: ASHA <= 0.5x the wall time with a best val_loss within 2%.

Every trial is a whole Ray Train run, so it pays a fixed start-up (worker group, DeepSpeed init,
Ray Data pipelines: about a minute on a 2-core box) that ASHA cannot save; trials must train for
several times that long before stopping them early pays off, hence the default of 3000 steps. The
steps-trained ratio it also prints is what the scheduler saved apart from that start-up.

Measured on the 2-core CI box (tiny preset, seq_len 64, 2 trials at a time): 3000 steps, ASHA
977 s / FIFO 1531 s = 0.64x wall, 0.49x steps trained (11,700 / 24,000), same best val_loss
(2.9455, +0.00%); 1000 steps: 0.64x (518 / 803 s), same best (3.4013).
2026-11-24 04:48-04:59 UTC, --steps 1000, 4 at once, reused actors (shared box): 0.73x (266 / 362 s),
0.36x steps, same best (3.4118); start-up 54 s/trial (FIFO), 66 s (ASHA, incl. 11-12 s per reused slot since cut).
After that cut, 05:40-05:51 UTC, same command: 0.67x (208 / 309 s), 0.55x steps, same best (3.4118);
ASHA start-up 37 s/trial, a reused slot's wait 2.0 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps the local cluster on loopback (see tests/conftest.py)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bigray.config import load_config  # noqa: E402

# 8 trials: 4 learning rates x 2 warmups, hopeless to good, the kind of spread a first sweep has; in
# a shuffled order, as random sampling would start them (asynchronous ASHA can only stop a trial
# that does worse than trials already at its rung, so the order matters; this one is not its best case).
SPACE = "tune.search_space={train.lr: {grid: [1.0e-3, 1.0e-5, 3.0e-3, 1.0e-4]}, train.warmup_steps: {grid: [2, 10]}}"


STARTUP_MARKS = ("actor", "trial", "trainer", "train_func", "engine", "first_batch", "first_step", "first_report")


def startup_probe(log_path: str):
    """A worker_process_setup_hook that timestamps each trial's start-up (benchmark-only: no bigray code changes).

    It patches, when they are imported, the trial's `_start` and the Train worker's named steps in
    bigray.train.loop (which train_func looks up at call time) to append (run, mark, time) lines to `log_path`.
    """

    def hook():
        import importlib.abc
        import importlib.util
        import json
        import sys
        import time

        def mark(run: str, what: str) -> None:
            with open(log_path, "a") as f:
                f.write(json.dumps({"run": run.split("-from-")[0], "mark": what, "t": time.time()}) + "\n")

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

        patches = {
            "bigray.tune.trial": patch_trial,
            "bigray.train.trainer": patch_trainer,
            "bigray.train.loop": patch_loop,
        }

        class Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name not in patches:
                    return None
                sys.meta_path.remove(self)
                try:
                    spec = importlib.util.find_spec(name)
                finally:
                    sys.meta_path.insert(0, self)
                run_module = spec.loader.exec_module

                def exec_module(module):
                    run_module(module)
                    patches[name](module)

                spec.loader.exec_module = exec_module
                return spec

        sys.meta_path.insert(0, Finder())

    return hook


def startup_table(log_path: str, runs: set[str]) -> tuple[str, float]:
    """Each trial's start-up phases (s) from the probe's marks, and the mean seconds from trial start to first step."""
    import json

    marks: dict[str, dict[str, float]] = {}
    with open(log_path) as f:
        for line in f:
            m = json.loads(line)
            if m["run"] in runs:  # the first time of each mark: a trial's first Train run
                marks.setdefault(m["run"], {}).setdefault(m["mark"], m["t"])
    names = [f"{a}->{b}" for a, b in zip(STARTUP_MARKS, STARTUP_MARKS[1:])]
    width = max(map(len, names))
    lines = ["  trial     " + " ".join(f"{n:>{width}}" for n in names) + "   start-up (actor->first_step)"]
    totals = []
    for run, m in sorted(marks.items()):
        cells = [m[b] - m[a] if a in m and b in m else float("nan") for a, b in zip(STARTUP_MARKS, STARTUP_MARKS[1:])]
        total = m.get("first_step", float("nan")) - m.get("actor", m.get("trial", float("nan")))
        totals.append(total)
        lines.append(f"  {run[-8:]:8}  " + " ".join(f"{c:{width}.1f}" for c in cells) + f"   {total:.1f}")
    mean = sum(totals) / len(totals) if totals else float("nan")
    return "\n".join(lines), mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="train.max_steps of every trial")
    # More trials than cores: a trial's start-up (mostly process starts and imports) overlaps the others' steps,
    # and a slot freed by a stopped or finished trial never leaves a core idle while trials are left to run.
    parser.add_argument("--concurrent", type=int, default=4, help="tune.max_concurrent (the same for both sweeps)")
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--schedulers", default="fifo,asha", help="sweeps to run, in order (the ratio needs both)")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for both sweeps")
    args = parser.parse_args()

    import ray

    from bigray.data import prepare
    from bigray.tune import tune

    root = tempfile.mkdtemp(prefix="bigray-bench-tune-")
    marks = os.path.join(root, "startup.jsonl")
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": startup_probe(marks)},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    data = os.path.join(root, "data")
    prepare(
        load_config(
            overrides=[
                "data.inputs=['{stdlib}/json/*.py', '{stdlib}/email/*.py', '{stdlib}/logging/*.py']",
                "data.format=text",
                f"data.output={data}",
                "data.vocab_size=512",
                "data.seq_len=64",
                "data.val_fraction=0.05",
            ]
        )
    )
    common = [
        f"data.output={data}",
        f"tune.storage_path={root}/sweeps",
        "train.num_workers=1",
        "train.micro_batch_size=8",
        "train.precision=fp32",
        "train.min_lr=1e-6",
        f"train.max_steps={args.steps}",
        f"train.eval_every={max(args.steps // 10, 1)}",
        "train.eval_batches=4",
        f"train.log_every={max(args.steps // 10, 1)}",
        f"train.checkpoint_every={max(args.steps // 10, 1)}",
        "train.keep_checkpoints=1",
        "train.max_failures=0",
        SPACE,
        "tune.num_samples=1",
        f"tune.max_concurrent={args.concurrent}",
        f"tune.grace_period={max(args.steps // 10, 1)}",
        "tune.reduction_factor=3",
    ]
    results = {}
    for scheduler in args.schedulers.split(","):
        cfg = load_config(overrides=[*common, f"tune.scheduler={scheduler}", f"tune.name={scheduler}", *args.overrides])
        start = time.perf_counter()
        out = tune(cfg)
        results[scheduler] = (time.perf_counter() - start, out)
        stopped = sum(t.stopped_early for t in out.trials)
        print(
            f"{scheduler}: {len(out.trials)} trials, {stopped} stopped early, {results[scheduler][0]:.1f} s, "
            f"best val_loss {out.best_metric:.4f} at step {out.best_step} ({out.best_params})",
            flush=True,
        )
        table, mean = startup_table(marks, {t.trial_id for t in out.trials})
        print(f"{scheduler} start-up per trial, s (mean {mean:.1f}):\n{table}", flush=True)
    if set(results) != {"fifo", "asha"}:
        return
    (fifo_s, fifo), (asha_s, asha) = results["fifo"], results["asha"]
    print(f"\nASHA / FIFO wall time: {asha_s:.1f} s / {fifo_s:.1f} s = {asha_s / fifo_s:.2f}x (goal <= 0.5x)")
    # What the scheduler itself saved, apart from the per-trial start-up it cannot: steps trained.
    steps = {name: sum(t.step for t in out.trials) for name, (_, out) in results.items()}
    print(f"steps trained: ASHA {steps['asha']} / FIFO {steps['fifo']} = {steps['asha'] / steps['fifo']:.2f}x")
    gap = (asha.best_metric - fifo.best_metric) / fifo.best_metric
    print(f"best val_loss: ASHA {asha.best_metric:.4f} vs FIFO {fifo.best_metric:.4f} ({gap:+.2%}; goal within 2%)")
    print(f"sweeps in {root}")
    ray.shutdown()


if __name__ == "__main__":
    main()
