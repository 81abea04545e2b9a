"""A small continuous-batching generation engine over a Hugging Face causal LM with a KV cache.

Every running sequence owns one slot (row) of a preallocated KV cache (`SlotCache`): its tokens sit in
columns 0..n-1 of its row, each decode step writes every row's new column at that row's own length,
and attention reads the first max(length) + 1 columns with a per-row mask. A sequence joining copies
only its own prefilled keys and values into a free slot; one leaving frees its slot by moving the last
row into the hole; neither copies the rest of the cache. Prompts are prefilled a chunk of columns per
step in a small cache of their own (at most `prefill_chunk_tokens` padded tokens), so a long prompt
never stalls the running streams. A sequence is admitted while the KV budget holds its worst case
(prompt + max_tokens); the rest wait, up to `max_waiting` sequences, after which new requests are
refused (`Overloaded`, HTTP 503). Rows carry their own positions and `torch.Generator`, so a
sequence's tokens do not depend on what else is in the batch, and a seeded request samples the same
tokens whoever it shares the batch with.

A failed step fails only the newest work: a failed prefill chunk fails the sequences being prefilled;
a failed decode (its half-written column lies beyond every row's length, so nothing needs undoing)
fails the newest row. `health()` reports an engine loop that stopped, a step running longer than
`step_timeout_s`, or `max_consecutive_failures` failed steps.

The model runs in a worker thread; the asyncio side only queues requests and hands out events.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from bigray.serve.metrics import EngineMetrics

log = logging.getLogger("bigray.serve")


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
    stream: bool = True  # False: one event when the sequence ends (its whole text), none per step


@dataclass
class Event:
    """What one engine step produced for one sequence: new text (held back while it may still become a stop string)."""

    text: str
    token_ids: list[int]
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length" | "error"
    completion_tokens: int = 0
    error: str | None = None


# NOTE: Ray exports metrics every few seconds: a gauge set or counter increment per step (hundreds a second) was
# work on the engine thread that no scrape could see. Histograms (TTFT, inter-token) still get every token.
METRICS_PERIOD_S = 0.5
PREFILL_PADDING_LIMIT = 2  # a prefill group's padded tokens may be at most this many times its prompt tokens


class Overloaded(Exception):
    """The engine's waiting queue is full: the client should retry after `retry_after_s`."""

    retry_after_s = 1


class Unhealthy(Exception):
    """The engine cannot generate (its loop stopped, or its steps keep failing)."""


class _OffsetDecoder:
    """Incremental detokenization for tokenizers without `DecodeStream`: decode only a short tail per token."""

    def __init__(self, decode):
        self.decode, self.ids, self.prefix, self.read = decode, [], 0, 0

    def step(self, token: int) -> str | None:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        now = self.decode(self.ids[self.prefix :])
        # A trailing U+FFFD is half a UTF-8 character: wait for the token that completes it.
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return None


class _Seq:
    __slots__ = (
        "index",
        "prompt",
        "params",
        "generator",
        "out",
        "loop",
        "ids",
        "text",
        "sent",
        "cancelled",
        "done",
        "hold",
        "decoder",
        "cost",
        "arrived",
        "last_token_at",
        "joined",
        "held",
    )

    def __init__(self, index, prompt, params, generator, out, loop, decoder):
        self.index, self.prompt, self.params, self.generator, self.out, self.loop = (
            index,
            prompt,
            params,
            generator,
            out,
            loop,
        )
        self.decoder = decoder
        self.ids: list[int] = []
        self.text = ""  # decoded so far (incrementally)
        self.sent = 0  # characters of `text` already emitted
        self.cancelled = False
        self.done = False
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string may straddle tokens
        self.cost = len(prompt) + params.max_tokens  # KV tokens this sequence may come to hold
        self.arrived = time.monotonic()
        self.last_token_at: float | None = None
        self.joined = 0  # order in which sequences joined the running batch (the newest fails first)
        self.held: Event | None = None  # what a non-streamed sequence generated so far (SamplingParams.stream)

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, (self.index, event))

    def fail(self, message: str) -> None:
        self.done = True
        self.emit(Event("", [], finish_reason="error", error=message))


class _Prefill:
    """Sequences being prefilled together, a chunk of columns per step, into their own cache."""

    def __init__(self, seqs: list[_Seq], pad_id: int, device):
        import torch
        from transformers import DynamicCache

        self.seqs = seqs
        width = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt) :] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt) :] = 1
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        self.done = 0  # columns already in the cache


class Engine:
    """Load an HF model dir (safetensors only) and generate for many concurrent requests in one batch.

    A peft adapter dir is served on its base (`base_model_dir`, else the local path adapter_config.json names).
    """

    def __init__(
        self,
        model_dir: str,
        *,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        device: str | None = None,
        dtype: str = "auto",
        num_threads: int | None = None,
        kv_token_budget: int | None = None,
        prefill_chunk_tokens: int = 512,
        max_waiting: int = 256,
        step_timeout_s: float = 120.0,
        max_consecutive_failures: int = 3,
        metrics: EngineMetrics | None = None,
        base_model_dir: str | None = None,
    ):
        import torch
        from transformers import AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        base_model_dir = base_model_dir or adapter_base(model_dir)  # a peft adapter dir: its base, if local
        self.model = load_model(model_dir, getattr(torch, dtype), base_model_dir)
        self.model.to(self.device).eval()
        has_tokenizer = os.path.exists(os.path.join(model_dir, "tokenizer_config.json"))
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_dir if has_tokenizer or not base_model_dir else base_model_dir, local_files_only=True
        )
        cfg = self.model.config
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or self.tokenizer.model_max_length)
        eos = {
            self.tokenizer.eos_token_id,
            *_as_list(getattr(cfg, "eos_token_id", None)),
            *_as_list(getattr(self.model.generation_config, "eos_token_id", None)),
        }
        self.eos_ids = frozenset(i for i in eos if i is not None)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        )
        fast = getattr(self.tokenizer, "is_fast", False)
        self._decode = self.tokenizer.backend_tokenizer.decode if fast else self.tokenizer.decode
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.kv_token_budget = kv_token_budget or max_batch_size * self.context
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_waiting = max_waiting
        self.step_timeout_s = step_timeout_s
        self.max_consecutive_failures = max_consecutive_failures
        self.metrics = metrics or EngineMetrics()
        self._pending: deque[_Seq] = deque()
        self._rows: list[_Seq] = []  # row i of the batch is slot i of the KV cache
        self._kv = None  # SlotCache, made at the first join
        self._next = self._lens = None  # per row: the token to feed next, and the tokens already in its slot
        self._joins = itertools.count(1)
        self._prefill: _Prefill | None = None
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped: BaseException | None = None  # what ended the engine thread
        self._closed = False
        self._reported_at = 0.0  # when the gauges and the token counter last went to `metrics`
        self._unreported_tokens = 0
        self._lock = threading.Lock()
        self._step_started: float | None = None
        self._failures = 0
        self._step_failed = False
        self._last_error = ""
        self.stats = {
            "requests": 0,
            "sequences": 0,
            "steps": 0,
            "batched_steps": 0,
            "max_batch_seen": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "cancelled": 0,
            "failed_steps": 0,
            "overloaded": 0,
            "step_seconds": 0.0,  # time spent in engine steps (the model, sampling, detokenization)
        }

    # ---- asyncio side -------------------------------------------------------------------------------------

    def load(self) -> dict:
        """Sequences running, being prefilled and waiting right now, and the KV tokens they reserve."""
        prefilling = self._prefill.seqs if self._prefill else []
        return {
            "running": len(self._rows),
            "prefilling": len(prefilling),
            "waiting": len(self._pending),
            "kv_tokens_reserved": sum(s.cost for s in self._rows) + sum(s.cost for s in prefilling),
            "kv_token_budget": self.kv_token_budget,
        }

    def health(self) -> str | None:
        """Why this engine cannot serve (Serve should replace the replica), or None when it is healthy."""
        if self._stopped is not None or self._thread is not None and not self._thread.is_alive():
            exc = self._stopped
            return f"the engine loop stopped ({type(exc).__name__}: {exc})" if exc else "the engine loop stopped"
        started = self._step_started
        if started is not None and time.monotonic() - started > self.step_timeout_s:
            took = time.monotonic() - started
            return f"an engine step has run for {took:.0f} s (limit serve.step_timeout_s={self.step_timeout_s:g})"
        if self._failures >= self.max_consecutive_failures:
            return f"{self._failures} engine steps failed in a row; last: {self._last_error}"
        return None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_text(self, token_id: int) -> str:
        return self._decode([token_id])

    async def generate(
        self, items: list[tuple[list[int], SamplingParams]], timeout_s: float | None = None
    ) -> AsyncIterator[tuple[int, Event]]:
        """Run `items` (prompt ids, params) as sequences of one request; yields (item index, event) as tokens arrive.

        Raises `Overloaded` when the waiting queue is full, `Unhealthy` when the engine loop has stopped,
        `ValueError` for a sequence the KV budget can never hold, and `TimeoutError` after `timeout_s`.
        Leaving the iteration early (a disconnected client, a cancelled task, a timeout) frees the sequences' rows.
        """
        loop = asyncio.get_running_loop()
        self._ensure_loop()
        out: asyncio.Queue = asyncio.Queue()
        seqs = [
            _Seq(i, list(prompt), p, self._generator(p.seed), out, loop, self._decoder())
            for i, (prompt, p) in enumerate(items)
        ]
        if (worst := max(s.cost for s in seqs)) > self.kv_token_budget:
            raise ValueError(
                f"prompt + max_tokens = {worst} tokens, more than this replica's KV budget of {self.kv_token_budget} "
                "(serve.kv_token_budget)"
            )
        with self._lock:
            if self._stopped is not None:  # the engine thread died after the check above
                raise Unhealthy(self.health())
            if sum(not s.cancelled for s in self._pending) + len(seqs) > self.max_waiting:
                self.stats["overloaded"] += 1
                raise Overloaded(
                    f"{len(self._pending)} sequences are already waiting (serve.max_waiting={self.max_waiting})"
                )
            self._pending.extend(seqs)
            self.stats["requests"] += 1
        self._wakeup.set()
        # One timer for the whole request (a sentinel in its queue), not a wait_for task per token: every extra
        # event-loop turn is one more GIL hand-off with the engine thread.
        timer = None if timeout_s is None else loop.call_later(timeout_s, out.put_nowait, (-1, None))
        remaining = len(seqs)
        try:
            while remaining:
                index, event = await out.get()
                if event is None:
                    raise TimeoutError(f"no answer within {timeout_s:g} s")
                remaining -= event.finish_reason is not None
                yield index, event
        finally:
            if timer is not None:
                timer.cancel()
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

    def _decoder(self):
        if getattr(self.tokenizer, "is_fast", False):
            from tokenizers.decoders import DecodeStream

            stream, backend = DecodeStream(skip_special_tokens=True), self.tokenizer.backend_tokenizer
            return _StreamStep(stream, backend)
        return _OffsetDecoder(self._decode)

    def close(self) -> None:
        """Let the engine thread end once the work in flight is done (the engine then refuses new work)."""
        self._closed = True
        self._wakeup.set()

    def _ensure_loop(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bigray-engine", daemon=True)
            self._thread.start()
        elif not self._thread.is_alive():
            # A stopped loop is not restarted: health() reports it and Serve replaces the replica.
            raise Unhealthy(self.health() or "the engine loop stopped")

    def _run(self) -> None:
        """The engine thread: steps back to back while there is work, sleeps on an Event when there is none.

        NOTE: one thread for the engine's life, not an `asyncio.to_thread` hop per step: each hop was two cross-thread
        wake-ups of the event loop (submit, result) per generated token, and in a Serve replica that loop's thread
        competes for the GIL with the replica's own threads. Tokens reach the loop once per step (`_deliver`).
        """
        try:
            while not self._closed:
                self._wakeup.clear()
                if not self._rows and not self._pending and self._prefill is None:
                    self._report()  # idle: the gauges show the empty engine, the counter every token
                    self._wakeup.wait()
                    if self._closed:
                        break
                    if self.batch_wait_timeout_s > 0 and self.max_batch_size > 1:
                        time.sleep(self.batch_wait_timeout_s)  # let concurrent arrivals join the first batch
                self.step()
        except BaseException as exc:
            self._stopped = exc
            # Nothing will answer these now: their clients hear it at once rather than at their timeout.
            with self._lock:
                stranded = [*self._rows, *(self._prefill.seqs if self._prefill else []), *self._pending]
                self._pending.clear()
            for s in stranded:
                if not s.done:
                    s.fail(f"the engine loop stopped ({type(exc).__name__}: {exc})")
            log.error("the engine loop stopped; health checks fail from now on", exc_info=exc)

    # ---- model side (worker thread) -----------------------------------------------------------------------

    def step(self) -> None:
        """One decode forward over the running rows and one prefill chunk of the sequences being admitted."""
        import torch

        self._step_started = time.monotonic()
        self._step_failed = False
        ok, worked = True, False
        try:
            with torch.inference_mode():
                self._drop_finished()  # cancelled since the last step
                if self._rows:
                    worked = True
                    ok &= self._guarded(self._decode_step, self._fail_newest_row)
                    self._drop_finished()  # rows that just finished free their slot and budget for admission
                if self._prefill is None:
                    self._admit()
                if self._prefill is not None:
                    worked = True
                    ok &= self._guarded(self._prefill_chunk, self._fail_prefill)
                self._drop_finished()
        finally:
            self.stats["step_seconds"] += time.monotonic() - self._step_started
            self._step_started = None
        if worked and ok:  # an idle turn of the loop proves nothing: it must not end a run of failures
            self._failures = 0
        if time.monotonic() - self._reported_at >= METRICS_PERIOD_S:
            self._report()

    def _report(self) -> None:
        """Occupancy gauges and the generated-tokens counter, at most every METRICS_PERIOD_S while busy."""
        self._reported_at = time.monotonic()
        tokens, self._unreported_tokens = self._unreported_tokens, 0
        self.metrics.load(len(self._pending), len(self._rows), sum(len(s.prompt) + len(s.ids) for s in self._rows))
        self.metrics.generated(tokens)

    def _guarded(self, work, on_error) -> bool:
        """Run one forward; on an exception (an OOM, a CUDA error) undo it for everyone but the newest work."""
        try:
            work()
            return True
        except Exception as exc:  # noqa: BLE001 - a failed forward fails its newest sequences, never the replica
            self.stats["failed_steps"] += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            self.metrics.error(type(exc).__name__)
            if not self._step_failed:  # counted before on_error tells the client, so health() already knows
                self._step_failed = True
                self._failures += 1
            on_error(self._last_error)
            return False

    def _admit(self) -> None:
        """Start prefilling the waiting sequences (in arrival order) that fit in free rows and the KV budget."""
        with self._lock:
            free = self.max_batch_size - len(self._rows)
            budget = self.kv_token_budget - sum(s.cost for s in self._rows)
            new: list[_Seq] = []
            width = tokens = 0
            while self._pending and len(new) < free:
                s = self._pending[0]
                if s.cancelled:
                    self._pending.popleft()
                    continue
                if s.cost > budget:
                    break  # first come, first served: a large request is not overtaken for ever by small ones
                # Prompts are left-padded to the group's longest: a prompt that would make padding more than half
                # of the group's prefill work starts the next group instead (mixed 8..1024-token prompts).
                if new and (len(new) + 1) * max(width, len(s.prompt)) > PREFILL_PADDING_LIMIT * (
                    tokens + len(s.prompt)
                ):
                    break
                budget -= s.cost
                width, tokens = max(width, len(s.prompt)), tokens + len(s.prompt)
                new.append(self._pending.popleft())
        if new:
            self._prefill = _Prefill(new, self.pad_id, self.device)

    def _prefill_chunk(self) -> None:
        g = self._prefill
        width = g.ids.shape[1]
        end = min(width, g.done + max(1, self.prefill_chunk_tokens // len(g.seqs)))
        # logits_to_keep=1: only the last position's logits are read; the full [rows, cols, vocab] is never made.
        logits = self.model(
            input_ids=g.ids[:, g.done : end],
            attention_mask=g.mask[:, :end],
            position_ids=g.pos[:, g.done : end],
            past_key_values=g.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        g.done = end
        if end < width:
            return
        tokens = self._sample(logits, g.seqs)
        self.stats["sequences"] += len(g.seqs)
        self.stats["prompt_tokens"] += sum(len(s.prompt) for s in g.seqs)
        self._merge(g, tokens.view(-1, 1))
        self._prefill = None  # only now: a failed join still fails this group (_fail_prefill), not a running row

    def _merge(self, g: _Prefill, nxt) -> None:
        """Copy each prefilled sequence's own columns (not its left padding) into the next free slot."""
        import torch

        from bigray.serve.kv_cache import SlotCache

        if self._kv is None:
            self._kv = SlotCache(len(g.cache.layers), self.max_batch_size, self.context)
        lengths = [len(s.prompt) for s in g.seqs]
        self._kv.reserve(max(lengths) + 1, g.cache.layers[0].keys)
        width = g.ids.shape[1]
        for i, s in enumerate(g.seqs):
            self._kv.put(len(self._rows) + i, g.cache, i, width - lengths[i])
            s.joined = next(self._joins)
        lens = torch.tensor(lengths, device=self.device)
        if self._rows:
            self._next, self._lens = torch.cat([self._next, nxt]), torch.cat([self._lens, lens])
        else:
            self._next, self._lens = nxt, lens
        self._rows = self._rows + g.seqs

    def _decode_step(self) -> None:
        # Every row writes its new column at its own length: rows of any length share the step, no padding.
        self._kv.reserve(int(self._lens.max()) + 1, self._kv.layers[0].keys)
        mask = self._kv.prepare(self._lens)
        logits = self.model(
            input_ids=self._next,
            attention_mask=mask,
            position_ids=self._lens.view(-1, 1),
            past_key_values=self._kv,
            use_cache=True,
        ).logits[:, -1]
        # A failure above leaves this step's column written beyond each row's length: masked and overwritten later.
        tokens = self._sample(logits, self._rows)
        self._next = tokens.view(-1, 1)
        self._lens = self._lens + 1

    def _fail_newest_row(self, message: str) -> None:
        max(self._rows, key=lambda s: s.joined).fail(message)

    def _fail_prefill(self, message: str) -> None:
        for s in self._prefill.seqs:
            s.fail(message)
        self._prefill = None

    def _count(self, batch: int) -> None:
        self.stats["steps"] += 1
        self.stats["batched_steps"] += batch > 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], batch)

    def _drop_finished(self) -> None:
        gone = [i for i, s in enumerate(self._rows) if s.done or s.cancelled]
        if not gone:
            return
        # Rows whose client left before the sequence finished: evidence that a disconnect frees its slot.
        self.stats["cancelled"] += sum(self._rows[i].cancelled and not self._rows[i].done for i in gone)
        keep = len(self._rows) - len(gone)
        if not keep:
            self._rows, self._next, self._lens = [], None, None
            return
        import torch

        # The rows beyond the new end that survive move into the holes below it: one row's copy each.
        holes = [i for i in gone if i < keep]
        dropped = set(gone)
        movers = [i for i in range(keep, len(self._rows)) if i not in dropped]
        order = list(range(keep))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if movers:
            self._kv.move(movers, holes, int(self._lens[movers].max()))
        idx = torch.tensor(order, device=self.device)
        self._rows = [self._rows[i] for i in order]
        self._next, self._lens = self._next[idx], self._lens[idx]

    def _sample(self, logits, seqs: list[_Seq]):
        """Pick every row's next token in one pass (each row's own params and generator), then emit the events."""
        self._count(len(seqs))
        logits = logits.float()
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        host = tokens.tolist()
        entries: list = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            logprobs = logits[want].log_softmax(-1)
            k = max(seqs[i].params.logprobs for i in want)
            top = logprobs.topk(k, -1) if k else None
            chosen = logprobs.gather(1, tokens[want].view(-1, 1)).view(-1).tolist()
            top_ids, top_vals = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
            for j, i in enumerate(want):
                n = seqs[i].params.logprobs
                entries[i] = (chosen[j], dict(zip(top_ids[j][:n], top_vals[j][:n])) if n else {})
        now = time.monotonic()
        generated = 0
        outbox: dict = {}
        for s, token, entry in zip(seqs, host, entries):
            generated += self._advance(s, token, entry, now, outbox)
        # One wake-up per event loop per step, not one per token: the loop also serves HTTP.
        for loop, events in outbox.items():
            loop.call_soon_threadsafe(_deliver, events)
        self._unreported_tokens += generated
        return tokens

    def _advance(self, s: _Seq, token: int, logprob, now: float, outbox: dict) -> int:
        """Append one token to a sequence, detect EOS / stop strings / length, and emit the new text."""
        if s.cancelled or s.done:
            return 0
        self.stats["generated_tokens"] += 1
        if s.last_token_at is None:
            self.metrics.first_token(now - s.arrived)
        else:
            self.metrics.inter_token(now - s.last_token_at)
        s.last_token_at = now
        finish = None
        if token in self.eos_ids:
            finish = "stop"
        else:
            s.ids.append(token)
            piece = s.decoder.step(token)
            if piece:
                s.text += piece
        generated = len(s.ids) + (finish is not None)
        text = s.text
        if s.params.stop:
            start = max(0, s.sent - s.hold)
            hits = [i for i in (text.find(stop, start) for stop in s.params.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and (generated >= s.params.max_tokens or len(s.prompt) + generated >= self.context):
            finish = "length"
        if finish is None:
            end = len(text) - s.hold  # what may still turn into a stop string stays back
        else:
            if finish == "length" or text is s.text:
                # The one full decode of the sequence, so the final text is exactly what decode() gives.
                text = self._decode(s.ids)
            end = len(text)
            s.done = True
        delta = text[s.sent : end] if end > s.sent else ""
        s.sent = max(s.sent, end)
        if s.params.stream:
            event = Event(delta, [token], [logprob] if logprob else [], finish, generated)
        else:
            # NOTE: a non-streamed answer is read only whole, so it costs its event loop one wake-up, not one per
            # step: in a Serve replica that loop's thread takes the GIL from this one at every wake-up.
            event = s.held or Event("", [])
            event.text += delta
            event.token_ids.append(token)
            if logprob:
                event.logprobs.append(logprob)
            event.finish_reason, event.completion_tokens = finish, generated
            if finish is None:
                s.held = event
                return 1
        outbox.setdefault(s.loop, []).append((s.out, (s.index, event)))
        return 1


class _StreamStep:
    """`tokenizers.decoders.DecodeStream` bound to its tokenizer: `.step(token)` returns the new text or None."""

    __slots__ = ("stream", "tokenizer")

    def __init__(self, stream, tokenizer):
        self.stream, self.tokenizer = stream, tokenizer

    def step(self, token: int) -> str | None:
        return self.stream.step(self.tokenizer, token)


def adapter_base(model_dir: str) -> str | None:
    """The base model a peft adapter dir names (adapter_config.json's base_model_name_or_path); None for a model dir."""
    path = os.path.join(model_dir, "adapter_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{model_dir}: adapter_config.json names no base_model_name_or_path")
    return base


def load_model(model_dir: str, dtype, base_model_dir: str | None = None):
    """`model_dir`'s causal LM; with `base_model_dir` (a peft adapter dir's base, local) the adapter is merged into
    the base at load, so serving it costs what the merged model costs: no LoRA matmuls per token."""
    from transformers import AutoModelForCausalLM

    # use_safetensors=True: a dir holding only pickled .bin weights is refused rather than unpickled.
    load = dict(local_files_only=True, use_safetensors=True, dtype=dtype, attn_implementation="sdpa")
    if base_model_dir is None:
        return AutoModelForCausalLM.from_pretrained(model_dir, **load)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, **load)
    return PeftModel.from_pretrained(base, model_dir, is_trainable=False).merge_and_unload()


def sample(logits, params: list[SamplingParams], generators: list):
    """Next tokens for a batch of float logits: argmax where temperature is 0, else temperature / top-k / top-p
    sampling, vectorised over rows; each row draws its one uniform number from its own generator."""
    import torch

    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return tokens
    vocab = logits.shape[-1]
    device = logits.device
    temperature = torch.tensor([params[i].temperature for i in rows], device=device)
    top_k = torch.tensor([params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in rows], device=device)
    top_p = torch.tensor([params[i].top_p for i in rows], device=device)
    x = logits[rows] / temperature[:, None]
    x, order = x.sort(-1, descending=True)
    x = x.masked_fill(torch.arange(vocab, device=device)[None] >= top_k[:, None], -float("inf"))
    probs = x.softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], 0.0)
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=generators[i], device=device) for i in rows]) * cdf[:, -1]
    picked = torch.searchsorted(cdf, u[:, None]).clamp(max=vocab - 1)
    tokens[rows] = order.gather(1, picked).view(-1)
    return tokens


def _deliver(events: list) -> None:
    for queue, item in events:
        queue.put_nowait(item)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


_ids = itertools.count()


def request_id(prefix: str) -> str:
    """OpenAI-looking ids, unique per replica process."""
    return f"{prefix}-{os.getpid():x}{next(_ids):08x}"
