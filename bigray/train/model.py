"""Models: Hugging Face causal LMs only, from a Llama-shaped preset (random init) or a pretrained dir."""

from __future__ import annotations

import json

from bigray.config import ModelConfig
from bigray.errors import ConfigError
from bigray.storage import Store, join

# Shapes of public models of these sizes (125m/350m: GPT-3 paper table; 1b: Llama-3.2-1B; 8b: Llama-3-8B).
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=192, tie_word_embeddings=True),
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048, tie_word_embeddings=True),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=2816, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, tie_word_embeddings=False, rope_theta=500000.0),
}


def model_config(model: ModelConfig, vocab_size: int, seq_len: int, eos_id: int, pretrained_dir: str | None = None):
    """The HF config to build: the pretrained dir's own (a local copy of `model.pretrained`), else the preset's."""
    from transformers import AutoConfig, LlamaConfig

    if pretrained_dir:
        try:
            return AutoConfig.from_pretrained(pretrained_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.pretrained: {model.pretrained} is not an HF model dir ({exc})") from None
    return LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=seq_len, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=eos_id, rms_norm_eps=1e-5, initializer_range=0.02, attention_dropout=0.0, **PRESETS[model.preset],
    )


def pretrained_vocab(model: ModelConfig, store: Store) -> int | None:
    """vocab_size from a pretrained dir's config.json, read without loading weights, so the driver can
    refuse a vocab smaller than the tokenizer's before any worker starts."""
    if not model.pretrained:
        return None
    path = join(model.pretrained, "config.json")
    if not store.exists(path):
        raise ConfigError(f"model.pretrained: {model.pretrained} has no config.json")
    return json.loads(store.read_bytes(path))["vocab_size"]


def resolve_attention(requested: str, on_gpu: bool, precision: str) -> str:
    """The attention implementation `model.attention` runs as: auto is flash_attention_2 where it can run (CUDA,
    bf16/fp16, flash-attn installed), else sdpa. Both keep packed documents apart (bigray/train/loss.py)."""
    from transformers.utils import is_flash_attn_2_available

    flash_ok = on_gpu and precision in ("bf16", "fp16") and is_flash_attn_2_available()
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        raise ConfigError("model.attention=flash_attention_2 needs a CUDA device, precision bf16 or fp16 and the "
                          "flash-attn package (pip install flash-attn); use model.attention=sdpa or auto")
    return requested


def build_model(hf_config, pretrained_dir: str | None = None, dtype=None, attn_implementation: str = "sdpa"):
    """Instantiate on this rank. Under ZeRO-3 the caller keeps an HfDeepSpeedConfig alive, so
    transformers builds (and loads) inside deepspeed.zero.Init and no rank holds all parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(attn_implementation=attn_implementation, dtype=dtype or torch.float32)
    if pretrained_dir:
        return AutoModelForCausalLM.from_pretrained(pretrained_dir, config=hf_config, local_files_only=True,
                                                    use_safetensors=True, **kwargs)
    return AutoModelForCausalLM.from_config(hf_config, **kwargs)


def flops_per_token(hf_config, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus 12·layers·hidden·seq for attention.

    N excludes the input embedding table (a lookup, not a matmul) unless it is tied to the LM head.
    """
    hidden, layers = hf_config.hidden_size, hf_config.num_hidden_layers
    embed = 0 if getattr(hf_config, "tie_word_embeddings", False) else hf_config.vocab_size * hidden
    return 6 * (n_params - embed) + 12 * layers * hidden * seq_len
