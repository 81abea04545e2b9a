"""The serving engine's slot KV cache on small tensors: placement on join, moves on leave, per-row writes, the mask,
and growth. (Its parity with `generate` inside the engine is in test_engine.py.)"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from bigray.serve.kv_cache import SlotCache

HEADS, DIM = 2, 3


def prefill_cache(lengths: list[int], layers: int = 2) -> DynamicCache:
    """A left-padded prefill cache whose row i holds values 100 * i + position for its real tokens, 0 for padding."""
    width = max(lengths)
    cache = DynamicCache()
    for layer in range(layers):
        keys = torch.zeros(len(lengths), HEADS, width, DIM)
        for i, n in enumerate(lengths):
            keys[i, :, width - n :] = (100 * i + torch.arange(n, dtype=torch.float))[None, :, None]
        cache.update(keys, -keys, layer)
    return cache


def test_join_leave_write_and_mask():
    kv = SlotCache(num_layers=2, slots=4, context=96)
    group = prefill_cache([3, 5])
    kv.reserve(6, group.layers[0].keys)
    assert kv.capacity == 64 and kv.layers[0].keys.shape == (4, HEADS, 64, DIM)
    storage = kv.layers[0].keys.data_ptr()
    kv.put(0, group, 0, start=2)  # row 0 had 2 columns of padding
    kv.put(1, group, 1, start=0)
    keys = kv.layers[1].keys
    assert keys[0, 0, :3, 0].tolist() == [0, 1, 2] and keys[0, 0, 3:, 0].abs().sum() == 0
    assert keys[1, 0, :5, 0].tolist() == [100, 101, 102, 103, 104]
    assert torch.equal(kv.layers[1].values[1], -keys[1])

    lengths = torch.tensor([3, 5])
    mask = kv.prepare(lengths)
    assert mask.shape == (2, 1, 1, 6) and mask.dtype == keys.dtype
    visible = (mask[:, 0, 0] == 0).tolist()
    assert visible == [[True] * 4 + [False] * 2, [True] * 6]  # each row sees its tokens plus the new column
    new = torch.full((2, HEADS, 1, DIM), 7.0)
    k, v = kv.update(new, -new, 0)
    assert k.shape == (2, HEADS, 6, DIM) and k.data_ptr() == storage  # a view of the slots, not a copy
    assert kv.layers[0].keys[0, 0, 3, 0] == 7 and kv.layers[0].keys[1, 0, 5, 0] == 7  # each at its own length

    kv.move([1], [0], columns=6)  # row 0 left: the last row moves into its slot
    assert kv.layers[1].keys[0, 0, :5, 0].tolist() == [100, 101, 102, 103, 104] and kv.rows_copied == 3
    assert kv.layers[0].keys.data_ptr() == storage and kv.grown == 0


def test_capacity_doubles_up_to_the_context_keeping_rows():
    kv = SlotCache(num_layers=1, slots=2, context=96)
    group = prefill_cache([4], layers=1)
    kv.reserve(5, group.layers[0].keys)
    kv.put(1, group, 0, start=0)
    kv.reserve(70, kv.layers[0].keys)
    assert kv.capacity == 96 and kv.grown == 1  # 128 capped at the context
    assert kv.layers[0].keys[1, 0, :4, 0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="context of 96"):
        kv.reserve(97, kv.layers[0].keys)
