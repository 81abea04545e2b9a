"""The one place bigray touches Ray internals, each in one function, with the Ray version it was checked on.

Everything else in bigray uses public Ray APIs. When a Ray upgrade breaks a function here, the fix
(or its removal, once Ray offers a public way) stays in this file.
"""

from __future__ import annotations


def init_loopback_cluster(**init_kwargs) -> None:
    """`ray.init` a new local cluster whose every port is bound to 127.0.0.1.

    Two internals, checked on Ray 2.60.0: `ray.init`'s private `_node_ip_address` (the public way is
    `ray start --node-ip-address`, a separate process), and Ray's habit of rewriting 127.0.0.1 to the
    host's outward address (`services.resolve_ip_for_localhost`) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    is off. Processes started below (raylet, workers) read the env var; this driver read it into
    `ray_constants` when it imported ray, so its copy is set by hand.
    """
    import os

    import ray
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", _node_ip_address="127.0.0.1", **init_kwargs)


def validate_cluster_launcher_config(cfg: dict) -> None:
    """What `ray up` runs on a cluster YAML before touching a cloud: provider defaults filled, then Ray's checks.

    Ray exposes this only through the `ray up` command. Checked on Ray 2.60.0
    (`ray.autoscaler._private.util.prepare_config` / `validate_config`).
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    # The fake provider's defaults file is not shipped in Ray's wheel; such YAMLs spell out every field.
    validate_config(cfg if cfg["provider"]["type"] == "fake_multinode" else prepare_config(cfg))
