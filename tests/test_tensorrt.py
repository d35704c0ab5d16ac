"""TensorRT engines: build, load, parity across sigma at fp32/fp16/bf16, CUDA-graph replay, the cache.

They need TensorRT and a CUDA GPU and skip without them; the first test runs everywhere.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time

import pytest
import torch

from pdscli.errors import PdsError


def test_the_toolkit_never_imports_tensorrt():
    """`tensorrt` is imported lazily, only when a TensorRT engine is built or opened."""
    code = (
        "import sys\n"
        "import pdscli.cli, pdscli.engines, pdscli.engines.onnx_engine, pdscli.engines.tensorrt_engine\n"
        "import pdscli.engines.cache, pdscli.engines.torch_engine, pdscli.engines.onnx_export, pdscli.engines.parity, pdscli.engines.export\n"
        "assert 'tensorrt' not in sys.modules, 'tensorrt was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# --- the build orchestration with a stand-in builder (runs without TensorRT) --------------------------


@pytest.fixture
def fake_builder(monkeypatch):
    """build_engine's locking, cache hits, --force and manifest, with TensorRT's build replaced by a
    function of its inputs (engine bytes = what was asked for)."""
    import contextlib

    from pdscli.engines import tensorrt_engine as te
    from pdscli.engines.cache import BuildEnv

    calls = []

    def build_serialized(trt, onnx_bytes, *, profile, chw, options, timing):
        calls.append(profile)
        time.sleep(0.2)  # long enough for concurrent builders to collide without the lock
        return b"engine:" + onnx_bytes + repr(profile).encode(), timing + b"+"

    monkeypatch.setattr(te, "require_tensorrt", lambda device="cuda": (object(), torch.device("cuda")))
    monkeypatch.setattr(te, "current_env", lambda trt, device: BuildEnv("10.9.0", "Fake GPU", "9.0"))
    monkeypatch.setattr(te, "build_serialized", build_serialized)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    return calls


def _fake_build(engine, onnx=b"onnx-1", profile=(1, 2, 4), **kw):
    from pdscli.engines.tensorrt_engine import build_engine

    return build_engine(onnx, engine, precision="fp16", profile=profile, chw=(3, 8, 8),
                        metadata={"pds.sigma_min": "0.01"}, **kw)


def test_build_is_cached_by_content_and_needs_force_to_replace(fake_builder, tmp_path):
    from pdscli.engines.cache import read_manifest

    engine = tmp_path / "m.plan"
    assert _fake_build(engine) == (engine, False)
    manifest = read_manifest(engine)
    assert manifest["gpu_name"] == "Fake GPU" and manifest["profile"] == {"min": 1, "opt": 2, "max": 4}
    assert manifest["metadata"] == {"pds.sigma_min": "0.01"}
    assert _fake_build(engine) == (engine, True) and len(fake_builder) == 1  # a hit: not rebuilt
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    # The key is the content: the same inputs under another name build the same bytes.
    _fake_build(moved / "n.plan")
    assert (moved / "n.plan").read_bytes() == engine.read_bytes()
    with pytest.raises(PdsError, match="built from something else .*onnx_sha256.*--force"):
        _fake_build(engine, onnx=b"onnx-2")
    assert _fake_build(engine, onnx=b"onnx-2", force=True) == (engine, False)
    assert engine.read_bytes().startswith(b"engine:onnx-2")
    timing = list(tmp_path.glob("tensorrt-timing-*.cache"))
    assert len(timing) == 1 and timing[0].read_bytes() == b"++"  # read back and extended each build
    assert not list(tmp_path.glob(".*.tmp"))


def test_concurrent_builds_of_one_engine_build_once(fake_builder, tmp_path):
    engine, results = tmp_path / "m.plan", []
    threads = [threading.Thread(target=lambda: results.append(_fake_build(engine)[1])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True, True, True] and len(fake_builder) == 1


# --- everything below needs TensorRT and a GPU ------------------------------------------------------


@pytest.fixture(scope="module")
def trt():
    module = pytest.importorskip("tensorrt", reason="TensorRT not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return module


@pytest.fixture(scope="module")
def torch_net(trt, fixture_dir):
    from pdscli.models.checkpoint import load_score_model

    return load_score_model(fixture_dir / "checkpoint.pth", fixture_dir / "config.json", device="cuda")


@pytest.fixture(scope="module")
def onnx_bytes(torch_net):
    """The fixture checkpoint as ONNX at each precision (parity-checked on the GPU where ORT can)."""
    from pdscli.engines.onnx_export import export_metadata, export_onnx

    cache = {}

    def get(precision):
        if precision not in cache:
            meta = export_metadata(torch_net.settings, precision=precision)
            cache[precision] = export_onnx(torch_net, torch_net.settings, precision=precision, metadata=meta,
                                           device="cuda", batches=(1, 2), sigmas=3)
        return cache[precision]

    return get


PROFILE = (1, 2, 4)


def _build(onnx_export, engine, precision, settings, **kw):
    from pdscli.engines.tensorrt_engine import build_engine

    return build_engine(onnx_export.data, engine, precision=precision, profile=PROFILE, chw=settings.shape,
                        metadata=onnx_export.metadata, device="cuda", **kw)


@pytest.fixture(scope="module")
def engines(trt, onnx_bytes, torch_net, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trt")
    built = {}

    def get(precision):
        if precision not in built:
            path = folder / f"small-{precision}.plan"
            _build(onnx_bytes(precision), path, precision, torch_net.settings)
            built[precision] = path
        return built[precision]

    return get


def _cases(settings, batch):
    sig = torch.logspace(math.log10(settings.sigma_min), math.log10(settings.sigma_max), batch)
    g = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, *settings.shape, generator=g) + sig[:, None, None, None] * torch.randn(batch, *settings.shape, generator=g)
    return x.cuda(), sig.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_engine_matches_torch_across_sigma(precision, engines, torch_net):
    from pdscli.engines import open_engine
    from pdscli.engines.parity import TOLERANCES, exact_fp32

    model = open_engine(engines(precision), device="cuda")
    assert model.settings == torch_net.settings
    assert model.info["backend"] == "tensorrt" and model.info["precision"] == precision
    for batch in (1, 4, 6):  # 6 > the profile's max: split by the adapter
        x, sigma = _cases(torch_net.settings, batch)
        with torch.inference_mode(), exact_fp32():
            ref = torch_net(x, sigma)
        got = model.score(x, sigma)
        assert got.dtype == torch.float32 and got.shape == x.shape
        for b in range(batch):
            rel = ((got[b] - ref[b]).abs().max() / ref[b].abs().max()).item()
            assert rel <= TOLERANCES[precision], (precision, float(sigma[b]), rel)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(engines, torch_net):
    from pdscli.engines import open_engine

    eager = open_engine(engines("fp16"), device="cuda")
    graphed = open_engine(engines("fp16"), device="cuda", cuda_graph=True)
    for batch in (4, 3, 4, 2):  # captured at 4; smaller batches replay it on padded rows
        x, sigma = _cases(torch_net.settings, batch)
        # Same engine, same kernels: equal up to any non-deterministic reduction order.
        torch.testing.assert_close(graphed.score(x, sigma), eager.score(x, sigma), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_up_to_date_engine_is_a_cache_hit_and_a_changed_one_needs_force(onnx_bytes, torch_net, tmp_path):
    from pdscli.engines.cache import manifest_path, read_manifest
    from pdscli.engines.tensorrt_engine import build_engine

    export = onnx_bytes("fp32")
    engine = tmp_path / "m.plan"
    assert _build(export, engine, "fp32", torch_net.settings) == (engine, False)
    manifest = read_manifest(engine)
    assert manifest["precision"] == "fp32" and manifest["profile"] == {"min": 1, "opt": 2, "max": 4}
    assert manifest["metadata"]["pds.sigma_max"] == "1348.0"
    assert (tmp_path / "m.plan.lock").exists() and manifest_path(engine).exists()
    assert list(tmp_path.glob("tensorrt-timing-*.cache")), "no timing cache kept beside the engine"
    assert _build(export, engine, "fp32", torch_net.settings) == (engine, True)
    with pytest.raises(PdsError, match="built from something else.*profile.*--force"):
        build_engine(export.data, engine, precision="fp32", profile=(1, 4, 8), chw=torch_net.settings.shape,
                     metadata=export.metadata, device="cuda")
    build_engine(export.data, engine, precision="fp32", profile=(1, 4, 8), chw=torch_net.settings.shape,
                 metadata=export.metadata, device="cuda", force=True)
    assert read_manifest(engine)["profile"]["max"] == 8


@pytest.mark.gpu
def test_concurrent_builders_do_not_clobber(onnx_bytes, torch_net, tmp_path):
    export, engine, results, errors = onnx_bytes("fp32"), tmp_path / "c.plan", [], []

    def build():
        try:
            results.append(_build(export, engine, "fp32", torch_net.settings)[1])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [False, True]  # one built, the other found it
    assert not list(tmp_path.glob(".c.plan.*.tmp"))


@pytest.mark.gpu
def test_stale_or_corrupt_engines_are_refused(engines, tmp_path):
    import hashlib
    import shutil

    from pdscli.engines import open_engine

    src = engines("fp32")
    engine = tmp_path / "s.plan"
    shutil.copy(src, engine)
    manifest = json.loads(src.with_name(src.name + ".json").read_text())

    stale = {**manifest, "gpu_name": "Some Other GPU", "compute_capability": "7.5"}
    engine.with_name("s.plan.json").write_text(json.dumps(stale))
    with pytest.raises(PdsError, match="refusing stale engine.*Some Other GPU"):
        open_engine(engine, device="cuda")

    engine.with_name("s.plan.json").write_text(json.dumps({**manifest, "tensorrt_version": "0.0.1"}))
    with pytest.raises(PdsError, match="TensorRT 0.0.1"):
        open_engine(engine, device="cuda")

    engine.with_name("s.plan.json").write_text(json.dumps(manifest))
    engine.write_bytes(engine.read_bytes()[:1000])
    with pytest.raises(PdsError, match="does not match its manifest"):
        open_engine(engine, device="cuda")

    garbage = b"\x00" * 4096
    engine.write_bytes(garbage)
    engine.with_name("s.plan.json").write_text(json.dumps({**manifest, "engine_sha256": hashlib.sha256(garbage).hexdigest()}))
    with pytest.raises(PdsError, match="TensorRT cannot load"):
        open_engine(engine, device="cuda")


@pytest.mark.gpu
def test_cli_builds_an_engine_and_samples_with_it(run_pds, trt, fixture_dir, tmp_path):
    out = tmp_path / "engines" / "small-fp16.plan"
    args = ("export", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json",
            "--format", "trt", "--precision", "fp16", "--min-batch", "1", "--max-batch", "4", "--out", out)
    r = run_pds(*args)
    assert r.exit_code == 0, r.stderr
    assert out.exists() and out.with_name(out.name + ".json").exists() and out.with_suffix(".onnx").exists()
    assert "TensorRT" in r.stderr and "max rel" in r.stderr
    again = run_pds(*args)  # same inputs: nothing rebuilt, no --force needed
    assert again.exit_code == 0 and "up to date" in again.stdout
    r = run_pds("sample", "--engine", out, "--steps", "2", "-n", "3", "-b", "3", "--out", tmp_path / "s", "--device", "cuda", "-q")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "s" / "000002.png").exists()
