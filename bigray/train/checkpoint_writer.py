"""A DeepSpeed checkpoint engine that lets training step on while a checkpoint's files are written.

DeepSpeed's own decoupled writer (`"checkpoint": {"writer": {"decoupled": true}}`) needs its async-I/O op
(libaio, absent from CPU images) and commits the files only at the next optimizer step, after bigray would
have reported them to Ray Train. This one keeps a host copy of each state DeepSpeed hands it and writes the
files when its owner says (`write_all`, on a thread of bigray's `Checkpointer`), which knows when they are done.
"""

from __future__ import annotations

import copy
import os
import sys
import threading

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def host_copy(obj, reuse=None, stream=None):
    """`obj` with every tensor in its dicts, lists and tuples copied to host memory: a snapshot the next
    optimizer step cannot change.

    A tensor of `reuse` (the previous snapshot of the same state) at the same place, of the same shape and dtype,
    is copied into rather than allocated: a fresh 1 GB buffer costs its page faults on every checkpoint (0.2-0.9 s
    per 640 MB on the 2-core box, against 0.04 s into a reused one). CUDA tensors go to pinned buffers with
    non-blocking copies on `stream`; the caller waits for the stream before the copies are read or the sources
    change (`HostCopyWriter.wait_copied`).
    """
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if (isinstance(reuse, torch.Tensor) and reuse.shape == src.shape and reuse.dtype == src.dtype
                and reuse.is_pinned() == src.is_cuda):
            out = reuse
        else:
            out = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.is_cuda)
        if src.is_cuda:
            src.record_stream(stream)  # a temporary the caller drops must outlive the copy queued on `stream`
            out.copy_(src, non_blocking=True)
        else:
            out.copy_(src)
        return out
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = host_copy(v, reuse.get(k) if isinstance(reuse, dict) else None, stream)
        return out
    if type(obj) in (list, tuple):
        olds = reuse if type(reuse) is type(obj) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(host_copy(v, old, stream) for v, old in zip(obj, olds))
    return obj


def yield_cpu() -> None:
    """Lower the calling thread's CPU priority to the lowest (nice 19), so that a training thread it competes
    with for a core runs first (Linux: a thread's own id is a valid `setpriority` target; elsewhere nothing)."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class HostCopyWriter(TorchCheckpointEngine):
    """`save` keeps a host copy of the state and its path; `write_all` writes them (torch.save, as DeepSpeed's
    default engine does).

    One writer serves a run's checkpoints: each snapshot reuses the previous one's buffers (kept in `buffers` by
    file name, the run's host memory for one checkpoint of this rank), so the owner must let a `write_all`
    finish before the next checkpoint's `save`s.
    """

    def __init__(self):
        super().__init__()
        self.queue: list[tuple[dict, str]] = []
        self.buffers: dict[str, dict] = {}
        self.stream = None  # CUDA: the side stream the copies of the latest checkpoint were queued on
        self.copied = None  # CUDA: an event recorded after them

    def save(self, state_dict, path: str):
        name = os.path.basename(path)  # the same file in every checkpoint of this rank
        if self.stream is None and _on_cuda(state_dict):
            self.stream = torch.cuda.Stream()
        if self.stream is None:
            snapshot = host_copy(state_dict, self.buffers.get(name))
        else:
            # After what the training stream queued so far (DeepSpeed may build parts of the state just now).
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                snapshot = host_copy(state_dict, self.buffers.get(name), self.stream)
            copied = torch.cuda.Event()
            copied.record(self.stream)
            self.copied = copied  # the stream runs in order: the latest event covers every earlier copy
        self.buffers[name] = snapshot
        self.queue.append((snapshot, path))

    def wait_copied(self) -> None:
        """Block until the host copies queued so far are complete (at once on CPU). Any thread may call it."""
        copied = self.copied
        if copied is not None:
            copied.synchronize()

    def write_all(self) -> None:
        self.wait_copied()
        while self.queue:
            state, path = self.queue.pop(0)
            torch.save(state, path)


def before_next_step(optimizer, fn) -> None:
    """Call `fn` once, just before `optimizer` next changes its states (a step pre-hook on the torch optimizer that
    DeepSpeed's ZeRO and fp16 wrappers hold as `.optimizer`); at once if there is no torch optimizer to hook."""
    base = optimizer
    while not isinstance(base, torch.optim.Optimizer) and hasattr(base, "optimizer"):
        base = base.optimizer
    if not isinstance(base, torch.optim.Optimizer):
        fn()
        return
    handle = None

    def hook(*_):
        handle.remove()
        fn()

    handle = base.register_step_pre_hook(hook)


def _on_cuda(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.is_cuda
    if isinstance(obj, dict):
        return any(_on_cuda(v) for v in obj.values())
    if type(obj) in (list, tuple):
        return any(_on_cuda(v) for v in obj)
    return False
