"""Next-token cross-entropy without the logits wall: `train.loss_impl` plain | chunked | liger (auto picks).

- plain: the model's logits (B·S·V), upcast to fp32, through `F.cross_entropy`. At the backward peak the fp32
  logits' log-softmax (saved for backward), its gradient and the logits' gradient coexist: ~12 bytes per logit,
  12.9 GB for the 1b preset at micro batch 16, seq 2048, vocab 32k.
- chunked: the decoder's final hidden states go through `lm_head` a chunk of tokens at a time, each chunk under
  `torch.utils.checkpoint`: forward keeps only the chunk's summed loss, backward recomputes that chunk's logits.
  At most one chunk's logits exist at once, in forward and in backward; the price is one more `lm_head` matmul
  per chunk (the recompute), +50% of the `lm_head` forward+backward FLOPs (2 of 6 per weight and token).
  `lm_head` is called as a module, so under ZeRO-3 DeepSpeed's hooks gather its weight for every call,
  the recompute in backward included.
- liger: liger-kernel's fused linear + cross-entropy (Triton, CUDA only): gradients are computed chunk by chunk
  in the forward pass, no recompute. Under ZeRO-3 the weight is gathered with `deepspeed.zero.GatheredParameters`
  for that forward, the only time liger reads it.
"""

from __future__ import annotations

import functools
import inspect
import math

from bigray.errors import ConfigError

IMPLS = ("plain", "chunked", "liger")
IGNORE_INDEX = -100  # F.cross_entropy's and HF's: labels with this value count for nothing


@functools.cache
def liger_available() -> bool:
    """Whether liger-kernel's fused linear cross-entropy imports (it needs Triton, i.e. a CUDA build)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except Exception:  # noqa: BLE001 - a missing package or a Triton without a GPU backend both mean "no"
        return False
    return True


def resolve_loss_impl(requested: str, device_type: str, zero_stage: int) -> str:
    """The implementation `requested` ("auto" or one of IMPLS) runs as on this device.

    auto: liger on CUDA when it imports, except under ZeRO-3 where chunked is the path tested with a partitioned
    `lm_head` (on CPU, with DeepSpeed); chunked on CUDA without liger. On CPU auto is plain: CPU runs are tests
    and demos with small vocabularies where RAM is not the limit, and plain avoids the recompute.
    """
    if requested == "auto":
        if device_type != "cuda":
            return "plain"
        return "liger" if liger_available() and zero_stage < 3 else "chunked"
    if requested == "liger" and not (device_type == "cuda" and liger_available()):
        raise ConfigError("train.loss_impl=liger needs a CUDA device and liger-kernel (pip install liger-kernel); "
                          "use train.loss_impl=chunked (any device) or auto")
    if requested not in IMPLS:
        raise ConfigError(f"train.loss_impl must be auto or one of {', '.join(IMPLS)} (got {requested!r})")
    return requested


def lm_loss(model, input_ids, labels, impl: str):
    """Mean cross-entropy of `model` predicting `labels` (B, S; IGNORE_INDEX skipped) from `input_ids` (B, S).

    `model`: an HF causal LM or a DeepSpeed engine around one; `impl`: a resolved implementation (IMPLS).
    """
    import torch.nn.functional as F

    if impl == "plain":
        logits = model(input_ids=input_ids).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    hidden = final_hidden_states(model, input_ids).flatten(0, 1)
    lm_head = _hf_model(model).get_output_embeddings()
    if impl == "chunked":
        return chunked_cross_entropy(lm_head, hidden, labels.flatten())
    if impl == "liger":
        return _liger_cross_entropy(lm_head, hidden, labels.flatten())
    raise ValueError(f"unknown loss impl {impl!r}; resolve it with resolve_loss_impl first")


def final_hidden_states(model, input_ids):
    """The decoder's last hidden states (after the final norm), without computing any logits.

    Goes through the model's (or engine's) own forward, so DeepSpeed's hooks, compile and activation checkpointing
    apply as for plain; `logits_to_keep` with no positions makes HF skip the `lm_head` matmul.
    """
    import torch

    model_class = type(_hf_model(model))
    if not _takes_logits_to_keep(model_class):
        raise ConfigError(f"{model_class.__name__} has no logits_to_keep argument; use train.loss_impl=plain")
    no_positions = torch.empty(0, dtype=torch.long, device=input_ids.device)
    out = model(input_ids=input_ids, logits_to_keep=no_positions, output_hidden_states=True)
    return out.hidden_states[-1]


def chunk_tokens(n_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk: ceil(V/H) chunks, so one chunk's logits are about as large as the hidden states."""
    n_chunks = max(1, math.ceil(vocab_size / hidden_size))
    return max(1, math.ceil(n_tokens / n_chunks))


def chunked_cross_entropy(lm_head, hidden, labels, tokens_per_chunk: int | None = None):
    """Mean cross-entropy of `lm_head(hidden)` (N, H) against `labels` (N,), one chunk's logits at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    # out_features, not weight.shape: under ZeRO-3 the weight is an empty partition outside the module's forward.
    chunk = tokens_per_chunk or chunk_tokens(hidden.size(0), lm_head.out_features, hidden.size(1))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for h, y in zip(hidden.split(chunk), labels.split(chunk)):
        total = total + checkpoint(_summed_cross_entropy, lm_head, h, y, use_reentrant=False)
    return total / (labels != IGNORE_INDEX).sum()


def _summed_cross_entropy(lm_head, hidden, labels):
    import torch.nn.functional as F

    return F.cross_entropy(lm_head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _liger_cross_entropy(lm_head, hidden, labels):
    import contextlib

    import torch
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    weight = lm_head.weight
    gather = contextlib.nullcontext()
    if hasattr(weight, "ds_id"):  # a ZeRO-3 partitioned parameter: empty outside its module's forward
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([weight] + ([lm_head.bias] if lm_head.bias is not None else []))
    with gather:
        # fp32 accumulation of the weight gradient across liger's chunks, as DeepSpeed accumulates ours (zero.py).
        return liger_fused_linear_cross_entropy(hidden, weight, labels, lm_head.bias, ignore_index=IGNORE_INDEX,
                                                accum_dtype=torch.float32)


def _hf_model(model):
    """The HF model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


@functools.cache
def _takes_logits_to_keep(model_class) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
