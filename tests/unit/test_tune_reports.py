"""The callback a trial hands its Train run is unpickled in the run's controller and in every worker (Ray ships the
run config to both): unpickling it must load ray.train only, not ray.tune and bigray's sweep (two fresh processes per
trial would import them)."""

from __future__ import annotations

import pickle
import subprocess
import sys

from bigray.tune.reports import ForwardToTune

UNPICKLE = """
import pickle, sys
callback = pickle.loads(sys.stdin.buffer.read())
print(type(callback).__name__, callback.run_name)
print(sorted(m for m in sys.modules if m == "ray.tune" or m.startswith(("ray.tune.", "bigray.tune"))))
"""


def test_unpickling_the_trial_callback_imports_no_ray_tune():
    blob = pickle.dumps(ForwardToTune(queue=None, run_name="trial_0"))
    proc = subprocess.run([sys.executable, "-c", UNPICKLE], input=blob, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    name, modules = proc.stdout.decode().strip().splitlines()[-2:]
    assert name == "ForwardToTune trial_0"
    assert modules == "['bigray.tune', 'bigray.tune.reports']"
