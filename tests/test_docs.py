"""The documentation points at things that exist: module paths, dotted names, flags and tests.

README.md and docs/*.md name `pdscli/...` files, `pdscli.x.y` objects and `--flags`; each must
resolve against the code as it is, so a rename that forgets the docs fails here.
"""

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


# -- module paths and dotted names ----------------------------------------------------------------

PATH = re.compile(r"(?<![\w/.])pdscli/[\w./*-]*")
DOTTED = re.compile(r"(?<![\w/.])pdscli(?:\.\w+)+")


def resolves(dotted: str) -> bool:
    """`pdscli.a.b.C` as a user's code reaches it: import the longest importable module prefix,
    then walk attributes from the top package (so a module shadowed by a name in its package's
    namespace does not resolve)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        obj = importlib.import_module(parts[0])
        for name in parts[1:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def missing_paths(text: str) -> list[str]:
    """`pdscli/...` paths in `text` that are not in the repository (a `*` is a glob)."""
    named = {m.rstrip(".,:;") for m in PATH.findall(text)}
    return sorted(p for p in named if not (any(REPO.glob(p)) if "*" in p else (REPO / p).exists()))


def unresolved_names(text: str) -> list[str]:
    return sorted(n for n in set(DOTTED.findall(text)) if not resolves(n))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_module_path_the_docs_name_exists(doc):
    assert missing_paths(doc.read_text()) == []


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_dotted_name_the_docs_name_resolves(doc):
    assert unresolved_names(doc.read_text()) == []


def test_the_code_names_only_modules_and_paths_that_exist():
    """The same for the docstrings and comments of pdscli/ and scripts/: they describe the code as it is."""
    sources = sorted((REPO / "pdscli").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    stale = {doc_id(p): missing_paths(p.read_text()) + unresolved_names(p.read_text()) for p in sources}
    assert {k: v for k, v in stale.items() if v} == {}


def test_resolves_tells_names_apart():
    assert resolves("pdscli.errors.PdsError")
    assert resolves("pdscli.samplers.pc.corrector_stalls")
    assert not resolves("pdscli.errors.NoSuchThing")
    assert not resolves("pdscli.no_such_module")


# -- flags ----------------------------------------------------------------------------------------

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
# Flags of the other programs the docs show: checked against these lists, not the pds commands.
EXTERNAL = {
    "torchrun": {"--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"},
    "hf": {"--local-dir"},
    "pip": set(),
    "pytest": {"--durations"},
}
# The reference implementation's flags, named where the docs compare with it.
REFERENCE = {"--speed_up"}


def pds_options() -> dict[str, set[str]]:
    """Each `pds` command's long options (and the root's under "")."""
    import typer.main

    from pdscli.cli import app

    root = typer.main.get_command(app)
    long = lambda cmd: {o for p in cmd.params for o in [*p.opts, *getattr(p, "secondary_opts", [])] if o.startswith("--")}
    options = {"": long(root) | {"--help"}}
    for name, cmd in root.commands.items():
        options[name] = long(cmd) | {"--help"}
    return options


def script_options() -> dict[str, set[str]]:
    """Each scripts/NAME.py's long options: the strings in its source that are a flag and nothing
    else (argparse's add_argument("--x"), or a plain `"--x" in argv`)."""
    options = {}
    for path in sorted((REPO / "scripts").glob("*.py")):
        strings = (n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant))
        options[f"scripts/{path.name}"] = {"--help"} | {s for s in strings if isinstance(s, str) and FLAG.fullmatch(s)}
    return options


def code_texts(text: str) -> tuple[list[str], str]:
    """The commands a Markdown text shows (fenced lines joined across trailing backslashes, and
    inline code spans), and the prose left when they are cut out."""
    commands = []
    fenced = re.compile(r"^```.*?^```", flags=re.S | re.M)
    for block in fenced.findall(text):
        commands += block.replace("\\\n", " ").splitlines()[1:-1]
    prose = fenced.sub("", text)
    commands += re.findall(r"`([^`\n]+)`", prose)
    return commands, re.sub(r"`[^`\n]+`", "", prose)


def unknown_flags(text: str, pds: dict[str, set[str]], scripts: dict[str, set[str]]) -> list[str]:
    """Flags of `text` that the program they follow does not have. Inside a command, a flag
    belongs to the last program named before it (`pds CMD`, `-m pdscli CMD`, `scripts/X.py`, or
    another tool); a flag with no program before it, or in prose, must be some pds command's or
    some script's."""
    anywhere = set().union(*pds.values(), *scripts.values(), REFERENCE)
    program = re.compile(r"(?<![\w/.-])(?:(?:pds|-m pdscli) (" + "|".join(c for c in pds if c) + r")(?=\s|$)|(scripts/\w+\.py)|"
                         r"(" + "|".join(EXTERNAL) + r")(?=\s))")
    commands, prose = code_texts(text)
    bad = [f for f in FLAG.findall(prose) if f not in anywhere]
    for command in commands:
        allowed, owner = anywhere, "any pds command or script"
        pos = 0
        for m in sorted([*program.finditer(command), *FLAG.finditer(command)], key=lambda m: m.start()):
            if m.start() < pos:
                continue
            pos = m.end()
            if m.re is FLAG:
                if m.group() not in allowed:
                    bad.append(f"{m.group()} ({owner}): {command.strip()[:120]}")
            elif m.group(1):
                allowed, owner = pds[m.group(1)], f"pds {m.group(1)}"
            elif m.group(2):
                allowed, owner = scripts.get(m.group(2), set()), m.group(2)
            else:
                allowed, owner = EXTERNAL[m.group(3)], m.group(3)
    return bad


@pytest.fixture(scope="module")
def options():
    return pds_options(), script_options()


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_flag_the_docs_name_exists(doc, options):
    assert unknown_flags(doc.read_text(), *options) == []


def test_unknown_flags_checks_each_flag_against_its_own_command(options):
    text = (
        "Run `pds sample --nfe 20 --out x` or `pds info --out x`.\n\n"
        "```\npds bench --quick \\\n  --no-such-flag\ntorchrun --nnodes 2 -m pdscli sample --seed 1 --nnodes 3\n```\n"
        "Prose may say --resume but not --resumee.\n"
    )
    bad = unknown_flags(text, *options)
    assert [b.split(":")[0] for b in bad] == ["--resumee", "--no-such-flag (pds bench)", "--nnodes (pds sample)",
                                              "--out (pds info)"]


# -- the reliability catalogue's tests ------------------------------------------------------------


def test_every_test_the_reliability_catalogue_names_exists():
    catalogue = (REPO / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"\b(test_\w+)(?!\w|\.py)", catalogue))  # test functions, not test_x.py files
    defined = set()
    for path in (REPO / "tests").glob("test_*.py"):
        defined.update(re.findall(r"^\s*def (test_\w+)", path.read_text(), flags=re.M))
    assert len(named) > 40, "the catalogue names the tests that hold its promises"
    # `test_the_folder_lock_*` names a family of tests by its prefix.
    missing = [n for n in named if n not in defined and not (n.endswith("_") and any(d.startswith(n) for d in defined))]
    assert sorted(missing) == []


# -- the sampler contract's callback --------------------------------------------------------------


def test_every_sampler_reports_the_callback_keys_design_md_lists():
    from pdscli.evaluate.analytic import GaussianImageModel
    from pdscli.noise import SampleNoise
    from pdscli.samplers import REGISTRY
    from pdscli.samplers.grids import make_steps

    design = (REPO / "docs" / "design.md").read_text()
    listed = set(re.findall(r'"(\w+)"', re.search(r"`info = \{([^}]*)\}`", design).group(1)))
    model = GaussianImageModel(4, 1)
    for name, info in REGISTRY.items():
        steps = make_steps(info.grid, model.settings, 4)
        seen = []
        info.fn(model.score, SampleNoise(0, range(2), model.shape), steps, callback=lambda i: seen.append(set(i)))
        assert seen and all(keys == listed for keys in seen), (name, seen[:1], listed)


# -- README's sampler table -----------------------------------------------------------------------


def test_readme_sampler_table_is_the_registry():
    """scripts/readme_samplers.py writes it; a sampler added without regenerating fails here."""
    import subprocess
    import sys

    from pdscli.samplers import REGISTRY

    assert all(info.summary for info in REGISTRY.values()), [n for n, i in REGISTRY.items() if not i.summary]
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "readme_samplers.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
