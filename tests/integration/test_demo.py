"""`bigray demo` end to end, as the README's first command runs it: a fresh process, no arguments
but --out, a local Ray cluster and local S3 server of its own, real HTTP at the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_the_whole_flow(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the demo brings its own S3
    proc = subprocess.run(
        [sys.executable, "-m", "bigray", "demo", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stdout = proc.stdout

    first, last = map(float, re.search(r"^loss ([\d.]+) -> ([\d.]+)", stdout, re.M).groups())
    assert last < first - 1.0, f"loss did not fall visibly: {first} -> {last}"
    # bigray's sweep table: ASHA stopped the weaker learning rates at the first rung.
    assert re.search(r"│ \S+ +│ .+ │ +\d+ │ stopped early", stdout), stdout[-3000:]
    # One completion and one chat answer, each with what the server counted (an EOS counts as generated).
    usage = re.findall(r"\((\d+) prompt \+ (\d+) completion tokens, (stop|length)\)$", stdout, re.M)
    assert len(usage) == 2 and all(int(p) > 0 and int(c) > 0 for p, c, _ in usage), usage
    assert "def read_config(path):" in stdout.split("/v1/completions", 1)[1]
    assert re.search(r'^assistant: ".*"  \(', stdout, re.M)

    written = dict(re.findall(r"^  (shards|run|sweep|served model)\s+(\S+)$", stdout, re.M))
    assert set(written) == {"shards", "run", "sweep", "served model"}
    assert all(Path(p).is_relative_to(out) and Path(p).exists() for p in written.values()), written
    manifest = json.loads((Path(written["shards"]) / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 1_000_000  # the whole stdlib, not a sample
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(written["served model"]))
    assert (Path(written["run"]) / "loss.png").exists()
    assert (Path(written["sweep"]) / "results.csv").exists()
