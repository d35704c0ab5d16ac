"""The package's import graph: no cycles, no upward imports, and every command's --help imports cleanly.

The layers (docs/design.md): the base modules, then samplers / precondition / models, then engines /
evaluate / train, then sample, then bench, then api (the Python API), diffusers, then cli. A module may import its own package and any
lower layer; a cycle anywhere is a failure, whether the imports run at module level or in a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pdscli"

LAYERS = {
    "pdscli": 0,  # the base modules: errors, settings, score, noise, devices, fsutil, images, console, machine
    "samplers": 1, "precondition": 1, "models": 1,
    "engines": 2, "evaluate": 2, "train": 2,
    "sample": 3,
    "bench": 4,
    "api": 5,  # pdscli.api: the Python API over the sampling run, filters and FID
    "diffusers": 6,  # pdscli.diffusers: PDS for diffusers pipelines, over the API
    "cli": 7,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, *, top_level_only: bool) -> set[str]:
    """pdscli modules that `path` imports (`from pkg import sub` counts as pkg.sub when sub is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pdscli")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "pdscli":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES}


# `python -m pdscli` and the top package's lazy `pdscli.load_score_model` sit above everything;
# `from pdscli import __version__` is allowed anywhere, since the top package imports nothing at load.
TOP = {"pdscli", "pdscli.__main__"}


def layer(module: str) -> tuple[str, int]:
    if module in TOP:
        return "top", max(LAYERS.values()) + 1
    parts = module.split(".")
    package = parts[1] if len(parts) > 1 and parts[1] in LAYERS else "pdscli"
    return package, LAYERS[package]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "all"])
def test_no_import_cycles(top_level_only):
    graph = {m: imported_modules(p, top_level_only=top_level_only) - {m, "pdscli"} for m, p in MODULES.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_imports():
    upward = []
    for m, p in MODULES.items():
        package, level = layer(m)
        for dep in imported_modules(p, top_level_only=False) - {"pdscli"}:
            dep_package, dep_level = layer(dep)
            if dep_level > level or (dep_level == level and dep_package != package and level != 1):
                upward.append(f"{m} -> {dep}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_top_package_imports_nothing_at_load():
    assert imported_modules(MODULES["pdscli"], top_level_only=True) == set()


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("command", ["", "sample", "filters", "export", "bench", "info", "train", "fid"])
def test_help_imports_cleanly(command):
    """`pds [COMMAND] --help` in a fresh interpreter: exits 0, and no module is left half-imported."""
    code = (
        "import sys\n"
        "from pdscli.cli import main\n"
        f"args = {[c for c in [command] if c] + ['--help']!r}\n"
        "try:\n    main(args)\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "half = [n for n, m in sys.modules.items() if n.startswith('pdscli') and getattr(getattr(m, '__spec__', None), '_initializing', False)]\n"
        "assert not half, half\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_library_modules_import_the_package_at_the_top():
    """Function-level imports of pdscli modules hide the graph: only cli/ (to keep --help fast) and the
    top package's lazy `load_score_model` may have them."""
    hidden = []
    for m, p in MODULES.items():
        if m == "pdscli" or m.startswith("pdscli.cli"):
            continue
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in top and (node.module or "").startswith("pdscli"):
                hidden.append(f"{m}:{node.lineno} imports {node.module}")
            elif isinstance(node, ast.Import) and id(node) not in top and any(a.name.startswith("pdscli") for a in node.names):
                hidden.append(f"{m}:{node.lineno}")
    assert not hidden, "function-level imports of the package:\n" + "\n".join(hidden)
