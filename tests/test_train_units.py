"""The training techniques as small pure functions: schedule, DeepSpeed config, param groups, FLOPs, data order."""

from __future__ import annotations

import numpy as np
import pytest

from bigray.config import load_config
from bigray.train.data import global_batches, micro_slice, shuffled_rows
from bigray.train.metrics import mfu, peak_flops
from bigray.train.model import flops_per_token, model_config
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
    t = train_cfg("train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true", "train.micro_batch_size=2",
                  "train.grad_accum_steps=4", "train.deepspeed={zero_optimization: {stage3_max_live_parameters: 7}, flops_profiler: {enabled: true}}")
    cfg = deepspeed_config(t, world_size=8, precision="bf16", on_gpu=True)
    assert cfg["train_batch_size"] == 64 and cfg["gradient_accumulation_steps"] == 4
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["pin_memory"] is True
    assert zero["stage3_max_live_parameters"] == 7 and cfg["flops_profiler"] == {"enabled": True}
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


def test_flops_per_token_and_mfu():
    from bigray.config import ModelConfig

    cfg = model_config(ModelConfig(preset="8b"), vocab_size=128_256, seq_len=8192, eos_id=0)
    n = 8_030_261_248  # Llama-3-8B's published parameter count
    flops = flops_per_token(cfg, n, 8192)
    assert flops == 6 * (n - 128_256 * 4096) + 12 * 32 * 4096 * 8192
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None and peak_flops("cpu", 2.0) == 2e12
    assert mfu(1000.0, flops, 989e12) == pytest.approx(1000 * flops / 989e12) and mfu(1.0, flops, None) is None


def test_presets_have_public_shapes():
    from transformers import AutoModelForCausalLM

    from bigray.config import ModelConfig

    one_b = model_config(ModelConfig(preset="1b"), 128_256, 2048, 0)
    assert (one_b.hidden_size, one_b.num_hidden_layers, one_b.num_key_value_heads, one_b.intermediate_size) == (2048, 16, 8, 8192)
    tiny = AutoModelForCausalLM.from_config(model_config(ModelConfig(preset="tiny"), 8192, 256, 0))
    assert 0.5e6 < sum(p.numel() for p in tiny.parameters()) < 1.5e6


def test_resume_skips_exactly_the_consumed_batches():
    rows = np.arange(1000 * 5).reshape(1000, 5)
    windows = [rows[i:i + 64] for i in range(0, 1000, 64)]
    full = list(global_batches(iter(windows), 24))
    assert len(full) == 1000 // 24 and all(len(b) == 24 for b in full)
    for k in (0, 1, 17, 41):
        np.testing.assert_array_equal(np.concatenate(list(global_batches(iter(windows), 24, skip=k)) or [np.zeros((0, 5))]),
                                      np.concatenate(full[k:]) if full[k:] else np.zeros((0, 5)))


def test_micro_slices_partition_a_global_batch():
    batch = np.arange(2 * 3 * 4)[:, None]  # world 3, micro batch 2, 4 accumulation steps
    seen = np.concatenate([micro_slice(batch, m, r, 3, 2) for m in range(4) for r in range(3)])
    np.testing.assert_array_equal(np.sort(seen[:, 0]), batch[:, 0])


def test_window_shuffle_is_seeded_and_a_permutation():
    import pyarrow as pa

    rows = np.arange(40, dtype=np.uint16).reshape(10, 4)
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), 4)})
    a = next(shuffled_rows([table], seed=1, epoch=0))
    assert (a == next(shuffled_rows([table], seed=1, epoch=0))).all()
    assert not (a == next(shuffled_rows([table], seed=1, epoch=1))).all()
    np.testing.assert_array_equal(np.sort(a[:, 0]), rows[:, 0])
