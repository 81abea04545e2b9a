"""The `bigray` command line: one subcommand per stage, each a thin call into its module."""

from __future__ import annotations

import argparse
import sys
import traceback

from bigray.config import Config, load_config, to_yaml
from bigray.errors import BigrayError


def _config_show(cfg: Config, args) -> None:
    print(to_yaml(cfg), end="")


def _tokenizer_train(cfg: Config, args) -> None:
    from bigray.data import load_tokenizer, train_tokenizer

    out = train_tokenizer(cfg)
    info = load_tokenizer(out, cfg.storage)
    print(f"tokenizer: {out} (vocab {info.vocab_size}, eos id {info.eos_id}, sha256 {info.sha256[:12]})")


def _prepare(cfg: Config, args) -> None:
    from bigray.data import prepare

    print_prepare_summary(prepare(cfg))


def _train(cfg: Config, args) -> None:
    from bigray.train.trainer import train

    out = train(cfg)
    first, last = out["first"], out["metrics"]
    print(f"run: {out['run_dir']}")
    print(f"steps {last.get('step')}: loss {first.get('loss', float('nan')):.4f} -> {last.get('loss', float('nan')):.4f}"
          + (f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else "")
          + f", {last.get('tokens_per_s', 0):,.0f} tokens/s, {out['wall_s']:.0f} s")
    if out["export"]:
        print(f"export: {out['export']['out_dir']} (step {out['export']['step']}, probe logits max |diff| {out['export']['probe_max_abs_diff']:.2e})")


def _export(cfg: Config, args) -> None:
    from bigray.train.export import export

    out = export(args.run_dir, args.out_dir, checkpoint=args.checkpoint, storage_cfg=cfg.storage)
    print(f"export: {out['out_dir']} from {out['checkpoint']} (step {out['step']}, {out['dtype']}, "
          f"probe logits max |diff| {out['probe_max_abs_diff']:.2e})")


def print_prepare_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    stats = result["stats"]
    console = Console(soft_wrap=True, highlight=False)
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
    console.print(docs)
    console.print(splits)
    console.print(f"{stats['tokens_kept']:,} tokens in {result['wall_s']:.1f} s = {result['tokens_per_s']:,.0f} tokens/s "
                  f"(seq_len {result['seq_len']}, tokenizer vocab {result['tokenizer']['vocab_size']})")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", action="append", default=[], metavar="FILE", help="YAML config; repeat to layer (later wins)")
    common.add_argument("--debug", action="store_true", help="show Python tracebacks")
    common.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides, values parsed as YAML")

    parser = argparse.ArgumentParser(prog="bigray", description="Prepare, train, tune and serve LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect the resolved config").add_subparsers(dest="action", required=True)
    config.add_parser("show", parents=[common], help="print the resolved, validated config as YAML").set_defaults(func=_config_show)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    tok.add_parser("train", parents=[common], help="train a byte-level BPE on data.inputs into data.tokenizer").set_defaults(func=_tokenizer_train)

    sub.add_parser("prepare", parents=[common], help="read, clean, tokenize, pack and write shards with Ray Data").set_defaults(func=_prepare)
    sub.add_parser("train", parents=[common], help="DeepSpeed ZeRO on Ray Train over prepared shards").set_defaults(func=_train)
    exp = sub.add_parser("export", parents=[common], help="consolidate a ZeRO checkpoint into a Hugging Face model dir")
    exp.add_argument("run_dir", help="a run dir (train.storage_path/run_name), local or s3://")
    exp.add_argument("out_dir", help="where to write the HF model dir")
    exp.add_argument("--checkpoint", help="a specific checkpoint dir (default: the latest step)")
    exp.set_defaults(func=_export)
    return parser


def user_error(exc: BaseException) -> BigrayError | None:
    """The BigrayError behind `exc`, unwrapping Ray's task and Ray Data's UDF wrappers."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
            continue
        if isinstance(exc, BigrayError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        args.func(cfg, args)
        return 0
    except KeyboardInterrupt:
        print("bigray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's one place that turns any failure into a message
        if args.debug:
            traceback.print_exc()
        err = user_error(exc)
        message = str(err) if err else f"{type(exc).__name__}: {exc}"
        hint = "" if args.debug or err else " (run with --debug for the traceback)"
        print(f"bigray {args.command}: error: {message}{hint}", file=sys.stderr)
        return 2 if err else 1
