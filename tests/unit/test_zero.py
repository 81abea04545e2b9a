"""DeepSpeed ZeRO pieces as pure functions: LR schedule, engine config, precision fallback, param groups."""

from __future__ import annotations

import pytest

from bigray.config import load_config
from bigray.train.zero import deepspeed_config, lr_at, param_groups, resolve_precision


def train_cfg(*overrides):
    return load_config(overrides=list(overrides)).train


def test_lr_warmup_then_cosine_to_min():
    t = train_cfg("train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=10", "train.max_steps=110")
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1) and lr_at(500, t) == pytest.approx(0.1)
    decay = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_deepspeed_config_from_train_section_and_passthrough():
    t = train_cfg("train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true",
                  "train.micro_batch_size=2", "train.grad_accum_steps=4",
                  "train.deepspeed={zero_optimization: {stage3_max_live_parameters: 7}, "
                  "flops_profiler: {enabled: true}}")
    cfg = deepspeed_config(t, world_size=8, precision="bf16", on_gpu=True)
    assert cfg["train_batch_size"] == 64 and cfg["gradient_accumulation_steps"] == 4
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["pin_memory"] is True
    assert zero["stage3_max_live_parameters"] == 7 and cfg["flops_profiler"] == {"enabled": True}
    assert cfg["flops_profiler"] is not t.deepspeed["flops_profiler"], "a copy: DeepSpeed may fill it in"
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    fp16 = deepspeed_config(train_cfg("train.use_gpu=true", "train.precision=fp16"), 1, "fp16", True)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0
    assert "offload_optimizer" not in deepspeed_config(train_cfg(), 1, "fp32", False)["zero_optimization"]


def test_precision_falls_back_to_fp32_where_unsupported():
    assert resolve_precision("bf16", on_gpu=False, bf16_ok=False) == "fp32"
    assert resolve_precision("bf16", on_gpu=False, bf16_ok=True) == "bf16"
    assert resolve_precision("fp16", on_gpu=True, bf16_ok=True) == "fp16"


def test_no_weight_decay_on_norms_and_biases():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    one_d = {id(p) for n, p in model.named_parameters() if p.ndim == 1}
    assert {id(p) for p in no_decay["params"]} == one_d and one_d.isdisjoint(id(p) for p in decay["params"])


def test_bf16_reduces_and_accumulates_gradients_in_fp32_unless_overridden():
    for stage in (1, 2, 3):
        cfg = deepspeed_config(train_cfg(f"train.zero_stage={stage}"), 2, "bf16", True)
        assert cfg["data_types"] == {"grad_accum_dtype": "fp32"} and cfg["communication_data_type"] == "fp32"
    # DeepSpeed has no bf16 engine with fp32 accumulation without ZeRO: only the all-reduce is fp32 there.
    zero0 = deepspeed_config(train_cfg("train.zero_stage=0"), 2, "bf16", True)
    assert "data_types" not in zero0 and zero0["communication_data_type"] == "fp32"
    assert "communication_data_type" not in deepspeed_config(train_cfg(), 2, "fp32", False)
    own = train_cfg("train.deepspeed={data_types: {grad_accum_dtype: bf16}, communication_data_type: bf16}")
    assert deepspeed_config(own, 2, "bf16", True)["data_types"] == {"grad_accum_dtype": "bf16"}
    assert deepspeed_config(own, 2, "bf16", True)["communication_data_type"] == "bf16"


def test_worker_threads_follow_cpus_per_worker():
    from bigray.train.zero import worker_env_vars

    assert worker_env_vars(train_cfg("train.cpus_per_worker=8")) == {"OMP_NUM_THREADS": "8"}
    assert worker_env_vars(train_cfg("train.cpus_per_worker=0.5")) == {"OMP_NUM_THREADS": "1"}
