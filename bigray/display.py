"""What bigray prints: summaries, tables, sparklines and live training progress.

The CLI and the demo both print through here, so presentation lives apart from dispatch
(`bigray/cli.py`) and from the stages, which return typed results and print nothing themselves.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def console() -> Console:
    return Console(soft_wrap=True, highlight=False)


def sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in values)


def stage(name: str) -> None:
    print(f"\n=== {name} ===", flush=True)


def prepare_summary(result: dict) -> None:
    stats = result["stats"]
    docs = Table(title=f"bigray prepare -> {result['output']}", title_justify="left")
    docs.add_column("documents")
    docs.add_column("count", justify="right")
    docs.add_column("first seen at", overflow="fold")
    docs.add_row("read", f"{stats['docs_read']:,}", "")
    docs.add_row("kept", f"{stats['docs_kept']:,}", "")
    for reason, count in stats["dropped"].items():
        docs.add_row(f"dropped: {reason}", f"{count:,}", stats["drop_examples"].get(reason, ""), style="yellow")
    splits = Table()
    for col in ("split", "rows", "tokens", "shards", "MB"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, split in result["splits"].items():
        size = sum(s["bytes"] for s in split["shards"])
        splits.add_row(name, f"{split['rows']:,}", f"{split['tokens']:,}", str(len(split["shards"])), f"{size / 1e6:,.1f}")
    out = console()
    out.print(docs)
    out.print(splits)
    out.print(f"{stats['tokens_kept']:,} tokens in {result['wall_s']:.1f} s = {result['tokens_per_s']:,.0f} tokens/s "
              f"(seq_len {result['seq_len']}, tokenizer vocab {result['tokenizer']['vocab_size']})")


def train_summary(out: dict) -> None:
    first, last = out["first"], out["metrics"]
    print(f"run: {out['run_dir']}")
    print(f"steps {last.get('step')}: loss {first.get('loss', float('nan')):.4f} -> {last.get('loss', float('nan')):.4f}"
          + (f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else "")
          + f", {last.get('tokens_per_s', 0):,.0f} tokens/s, {out['wall_s']:.0f} s")
    if out["export"]:
        export_line(out["export"])


def export_line(exp: dict) -> None:
    source = f" from {exp['checkpoint']}" if exp.get("checkpoint") else ""
    print(f"export: {exp['out_dir']}{source} (step {exp['step']}, probe logits max |diff| {exp['probe_max_abs_diff']:.2e})")


def tune_table(out: dict, metric: str, scheduler: str, keys: list[str]) -> None:
    table = Table(title=f"bigray tune -> {out['sweep_dir']} ({scheduler}, {len(out['trials'])} trials, {out['wall_s']:.0f} s)",
                  title_justify="left")
    for col in ["trial", *keys, metric, "step", "status"]:
        table.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for t in out["trials"]:  # already sorted by the metric, best first
        status = "stopped early" if t["stopped_early"] else t["status"].lower()
        params = (f"{t['params'].get(k):.4g}" if isinstance(t["params"].get(k), float) else str(t["params"].get(k)) for k in keys)
        table.add_row(t["trial_id"], *params, f"{t['metric']:.4f}", str(t["step"]), status,
                      style="bold green" if t["trial_id"] == out["best_trial"] else None)
    console().print(table)


def tune_summary(out: dict, metric: str) -> None:
    print(f"results: {out['results_csv']}")
    print(f"plot:    {out['plot']}")
    print(f"best:    {out['best_yaml']} (trial {out['best_trial']}, {metric} {out['best_metric']:.4f}; "
          f"run it with bigray train -c {out['best_yaml']})")
    print(f"export:  {out['best_export']} (step {out['export']['step']})")
    print(f"bigray serve serve.model={out['best_export']}")
