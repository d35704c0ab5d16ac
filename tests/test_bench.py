"""`pds bench`: quick runs on the CPU (analytic model, the reference NCSN++ fixture, a tiny random
architecture), checked for the report's structure and for numbers that are positive and agree
with each other. No test asserts a speed: the machine may be shared and slow."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from pdscli.bench import backends, latency, quality, report as bench_report, timing
from pdscli.bench.config import NETWORK_BACKENDS, BenchConfig
from pdscli.bench.model import BenchModel
from pdscli.errors import PdsError
from pdscli.sample.model import ModelSpec

from conftest import QUICK, tiny_network_config

def _stats_ok(t: dict, repeats: int | None = None) -> None:
    """A timing summary: positive, ordered, and computed from the raw times it carries."""
    times = t["times_s"]
    assert times and all(v > 0 for v in times)
    if repeats is not None:
        assert len(times) == repeats == t["count"]
    assert t["min_s"] <= t["q1_s"] <= t["median_s"] <= t["q3_s"] <= t["max_s"]
    assert t["iqr_s"] == pytest.approx(t["q3_s"] - t["q1_s"])
    assert t["median_s"] == pytest.approx(sorted(times)[len(times) // 2] if len(times) % 2 else
                                          (sorted(times)[len(times) // 2 - 1] + sorted(times)[len(times) // 2]) / 2)


def _check_machine(report: dict) -> None:
    m = report["machine"]
    assert m["cpu"] and m["usable_cores"] >= 1 and m["torch_threads"] == 1
    assert m["libraries"]["torch"] == torch.__version__
    assert {"onnxruntime", "onnx", "tensorrt", "numpy", "pds"} <= set(m["libraries"])
    assert "gpu" in m  # None on a CPU machine, a dict with name/driver/cuda on a GPU one


def _check_backends(report: dict, names: list[str], batches: list[int], repeats: int) -> None:
    ok = {e["name"]: e for e in report["backends"] if e["status"] == "ok"}
    assert sorted(ok) == sorted(names), report["backends"]
    for e in ok.values():
        assert [r["batch"] for r in e["batches"]] == batches
        for r in e["batches"]:
            _stats_ok(r, repeats)
            assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"])
            assert r["per_image_s"] == pytest.approx(r["median_s"] / r["batch"])
            assert r["finite"]


def _check_e2e(report: dict, full: int, pds_steps: int, nfe_per_step: int = 2) -> dict:
    e2e = report["end_to_end"]
    assert e2e["status"] == "ok"
    vanilla, pds = e2e["runs"]
    assert (vanilla["sampler"], pds["sampler"]) == ("pc", "pds")
    assert (vanilla["steps"], pds["steps"]) == (full, pds_steps)
    assert vanilla["nfe"] == nfe_per_step * full and pds["nfe"] == nfe_per_step * pds_steps
    for run in (vanilla, pds):
        _stats_ok(run["timing"])
        assert run["images_per_s"] == pytest.approx(e2e["batch"] / run["timing"]["median_s"])
        # An end-to-end run makes `nfe` network calls: it cannot be much faster than that many of
        # the fastest call measured at its batch size (0.5: timing noise on a shared machine).
        fastest = min(r["median_s"] for e in report["backends"] if e["status"] == "ok"
                      for r in e["batches"] if r["batch"] == e2e["batch"])
        assert run["timing"]["median_s"] >= 0.5 * run["nfe"] * fastest
    assert e2e["speedup"] == pytest.approx(vanilla["timing"]["median_s"] / pds["timing"]["median_s"])
    assert e2e["nfe_ratio"] == pytest.approx(full / pds_steps)
    return e2e


# --- the analytic model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian_report(tmp_path_factory):
    """One quick run on the analytic model with every part, JSON and plot, shared by the tests below."""
    from pdscli.cli import main

    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--model", "gaussian", "--image-size", "16", *QUICK, "--samplers", "pc,pds,ddim,accel-ode2",
            "--nfe", "10,20", "--out", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), e.code
    return json.loads((out / "bench.json").read_text()), out


def test_gaussian_report_structure(gaussian_report):
    report, _ = gaussian_report
    assert report["format"] == bench_report.FORMAT
    assert report["command"].startswith("pds bench --model gaussian")
    _check_machine(report)
    assert report["model"]["kind"] == "analytic" and report["model"]["shape"] == [3, 16, 16]
    assert report["settings"]["quick"] and report["settings"]["batch_sizes"] == [1, 8]
    _check_backends(report, ["analytic"], [1, 8], repeats=3)
    assert report["flops"]["per_call"] is None and "FFT" in report["flops"]["note"]


def test_gaussian_pds_overhead_is_measured_per_batch(gaussian_report):
    report, _ = gaussian_report
    part = report["pds_overhead"]
    assert part["status"] == "ok" and [r["batch"] for r in part["batches"]] == [1, 8]
    for r in part["batches"]:
        _stats_ok(r["noise"], 3)
        _stats_ok(r["grad"], 3)
        assert r["per_nfe_s"] == pytest.approx(r["noise"]["median_s"] + r["grad"]["median_s"])
        nfe = latency.nfe_median(report["backends"], "analytic", r["batch"])
        assert r["fraction_of_nfe"]["analytic"] == pytest.approx(r["per_nfe_s"] / nfe)


def test_gaussian_end_to_end_has_speed_and_exact_quality(gaussian_report):
    report, _ = gaussian_report
    e2e = _check_e2e(report, full=40, pds_steps=20)
    assert e2e["backend"] == "analytic" and e2e["batch"] == 8 and e2e["samples"] == 16
    for run in e2e["runs"]:
        q = run["quality"]
        assert q["metric"] == "spectral_kl" and q["samples"] == 16
        assert q["value"] > 0 and 0 < q["floor"] < 0.1  # ~1/(4n) for n exact samples
    assert e2e["runs"][1]["alpha"] == 5.0
    assert report["filters"]["images_meaningful"] is True


def test_gaussian_samplers_at_equal_nfe(gaussian_report):
    report, _ = gaussian_report
    rows = report["samplers"]["rows"]
    assert [(r["sampler"], r["nfe_budget"]) for r in rows] == [
        (s, b) for s in ("pc", "pds", "ddim", "accel-ode2") for b in (10, 20)]
    for r in rows:
        assert r["status"] == "ok"
        assert r["nfe"] <= r["nfe_budget"]
        assert r["quality"]["value"] is not None and r["per_image_s"] > 0
    by = {(r["sampler"], r["nfe_budget"]): r for r in rows}
    assert by[("pc", 20)]["steps"] == 10 and by[("pc", 20)]["nfe"] == 20
    assert by[("ddim", 20)]["steps"] == 20 and by[("ddim", 20)]["schedule"] == "geometric"
    assert by[("accel-ode2", 20)]["steps"] == 10 and by[("accel-ode2", 20)]["nfe"] == 19
    assert by[("pds", 10)]["alpha"] == 5.0 and by[("pc", 10)]["alpha"] is None


def test_gaussian_plot_is_written(gaussian_report):
    _, out = gaussian_report
    data = (out / "bench.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 600 and height > 200


def test_json_to_stdout_keeps_stdout_parseable(run_pds):
    r = run_pds("bench", "--model", "gaussian", "--image-size", "8", "--channels", "1", *QUICK,
                "--skip", "overhead,e2e", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["end_to_end"]["status"] == "skipped" and report["pds_overhead"]["reason"] == "--skip overhead"
    assert "Network call (NFE) latency" in r.stderr  # the tables moved to stderr
    assert report["machine"]["cpu"] in r.stderr  # the machine is named in the human report too


@pytest.mark.slow  # `pds bench --quick`: minutes on a busy 2-core CPU
def test_default_quick_run_is_the_smoke_test(run_pds):
    """`pds bench --quick` as the README shows it: the built-in network (with its training digits as
    the quality reference) where it is installed, else the analytic model."""
    r = run_pds("bench", *QUICK, "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["model"]["name"] in ("builtin:digits", "gaussian")
    assert report["settings"]["batch_sizes"] == [1, 8] and report["elapsed_s"] > 0
    e2e = report["end_to_end"]
    assert e2e["status"] == "ok" and e2e["nfe_ratio"] == 2
    if report["model"]["name"] == "builtin:digits":
        assert report["filters"]["source"] == "the built-in model's own filters"
        pytest.importorskip("sklearn")
        assert report["quality"]["metric"] == "spectral_kl_vs_reference"
    assert all(run["quality"]["value"] is not None for run in e2e["runs"])


# --- NCSN++ networks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """24 PNGs of smooth 32x32 colour images: a stand-in data set for --reference."""
    from pdscli.evaluate.analytic import GaussianImageModel
    from pdscli.images import save_png

    folder = tmp_path_factory.mktemp("reference")
    g = GaussianImageModel(32, 3, power=1.5)
    for i, x in enumerate(g.sample(24, torch.Generator().manual_seed(3)).clamp(0, 1)):
        save_png(folder / f"{i:03d}.png", x)
    return folder


def test_fixture_network_quick(run_pds, fixture_dir, reference_dir):
    r = run_pds("bench", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json",
                *QUICK, "--backends", "eager,bf16,cuda-graph,trt-fp16,analytic", "--batch-sizes", "1,2",
                "--full-steps", "8", "--speed-up", "4", "--reference", reference_dir, "--quality-samples", "8", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    _check_machine(report)
    assert report["model"]["kind"] == "network" and report["model"]["num_params"] == 320_793
    _check_backends(report, ["eager", "bf16"], [1, 2], repeats=3)
    skipped = {e["name"]: e["reason"] for e in report["backends"] if e["status"] == "skipped"}
    if not torch.cuda.is_available():
        assert "--device cuda" in skipped["cuda-graph"]
    assert "analytic" in skipped and "trt-fp16" in skipped

    # FLOPs: counted per batch, linear in the batch, and FLOP/s = FLOPs / median time.
    flops = report["flops"]["per_call"]
    assert flops["1"] > 1e7 and flops["2"] == 2 * flops["1"]
    for e in report["backends"]:
        for row in e.get("batches", []):
            assert row["flops_per_call"] == flops[str(row["batch"])]
            assert row["achieved_flops_per_s"] == pytest.approx(row["flops_per_call"] / row["median_s"])
    errors = {e["name"]: e["batches"][0]["max_rel_err_vs_eager_fp32"] for e in report["backends"] if e["status"] == "ok"}
    assert errors["eager"] == 0 and 0 < errors["bf16"] < 0.1

    overhead = report["pds_overhead"]["batches"]
    assert all(0 < row["fraction_of_nfe"]["eager"] for row in overhead)
    _check_e2e(report, full=8, pds_steps=2)
    assert report["filters"]["source"].startswith("statistics of 24 --reference images")
    for run in report["end_to_end"]["runs"]:
        q = run["quality"]
        assert q["metric"] == "spectral_kl_vs_reference" and q["value"] is not None and q["value"] >= 0
        assert q["floor"] is None or q["floor"] >= 0


def test_random_weights_architecture(run_pds, fixture_dir, tmp_path):
    config = tiny_network_config(fixture_dir, tmp_path)
    r = run_pds("bench", "--config", config, "--random-weights", *QUICK, "--batch-sizes", "2",
                "--samplers", "ddim", "--nfe", "4", "--plot", tmp_path / "p.svg")
    assert r.exit_code == 0, r.stderr
    assert "random:tiny" in r.stdout and "PDS speedup" in r.stdout and "Samplers at equal NFE" in r.stdout
    assert "synthetic" in r.stdout  # PDS's filters are made up here, and the report says so
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.slow
def test_onnx_cpu_backend_matches_eager(run_pds, fixture_dir, tmp_path):
    r = run_pds("bench", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json",
                *QUICK, "--backends", "eager,onnx-cpu", "--batch-sizes", "2", "--skip", "e2e,overhead",
                "--cache-dir", tmp_path / "cache", "--out", tmp_path / "b.json")
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    onnx = next(e for e in report["backends"] if e["name"] == "onnx-cpu")
    assert onnx["status"] == "ok", onnx
    assert onnx["provider"] == "CPUExecutionProvider" and onnx["intra_op_threads"] == 1
    assert onnx["batches"][0]["max_rel_err_vs_eager_fp32"] < 1e-4
    exported = list((tmp_path / "cache").glob("*-fp32.onnx"))
    assert len(exported) == 1  # kept for the next run

    # The same file as an --engine: its own backend only, settings from its metadata.
    r = run_pds("bench", "--engine", exported[0], *QUICK, "--batch-sizes", "2", "--skip", "overhead",
                "--full-steps", "4", "--speed-up", "2", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["model"]["kind"] == "engine" and report["model"]["sampling_settings"]["sigma_max"] == 1348
    assert [e["name"] for e in report["backends"] if e["status"] == "ok"] == ["engine"]
    assert report["flops"]["per_call"] is None
    _check_e2e(report, full=4, pds_steps=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_backends_use_cuda_events(run_pds, fixture_dir, tmp_path):
    r = run_pds("bench", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json",
                "--device", "cuda", *QUICK, "--backends", "eager,fp16,cuda-graph", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["machine"]["gpu"]["name"]
    for e in report["backends"]:
        assert e["status"] == "ok", e
        assert all(row["clock"] == "cuda-events" and row["wall_mean_s"] > 0 for row in e["batches"])


# --- user errors: one line, exit code 2, before any model is loaded ---------------------------


@pytest.mark.parametrize("args, message", [
    (["--backends", "eager,warp-drive"], "--backends must be one of eager, bf16"),
    (["--batch-sizes", "1,x"], "--batch-sizes must be a whole number"),
    (["--batch-sizes", "0"], "at least 1"),
    (["--skip", "lunch"], "--skip must be one of nfe, overhead, e2e, samplers, not 'lunch'"),
    (["--samplers", "pc,magic"], "--samplers must be one of pc, pds, predictor, corrector"),
    (["--steps", "10", "--speed-up", "4"], "exclude each other"),
    (["--random-weights"], "--random-weights builds an architecture"),
    (["--preset", "cifar10"], "--config / --preset describe a --checkpoint"),
    (["--model", "gaussian", "--reference", "."], "--reference is for network models"),
    (["--model", "gaussian", "--engine", "x.onnx"], "choose one model"),
    (["--alpha", "strong"], "--alpha must be a positive number or auto, not 'strong'"),
    (["--image-size", "64", "--quiet"], "--image-size 64 does not match the model"),
    (["--model", "gaussian", "--plot", "out.gif"], "--plot writes .png, .pdf, .svg"),
    (["--repeats", "0"], "--repeats"),
])
def test_user_errors(run_pds, args, message):
    r = run_pds("bench", *args)
    assert r.exit_code == 2
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_existing_out_needs_force(run_pds, tmp_path):
    target = tmp_path / "b.json"
    target.write_text("{}")
    r = run_pds("bench", "--model", "gaussian", *QUICK, "--out", target)
    assert r.exit_code == 2 and "--force" in r.stderr
    assert target.read_text() == "{}"


# --- the pieces ----------------------------------------------------------------------------


def test_summarize_and_time_calls():
    s = timing.summarize([3.0, 1.0, 2.0, 4.0])
    assert (s["median_s"], s["min_s"], s["max_s"], s["count"]) == (2.5, 1.0, 4.0, 4)
    assert s["q1_s"] == pytest.approx(1.75) and s["iqr_s"] == pytest.approx(1.5)
    calls = []
    t = timing.time_calls(lambda: calls.append(1), warmup=2, repeats=5, device=torch.device("cpu"))
    assert len(calls) == 7 and t["count"] == 5 and t["clock"] == "perf_counter" and t["first_call_s"] >= 0


def test_reference_statistic_is_zero_on_itself_and_sees_leftover_noise():
    from pdscli.evaluate.analytic import GaussianImageModel

    g = GaussianImageModel(16, 3)
    images = g.sample(400, torch.Generator().manual_seed(0)).clamp(0, 1).double()
    q = quality.ReferenceQuality(images)
    assert q.measure(images)["value"] == pytest.approx(0, abs=1e-12)
    fresh = g.sample(100, torch.Generator().manual_seed(1)).clamp(0, 1)
    noisy = (fresh + 0.1 * torch.randn(fresh.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    clean, dirty = q.measure(fresh), q.measure(noisy)
    assert clean["value"] < 0.05 and dirty["value"] > 5 * clean["value"]
    assert dirty["high_band_variance_ratio"] > 1.5  # the extra energy sits at high frequencies
    assert 0 <= clean["floor"] < 0.05


def test_exact_quality_of_exact_samples_is_near_its_floor():
    from pdscli.evaluate.analytic import GaussianImageModel

    g = GaussianImageModel(16, 1)
    q = quality.ExactQuality(g)
    x = g.sample(256, torch.Generator().manual_seed(5))
    m = q.measure(x)
    assert m["floor"] == pytest.approx(1 / (4 * 256), rel=0.5) and m["value"] == pytest.approx(m["floor"], rel=0.5)


def test_backend_plan_reasons():
    from pdscli.settings import SamplingSettings

    settings = SamplingSettings(0.01, 50.0, 1000, 0.16, 8, 3)
    net = BenchModel("network", lambda x, s: x, settings, torch.device("cpu"), "n")
    cfg = BenchConfig(quick=False).resolved()
    plan = dict(backends.backend_plan(cfg, net))
    assert list(plan) == list(NETWORK_BACKENDS)
    assert plan["eager"] is None and plan["bf16"] is None
    assert "--device cuda" in plan["cuda-graph"] and "--device cuda" in plan["trt-fp16"]
    assert "CPU deployment" in plan["fp16"] and "GPU" in plan["onnx-cuda"]
    quick = dict(backends.backend_plan(BenchConfig(quick=True).resolved(), net))
    assert quick["eager"] is None and "--quick" in quick["bf16"]
    analytic = BenchModel("analytic", lambda x, s: x, settings, torch.device("cpu"), "gaussian")
    assert backends.backend_plan(cfg, analytic) == [("analytic", None)]


def test_json_is_strict():
    with pytest.raises(ValueError):
        bench_report.to_json({"x": math.nan})
    assert quality.finite_or_none(math.inf) is None and quality.finite_or_none(2) == 2.0


def test_config_errors_are_pds_errors():
    with pytest.raises(PdsError, match="--e2e-backend"):
        BenchConfig(e2e_backend="fastest").resolved()
    cfg = BenchConfig(batch_sizes=[1, 2], e2e_batch=3).resolved()
    assert cfg.batch_sizes == [1, 2, 3]  # the e2e batch is always measured per NFE too


# --- outputs: --json, --out, checked before the work; a full disk -----------------------------

TINY_RUN = ["--model", "gaussian", "--image-size", "8", "--channels", "1", *QUICK, "--batch-sizes", "1",
            "--skip", "overhead,e2e"]


def test_json_flag_prints_only_the_report_and_out_writes_the_same(run_pds, tmp_path):
    r = run_pds("bench", *TINY_RUN, "--json", "--out", tmp_path / "b.json")
    assert r.exit_code == 0, r.stderr
    printed, written = json.loads(r.stdout), json.loads((tmp_path / "b.json").read_text())
    assert printed["format"] == written["format"] == bench_report.FORMAT
    assert printed["backends"] == written["backends"]  # one report, two destinations
    words = printed["command"].split()
    assert "--json" in words and words[words.index("--out") + 1] == str(tmp_path / "b.json")


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_output_that_is_a_folder_is_refused_before_any_work(run_pds, tmp_path, monkeypatch, flag):
    """Issue 12, item 12: `--force` onto an existing folder used to fail with IsADirectoryError
    after the whole bench had run."""
    import pdscli.bench.run

    def no_work(*args, **kwargs):
        raise AssertionError("the bench ran before its output path was checked")

    monkeypatch.setattr(pdscli.bench.run, "run_bench", no_work)
    folder = tmp_path / "d"
    folder.mkdir()
    r = run_pds("bench", *TINY_RUN, flag, folder, "--force")
    assert r.exit_code == 2, r.stderr
    assert f"{flag} {folder} is a folder" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert folder.is_dir() and not any(folder.iterdir())


def _disk_full(monkeypatch):
    """Every fsync fails as on a full disk: what atomic writes hit when the data cannot land."""
    import errno
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


@pytest.mark.parametrize("flag, name", [("--out", "b.json"), ("--plot", "b.svg")])
def test_full_disk_while_writing_is_one_line_naming_the_path(run_pds, tmp_path, monkeypatch, flag, name):
    """Issue 12, item 4: a full disk is one line naming the file, exit 2, and no half file."""
    pytest.importorskip("matplotlib")
    _disk_full(monkeypatch)
    target = tmp_path / name
    r = run_pds("bench", *TINY_RUN, flag, target)
    assert r.exit_code == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert str(target) in line and "no space left" in line.lower()
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary beside it


# --- the ONNX export cache: keyed on content, verified before use -----------------------------


@pytest.fixture
def tiny_network(fixture_dir, tmp_path):
    """A random-weights NCSN++ small enough to export in seconds, as bench opens it."""
    from pdscli.bench.model import open_bench_model

    def make(seed=0):
        cfg = BenchConfig(spec=ModelSpec(config=tiny_network_config(fixture_dir, tmp_path), random_weights=True),
                          seed=seed).resolved()
        return open_bench_model(cfg, torch.device("cpu"))

    return make


def _cached_graphs(folder):
    return sorted(folder.glob("*.onnx"))


@pytest.mark.slow
def test_export_cache_reuses_only_a_verified_file(tiny_network, tmp_path):
    from pdscli.bench.export_cache import ExportCache, record_path

    model, folder = tiny_network(), tmp_path / "cache"
    first = ExportCache(folder).onnx(model, "fp32")
    assert not first.reused and _cached_graphs(folder) == [first.path]
    again = ExportCache(folder)
    second = again.onnx(model, "fp32")
    assert second.reused and second.data == first.data and again.warnings == []

    # Truncated (a full disk, a killed copy): exported again, with a warning, never loaded.
    first.path.write_bytes(first.data[: len(first.data) // 2])
    cache = ExportCache(folder)
    third = cache.onnx(model, "fp32")
    assert not third.reused and third.data == first.data and first.path.read_bytes() == first.data
    assert len(cache.warnings) == 1 and str(first.path) in cache.warnings[0]

    # A graph without the record beside it is not trusted either (nor one whose record is another key's).
    saved = record_path(first.path).read_text()
    record_path(first.path).unlink()
    cache = ExportCache(folder)
    assert cache._verified(first.path, first.key) is None and len(cache.warnings) == 1
    record_path(first.path).write_text(saved.replace(first.key, "0" * 64))
    assert cache._verified(first.path, first.key) is None and len(cache.warnings) == 2


def test_export_cache_key_is_the_content(tiny_network, tmp_path, monkeypatch):
    """Other weights (here another seed of the same architecture), another precision, other
    export metadata or another pds version give another key, hence another file name: whatever
    the checkpoint's or config's name, a cached export is only ever found by its own model."""
    from pdscli.bench import export_cache
    from pdscli.bench.export_cache import ExportCache

    cache, meta = ExportCache(tmp_path / "cache"), {"pds.precision": "fp32"}
    key = cache.export_key(tiny_network(seed=0), "fp32", meta)
    assert ExportCache(None).export_key(tiny_network(seed=0), "fp32", meta) == key  # the same weights rebuilt
    assert cache.export_key(tiny_network(seed=1), "fp32", meta) != key
    model = tiny_network(seed=0)
    assert cache.export_key(model, "fp16", meta) != key
    assert cache.export_key(model, "fp32", {**meta, "pds.preset": "x"}) != key
    monkeypatch.setattr(export_cache, "__version__", "999.0")
    assert cache.export_key(model, "fp32", meta) != key


def _identity_graph(channels: int, size: int) -> bytes:
    """A valid ONNX graph with the score's inputs and output that computes nothing (score = x)."""
    from onnx import TensorProto, helper

    from pdscli.engines import OUTPUT_NAME

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])
    sigma = helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["N"])
    out = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", channels, size, size])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], [OUTPUT_NAME])], "foreign", [x, sigma], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # one every supported onnxruntime loads
    return model.SerializeToString()


@pytest.mark.slow
def test_a_foreign_graph_in_the_cache_is_not_benchmarked(run_pds, fixture_dir, tmp_path):
    """Issue 12, item 14: another graph put under the cached name was timed (and reported as far
    faster than eager); now it is exported again, the report warns, and onnx-cpu matches eager."""
    pytest.importorskip("onnxruntime")
    config, cache = tiny_network_config(fixture_dir, tmp_path), tmp_path / "cache"
    args = ["bench", "--config", config, "--random-weights", *QUICK, "--backends", "eager,onnx-cpu",
            "--batch-sizes", "2", "--skip", "e2e,overhead", "--cache-dir", cache, "--json"]
    r = run_pds(*args)
    assert r.exit_code == 0, r.stderr
    [graph] = _cached_graphs(cache)
    graph.write_bytes(_identity_graph(3, 16))

    r = run_pds(*args)
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    onnx_entry = next(e for e in report["backends"] if e["name"] == "onnx-cpu")
    assert onnx_entry["status"] == "ok" and onnx_entry["onnx_reused_from_cache"] is False
    assert onnx_entry["batches"][0]["max_rel_err_vs_eager_fp32"] < 1e-4  # the real network, not x
    assert any(str(graph) in w and "not trusted" in w for w in report["warnings"])
