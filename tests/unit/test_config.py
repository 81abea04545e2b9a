"""The config tree: YAML layering, dotted overrides, and errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bigray.config import Config, load_config, parse_override, to_yaml
from bigray.errors import ConfigError


def test_defaults_match_spec():
    cfg = Config()
    assert (cfg.data.seq_len, cfg.data.val_fraction, cfg.train.zero_stage, cfg.train.precision) == (
        1024,
        0.01,
        2,
        "bf16",
    )
    assert cfg.serve.host == "127.0.0.1" and cfg.tune.scheduler == "asha" and cfg.ray.address is None


def test_files_layer_and_overrides_win(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("data: {seq_len: 128, inputs: [x.jsonl]}\ntrain: {lr: 1.0e-3}\n")
    b.write_text("data: {seq_len: 256}\n")
    cfg = load_config(
        [a, b], ["train.lr=3e-4", "data.inputs=[a.jsonl, b.jsonl]", "train.deepspeed={zero_optimization: {stage: 3}}"]
    )
    assert cfg.data.seq_len == 256
    assert cfg.train.lr == 3e-4
    assert cfg.data.inputs == ["a.jsonl", "b.jsonl"]
    assert cfg.train.deepspeed == {"zero_optimization": {"stage": 3}}


def test_search_space_entry_is_replaced_not_merged(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text(
        "tune:\n  search_space:\n    train.lr: {grid: [1.0e-3, 3.0e-4]}\n    train.warmup_steps: {choice: [2, 10]}\n"
    )
    cfg = load_config([f], ["tune.search_space={train.lr: {loguniform: [1.0e-4, 3.0e-3]}}"])
    assert cfg.tune.search_space == {
        "train.lr": {"loguniform": [1e-4, 3e-3]},
        "train.warmup_steps": {"choice": [2, 10]},
    }


def test_show_round_trips(tmp_path):
    cfg = load_config(overrides=["data.seq_len=64", "serve.autoscaling={max_replicas: 4}"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config([path]) == cfg
    assert yaml.safe_load(to_yaml(cfg))["serve"]["autoscaling"]["max_replicas"] == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {lrr: 0.1}", r"x\.yaml: unknown key train\.lrr \(did you mean train\.lr\?\)"),
        ("trian: {lr: 0.1}", r"x\.yaml: unknown key trian \(did you mean train\?\)"),
        ("train: {num_workers: many}", r"x\.yaml: train\.num_workers: Input should be a valid integer.*'many'"),
        ("data: {seq_len: 0}", r"x\.yaml: data\.seq_len: Input should be greater than or equal to 1 \(got 0\)"),
        ("data: {val_fraction: 1.5}", r"x\.yaml: data\.val_fraction: Input should be less than 1"),
        ("train: {zero_stage: 4}", r"x\.yaml: train\.zero_stage: Input should be 0, 1, 2 or 3"),
        ("train: {lr: 1.0e-4, min_lr: 1.0e-3}", r"x\.yaml: train: Value error, min_lr .* must not exceed lr"),
        ("- a\n- b", r"x\.yaml: top level must be a mapping"),
        ("data: {seq_len: [", r"x\.yaml: not valid YAML"),
    ],
)
def test_file_errors_name_key_and_file(tmp_path, text, message):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config([path])


def test_override_errors_name_command_line(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("data: {seq_len: 64}")
    with pytest.raises(ConfigError, match=r"command line: data\.seq_len: Input should be a valid integer"):
        load_config([path], ["data.seq_len=long"])
    with pytest.raises(ConfigError, match=r"command line: bad override 'train\.lr'"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match=r"cannot read config file"):
        load_config([tmp_path / "missing.yaml"])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")), ids=str)
def test_shipped_configs_validate(path):
    load_config([path])
