"""What bigray prints: summaries, tables, sparklines and live training progress.

The CLI and the demo both print through here, so presentation lives apart from dispatch
(`bigray/cli.py`) and from the stages, which return typed results and print nothing themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from bigray.data.prepare import PrepareResult
    from bigray.plan import PlanResult
    from bigray.train.export import ExportResult
    from bigray.train.trainer import TrainResult
    from bigray.tune import TuneResult


def console() -> Console:
    return Console(soft_wrap=True, highlight=False)


def sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in values)


def stage(name: str) -> None:
    print(f"\n=== {name} ===", flush=True)


def prepare_summary(result: PrepareResult) -> None:
    docs = Table(title=f"bigray prepare -> {result.output}", title_justify="left")
    docs.add_column("documents")
    docs.add_column("count", justify="right")
    docs.add_column("first seen at", overflow="fold")
    docs.add_row("read", f"{result.docs_read:,}", "")
    docs.add_row("kept", f"{result.docs_kept:,}", "")
    for reason, count in result.dropped.items():
        docs.add_row(f"dropped: {reason}", f"{count:,}", result.drop_examples.get(reason, ""), style="yellow")
    splits = Table()
    for col in ("split", "rows", "tokens", "shards", "MB"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, split in result.splits.items():
        splits.add_row(name, f"{split.rows:,}", f"{split.tokens:,}", str(split.shards), f"{split.bytes / 1e6:,.1f}")
    out = console()
    out.print(docs)
    out.print(splits)
    out.print(f"{result.tokens_kept:,} tokens in {result.wall_s:.1f} s = {result.tokens_per_s:,.0f} tokens/s "
              f"(seq_len {result.seq_len}, tokenizer vocab {result.vocab_size})")


def train_summary(out: TrainResult) -> None:
    first, last = out.first, out.last
    print(f"run: {out.run_dir}")
    print(
        f"steps {last.get('step')}: loss {first.get('loss', float('nan')):.4f} -> {last.get('loss', float('nan')):.4f}"
        + (f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else "")
        + f", {last.get('tokens_per_s', 0):,.0f} tokens/s, {out.wall_s:.0f} s"
    )
    if out.export:
        export_line(out.export)


def export_line(exp: ExportResult) -> None:
    kind = "LoRA adapter " if exp.adapter_only else ""
    merged = f", LoRA merge |diff| {exp.merge_max_abs_diff:.2e}" if exp.merge_max_abs_diff is not None else ""
    task = f", Ray task reserved {exp.reserved_memory_gib:.1f} GiB" if exp.reserved_memory_gib is not None else ""
    print(f"export: {kind}{exp.out_dir} from {exp.checkpoint} "
          f"(step {exp.step}, probe logits max |diff| {exp.probe_max_abs_diff:.2e}{merged}{task})")


def tune_table(out: TuneResult) -> None:
    """One row per trial, best first (compared at `best_step`); the best in green."""
    keys = list(out.best.params)
    table = Table(
        title=f"bigray tune -> {out.sweep_dir} ({out.scheduler}, {len(out.trials)} trials, {out.wall_s:.0f} s)",
        title_justify="left",
    )
    for col in ["trial", *keys, out.metric, "step", "status"]:
        table.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for t in out.trials:
        params = (f"{v:.4g}" if isinstance(v, float) else str(v) for v in (t.params.get(k) for k in keys))
        style = "bold green" if t is out.best else None
        table.add_row(t.trial_id, *params, f"{t.metric:.4f}", str(t.step), t.status, style=style)
    console().print(table)


def tune_summary(out: TuneResult) -> None:
    print(f"results: {out.results_csv}")
    print(f"plot:    {out.plot}")
    print(f"best:    {out.best_yaml} (trial {out.best_trial}, {out.metric} {out.best_metric:.4f} "
          f"at step {out.best_step}; run it with bigray train -c {out.best_yaml})")
    print(f"export:  {out.best_export} (step {out.best_step})")
    print(f"bigray serve serve.model={out.best_export}")


def plan_summary(result: PlanResult) -> None:
    """`bigray plan`: GiB per GPU by category for the config as given and for the proposal, then the verdict."""
    from bigray.plan import GIB

    plans = [("as configured", result.plan)] + ([("proposed", result.proposal)] if result.proposal else [])
    table = Table(title=f"bigray plan: {result.model}, {result.shape.n_params / 1e9:.2f} B parameters, "
                        f"per GPU of {result.plan.world}", title_justify="left")
    table.add_column("GiB per GPU")
    for name, _ in plans:
        table.add_column(name, justify="right")
    rows = [
        ("micro batch x accumulation", lambda p: f"{p.micro_batch_size} x {p.grad_accum_steps}"),
        ("ZeRO stage, offload", lambda p: f"{p.zero_stage}" + (", optimizer" if p.offload_optimizer else "")
         + (", params" if p.offload_params else "")),
        ("activation checkpointing", lambda p: "yes" if p.activation_checkpointing else "no"),
        ("loss, precision", lambda p: f"{p.loss_impl}, {p.precision}"),
        ("weights", lambda p: f"{p.params / GIB:.2f}"),
        ("gradients", lambda p: f"{p.grads / GIB:.2f}"),
        ("optimizer states", lambda p: f"{p.optimizer / GIB:.2f}"),
        ("DeepSpeed buckets, gathered params", lambda p: f"{p.buckets / GIB:.2f}"),
        ("activations saved", lambda p: f"{p.activations / GIB:.2f}"),
        ("logits + loss (backward peak)", lambda p: f"{p.logits / GIB:.2f}"),
        ("layer backward (recompute, grads)", lambda p: f"{p.layer_backward / GIB:.2f}"),
        ("peak allocated (torch)", lambda p: f"{p.peak_allocated / GIB:.2f}"),
        ("CUDA context, fragmentation", lambda p: f"{p.reserved / GIB:.2f}"),
        ("total", lambda p: f"{p.total / GIB:.2f}"),
        ("in CPU RAM (offload)", lambda p: f"{p.cpu_offloaded / GIB:.2f}"),
        ("tokens/s per GPU (all GPUs)", lambda p: "-" if p.tokens_per_s is None else
         f"{p.tokens_per_s:,.0f} ({p.tokens_per_s * p.world:,.0f})"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(p) for _, p in plans), style="bold" if label == "total" else None)
    out = console()
    out.print(table)
    for note in result.notes:
        out.print(f"- {note}")
    if result.plan.fits is not False:  # a config that does not fit is the CLI's error message
        out.print(result.verdict, style="green" if result.plan.fits else "yellow")


class TrainProgress:
    """Live training progress on the driver, fed each metrics record as Ray Train reports it.

    A rich progress bar on a terminal; one plain line per record otherwise (CI logs, `ray job logs`).
    """

    def __init__(self, max_steps: int, start_step: int = 0, tty: bool | None = None):
        import sys

        self.max_steps = max_steps
        self.start_step = start_step
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.bar = None
        self.val_loss: float | None = None

    def __enter__(self) -> TrainProgress:
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeRemainingColumn(),
                console=console(),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("", total=self.max_steps, completed=self.start_step)
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, record: dict) -> None:
        import time

        step = record.get("step", 0)
        if record.get("val_loss") is not None:
            self.val_loss = record["val_loss"]
        parts = [f"loss {record['loss']:.4f}"] if record.get("loss") is not None else []
        if self.val_loss is not None:
            parts.append(f"val_loss {self.val_loss:.4f}")
        if record.get("tokens_per_s"):
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if record.get("mfu"):
            parts.append(f"MFU {record['mfu']:.1%}")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description="  ".join(parts))
            return
        # The rate since the first record: start-up (workers, DeepSpeed, the first batch) is not a step.
        now = time.monotonic()
        self.first = getattr(self, "first", None) or (step, now)
        done = step - self.first[0]
        eta = (now - self.first[1]) / done * (self.max_steps - step) if done > 0 else None
        parts.append(f"ETA {_duration(eta)}" if eta is not None else "ETA ?")
        print(f"step {step}/{self.max_steps}  " + "  ".join(parts), flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
