"""The Train workers' runtime env (bigray/train/trainer.py): only where it sets something Ray would not."""

from __future__ import annotations

from bigray.config import load_config
from bigray.train.trainer import worker_runtime_env


def test_worker_runtime_env_only_where_threads_differ_from_rays_own():
    def env(cpus):
        return worker_runtime_env(load_config(overrides=[f"train.cpus_per_worker={cpus}"]).train)

    # Ray gives a worker of fewer than 2 CPUs OMP_NUM_THREADS=1 itself; a runtime env would only cost a process start.
    assert env(1) is None and env(0.5) is None
    assert env(2) == {"env_vars": {"OMP_NUM_THREADS": "2"}}
    assert env(8) == {"env_vars": {"OMP_NUM_THREADS": "8"}}
