"""Model presets and the FLOPs count MFU is computed from."""

from __future__ import annotations

from bigray.train.model import flops_per_token, model_config


def test_flops_per_token():
    from bigray.config import ModelConfig

    cfg = model_config(ModelConfig(preset="8b"), vocab_size=128_256, seq_len=8192, eos_id=0)
    n = 8_030_261_248  # Llama-3-8B's published parameter count
    flops = flops_per_token(cfg, n, 8192)
    assert flops == 6 * (n - 128_256 * 4096) + 12 * 32 * 4096 * 8192


def test_presets_have_public_shapes():
    from transformers import AutoModelForCausalLM

    from bigray.config import ModelConfig

    one_b = model_config(ModelConfig(preset="1b"), 128_256, 2048, 0)
    shape = (one_b.hidden_size, one_b.num_hidden_layers, one_b.num_key_value_heads, one_b.intermediate_size)
    assert shape == (2048, 16, 8, 8192)
    tiny = AutoModelForCausalLM.from_config(model_config(ModelConfig(preset="tiny"), 8192, 256, 0))
    assert 0.5e6 < sum(p.numel() for p in tiny.parameters()) < 1.5e6


def test_resolve_attention():
    import pytest

    from bigray.errors import ConfigError
    from bigray.train.model import resolve_attention

    assert resolve_attention("auto", on_gpu=False, precision="bf16") == "sdpa"
    assert resolve_attention("auto", on_gpu=True, precision="fp32") == "sdpa"  # flash-attention has no fp32 kernels
    assert resolve_attention("eager", on_gpu=False, precision="fp32") == "eager"
    with pytest.raises(ConfigError, match="model.attention=flash_attention_2 needs a CUDA device"):
        resolve_attention("flash_attention_2", on_gpu=False, precision="bf16")
