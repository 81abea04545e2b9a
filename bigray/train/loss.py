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

Every implementation sums the cross-entropy over the labels that are not IGNORE_INDEX and divides by a
`normalizer` (default: their count, i.e. the mean). SFT rows bring a `loss_mask` (1 where a token is a
training target) and `segment_ids` (the document each token belongs to, for packed rows): `shift_rows` turns
them into labels (IGNORE_INDEX on non-targets and on a first token predicted from another document) and
per-document `position_ids`, from which transformers builds a block-diagonal causal mask (SDPA, eager) or
varlen cu_seqlens (flash-attention, on one flattened row), so attention never crosses a document.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True)
class ShiftedRows:
    """A model's inputs and labels from rows of seq_len + 1 token ids (numpy, int64, (B, seq_len) each)."""

    input_ids: np.ndarray
    labels: np.ndarray  # IGNORE_INDEX where a position predicts nothing
    position_ids: np.ndarray | None  # per-document positions for packed rows; None: 0..seq_len-1 in every row


def target_mask(tokens: np.ndarray, loss_mask: np.ndarray | None, segment_ids: np.ndarray | None) -> np.ndarray:
    """(B, S) bool: which next-token predictions count, for rows `tokens` (B, S + 1).

    Position j predicts token j + 1: it counts when `loss_mask[j + 1]` is 1 (the target token is a training target)
    and token j + 1 belongs to the same document as token j (no prediction across a packed document boundary).
    """
    keep = np.ones((tokens.shape[0], tokens.shape[1] - 1), dtype=bool)
    if loss_mask is not None:
        keep &= loss_mask[:, 1:] != 0
    if segment_ids is not None:
        keep &= segment_ids[:, 1:] == segment_ids[:, :-1]
    return keep


def count_targets(tokens: np.ndarray, loss_mask: np.ndarray | None, segment_ids: np.ndarray | None) -> int:
    """How many labels of rows `tokens` (B, S + 1) count (`target_mask`): B * S for rows without masks."""
    if loss_mask is None and segment_ids is None:
        return tokens.shape[0] * (tokens.shape[1] - 1)
    return int(target_mask(tokens, loss_mask, segment_ids).sum())


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 at every change of segment id along each row (B, S)."""
    index = np.broadcast_to(np.arange(segment_ids.shape[1]), segment_ids.shape)
    starts = np.ones(segment_ids.shape, dtype=bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


def shift_rows(tokens: np.ndarray, loss_mask: np.ndarray | None = None,
               segment_ids: np.ndarray | None = None) -> ShiftedRows:
    """Inputs tokens[:, :-1], labels tokens[:, 1:] masked by `target_mask`, positions from the input's segments."""
    tokens = tokens.astype(np.int64, copy=False)
    labels = tokens[:, 1:].copy()
    if loss_mask is not None or segment_ids is not None:
        labels[~target_mask(tokens, loss_mask, segment_ids)] = IGNORE_INDEX
    positions = None if segment_ids is None else segment_positions(segment_ids[:, :-1])
    return ShiftedRows(np.ascontiguousarray(tokens[:, :-1]), labels, positions)


def lm_loss(model, input_ids, labels, impl: str, position_ids=None, normalizer=None):
    """Cross-entropy of `model` predicting `labels` (B, S; IGNORE_INDEX skipped) from `input_ids` (B, S): the sum over
    counted labels divided by `normalizer` (a number or 0-d tensor; None: the count, i.e. the mean).

    `model`: an HF causal LM or a DeepSpeed engine around one; `impl`: a resolved implementation (IMPLS);
    `position_ids` (B, S): per-document positions of packed rows (transformers then masks attention per document).
    """
    import torch.nn.functional as F

    labels = labels.flatten()
    if normalizer is None:
        normalizer = (labels != IGNORE_INDEX).sum().clamp(min=1)
    # No KV cache: training never reads one, and with a cache transformers skips the packed-documents mask.
    kwargs = {"use_cache": False}
    if position_ids is not None:
        if _base_model(model).config._attn_implementation.startswith("flash_attention"):
            # transformers' flash-attention reads packed documents (varlen cu_seqlens from positions restarting at
            # 0) only in a batch of one row: padding-free, every row's documents in one sequence.
            input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
        kwargs["position_ids"] = position_ids
    if impl == "plain":
        logits = model(input_ids=input_ids, **kwargs).logits
        total = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / normalizer
    hidden = final_hidden_states(model, input_ids, **kwargs).flatten(0, 1)
    lm_head = _hf_model(model).get_output_embeddings()
    if impl == "chunked":
        return chunked_cross_entropy(lm_head, hidden, labels, normalizer=normalizer)
    if impl == "liger":
        return _liger_summed_cross_entropy(lm_head, hidden, labels) / normalizer
    raise ValueError(f"unknown loss impl {impl!r}; resolve it with resolve_loss_impl first")


def final_hidden_states(model, input_ids, **kwargs):
    """The decoder's last hidden states (after the final norm), without computing any logits.

    Goes through the model's (or engine's) own forward, so DeepSpeed's hooks, compile and activation checkpointing
    apply as for plain; `logits_to_keep` with no positions makes HF skip the `lm_head` matmul. `kwargs` go to the
    forward as they are (position_ids).
    """
    import torch

    model_class = type(_base_model(model))
    if not _takes_logits_to_keep(model_class):
        raise ConfigError(f"{model_class.__name__} has no logits_to_keep argument; use train.loss_impl=plain")
    no_positions = torch.empty(0, dtype=torch.long, device=input_ids.device)
    out = model(input_ids=input_ids, logits_to_keep=no_positions, output_hidden_states=True, **kwargs)
    return out.hidden_states[-1]


def chunk_tokens(n_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk: ceil(V/H) chunks, so one chunk's logits are about as large as the hidden states."""
    n_chunks = max(1, math.ceil(vocab_size / hidden_size))
    return max(1, math.ceil(n_tokens / n_chunks))


def chunked_cross_entropy(lm_head, hidden, labels, tokens_per_chunk: int | None = None, normalizer=None):
    """Cross-entropy of `lm_head(hidden)` (N, H) against `labels` (N,), one chunk's logits at a time: summed, divided
    by `normalizer` (None: the count of labels that are not IGNORE_INDEX, i.e. the mean)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    # out_features, not weight.shape: under ZeRO-3 the weight is an empty partition outside the module's forward.
    chunk = tokens_per_chunk or chunk_tokens(hidden.size(0), lm_head.out_features, hidden.size(1))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for h, y in zip(hidden.split(chunk), labels.split(chunk)):
        total = total + checkpoint(_summed_cross_entropy, lm_head, h, y, use_reentrant=False)
    return total / ((labels != IGNORE_INDEX).sum().clamp(min=1) if normalizer is None else normalizer)


def _summed_cross_entropy(lm_head, hidden, labels):
    import torch.nn.functional as F

    return F.cross_entropy(lm_head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _liger_summed_cross_entropy(lm_head, hidden, labels):
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
                                                reduction="sum", accum_dtype=torch.float32)


def _hf_model(model):
    """The HF model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def _base_model(model):
    """The transformers model itself: inside a DeepSpeed engine and a peft wrapper, if any."""
    model = _hf_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _takes_logits_to_keep(model_class) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
