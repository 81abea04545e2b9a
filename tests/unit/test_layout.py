"""The house rules a reader relies on, checked on the source: no import circles, sections not trees, public Ray only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "bigray"
# The functions a command calls with the whole tree; everything below them gets a section and a Store.
ENTRY_POINTS = {
    "bigray/config.py": {"*"},  # the tree's own loading, overriding and printing
    "bigray/cli.py": {"*"},  # the dispatcher: each `_<command>(cfg, args)` hands the tree to one entry point
    "bigray/demo.py": {"demo"},
    "bigray/data/prepare.py": {"prepare"},
    "bigray/data/tokenizer.py": {"train_tokenizer"},
    "bigray/train/trainer.py": {"train", "plan_run"},
    "bigray/tune/sweep.py": {"tune"},
    "bigray/serve/deploy.py": {"build_app", "start"},
    "bigray/plan.py": {"plan"},
}
RAY_PRIVATE = re.compile(r"\bray(\.\w+)*\._(?!_)\w+|\b_node_ip_address\b|\._experiment_analysis\b|\b_system_config\b")
COMPAT = "bigray/ray_compat.py"


def modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE.parent)): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def module_name(rel: str) -> str:
    return rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def imports(rel: str, tree: ast.Module, known: set[str]) -> set[str]:
    """bigray modules `rel` imports anywhere (module level or inside functions)."""
    here = module_name(rel).split(".")
    package = here if rel.endswith("__init__.py") else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # `from bigray.data import prepare` names a module or a name in bigray.data: take the longest known.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module_name(rel):
                found.add(name)
    return found


def test_no_import_circle():
    trees = modules()
    known = {module_name(r) for r in trees}
    graph = {module_name(r): imports(r, t, known) for r, t in trees.items()}
    # A package's __init__ re-exporting its own modules is not a circle a reader has to untangle.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (d in known and name.startswith(d + ".") and d != "bigray")}
    circles = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    circles.append(" -> ".join(path + [start]))
                elif nxt not in path and len(path) < 12:
                    stack.append((nxt, path + [nxt]))
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles)))


def test_only_entry_points_take_the_whole_config():
    offenders = []
    for rel, tree in modules().items():
        allowed = ENTRY_POINTS.get(rel, set())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            takes_tree = any(
                a.annotation is not None and re.fullmatch(r"(\w+\.)?Config( \| None)?", ast.unparse(a.annotation))
                for a in args
            )
            if takes_tree and "*" not in allowed and node.name not in allowed:
                offenders.append(f"{rel}:{node.lineno} {node.name}")
    assert not offenders, "functions below a command's entry point take the whole Config:\n" + "\n".join(offenders)


def test_public_ray_apis_only_outside_the_compat_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        if rel == COMPAT:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if RAY_PRIVATE.search(line.split("#")[0]):
                offenders.append(f"{rel}:{lineno}: {line.strip()}")
    assert not offenders, "private Ray APIs outside bigray/ray_compat.py:\n" + "\n".join(offenders)
