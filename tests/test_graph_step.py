"""The GPU paths, as far as a CPU can check them: step graphs (pdscli.engines.graph_step) fall back
to the eager step and give its samples, channels_last gives the NCHW network's scores, and the
TF32 policy is set and reported. The graph-replay comparison itself runs on a GPU (the test at the
end, and scripts/gpu_bench.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pdscli.devices import TF32_POLICIES, set_tf32, tf32_state
from pdscli.engines.graph_step import (
    COMPILED, CUDA_GRAPH, EAGER, STEP_PATHS, CompiledStepSampler, StepGraphSampler, step_sampler,
)
from pdscli.errors import PdsError
from pdscli.evaluate.analytic import gaussian_score_model
from pdscli.noise import SampleNoise
from pdscli.precondition import Preconditioner
from pdscli.precondition.operator import Filters
from pdscli.samplers import get_sampler, pc_steps
from pdscli.samplers.grids import make_steps
from pdscli.samplers.pc import PCOptions
from pdscli.score import CountingScore

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def model():
    return gaussian_score_model(8, 3, device="cpu")


def _steps(model, name, n=6):
    return pc_steps(model.settings, n) if name in ("pc", "pds", "predictor", "corrector") else make_steps("geometric", model.settings, n)


@pytest.mark.parametrize("name", ["pc", "ddpm", "accel-ode"])
def test_cpu_falls_back_to_the_eager_step_and_says_why(model, name):
    fn, steps = get_sampler(name), _steps(model, name)
    wrapped = StepGraphSampler(fn, "cpu")
    seen_eager, seen_wrapped = [], []
    for batch in ([0, 1, 2], [3, 4, 5], [6, 7]):
        eager = fn(model.score, SampleNoise(4, batch, model.settings.shape), steps, callback=lambda i: seen_eager.append(i["nfe"]))
        got = wrapped(model.score, SampleNoise(4, batch, model.settings.shape), steps, callback=lambda i: seen_wrapped.append(i["nfe"]))
        assert torch.equal(got, eager)
    assert seen_wrapped == seen_eager
    summary = wrapped.summary()
    assert summary["path"] == EAGER and "CUDA device" in summary["reason"] and summary["batches"] == {EAGER: 3, CUDA_GRAPH: 0}


def test_switched_off_it_is_the_sampler_itself(model):
    fn, steps = get_sampler("pc"), _steps(model, "pc")
    wrapped = StepGraphSampler(fn, "cpu", enabled=False)
    got = wrapped(model.score, SampleNoise(1, [0, 1], model.settings.shape), steps, snr=0.2, per_sample_step=True)
    assert torch.equal(got, fn(model.score, SampleNoise(1, [0, 1], model.settings.shape), steps, snr=0.2, per_sample_step=True))
    assert wrapped.summary()["reason"] == "step graphs off"


def test_a_run_records_the_path_and_makes_the_same_images(model, tmp_path):
    from pdscli.sample.job import SampleJob
    from pdscli.sample.run import run

    records, samples = [], []
    for path in STEP_PATHS:
        out = tmp_path / path
        job = SampleJob(model=model, sampler="pc", steps=_steps(model, "pc"), out=out, num_samples=3,
                        batch_size=2, seed=2, snr=model.settings.snr, step_path=path)
        records.append(run(job))
        samples.append(np.load(out / "samples.npz")["samples"])
        assert json.loads((out / "run.json").read_text())["step_graph"] == records[-1]["step_graph"]
    np.testing.assert_array_equal(samples[0], samples[1])
    np.testing.assert_array_equal(samples[0], samples[2])
    off, graphs, compiled = (r["step_graph"] for r in records)
    assert off["reason"] == "step graphs off" and graphs["path"] == EAGER and "CUDA" in graphs["reason"]
    assert compiled["path"] == EAGER and compiled["mode"] == "reduce-overhead"
    assert "needs a CUDA device (this run is on cpu)" in compiled["reason"]
    assert records[1]["tf32"]["applies"] is False


@pytest.mark.parametrize("flags, path", [
    ([], "off"),
    (["--step-graphs"], CUDA_GRAPH),
    (["--whole-step", "cuda-graph", "--step-graphs"], CUDA_GRAPH),
    (["--whole-step", "Compile"], COMPILED),
])
def test_whole_step_picks_the_path_from_the_command_line(run_pds, tmp_path, flags, path):
    out = tmp_path / "out"
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--channels", "1", "--steps", "3", "-n", "2",
                "-b", "2", "--device", "cpu", "--out", out, "--quiet", *flags)
    assert r.exit_code == 0, r.stderr
    record = json.loads((out / "run.json").read_text())["step_graph"]
    assert record["path"] == EAGER  # a CPU runs every path eagerly, and says why
    expected = {"off": "step graphs off", CUDA_GRAPH: "CUDA graphs need a CUDA device (this run is on cpu)",
                COMPILED: "needs a CUDA device (this run is on cpu)"}[path]
    assert expected in record["reason"] and ("mode" in record) == (path == COMPILED)


@pytest.mark.parametrize("flags, message", [
    (["--whole-step", "graphs"], "error: --whole-step must be one of off, cuda-graph, compile, not 'graphs'"),
    (["--whole-step", "compile", "--step-graphs"],
     "error: --step-graphs is --whole-step cuda-graph: drop it to run --whole-step compile"),
])
def test_whole_step_refusals(run_pds, tmp_path, flags, message):
    from conftest import one_line_error

    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--out", tmp_path / "out", *flags)
    assert one_line_error(r) == message and not (tmp_path / "out").exists()


# -- the torch.compile(mode="reduce-overhead") variant --------------------------------------------


def test_step_sampler_picks_the_path(model):
    fn = get_sampler("pc")
    off, graphs, compiled = (step_sampler(fn, "cpu", p) for p in ("off", "cuda-graph", "compile"))
    assert isinstance(off, StepGraphSampler) and not off.enabled
    assert isinstance(graphs, StepGraphSampler) and graphs.enabled
    assert isinstance(compiled, CompiledStepSampler) and (compiled.mode, compiled.backend) == ("reduce-overhead", "inductor")
    with pytest.raises(ValueError, match="step path must be one of off, cuda-graph, compile"):
        step_sampler(fn, "cpu", "graphs")


def test_reduce_overhead_on_cpu_runs_the_eager_step_and_says_why(model):
    fn, steps = get_sampler("pds"), _steps(model, "pds")
    wrapped = step_sampler(fn, "cpu", "compile")
    for batch in ([0, 1], [2, 3]):
        got = wrapped(model.score, SampleNoise(3, batch, model.settings.shape), steps)
        assert torch.equal(got, fn(model.score, SampleNoise(3, batch, model.settings.shape), steps))
    summary = wrapped.summary()
    assert summary["path"] == EAGER and summary["batches"] == {EAGER: 2, COMPILED: 0}
    assert "needs a CUDA device (this run is on cpu)" in summary["reason"] and summary["compile_s"] is None


@pytest.mark.parametrize("name", ["pc", "ddim", "accel-ode"])
def test_dynamo_traced_steps_give_the_eager_samples(model, name):
    """Dynamo's tracing alone (backend "eager"): the whole-step path's graphs, graph breaks and
    callbacks, without Inductor's C++ compile on a CPU."""
    fn, steps = get_sampler(name), _steps(model, name)
    wrapped = CompiledStepSampler(fn, "cpu", mode=None, backend="eager")
    seen_eager, seen_wrapped = [], []
    for batch in ([0, 1, 2], [3, 4, 5], [6, 7]):  # the last, partial batch runs eagerly
        counting = CountingScore(model.score)
        eager = fn(model.score, SampleNoise(4, batch, model.settings.shape), steps, callback=lambda i: seen_eager.append(i["nfe"]))
        got = wrapped(counting, SampleNoise(4, batch, model.settings.shape), steps, callback=lambda i: seen_wrapped.append(i["nfe"]))
        assert torch.equal(got, eager)
        assert counting.calls == seen_eager[-1]
    assert seen_wrapped == seen_eager
    summary = wrapped.summary()
    assert summary["path"] == COMPILED and summary["batches"] == {EAGER: 1, COMPILED: 2}
    assert summary["reason"] == "batch of 2: compiled for 3 (fixed shapes)"
    assert summary["compile_s"] > 0 and summary["graphs"]["graphs"] >= 1


def test_a_failed_compile_falls_back_to_the_eager_step(model):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler today")

    fn, steps = get_sampler("pc"), _steps(model, "pc")
    wrapped = CompiledStepSampler(fn, "cpu", mode=None, backend=broken)
    for batch in ([0, 1], [2, 3]):
        counting = CountingScore(model.score)
        got = wrapped(counting, SampleNoise(6, batch, model.settings.shape), steps)
        assert torch.equal(got, fn(model.score, SampleNoise(6, batch, model.settings.shape), steps))
        assert counting.calls == 2 * len(steps)  # the failed attempt's calls are not counted
    summary = wrapped.summary()
    assert summary["path"] == EAGER and summary["batches"] == {EAGER: 2, COMPILED: 0}
    assert summary["reason"].startswith("compile failed (") and "no compiler today" in summary["reason"]


def test_the_samplers_own_errors_are_not_taken_for_compile_failures(model):
    fn, steps = get_sampler("pc"), _steps(model, "pc")
    wrapped = CompiledStepSampler(fn, "cpu", mode=None, backend="eager")
    unbuildable = PCOptions(predictor="euler_maruyama")  # no log_ratio: the sampler itself refuses it
    with pytest.raises(PdsError, match="euler_maruyama predictor needs"):
        wrapped(model.score, SampleNoise(6, [0], model.settings.shape), steps, options=unbuildable)


@pytest.mark.slow
def test_inductor_compiled_steps_match_the_eager_samples(model):
    """Inductor itself (C++ on a CPU: slow to compile): the same samples up to float32 rounding."""
    fn, steps = get_sampler("ddim"), _steps(model, "ddim", 3)
    wrapped = CompiledStepSampler(fn, "cpu", mode="default")
    for batch in ([0, 1], [2, 3]):
        got = wrapped(model.score, SampleNoise(2, batch, model.settings.shape), steps)
        eager = fn(model.score, SampleNoise(2, batch, model.settings.shape), steps)
        assert torch.allclose(got, eager, rtol=1e-4, atol=1e-5)
    assert wrapped.summary()["batches"] == {EAGER: 0, COMPILED: 2}


# -- channels_last and TF32 -----------------------------------------------------------------------


def test_channels_last_gives_the_nchw_scores(fixture_dir):
    from pdscli.engines.torch_engine import torch_score
    from pdscli.models.checkpoint import load_score_model

    net = load_score_model(fixture_dir / "checkpoint.pth", fixture_dir / "config.json")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 30.0])
    ref = torch_score(net, device="cpu")(x, sigma)
    got = torch_score(net, device="cpu", channels_last=True)(x, sigma)
    assert got.is_contiguous() and got.dtype == torch.float32
    for b in range(2):  # another convolution algorithm: float32 rounding, relative to each sample's scale
        assert float((got[b] - ref[b]).abs().max()) <= 1e-4 * float(ref[b].abs().max())


@pytest.fixture
def restore_tf32():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_policies_set_and_report_the_flags(restore_tf32):
    assert set_tf32("on") == {"policy": "on", "matmul": True, "conv": True, "applies": None}
    assert set_tf32("off") == {"policy": "off", "matmul": False, "conv": False, "applies": None}
    torch.backends.cudnn.allow_tf32 = True  # torch's own default
    assert set_tf32("torch")["policy"] == "torch"  # left as it was
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False
    assert tf32_state("cpu") == {"policy": "mixed", "matmul": True, "conv": False, "applies": False}
    assert set(TF32_POLICIES) == {"off", "on", "torch"}
    with pytest.raises(PdsError, match="--tf32 must be one of off, on, torch"):
        set_tf32("fast")


def test_sample_cli_takes_tf32_and_records_it(run_pds, tmp_path, restore_tf32):
    out = tmp_path / "run"
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--steps", "2", "-n", "1", "-q", "--out", out, "--tf32", "on")
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "run.json").read_text())["tf32"]["policy"] == "on"
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--steps", "2", "-n", "1", "-q", "--out", tmp_path / "b", "--tf32", "x")
    assert r.exit_code == 2 and "--tf32 must be one of" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- on a GPU: the replayed graphs against the eager step -----------------------------------------


def _preconditioner(shape):
    rng = np.random.default_rng(0)
    filters = Filters(freq=rng.uniform(1, 5, shape), space=rng.uniform(0.1, 0.5, shape), size=shape[-1], channels=shape[0], count=10)
    return Preconditioner.from_filters(filters, 5.0, torch.device("cuda"))


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU: the replay is compared with the eager step by scripts/gpu_bench.py on one")
@pytest.mark.parametrize("name", ["pc", "pds", "predictor", "ddim", "ddpm", "accel-sde", "accel-ode"])
def test_replayed_graphs_give_the_eager_samples(name):
    model = gaussian_score_model(16, 3, device="cuda")
    fn, steps = get_sampler(name), _steps(model, name, 8)
    precond = _preconditioner(model.settings.shape) if name == "pds" else None
    wrapped = StepGraphSampler(fn, "cuda")
    for batch in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]):
        eager = fn(model.score, SampleNoise(4, batch, model.settings.shape, "cuda"), steps, precond=precond)
        got = wrapped(model.score, SampleNoise(4, batch, model.settings.shape, "cuda"), steps, precond=precond)
        assert torch.allclose(got, eager, rtol=1e-5, atol=1e-6), (name, batch)
    summary = wrapped.summary()
    if name == "accel-ode":  # its NaN guard reads a tensor on the host: not capturable
        assert summary["path"] == EAGER and "capture failed" in summary["reason"]
    else:
        assert summary["path"] == CUDA_GRAPH and summary["batches"] == {EAGER: 1, CUDA_GRAPH: 2}


def test_a_samplers_own_keywords_pass_through(model):
    from pdscli.samplers.pc import PCOptions

    fn, steps = get_sampler("pc"), _steps(model, "pc")
    options = PCOptions(corrector="none")
    wrapped = StepGraphSampler(fn, "cpu")
    got = wrapped(model.score, SampleNoise(5, [0, 1], model.settings.shape), steps, options=options)
    assert torch.equal(got, fn(model.score, SampleNoise(5, [0, 1], model.settings.shape), steps, options=options))


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU: the reduce-overhead path is compared with the eager step on one")
@pytest.mark.parametrize("name", ["pc", "pds", "ddim", "accel-ode"])
def test_reduce_overhead_steps_give_the_eager_samples(name):
    model = gaussian_score_model(16, 3, device="cuda")
    fn, steps = get_sampler(name), _steps(model, name, 8)
    precond = _preconditioner(model.settings.shape) if name == "pds" else None
    wrapped = step_sampler(fn, "cuda", "compile")
    for batch in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]):
        eager = fn(model.score, SampleNoise(4, batch, model.settings.shape, "cuda"), steps, precond=precond)
        got = wrapped(model.score, SampleNoise(4, batch, model.settings.shape, "cuda"), steps, precond=precond)
        assert torch.allclose(got, eager, rtol=1e-5, atol=1e-6), (name, batch)
    assert wrapped.summary()["batches"] == {EAGER: 0, COMPILED: 3}
