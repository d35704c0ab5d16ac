
from pdscli import __version__
from pdscli.cli import app


def test_version(run_pds):
    r = run_pds("--version")
    assert r.exit_code == 0
    assert r.stdout.strip() == f"pds {__version__}"


def test_unknown_command_is_a_usage_error(run_pds):
    r = run_pds("no-such-command")
    assert r.exit_code == 2
    assert "Traceback" not in r.stderr


def test_every_command_has_help_with_examples(run_pds):
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert names, "no command registered"
    for name in names:
        r = run_pds(name, "--help")
        assert r.exit_code == 0, name
        assert "Example" in r.stdout, f"`pds {name} --help` shows no example"


def test_every_command_takes_json(run_pds):
    for command in app.registered_commands:
        r = run_pds(command.name, "--help")
        assert "--json" in r.stdout, f"`pds {command.name}` has no --json"


def test_one_json_printer_serves_every_command():
    """cli.output.print_json is the only JSON writer of the commands: one style everywhere."""
    import ast
    from pathlib import Path

    import pdscli.cli

    folder = Path(pdscli.cli.__file__).parent
    writers = []
    for path in sorted(folder.glob("*.py")):
        if path.name == "output.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("dumps", "dump") and getattr(node.value, "id", "") == "json":
                writers.append(f"{path.name}:{node.lineno}")
    assert not writers, writers


def test_the_json_printer_is_strict_and_indented(capsys):
    import json
    from pathlib import Path

    from pdscli.cli.output import print_json

    print_json({"path": Path("a/b"), "nan": float("nan"), "inf": [float("inf"), 1.5], "n": 2})
    text = capsys.readouterr().out
    assert json.loads(text) == {"path": "a/b", "nan": None, "inf": [None, 1.5], "n": 2}
    assert text.startswith('{\n  "path"') and text.endswith("}\n")


def _help_text(run_pds, command: str) -> str:
    """`pds COMMAND --help` as one line of words (no box drawing, no line breaks)."""
    r = run_pds(command, "--help")
    assert r.exit_code == 0, r.stderr
    return " ".join(r.stdout.replace("│", " ").split())


def test_help_lists_the_registries_choices(run_pds):
    from pdscli.bench.config import KNOWN_BACKENDS
    from pdscli.devices import PRECISIONS
    from pdscli.engines.export import FORMATS
    from pdscli.models.config import PRESET_NAMES
    from pdscli.samplers import REGISTRY
    from pdscli.samplers.grids import SCHEDULES

    sample, export = _help_text(run_pds, "sample"), _help_text(run_pds, "export")
    bench, info = _help_text(run_pds, "bench"), _help_text(run_pds, "info")
    assert f"One of {', '.join(REGISTRY)} " in sample
    assert all(name in sample for name in SCHEDULES) and ", ".join(PRECISIONS) in sample
    assert all(f"{name}: " in export for name in FORMATS)
    assert ", ".join(KNOWN_BACKENDS) in bench and ", ".join(PRESET_NAMES) in info


def test_no_help_text_keeps_a_placeholder(run_pds):
    from pdscli.cli.choices import CHOICES

    for command in app.registered_commands:
        text = _help_text(run_pds, command.name)
        assert not [name for name in CHOICES if "{" + name + "}" in text], command.name


def test_a_misspelt_format_lists_every_choice(run_pds, tmp_path):
    r = run_pds("export", "--preset", "cifar10", "--random-weights", "--format", "onxx", "--out", tmp_path / "m.onnx")
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --format must be one of onnx, trt, diffusers, not 'onxx'"


def test_the_command_line_loads_without_torch():
    """`pds --help` stays fast: the registries the help texts name are read only when shown."""
    import subprocess
    import sys

    code = "import sys, pdscli.cli; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
