
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
