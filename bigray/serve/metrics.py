"""Prometheus metrics of a serving replica, through Ray Serve's metrics API (`ray.serve.metrics`).

Ray exports them on every node's metrics endpoint (`ray metrics launch-prometheus`, the dashboard's
Grafana panels) with Serve's own deployment / replica / application tags added. The engine calls an
`EngineMetrics`; the base class records nothing, so the engine runs without Ray (unit tests, benchmarks).
"""

from __future__ import annotations

# Seconds: from a few ms per token on a GPU to minutes for a queued request on a busy CPU replica.
_LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class EngineMetrics:
    """What the engine reports; this base records nothing."""

    def first_token(self, seconds: float) -> None:
        """Time from a sequence's arrival to its first generated token (TTFT)."""

    def inter_token(self, seconds: float) -> None:
        """Time between two tokens of one sequence (ITL)."""

    def generated(self, tokens: int) -> None:
        """Tokens generated since the last report (the engine reports every half second while busy, and when idle)."""

    def error(self, kind: str) -> None:
        """One failure, by type (an exception class name, `overloaded`, `timeout`, an HTTP error type)."""

    def load(self, waiting: int, running: int, kv_tokens: int) -> None:
        """The engine's occupancy after a step: queued sequences, batch rows, KV-cache tokens held."""


class ServeMetrics(EngineMetrics):
    """The same reports as Ray Serve metrics, tagged with the served model's name."""

    def __init__(self, model: str):
        from ray.serve.metrics import Counter, Gauge, Histogram

        tags = ("model",)
        self._ttft = Histogram(
            "bigray_serve_time_to_first_token_seconds",
            "Arrival to first generated token, per sequence",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=tags,
        )
        self._itl = Histogram(
            "bigray_serve_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=tags,
        )
        self._tokens = Counter("bigray_serve_generated_tokens", "Tokens generated", tag_keys=tags)
        self._errors = Counter(
            "bigray_serve_errors", "Failed requests and engine steps, by type", tag_keys=(*tags, "type")
        )
        self._waiting = Gauge(
            "bigray_serve_queue_depth", "Sequences waiting in the engine for a batch row or KV budget", tag_keys=tags
        )
        self._running = Gauge("bigray_serve_running_rows", "Sequences in the engine's running batch", tag_keys=tags)
        self._kv = Gauge(
            "bigray_serve_kv_tokens_in_use", "Tokens held in the KV cache by running sequences", tag_keys=tags
        )
        for metric in (self._ttft, self._itl, self._tokens, self._errors, self._waiting, self._running, self._kv):
            metric.set_default_tags({"model": model})

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def generated(self, tokens: int) -> None:
        if tokens:
            self._tokens.inc(tokens)

    def error(self, kind: str) -> None:
        self._errors.inc(1, tags={"type": kind})

    def load(self, waiting: int, running: int, kv_tokens: int) -> None:
        self._waiting.set(waiting)
        self._running.set(running)
        self._kv.set(kv_tokens)
