"""The sampling run (pdscli.sample.run, .loop, .outputs) on a tiny exact model: files, resume, interruption, NaN, determinism."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from pdscli.errors import PdsError
from pdscli.evaluate.analytic import gaussian_score_model
from pdscli.images import load_png, make_grid, to_uint8
from pdscli.sample import loop, outputs
from pdscli.sample import run as runner
from pdscli.sample.job import NonFiniteState, RunInterrupted, SampleJob
from pdscli.samplers import get_sampler, pc_steps

SIZE, CH = 8, 3


@pytest.fixture(scope="module")
def model():
    return gaussian_score_model(SIZE, CH, device="cpu")


def make_job(model, out, **kw) -> SampleJob:
    opts = dict(sampler="pc", num_samples=5, batch_size=2, seed=3, per_sample_step=True)
    opts.update(kw)
    steps = pc_steps(model.settings, opts.pop("n_steps", 6))
    return SampleJob(model=model, steps=steps, out=out, snr=model.settings.snr, **opts)


def samples_of(out) -> np.ndarray:
    with np.load(out / "samples.npz") as z:
        assert z["indices"].tolist() == list(range(len(z["samples"])))
        return z["samples"]


class Breaking:
    """A score that raises `error` on its call number `after` (a Ctrl-C or a NaN half-way through a run)."""

    def __init__(self, score, after: int, error=KeyboardInterrupt, nan=False):
        self.score, self.after, self.error, self.nan, self.calls = score, after, error, nan, 0

    def __call__(self, x, sigma):
        self.calls += 1
        out = self.score(x, sigma)
        if self.calls >= self.after:
            if self.nan:
                return out * float("nan")
            raise self.error()
        return out


def test_png_names_pad_and_sort():
    assert outputs.png_name(12, 100) == "000012.png"
    assert outputs.png_name(5, 10_000_001) == "00000005.png"


def test_run_writes_every_file(model, tmp_path):
    out = tmp_path / "run"
    record = runner.run(make_job(model, out))
    names = sorted(p.name for p in out.iterdir() if p.name != ".pds-lock")
    assert names == [f"{i:06d}.png" for i in range(5)] + ["grid.png", "run.json", "samples.npz"]
    x = samples_of(out)
    assert x.shape == (5, CH, SIZE, SIZE) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.01
    # The PNGs are the 8-bit version of exactly these floats.
    for i in range(5):
        assert np.array_equal(to_uint8(x[i]), to_uint8(load_png(out / f"{i:06d}.png")))
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["nfe"]["per_sample"] == 12  # pc: 2 score calls per step
    assert on_disk["nfe"]["network_calls"] == 36  # 3 batches
    assert on_disk["seed"] == 3 and on_disk["steps"]["count"] == 6 and on_disk["samples_from_png"] == []


def test_grid_is_the_first_samples(model, tmp_path):
    out = tmp_path / "run"
    runner.run(make_job(model, out))
    grid = load_png(out / "grid.png")
    assert np.array_equal(to_uint8(grid), to_uint8(make_grid(samples_of(out), min_cell=outputs.GRID_MIN_CELL)))


def test_same_seed_same_images_at_any_batch_size(model, tmp_path):
    runner.run(make_job(model, tmp_path / "a", batch_size=1))
    runner.run(make_job(model, tmp_path / "b", batch_size=5))
    np.testing.assert_allclose(samples_of(tmp_path / "a"), samples_of(tmp_path / "b"), atol=1e-5)
    for i in range(5):
        name = outputs.png_name(i, 5)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_batch_mean_step_couples_a_batch(model, tmp_path):
    # The reference's batch-mean corrector step: batch size changes the images (slightly).
    runner.run(make_job(model, tmp_path / "a", batch_size=1, per_sample_step=False))
    runner.run(make_job(model, tmp_path / "b", batch_size=5, per_sample_step=False))
    assert not np.allclose(samples_of(tmp_path / "a"), samples_of(tmp_path / "b"), atol=1e-5)


def test_resume_without_float_records_uses_the_pngs_and_says_so(model, tmp_path):
    out = tmp_path / "run"
    broken = dataclasses.replace(model, score=Breaking(model.score, after=13))
    with pytest.raises(RunInterrupted):
        runner.run(make_job(broken, out))
    (out / outputs.PARTIAL / "1.npy").unlink()
    record = runner.run(make_job(model, out, resume=True))
    assert record["samples_from_png"] == [1]
    x = samples_of(out)
    np.testing.assert_array_equal(x[1], load_png(out / "000001.png"))


def test_resume_refuses_other_settings(model, tmp_path):
    out = tmp_path / "run"
    runner.run(make_job(model, out, num_samples=2))
    with pytest.raises(PdsError, match="seed 3 -> 4"):
        runner.run(make_job(model, out, seed=4, resume=True))


def test_resume_can_extend_a_finished_run(model, tmp_path):
    runner.run(make_job(model, tmp_path / "ref"))
    out = tmp_path / "run"
    runner.run(make_job(model, out, num_samples=3))
    record = runner.run(make_job(model, out, resume=True))
    assert record["made_now"] == 2
    np.testing.assert_allclose(samples_of(out), samples_of(tmp_path / "ref"), atol=1e-5)


def test_force_clears_an_earlier_run(model, tmp_path):
    out = tmp_path / "run"
    runner.run(make_job(model, out, num_samples=5))
    (out / "notes.txt").write_text("mine")
    runner.run(make_job(model, out, num_samples=2, force=True))
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000.png", "000001.png"]
    assert (out / "notes.txt").read_text() == "mine"  # not ours: kept
    assert samples_of(out).shape[0] == 2


def test_nan_stops_the_run_naming_step_and_sigma_and_keeps_images(model, tmp_path):
    out = tmp_path / "run"
    broken = dataclasses.replace(model, score=Breaking(model.score, after=15, nan=True))
    with pytest.raises(NonFiniteState, match=r"step 2 of 6 \(sigma=[0-9.]+\).*samples 2\.\.3"):
        runner.run(make_job(broken, out))
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]


def test_ranks_share_the_batch_plan(model, tmp_path):
    # What torchrun ranks do: each makes every other pending batch; the main rank finishes.
    out = tmp_path / "run"
    job = make_job(model, out, num_samples=5, per_sample_step=False)
    runner.begin(job).release()
    todo = loop.pending_batches(5, 2, None)
    stats = [loop.sample_batches(job, todo[r::2], sampler_fn=get_sampler("pc"), progress=loop.NoProgress())
             for r in range(2)]
    assert outputs.indices_on_disk(out) == set(range(5))
    record = runner._finish(job, stats[0], started=0.0, resumed=0)
    assert record["num_samples"] == 5
    runner.run(make_job(model, tmp_path / "ref", num_samples=5, per_sample_step=False))
    np.testing.assert_array_equal(samples_of(out), samples_of(tmp_path / "ref"))


def test_the_plan_is_ranges_not_lists():
    # -n 10**12 must not build a list of indices before the first batch.
    todo = loop.pending_batches(10**12, 7, None)
    assert isinstance(todo, range) and len(todo) == -(-10**12 // 7)
    assert loop.batch_indices(len(todo) - 1, 10**12, 7) == range(10**12 - 10**12 % 7, 10**12)
    assert isinstance(todo[1::4], range)
