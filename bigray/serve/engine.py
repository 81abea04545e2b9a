"""A small continuous-batching generation engine over a Hugging Face causal LM with a KV cache.

Every in-flight sequence is one row of a single left-padded batch that shares one `DynamicCache`.
Each engine step runs one decode forward over all running rows; sequences that arrived meanwhile are
prefilled together and merged into the batch (their cache left-padded to the batch's length), and
finished or cancelled rows leave it. Rows carry their own attention-mask row and position ids, so a
sequence's tokens do not depend on what else is in the batch, and their own `torch.Generator`, so a
seeded request samples the same tokens whoever it shares the batch with.

The model runs in a worker thread; the asyncio side only queues requests and hands out events.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence generation settings (already validated by the HTTP layer)."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None = off; k = the sampled token's logprob plus the top k


@dataclass
class Event:
    """What one engine step produced for one sequence: new text (held back while it may still become a stop string)."""

    text: str
    token_ids: list[int]
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length" | "error"
    completion_tokens: int = 0
    error: str | None = None


class _Seq:
    __slots__ = ("index", "prompt", "params", "generator", "out", "loop", "ids", "sent", "cancelled", "done", "hold")

    def __init__(self, index, prompt, params, generator, out, loop):
        self.index, self.prompt, self.params, self.generator, self.out, self.loop = index, prompt, params, generator, out, loop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.cancelled = False
        self.done = False
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string may straddle tokens

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, (self.index, event))


class Engine:
    """Load an HF model dir (safetensors only) and generate for many concurrent requests in one batch."""

    def __init__(self, model_dir: str, *, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01, device: str | None = None,
                 dtype: str = "auto", num_threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        # use_safetensors=True: a dir holding only pickled .bin weights is refused rather than unpickled.
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                                          dtype=getattr(torch, dtype), attn_implementation="sdpa")
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        cfg = self.model.config
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or self.tokenizer.model_max_length)
        eos = {self.tokenizer.eos_token_id, *_as_list(getattr(cfg, "eos_token_id", None)),
               *_as_list(getattr(self.model.generation_config, "eos_token_id", None))}
        self.eos_ids = frozenset(i for i in eos if i is not None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self._decode = self.tokenizer.backend_tokenizer.decode if getattr(self.tokenizer, "is_fast", False) else self.tokenizer.decode
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._pending: deque[_Seq] = deque()
        self._rows: list[_Seq] = []
        self._mask = self._cache = self._next = self._pos = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "sequences": 0, "steps": 0, "batched_steps": 0, "max_batch_seen": 0, "prompt_tokens": 0, "generated_tokens": 0,
                      "cancelled": 0}

    # ---- asyncio side -------------------------------------------------------------------------------------

    def load(self) -> dict:
        """Sequences in the batch and waiting for a row right now."""
        return {"running": len(self._rows), "waiting": len(self._pending)}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_text(self, token_id: int) -> str:
        return self._decode([token_id])

    async def generate(self, items: list[tuple[list[int], SamplingParams]]) -> AsyncIterator[tuple[int, Event]]:
        """Run `items` (prompt ids, params) as sequences of one request; yields (item index, event) as tokens arrive.

        Leaving the iteration early (a disconnected client, a cancelled task) frees the sequences' batch rows.
        """
        loop = asyncio.get_running_loop()
        self._ensure_loop()
        out: asyncio.Queue = asyncio.Queue()
        seqs = [_Seq(i, list(prompt), p, self._generator(p.seed), out, loop) for i, (prompt, p) in enumerate(items)]
        with self._lock:
            self._pending.extend(seqs)
            self.stats["requests"] += 1
        self._wakeup.set()
        remaining = len(seqs)
        try:
            while remaining:
                index, event = await out.get()
                remaining -= event.finish_reason is not None
                yield index, event
        finally:
            for s in seqs:
                s.cancelled = True

    def _generator(self, seed: int | None):
        import torch

        g = torch.Generator(device=self.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        return g

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            if not self._rows and not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.batch_wait_timeout_s > 0 and self.max_batch_size > 1:
                    await asyncio.sleep(self.batch_wait_timeout_s)  # let concurrent arrivals join the first batch
            await asyncio.to_thread(self.step)

    # ---- model side (worker thread) -----------------------------------------------------------------------

    def step(self) -> None:
        """One decode step over the running rows, plus prefill of waiting sequences that fit; emits events."""
        import torch

        new: list[_Seq] = []
        try:
            with torch.inference_mode():
                self._drop_finished()  # cancelled since the last step
                if self._rows:
                    self._decode_step()
                    self._drop_finished()  # rows that just finished free their slot for this step's arrivals
                with self._lock:
                    free = self.max_batch_size - len(self._rows)
                    while self._pending and len(new) < free:
                        s = self._pending.popleft()
                        if not s.cancelled:
                            new.append(s)
                if new:
                    self._prefill(new)
                self._drop_finished()
        except Exception as exc:  # noqa: BLE001 - a failed step fails its sequences, never the replica
            for s in self._rows + [s for s in new if s not in self._rows]:
                s.emit(Event("", [], finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
            self._rows, self._mask, self._cache, self._next, self._pos = [], None, None, None, None

    def _prefill(self, seqs: list[_Seq]) -> None:
        import torch
        from transformers import DynamicCache

        width = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
        tokens = self._sample(logits, seqs)
        self.stats["sequences"] += len(seqs)
        self.stats["prompt_tokens"] += sum(len(s.prompt) for s in seqs)
        self._count(len(seqs))
        nxt, last = tokens.view(-1, 1), pos[:, -1] + 1
        if not self._rows:
            self._rows, self._mask, self._cache, self._next, self._pos = seqs, mask, cache, nxt, last
            return
        # Merge into the running batch: left-pad whichever cache is shorter (masked out), then stack rows.
        a, b = self._mask.shape[1], mask.shape[1]
        width = max(a, b)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self._rows = self._rows + seqs
        self._next = torch.cat([self._next, nxt])
        self._pos = torch.cat([self._pos, last])

    def _decode_step(self) -> None:
        import torch

        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        logits = self.model(input_ids=self._next, attention_mask=self._mask, position_ids=self._pos.view(-1, 1),
                            past_key_values=self._cache, use_cache=True).logits[:, -1]
        tokens = self._sample(logits, self._rows)
        self._count(len(self._rows))
        self._next = tokens.view(-1, 1)
        self._pos = self._pos + 1

    def _count(self, batch: int) -> None:
        self.stats["steps"] += 1
        self.stats["batched_steps"] += batch > 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], batch)

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._rows) if not (s.done or s.cancelled)]
        if len(keep) == len(self._rows):
            return
        # Rows whose client left before the sequence finished: evidence that a disconnect frees its slot.
        self.stats["cancelled"] += sum(s.cancelled and not s.done for s in self._rows)
        if not keep:
            self._rows, self._mask, self._cache, self._next, self._pos = [], None, None, None, None
            return
        import torch

        idx = torch.tensor(keep, device=self.device)
        mask = self._mask[idx]
        # Columns now padding in every remaining row are dead weight in each later attention.
        start = int((mask.sum(0) > 0).nonzero()[0])
        self._cache.batch_select_indices(idx)
        if start:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._next, self._pos = mask[:, start:], self._next[idx], self._pos[idx]

    def _sample(self, logits, seqs: list[_Seq]):
        """Pick each row's next token with its own params and generator, then turn it into an event."""
        import torch

        logits = logits.float()
        tokens = logits.argmax(-1)
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature > 0:
                row = logits[i] / p.temperature
                if 0 < p.top_k < row.numel():
                    row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], -math.inf)
                if p.top_p < 1.0:
                    sorted_row, order = torch.sort(row, descending=True)
                    cum = sorted_row.softmax(-1).cumsum(-1)
                    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                    drop = cum - sorted_row.softmax(-1) >= p.top_p
                    row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
                tokens[i] = torch.multinomial(row.softmax(-1), 1, generator=s.generator)[0]
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        logprobs = logits[want].log_softmax(-1) if want else None
        host = tokens.tolist()
        for j, i in enumerate(want):
            k = seqs[i].params.logprobs
            top = torch.topk(logprobs[j], k) if k else None
            entry = (float(logprobs[j, host[i]]), dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {})
            self._advance(seqs[i], host[i], entry)
        for i in set(range(len(seqs))) - set(want):
            self._advance(seqs[i], host[i], None)
        return tokens

    def _advance(self, s: _Seq, token: int, logprob) -> None:
        """Append one token to a sequence, detect EOS / stop strings / length, and emit the new text."""
        if s.cancelled:
            return
        self.stats["generated_tokens"] += 1
        finish = None
        if token in self.eos_ids:
            finish = "stop"
        else:
            s.ids.append(token)
        generated = len(s.ids) + (finish is not None)
        text = self._decode(s.ids)
        if s.params.stop:
            start = max(0, s.sent - s.hold)
            hits = [i for i in (text.find(stop, start) for stop in s.params.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and (generated >= s.params.max_tokens or len(s.prompt) + generated >= self.context):
            finish = "length"
        if finish is None:
            # Hold back what may still turn into a stop string, and a trailing partial UTF-8 character.
            end = len(text) - s.hold
            while end > s.sent and text[end - 1] == "\ufffd":
                end -= 1
        else:
            end = len(text)
            s.done = True
        delta = text[s.sent:end] if end > s.sent else ""
        s.sent = max(s.sent, end)
        s.emit(Event(delta, [token], [logprob] if logprob else [], finish, generated))


def _left_pad(t, width: int, dim: int = 2):
    """Zero-pad `t` on the left of `dim` up to `width` (KV tensors: dim 2; masks: dim 1)."""
    import torch.nn.functional as F

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [missing, 0]
    return F.pad(t, pad)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


_ids = itertools.count()


def request_id(prefix: str) -> str:
    """OpenAI-looking ids, unique per replica process."""
    import os

    return f"{prefix}-{os.getpid():x}{next(_ids):08x}"
