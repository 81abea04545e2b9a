"""Peak-memory measurement for code run in a fresh child process (the loss and planner memory tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# ru_maxrss is no use here: Linux carries the parent's high-water mark over fork + exec, so a child of a big
# pytest process "peaks" at the parent's RSS. VmHWM belongs to this process's memory and clear_refs resets it.
PRELUDE = '''
import json, psutil, torch
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
def hwm():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024
'''


def run_probe(code: str, timeout: int = 600):
    """Run PRELUDE + `code` in a fresh interpreter at the repo root; its last stdout line parsed as JSON."""
    # Big allocations straight from mmap and back: glibc's heap would otherwise keep freed chunks in the RSS.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PRELUDE + code], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
