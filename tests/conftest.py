"""Shared test helpers: the reference fixture, and running `pds` in-process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fixture_root() -> Path:
    # The fixture ships with the tests; PDS_SHARED points at another copy (a shared/ folder).
    env = os.environ.get("PDS_SHARED")
    return Path(env) / "fixtures" if env else Path(__file__).resolve().parent / "fixtures"


FIXTURE = _fixture_root() / "ncsnpp_small"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread for the whole suite.

    The test machines have 2 cores; the suite's work is small FFTs, tiny networks and small
    batches, which a second thread does not speed up, while a second thread competing with
    any other process makes OpenMP spin (each call measured 10-100x slower). Subprocesses
    (torchrun tests) get OMP_NUM_THREADS=1 for the same reason.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """tests/fixtures/ncsnpp_small: a checkpoint written by the reference implementation."""
    assert (FIXTURE / "checkpoint.pth").exists(), f"reference fixture missing at {FIXTURE}"
    return FIXTURE


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_pds(capsys):
    """Run `pds ARGS...` in this process, as the console script does; returns exit code and output."""
    from pdscli.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run
