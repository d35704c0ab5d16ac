"""What every command writes stays inside its output, and --force deletes nothing a user made
(docs/reliability.md): a planted link for each file pds writes, the diffusers export's --force,
its temporary folders, a full disk and --out ."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK, image_folder, one_line_error

import pdscli

DIGITS_CONFIG = Path(pdscli.__file__).parent / "data" / "digits-config.json"


def tiny_train_config(tmp_path) -> Path:
    cfg = json.loads(DIGITS_CONFIG.read_text())
    cfg["data"]["image_size"] = 8
    cfg["model"].update(nf=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], num_scales=50, sigma_max=5.0)
    cfg["training"].update({"batch_size": 4, "n_iters": 2, "log_freq": 1, "snapshot_freq_for_preemption": 1})
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


class Planted:
    """Links at the names pds writes, each to a file (or a missing path) outside the output."""

    def __init__(self, tmp_path):
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        self.links: list[tuple[Path, Path]] = []

    def link(self, at: Path, *, existing: bool = True) -> None:
        target = self.outside / f"target-{len(self.links)}"
        if existing:
            target.write_text("the user's\n")
        at.parent.mkdir(parents=True, exist_ok=True)
        at.symlink_to(target)
        self.links.append((at, target))

    def assert_untouched(self) -> None:
        for at, target in self.links:
            if target.exists():
                assert target.read_text() == "the user's\n", f"{at} was written through to {target}"
        made = sorted(p.name for p in self.outside.iterdir())
        assert made == sorted(t.name for _, t in self.links if t.exists()), f"files made outside: {made}"


def _sample(run_pds, tmp_path, plant):
    out = tmp_path / "o"
    for name in ("000000.png", "000001.png", "grid.png", "samples.npz", "run.json"):
        plant.link(out / name)
    plant.link(out / ".000002.png.abcd1234.tmp", existing=False)
    return run_pds("sample", "--model", "gaussian", "--image-size", "8", "--steps", "3", "-n", "3", "--quiet",
                   "--out", out, "--force")


def _filters(run_pds, tmp_path, plant):
    out = tmp_path / "m" / "faces.npz"
    for at in (out, out.with_suffix(".png"), out.parent / "faces" / "freq_mask.npy",
               out.parent / "faces" / "space_mask.npy"):
        plant.link(at)
    return run_pds("filters", image_folder(tmp_path / "imgs"), "--size", "8", "--out", out, "--npy", "--force", "--quiet")


def _export(run_pds, tmp_path, plant, fixture_dir):
    out = tmp_path / "e" / "small.onnx"
    plant.link(out)
    return run_pds("export", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json",
                   "--out", out, "--force", "--quiet")


def _export_diffusers(run_pds, tmp_path, plant, fixture_dir):
    out = tmp_path / "d"
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"):
        plant.link(out / name)
    return export_diffusers(run_pds, tmp_path / "cfg", out, "--force")


def _bench(run_pds, tmp_path, plant):
    out = tmp_path / "b" / "bench.json"
    plant.link(out)
    return run_pds("bench", "--model", "gaussian", "--image-size", "8", "--channels", "1", *QUICK,
                   "--skip", "overhead,e2e", "--out", out, "--force")


def _train(run_pds, tmp_path, plant):
    out = tmp_path / "t"
    for name in ("checkpoint.pth", "config.json", "log.jsonl", "train.json"):
        plant.link(out / name)
    return run_pds("train", "digits", "--config", tiny_train_config(tmp_path), "--iters", "2", "--threads", "1",
                   "--out", out, "--force", "--quiet")


def _fid(run_pds, tmp_path, plant, tiny_features):
    out = tmp_path / "f" / "stats.npz"
    plant.link(out)
    a = image_folder(tmp_path / "a", size=16)
    return run_pds("fid", a, a, "--features", tiny_features, "--save-stats", out, "--force", "--quiet")


COMMANDS = {"sample": _sample, "filters": _filters, "export-onnx": _export, "export-diffusers": _export_diffusers,
            "bench": _bench, "train": _train, "fid": _fid}


@pytest.fixture
def tiny_features(tmp_path):
    from pdscli.evaluate.features import save_tiny_features

    return save_tiny_features(tmp_path / "tiny.pt")


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_writes_through_a_link_planted_at_its_outputs(run_pds, tmp_path, fixture_dir, tiny_features,
                                                                 command):
    plant = Planted(tmp_path)
    extra = {"export-onnx": (fixture_dir,), "export-diffusers": (fixture_dir,), "fid": (tiny_features,)}
    r = COMMANDS[command](run_pds, tmp_path, plant, *extra.get(command, ()))
    # Refusing in one line is as good as replacing the link: nothing outside is opened for writing.
    assert r.exit_code in (0, 2) and "Traceback" not in r.stderr, r.stderr
    if r.exit_code == 2:
        one_line_error(r)
    plant.assert_untouched()


# ---------------------------------------------------------------------------- pds export --format diffusers


def wide_config(folder) -> Path:
    """A small NCSN++ diffusers can build (its attention level has 128 channels; the fixture's 32 it cannot)."""
    from pdscli.models import get_preset

    cfg = get_preset("ffhq-1024")
    cfg["data"]["image_size"] = 16
    cfg["model"].update(nf=32, ch_mult=[1, 4], num_res_blocks=1, attn_resolutions=[8])
    path = Path(folder) / "wide.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def export_diffusers(run_pds, folder, out, *extra):
    return run_pds("export", "--config", wide_config(folder), "--random-weights", "--format", "diffusers",
                   "--out", out, "--quiet", *extra)


def test_force_never_deletes_what_the_user_keeps_in_the_export_folder(run_pds, tmp_path, fixture_dir):
    out = tmp_path / "pipe"
    assert export_diffusers(run_pds, tmp_path / "cfg", out).exit_code == 0
    (out / "notes.txt").write_text("mine")
    (out / "photos").mkdir()
    (out / "photos" / "a.jpg").write_bytes(b"jpeg")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one_line_error(export_diffusers(run_pds, tmp_path / "cfg", out, "--force"), "notes.txt", "--force replaces only")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "notes.txt").unlink()
    (out / "photos" / "a.jpg").unlink()
    (out / "photos").rmdir()
    assert export_diffusers(run_pds, tmp_path / "cfg", out, "--force").exit_code == 0  # only pds's files: replaced


def test_export_to_the_current_folder_is_refused_before_the_work(run_pds, tmp_path, fixture_dir, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", ".."):
        one_line_error(export_diffusers(run_pds, tmp_path / "cfg", out, "--force"), "current folder")
    assert list(here.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cfg", "here"]


def test_what_killed_exports_left_beside_the_folder_is_removed(run_pds, tmp_path, fixture_dir):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    stale = [tmp_path / f".pipe.{dead}.k2j3h4g5.tmp", tmp_path / f".pipe.{dead}.a1b2c3d4.old"]
    live = tmp_path / f".pipe.{os.getpid()}.zzzzzzzz.tmp"  # a running export's: kept
    mine = tmp_path / ".pipe.notes.tmp"  # not named as an export's: kept
    for folder in (*stale, live, mine):
        (folder / "unet").mkdir(parents=True)
    assert export_diffusers(run_pds, tmp_path / "cfg", tmp_path / "pipe").exit_code == 0
    assert not any(p.exists() for p in stale) and live.is_dir() and mine.is_dir()


def test_a_full_disk_during_the_export_is_one_line_and_leaves_nothing(tmp_path, fixture_dir):
    def small_disk():  # every write past 200 kB fails, as on a full disk (the weights are several MB)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "pipe"
    config = wide_config(tmp_path / "cfg")
    r = subprocess.run([sys.executable, "-m", "pdscli", "export", "--config", str(config), "--random-weights",
                        "--format", "diffusers", "--out", str(out),
                        "--quiet"], capture_output=True, text=True, timeout=600, preexec_fn=small_disk,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no space left" in lines[0] and "diffusion_pytorch_model.safetensors" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg"]  # no --out, no temporary folder


def test_replacing_an_export_never_leaves_a_moment_without_the_folder(run_pds, tmp_path, fixture_dir, monkeypatch):
    from pdscli.models import diffusers

    out = tmp_path / "pipe"
    assert export_diffusers(run_pds, tmp_path / "cfg", out).exit_code == 0
    seen = []
    real = diffusers.exchange

    def watched(a, b):
        swapped = real(a, b)
        seen.append((swapped, b.is_dir()))
        return swapped

    monkeypatch.setattr(diffusers, "exchange", watched)
    assert export_diffusers(run_pds, tmp_path / "cfg", out, "--force").exit_code == 0
    assert seen == [(True, True)]  # one atomic swap: the folder existed before and after it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
