"""torchrun on CPU (Gloo): the same images as one process, and --resume after a rank dies."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                                reason="torchrun not found beside the Python interpreter")

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _env():
    # Bitwise equality needs the same thread count on both sides: torchrun sets 1 per rank.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _single(out: Path, args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "pdscli", "sample", *args, "--out", str(out), "--quiet"],
                   check=True, env=_env(), capture_output=True, timeout=300)


def _torchrun(out: Path, args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    cmd = [TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(_free_port()),
           "-m", "pdscli", "sample", *args, "--out", str(out), "--quiet"]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("[0-9]*.png"))}


def _assert_same_run(a: Path, b: Path, n: int) -> None:
    pa, pb = _pngs(a), _pngs(b)
    assert len(pa) == n and pa.keys() == pb.keys()
    assert all(pa[k] == pb[k] for k in pa), [k for k in pa if pa[k] != pb[k]]
    sa, sb = np.load(a / "samples.npz"), np.load(b / "samples.npz")
    assert np.array_equal(sa["indices"], np.arange(n))
    assert np.array_equal(sa["samples"], sb["samples"])


@pytest.mark.slow  # torchrun: two processes start torch
@pytest.mark.parametrize("model_args", [
    ["--model", "gaussian", "--image-size", "16", "--steps", "8"],
    "fixture",
], ids=["gaussian", "ncsnpp"])
def test_two_ranks_make_the_single_process_images(tmp_path, model_args, request):
    if model_args == "fixture":
        fixture = request.getfixturevalue("fixture_dir")
        model_args = ["--checkpoint", str(fixture / "checkpoint.pth"), "--config", str(fixture / "config.json"),
                      "--steps", "2"]
    # Batch-mean step sizes (the default) couple a batch: whole batches go to ranks, so this holds too.
    args = [*model_args, "-n", "5", "-b", "2", "--seed", "7", "--device", "cpu"]
    _single(tmp_path / "one", args)
    proc = _torchrun(tmp_path / "two", args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    _assert_same_run(tmp_path / "one", tmp_path / "two", 5)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


@pytest.mark.slow
def test_killed_rank_then_resume_completes_the_set(tmp_path):
    n = 24
    args = ["--model", "gaussian", "--image-size", "16", "--steps", "300", "-n", str(n), "-b", "1",
            "--seed", "3", "--device", "cpu"]
    out = tmp_path / "run"
    proc = _torchrun(out, args)
    deadline = time.time() + 240
    while len(list(out.glob("[0-9]*.png"))) < 2:
        assert proc.poll() is None, "the run ended before a rank could be killed"
        assert time.time() < deadline, "no image appeared in time"
        time.sleep(0.05)
    victim = _children(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0, "torchrun should report the dead rank"
    partial = _pngs(out)
    assert 0 < len(partial) < n, "the kill came too late to test anything"
    assert not (out / "samples.npz").exists()

    rerun = _torchrun(out, [*args, "--resume"])
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log
    # Images written before the kill are kept as they were, and the full set equals one clean run.
    after = _pngs(out)
    assert all(after[k] == v for k, v in partial.items())
    _single(tmp_path / "clean", args)
    _assert_same_run(out, tmp_path / "clean", n)
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))
