"""Shared test helpers: the reference fixture and its one ONNX export, running `pds` in-process, and the one-line error check."""

from __future__ import annotations

import contextlib
import io
import json
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
QUICK = ["--quick", "--threads", "1", "--quiet"]  # `pds bench`'s smallest run, one thread, no report on stderr


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


def run_cli(*args) -> CliResult:
    """Run `pds ARGS...` in this process, as the console script does, capturing its output."""
    from pdscli.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def run_pds():
    """`run_cli` as a fixture: `r = run_pds("sample", ...)`."""
    return run_cli


def one_line_error(result: CliResult, *needles: str) -> str:
    """A user error as every command must report it: exit code 2, exactly one line on stderr
    (`error: ...`), no traceback, and each needle in that line. Returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.stderr + result.stdout)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@dataclass
class Export:
    path: Path
    result: CliResult


@pytest.fixture(scope="session")
def fixture_onnx(fixture_dir, tmp_path_factory) -> Export:
    """The fixture checkpoint exported once for the whole session, through `pds export` (fp32, the
    parity check included): tests read it, copy it to break it, and check the command's output."""
    path = tmp_path_factory.mktemp("export") / "small.onnx"
    result = run_cli("export", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json",
                     "--out", path, "--json")
    assert result.exit_code == 0, result.stderr
    return Export(path, result)


# -- small inputs several test modules build ----------------------------------------------------


def tiny_onnx(path, *, inputs=("x", "sigma"), size=8, channels=3):
    """An ONNX file whose score is -x (sigma unused); `inputs` lets a test break the contract."""
    import onnx
    from onnx import TensorProto, helper

    shapes = {"x": ["B", channels, size, size], "sigma": ["B"]}
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes.get(n, ["B", channels, size, size])) for n in inputs]
    out = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B", channels, size, size])
    graph = helper.make_graph([helper.make_node("Neg", [inputs[0]], ["score"])], "tiny", ins, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in {"sigma_min": 0.01, "sigma_max": 10.0, "num_scales": 100, "snr": 0.16, "image_size": size,
                 "num_channels": channels}.items():
        model.metadata_props.add(key=f"pds.{k}", value=repr(v))
    onnx.save(model, str(path))
    return path


def tiny_network_config(fixture_dir, tmp_path):
    """The fixture's config shrunk to a 16x16, nf 8 network (random weights): seconds, not minutes."""
    cfg = json.loads((fixture_dir / "config.json").read_text())
    cfg["data"]["image_size"] = 16
    cfg["model"].update(nf=8, ch_mult=[1, 2], attn_resolutions=[8], num_scales=100)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def full_disk_at(monkeypatch, suffix: str) -> None:
    """The disk fills up while a file whose name has `suffix` is written: its fsync fails with ENOSPC."""
    fsync = os.fsync

    def failing(fd):
        if suffix in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)


def image_folder(path, n: int = 4, size: int = 16, seed: int = 0) -> Path:
    """`n` random 8-bit RGB PNGs of `size` x `size` in a new folder `path`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    path = Path(path)
    path.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path
