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
    from bigray.data import train_tokenizer

    info = train_tokenizer(cfg)
    print(f"tokenizer: {info.uri} (vocab {info.vocab_size}, eos id {info.eos_id}, sha256 {info.sha256[:12]})")


def _prepare(cfg: Config, args) -> None:
    from bigray import display
    from bigray.data import prepare

    display.prepare_summary(prepare(cfg))


def _train(cfg: Config, args) -> None:
    from bigray import display
    from bigray.train.trainer import train

    with display.TrainProgress(cfg.train.max_steps) as progress:
        result = train(cfg, progress=progress)
    display.train_summary(result)


def _export(cfg: Config, args) -> None:
    from bigray import display
    from bigray.runtime import init_ray
    from bigray.storage import Store
    from bigray.train.export import export_in_task

    init_ray(cfg.ray)  # the consolidation runs as a Ray task on a node with the memory it needs
    display.export_line(export_in_task(args.run_dir, args.out_dir, Store(cfg.storage), checkpoint=args.checkpoint,
                                       adapter_only=args.adapter_only))


def _plan(cfg: Config, args) -> None:
    from bigray import display
    from bigray.errors import ConfigError
    from bigray.plan import plan

    result = plan(cfg, gpu_memory_gb=args.gpu_memory, gpus=args.gpus, mfu=args.mfu)
    display.plan_summary(result)
    if result.plan.fits is False:
        raise ConfigError(result.verdict)


def _tune(cfg: Config, args) -> None:
    from bigray import display
    from bigray.tune import tune

    out = tune(cfg, resume=args.resume, log=print)
    display.tune_table(out)
    display.tune_summary(out)


def _serve(cfg: Config, args) -> None:
    import signal
    import threading

    import ray

    from bigray.serve.app import model_name
    from bigray.serve.deploy import start, stop

    was_connected = ray.is_initialized()
    done = threading.Event()
    try:
        url = start(cfg)
        # SIGTERM (docker stop, a job's kill) gets the same clean shutdown as Ctrl-C.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        print(
            f"serving {model_name(cfg.serve)!r} ({cfg.serve.engine} engine) at {url}/v1  (health: {url}/health); "
            "Ctrl-C to stop",
            flush=True,
        )
        while not done.wait(1.0):
            pass
    finally:
        if ray.is_initialized():
            print("bigray serve: shutting down", file=sys.stderr, flush=True)
            stop()
            if not was_connected:
                ray.shutdown()


def _demo(cfg: Config, args) -> None:
    from bigray.demo import demo

    demo(cfg, address=args.address, bucket=args.bucket, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", action="append", default=[], metavar="FILE", help="YAML config; repeat to layer (later wins)"
    )
    common.add_argument("--debug", action="store_true", help="show Python tracebacks")
    common.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="dotted overrides, values parsed as YAML"
    )

    parser = argparse.ArgumentParser(prog="bigray", description="Prepare, train, tune and serve LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect the resolved config").add_subparsers(dest="action", required=True)
    config.add_parser("show", parents=[common], help="print the resolved, validated config as YAML").set_defaults(
        func=_config_show
    )

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    tok.add_parser(
        "train", parents=[common], help="train a byte-level BPE on data.inputs into data.tokenizer"
    ).set_defaults(func=_tokenizer_train)

    sub.add_parser(
        "prepare", parents=[common], help="read, clean, tokenize, pack and write shards with Ray Data"
    ).set_defaults(func=_prepare)
    sub.add_parser("train", parents=[common], help="DeepSpeed ZeRO on Ray Train over prepared shards").set_defaults(
        func=_train
    )
    sub.add_parser(
        "serve", parents=[common], help="OpenAI-compatible HTTP API for serve.model on Ray Serve, until Ctrl-C"
    ).set_defaults(func=_serve)
    tune = sub.add_parser("tune", parents=[common], help="Ray Tune sweep (ASHA, FIFO or PBT) over bigray train trials")
    tune.add_argument(
        "--resume", action="store_true", help="finish the interrupted sweep tune.storage_path/tune.name (Tuner.restore)"
    )
    tune.set_defaults(func=_tune)
    exp = sub.add_parser("export", parents=[common], help="consolidate a ZeRO checkpoint into a Hugging Face model dir")
    exp.add_argument("run_dir", help="a run dir (train.storage_path/run_name), local or s3://")
    exp.add_argument("out_dir", help="where to write the HF model dir")
    exp.add_argument("--checkpoint", help="a specific checkpoint dir (default: the latest step)")
    exp.add_argument(
        "--adapter-only", action="store_true", help="LoRA runs: write the peft adapter dir instead of the merged model"
    )
    exp.set_defaults(func=_export)
    plan = sub.add_parser(
        "plan", parents=[common], help="GPU memory per worker, whether it fits, the largest batch that does"
    )
    plan.add_argument(
        "--gpu-memory", type=float, metavar="GB", help="GiB per GPU (default: train.gpu_memory_gb, else this machine's)"
    )
    plan.add_argument("--gpus", type=int, metavar="N", help="data-parallel GPUs (default: train.num_workers)")
    plan.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    plan.set_defaults(func=_plan)
    from bigray.demo import DEFAULT_CONFIG

    demo = sub.add_parser(
        "demo", parents=[common], help="the whole flow on the embedded default: prepare, train, tune, serve, ask"
    )
    demo.add_argument(
        "--address", help="a running Ray cluster (auto, ray://host:10001); default: a local one on 127.0.0.1"
    )
    demo.add_argument(
        "--bucket", help="s3://bucket/prefix for every artifact; default: a local S3 server, copied to --out at the end"
    )
    demo.add_argument("--out", help="local dir for the copy of the local bucket (default: a new temp dir)")
    # configs/demo.yaml first, then the user's -c files and overrides on top.
    demo.set_defaults(func=_demo, base_config=[DEFAULT_CONFIG])
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
        cfg = load_config(getattr(args, "base_config", []) + args.config, args.overrides)
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
