"""The package's import graph: no cycles, only the imports the table allows, and every command's --help imports cleanly.

`ALLOWED` says which packages each package may import, besides its own modules and the base
modules (pdscli/*.py), which every package may import; docs/design.md prints the same table and a
test holds the two together. A cycle anywhere is a failure, whether the imports run at module
level or in a function.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pdscli"

# package -> the other packages it may import. "pdscli" is the base modules; "top" is the package
# itself (its lazy `load_score_model`) and `python -m pdscli`.
ALLOWED: dict[str, set[str]] = {
    "pdscli": set(),
    "samplers": set(),
    "precondition": set(),
    "models": {"precondition"},  # the built-in model ships its PDS filters and their alpha
    "engines": {"models"},
    "train": {"models"},
    "evaluate": {"samplers", "precondition", "models", "train"},  # the digits check: the built-in model, the digits data
    "sample": {"samplers", "precondition", "models", "engines", "evaluate"},
    "bench": {"samplers", "precondition", "models", "engines", "evaluate", "train", "sample"},
    "cli": {"samplers", "precondition", "models", "engines", "evaluate", "train", "sample", "bench", "api"},  # pds filters, pds fid: the API
    "api": {"samplers", "precondition", "models", "engines", "evaluate", "sample"},  # pdscli.api: the Python API
    "diffusers": {"samplers", "precondition", "sample", "api"},  # pdscli.diffusers: PDS for diffusers pipelines
    "top": {"precondition", "models", "cli", "api", "diffusers"},
}
# The directories, and the single modules that have a row of their own (not base modules).
PACKAGES = {"pdscli", "top"} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} | {
    name for name in ALLOWED if (PACKAGE / f"{name}.py").is_file()}


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


def package_of(module: str) -> str:
    if module in TOP:
        return "top"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in PACKAGES) else "pdscli"


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


def test_imports_follow_the_table():
    against = []
    for m, p in MODULES.items():
        package = package_of(m)
        for dep in imported_modules(p, top_level_only=False) - {"pdscli"}:
            other = package_of(dep)
            if other not in (package, "pdscli") and other not in ALLOWED[package]:
                against.append(f"{m} -> {dep}")
    assert not against, "imports the table in tests/test_layout.py does not allow:\n" + "\n".join(sorted(against))


def test_the_table_names_every_package_and_has_no_cycle():
    assert PACKAGES <= set(ALLOWED)
    assert find_cycle(ALLOWED) is None


def test_design_md_prints_the_same_table():
    """docs/design.md's "| package | may import |" table is ALLOWED, row for row."""
    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|(.*)\|$", text, flags=re.M)
    printed = {name: set(re.findall(r"`(\w+)`", deps)) for name, deps in rows}
    assert printed == ALLOWED


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
