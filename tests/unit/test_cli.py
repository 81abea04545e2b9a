"""The `bigray` command as a user runs it: exit codes, one-paragraph errors, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from bigray.cli import main


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "bigray", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_config_show_prints_resolved_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {seq_len: 77}\n")
    out = run("config", "show", "-c", str(cfg), "train.lr=1e-3")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["data"]["seq_len"] == 77 and shown["train"]["lr"] == 1e-3


def test_bad_config_exits_nonzero_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {seq_len: -5}\n")
    out = run("prepare", "-c", str(cfg))
    assert out.returncode == 2
    assert f"{cfg}: data.seq_len" in out.stderr and "Traceback" not in out.stderr


def test_missing_input_error_and_debug_traceback(tmp_path):
    args = ["prepare", f"data.inputs=[{tmp_path}/absent.jsonl]", f"data.output={tmp_path}/out"]
    out = run(*args)
    assert out.returncode == 2 and "absent.jsonl: no such file or directory" in out.stderr
    assert "Traceback" not in out.stderr
    debug = run(*args, "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_prepare_requires_output(capsys):
    assert main(["prepare", "data.inputs=[x.jsonl]"]) == 2
    assert "data.output is required by `bigray prepare`" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["config", "show"], ["prepare"], ["tokenizer", "train"]])
def test_help(cmd):
    with pytest.raises(SystemExit) as exit_info:
        main([*cmd, "--help"])
    assert exit_info.value.code == 0
