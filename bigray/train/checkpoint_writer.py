"""A DeepSpeed checkpoint engine that lets training step on while a checkpoint's files are written.

DeepSpeed's own decoupled writer (`"checkpoint": {"writer": {"decoupled": true}}`) needs its async-I/O op
(libaio, absent from CPU images) and commits the files only at the next optimizer step, after bigray would
have reported them to Ray Train. This one keeps a host copy of each state DeepSpeed hands it and writes the
files when its owner says (`write_all`, on a thread of bigray's `Checkpointer`), which knows when they are done.
"""

from __future__ import annotations

import copy

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def host_copy(obj):
    """`obj` with every tensor in its dicts, lists and tuples copied to host memory: a snapshot the next
    optimizer step cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = host_copy(v)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class HostCopyWriter(TorchCheckpointEngine):
    """`save` keeps a host copy of the state and its path; `write_all` writes them (torch.save, as DeepSpeed's
    default engine does)."""

    def __init__(self):
        super().__init__()
        self.queue: list[tuple[dict, str]] = []

    def save(self, state_dict, path: str):
        self.queue.append((host_copy(state_dict), path))

    def write_all(self) -> None:
        while self.queue:
            state, path = self.queue.pop(0)
            torch.save(state, path)
