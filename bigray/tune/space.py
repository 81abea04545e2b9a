"""The search space of `bigray tune`: checked before any trial starts, then turned into Ray Tune distributions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bigray.config import TuneConfig
from bigray.errors import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
# Shards are prepared once for the sweep; only what training reads may vary between trials.
SWEEPABLE = ("train.", "model.")
# PBT restarts a trial from another trial's checkpoint with mutated values, so only scalars the
# optimizer reads at every step may change: the model's shape must match the checkpoint, and the
# worker count and batch sizes fix ZeRO's partitions and the exact-resume data order.
PBT_MUTABLE = ("train.lr", "train.min_lr", "train.weight_decay", "train.warmup_steps", "train.grad_clip")


def check_search_space(tc: TuneConfig, validate: Callable[[dict[str, Any]], object]) -> None:
    """Fail before any trial: unknown keys, bad ranges, and values `validate` (the config) rejects."""
    if not tc.search_space:
        raise ConfigError(
            "tune.search_space is empty: give at least one key, "
            'e.g. tune.search_space={"train.lr": {loguniform: [1e-4, 3e-3]}}'
        )
    if tc.scheduler == "pbt":
        if frozen := [key for key in tc.search_space if key not in PBT_MUTABLE]:
            raise ConfigError(
                f"tune.scheduler pbt cannot mutate {', '.join(frozen)}: a PBT trial continues from another "
                "trial's checkpoint, whose model shape, worker count and batch must stay as they are; "
                f"PBT may mutate {', '.join(PBT_MUTABLE)} (sweep the others with asha or fifo)"
            )
    for key, spec in tc.search_space.items():
        if not key.startswith(SWEEPABLE):
            raise ConfigError(
                f"tune.search_space.{key}: only train.* and model.* keys can be swept "
                "(shards are prepared once for the sweep)"
            )
        for value in values_to_check(key, spec):
            try:
                validate({key: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space.{key} = {value!r} is not a valid config: {exc}") from None


def values_to_check(key: str, spec: dict) -> list:
    """The values of one search-space entry a trial could get at the extremes, after checking its shape."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"tune.search_space.{key}: expected one distribution, e.g. {{loguniform: [1e-4, 3e-3]}} (got {spec!r})"
        )
    ((dist, args),) = spec.items()
    if dist not in DISTRIBUTIONS:
        raise ConfigError(
            f"tune.search_space.{key}: unknown distribution {dist!r}; use one of {', '.join(DISTRIBUTIONS)}"
        )
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.search_space.{key}: {dist} needs a non-empty list of values (got {args!r})")
        return args
    low, high = bounds(key, dist, args)
    if low >= high:
        raise ConfigError(f"tune.search_space.{key}: empty range [{low}, {high}]: low must be below high")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"tune.search_space.{key}: loguniform needs low > 0 (got {low})")
    if dist == "randint":
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"tune.search_space.{key}: randint needs integer bounds (got {args!r})")
        return [low, high - 1]  # Tune's randint excludes high
    return [low, high]


def bounds(key: str, dist: str, args) -> list:
    """[low, high] as numbers; YAML 1.1 reads 1e-4 (no dot) as a string, so numeric strings count too."""
    try:
        if not (isinstance(args, list) and len(args) == 2) or any(isinstance(a, bool) for a in args):
            raise ValueError
        return [
            a if isinstance(a, (int, float)) else int(a) if str(a).lstrip("-").isdigit() else float(a) for a in args
        ]
    except (TypeError, ValueError):
        raise ConfigError(f"tune.search_space.{key}: {dist} needs [low, high] numbers (got {args!r})") from None


def param_space(space: dict[str, dict]) -> dict:
    """tune.search_space as Ray Tune sampling objects, keyed by the dotted config key."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        ((dist, args),) = spec.items()
        out[key] = tune.grid_search(args) if dist == "grid" else _sampler(key, dist, args)
    return out


def pbt_mutations(space: dict[str, dict]) -> dict:
    """PBT's hyperparam_mutations: a list for choice/grid entries (PBT steps along it), else the distribution."""
    return {
        key: list(args) if dist in ("choice", "grid") else _sampler(key, dist, args)
        for key, spec in space.items()
        for dist, args in spec.items()
    }


def _sampler(key: str, dist: str, args):
    from ray import tune

    if dist == "choice":
        return tune.choice(args)
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dist](
        *bounds(key, dist, args)
    )
