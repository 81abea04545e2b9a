"""Benchmark-only instrumentation: patch modules of bigray (or DeepSpeed) as a process imports them, so a benchmark
can timestamp steps inside Ray workers without any change to bigray's code."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable


def patch_on_import(patches: dict[str, Callable]) -> None:
    """After this process imports module `name` (if it ever does), call `patches[name](module)`."""

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in patches:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                patches[name](module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())
