"""Engines at sampling time: ONNX Runtime against PyTorch, the batch adapter, the TensorRT cache key
and manifest (plain data, no TensorRT needed), and bad engine files through the CLI."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from pdscli.engines import BatchAdapter, check_io_signature, open_engine
from pdscli.engines.cache import (
    BuildEnv,
    BuildSpec,
    build_lock,
    cache_key,
    check_manifest,
    differences,
    is_up_to_date,
    make_manifest,
    read_manifest,
    write_manifest,
)
from pdscli.errors import PdsError

from conftest import one_line_error

SETTINGS_FLAGS = ["--sigma-min", "0.01", "--sigma-max", "1348", "--num-scales", "2000", "--snr", "0.15"]


@pytest.fixture(scope="module")
def torch_net(fixture_dir):
    from pdscli.models.checkpoint import load_score_model

    return load_score_model(fixture_dir / "checkpoint.pth", fixture_dir / "config.json")


@pytest.fixture(scope="module")
def onnx_file(fixture_onnx):
    """The fixture checkpoint at fp32: the session's one export (conftest.fixture_onnx); read-only."""
    return fixture_onnx.path


def _rewrite(src, dst, edit):
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))
    return dst


# --- ONNX Runtime engine ---------------------------------------------------------------------


def test_onnx_engine_reads_settings_and_matches_torch_across_sigma(onnx_file, torch_net):
    model = open_engine(onnx_file, device="cpu")
    assert model.settings == torch_net.settings
    assert model.info["provider"] == "CPUExecutionProvider" and model.info["precision"] == "fp32"
    assert model.sha256 and model.name.startswith("onnx:")
    g = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.01, 0.3, 20.0, 1348.0])
    x = torch.rand(4, 3, 32, 32, generator=g) + sigma[:, None, None, None] * torch.randn(4, 3, 32, 32, generator=g)
    with torch.inference_mode():
        ref = torch_net(x, sigma)
    got = model.score(x, sigma)
    assert got.dtype == torch.float32 and got.shape == x.shape
    for b in range(4):  # per sample: the scale of the score spans 1e-3 .. 1e4 across sigma
        assert (got[b] - ref[b]).abs().max() <= 1e-4 * ref[b].abs().max(), f"sigma {sigma[b]}"


def test_sampling_through_onnx_gives_the_torch_images(onnx_file, torch_net):
    """The full PC loop (corrector + predictor, 4 steps) through both engines, same seed."""
    from pdscli.noise import SampleNoise
    from pdscli.samplers import pc_steps
    from pdscli.samplers.pc import pc

    model = open_engine(onnx_file, device="cpu")
    steps = pc_steps(model.settings, 4)
    results = []
    for score in (torch_net, model.score):
        noise = SampleNoise(seed=7, indices=[0, 1], shape=model.settings.shape)
        with torch.inference_mode():
            results.append(pc(score, noise, steps, snr=model.settings.snr))
    a, b = results
    # The fixture's weights are random, so the "images" are far outside [0, 1]: compare the
    # raw result relative to its scale, and the clipped images a run would write.
    assert (a - b).abs().max() <= 1e-3 * max(1.0, a.abs().max().item())
    assert (a.clamp(0, 1) - b.clamp(0, 1)).abs().max() <= 1e-3


def test_fixed_batch_onnx_is_padded_not_run_at_other_shapes(onnx_file, tmp_path, torch_net):
    def fix_batch(proto):
        for v in [*proto.graph.input, *proto.graph.output]:
            v.type.tensor_type.shape.dim[0].dim_value = 2

    path = _rewrite(onnx_file, tmp_path / "fixed.onnx", fix_batch)
    model = open_engine(path, device="cpu")
    assert model.info["fixed_batch"] == 2 and isinstance(model.score, BatchAdapter)
    x, sigma = torch.rand(3, 3, 32, 32), torch.tensor([0.5, 5.0, 50.0])
    got = model.score(x, sigma)  # 3 = 2 + (1 padded to 2)
    with torch.inference_mode():
        ref = torch_net(x, sigma)
    assert got.shape == x.shape
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_metadata_missing_settings_come_from_flags(onnx_file, tmp_path):
    path = _rewrite(onnx_file, tmp_path / "bare.onnx", lambda p: p.ClearField("metadata_props"))
    with pytest.raises(PdsError, match="--sigma-min, --sigma-max, --num-scales, --snr"):
        open_engine(path, device="cpu")
    model = open_engine(path, device="cpu", overrides=dict(sigma_min=0.01, sigma_max=1348.0, num_scales=2000, snr=0.15))
    # The image shape is read from the graph itself.
    assert model.settings.image_size == 32 and model.settings.num_channels == 3


def test_precision_must_match_the_file(onnx_file):
    with pytest.raises(PdsError, match="exported at fp32, not fp16"):
        open_engine(onnx_file, device="cpu", precision="fp16")


def test_onnx_with_wrong_inputs_is_refused(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["y"])], "g", [x], [y])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    with pytest.raises(PdsError, match="does not follow the score contract") as e:
        open_engine(path, device="cpu")
    assert "\n" not in str(e.value)


def _wrong_shape_onnx(path):
    """Declares the score contract, but its score is x and x stacked: twice the batch, known only at run time."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, 4, 4])
    sigma = helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["B"])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B", 1, 4, 4])
    graph = helper.make_graph([helper.make_node("Concat", ["x", "x"], ["score"], axis=0)], "g", [x, sigma], [score])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


def test_onnx_output_of_the_wrong_shape_at_run_time_is_one_line(tmp_path, run_pds):
    path = _wrong_shape_onnx(tmp_path / "twice.onnx")
    model = open_engine(path, device="cpu", overrides={"sigma_min": 0.01, "sigma_max": 1.0, "num_scales": 10, "snr": 0.16})
    with pytest.raises(PdsError, match=r"returned score \[4, 1, 4, 4\] for x \[2, 1, 4, 4\]") as e:
        model.score(torch.zeros(2, 1, 4, 4), torch.ones(2))
    assert "\n" not in str(e.value)
    r = run_pds("sample", "--engine", path, "--steps", 2, "-n", 2, "-b", 2, "--out", tmp_path / "out", "--quiet",
                "--sigma-min", 0.01, "--sigma-max", 1.0, "--num-scales", 10, "--snr", 0.16)
    assert r.exit_code == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "score contract" in r.stderr


def test_one_session_factory_for_bytes_and_paths(onnx_file):
    """create_session takes a path or the bytes, sets the threads, and names the model in its errors."""
    from pdscli.engines.onnx_engine import choose_providers, create_session

    providers = choose_providers(torch.device("cpu"), None)
    for model in (onnx_file, onnx_file.read_bytes()):
        session = create_session(model, providers, threads=1, label="m")
        assert session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(PdsError, match="cannot load the-label as an ONNX model"):
        create_session(b"not a graph", providers, label="the-label")


@pytest.mark.parametrize(
    "inputs, outputs, match",
    [
        ([("x", "float16", [None, 3, 8, 8]), ("sigma", "float32", [None])], [("score", "float32", [None, 3, 8, 8])], "float32"),
        ([("x", "float32", [None, 3, 8]), ("sigma", "float32", [None])], [("score", "float32", [None, 3, 8, 8])], "ranks"),
        ([("x", "float32", [None, 3, 8, 8]), ("sigma", "float32", [None])], [("score", "float32", [None, 1, 8, 8])], "same fixed"),
        ([("x", "float32", [None, 3, None, None]), ("sigma", "float32", [None])], [("score", "float32", [None, 3, None, None])], "same fixed"),
    ],
)
def test_io_signature_checks(inputs, outputs, match):
    with pytest.raises(PdsError, match=match):
        check_io_signature("m.onnx", inputs, outputs)


def test_io_signature_accepts_the_contract():
    chw, batch = check_io_signature(
        "m.onnx", [("sigma", "float32", [None]), ("x", "float32", [None, 3, 8, 8])], [("score", "float32", [None, 3, 8, 8])]
    )
    assert chw == (3, 8, 8) and batch is None


def test_unknown_engine_type_and_missing_file(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(PdsError, match="cannot tell the engine type"):
        open_engine(tmp_path / "m.bin")
    with pytest.raises(PdsError, match="does not exist"):
        open_engine(tmp_path / "nope.onnx")


# --- the batch adapter -------------------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma):
        self.batches.append(x.shape[0])
        assert sigma.shape == (x.shape[0],)
        return x * sigma[:, None, None, None]


@pytest.mark.parametrize("b, lo, hi, seen", [(3, 4, 4, [4]), (9, 4, 4, [4, 4, 4]), (5, 1, 8, [5]), (10, 2, 4, [4, 4, 2]), (9, 2, 4, [4, 4, 2])])
def test_batch_adapter_pads_and_splits(b, lo, hi, seen):
    fn = _Recorder()
    x, sigma = torch.randn(b, 1, 2, 2), torch.rand(b) + 0.5
    out = BatchAdapter(fn, lo, hi)(x, sigma)
    assert fn.batches == seen
    assert torch.equal(out, x * sigma[:, None, None, None])


# --- the TensorRT cache key and manifest (no TensorRT needed) --------------------------------------

ENV = BuildEnv("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
SPEC = BuildSpec("ab" * 32, "fp16", (1, 8, 16), {"opt_level": 3, "workspace_gib": None, "tf32": False})


def _spec(**changes):
    import dataclasses

    return dataclasses.replace(SPEC, **changes)


def test_cache_key_follows_content_not_path():
    import dataclasses

    key = cache_key(SPEC, ENV)
    assert cache_key(_spec(), ENV) == key  # deterministic
    changed = [
        _spec(onnx_sha256="ab" * 31 + "ac"),  # one ONNX byte changed -> another sha256
        _spec(precision="bf16"),
        _spec(profile=(1, 8, 32)),
        _spec(profile=(2, 8, 16)),
        _spec(options={**SPEC.options, "opt_level": 5}),
    ]
    for spec in changed:
        assert cache_key(spec, ENV) != key, spec
    for env in (dataclasses.replace(ENV, tensorrt_version="10.4.0"), dataclasses.replace(ENV, gpu_name="NVIDIA A100"),
                dataclasses.replace(ENV, compute_capability="8.0")):
        assert cache_key(SPEC, env) != key, env


def test_key_changes_with_one_onnx_byte(onnx_file):
    import hashlib

    data = bytearray(onnx_file.read_bytes())
    keys = set()
    for blob in (bytes(data), bytes(data[:-1] + bytes([data[-1] ^ 1]))):
        keys.add(cache_key(_spec(onnx_sha256=hashlib.sha256(blob).hexdigest()), ENV))
    assert len(keys) == 2


def _engine_with_manifest(tmp_path, env=ENV):
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"engine bytes")
    sha = hashlib.sha256(b"engine bytes").hexdigest()
    write_manifest(engine, make_manifest(SPEC, env, engine_sha256=sha, metadata={"pds.sigma_min": "0.01"}))
    return engine


def test_manifest_from_another_gpu_or_tensorrt_is_refused(tmp_path):
    import dataclasses

    engine = _engine_with_manifest(tmp_path)
    manifest = read_manifest(engine)
    check_manifest(manifest, ENV, engine)  # same GPU and TensorRT: fine
    with pytest.raises(PdsError, match="built on NVIDIA H100 80GB HBM3 .*this is NVIDIA A100"):
        check_manifest(manifest, dataclasses.replace(ENV, gpu_name="NVIDIA A100", compute_capability="8.0"), engine)
    with pytest.raises(PdsError, match="TensorRT 10.3.0, this is TensorRT 10.4.0"):
        check_manifest(manifest, dataclasses.replace(ENV, tensorrt_version="10.4.0"), engine)


def test_manifest_cache_hit_and_differences(tmp_path):
    engine = _engine_with_manifest(tmp_path)
    assert is_up_to_date(engine, cache_key(SPEC, ENV))
    assert not is_up_to_date(engine, cache_key(_spec(precision="fp32"), ENV))
    engine.write_bytes(b"engine bytes, changed")  # the same manifest over other bytes is no hit
    assert not is_up_to_date(engine, cache_key(SPEC, ENV))
    assert differences(read_manifest(engine), _spec(profile=(1, 8, 32)), ENV) == [
        "profile {'min': 1, 'opt': 8, 'max': 16} -> {'min': 1, 'opt': 8, 'max': 32}"
    ]


def test_missing_or_foreign_manifest_is_an_error(tmp_path):
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"x")
    with pytest.raises(PdsError, match="has no manifest"):
        read_manifest(engine)
    (tmp_path / "m.plan.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(PdsError, match="not a pds TensorRT manifest"):
        read_manifest(engine)
    (tmp_path / "m.plan.json").write_text("{not json")
    with pytest.raises(PdsError, match="cannot read engine manifest"):
        read_manifest(engine)


def test_build_lock_serialises_builders(tmp_path):
    """A second builder of the same engine waits for the first (flock on <engine>.lock)."""
    engine = tmp_path / "m.plan"
    events = []

    def builder(name, hold):
        with build_lock(engine):
            events.append(f"{name} in")
            time.sleep(hold)
            events.append(f"{name} out")

    first = threading.Thread(target=builder, args=("a", 0.3))
    first.start()
    time.sleep(0.1)
    second = threading.Thread(target=builder, args=("b", 0))
    second.start()
    first.join()
    second.join()
    assert events == ["a in", "a out", "b in", "b out"]
    assert (tmp_path / "m.plan.lock").exists()


# --- the PyTorch engine --------------------------------------------------------------------------


def test_torch_engine_is_the_module(torch_net):
    from pdscli.engines.torch_engine import torch_score

    score = torch_score(torch_net, device="cpu")
    x, sigma = torch.rand(2, 3, 32, 32), torch.tensor([0.1, 10.0])
    with torch.inference_mode():
        ref = torch_net(x, sigma)
    assert torch.equal(score(x, sigma), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_torch_cuda_graph_replay_equals_eager(torch_net):
    from pdscli.engines.torch_engine import torch_score

    import copy

    net = copy.deepcopy(torch_net).to("cuda")  # the module's fixture stays on the CPU
    eager = torch_score(net, device="cuda")
    graphed = torch_score(net, device="cuda", cuda_graph=True, batch_size=4, shape=(3, 32, 32))
    for b in (4, 3, 4):  # a partial batch is padded to the captured one
        x, sigma = torch.rand(b, 3, 32, 32, device="cuda"), torch.logspace(-2, 3, b, device="cuda")
        torch.testing.assert_close(graphed(x, sigma), eager(x, sigma), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_onnx_cuda_io_binding_matches_cpu(onnx_file):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without CUDAExecutionProvider")
    cpu = open_engine(onnx_file, device="cpu")
    gpu = open_engine(onnx_file, device="cuda")
    assert gpu.info["provider"] == "CUDAExecutionProvider"
    x, sigma = torch.rand(3, 3, 32, 32), torch.tensor([0.01, 1.0, 1000.0])
    got = gpu.score(x.cuda(), sigma.cuda())
    assert got.device.type == "cuda"
    ref = cpu.score(x, sigma)
    for b in range(3):
        assert (got[b].cpu() - ref[b]).abs().max() <= 1e-4 * ref[b].abs().max()


# --- bad engine files through the CLI ----------------------------------------------------------


def test_cli_corrupt_onnx_engine(run_pds, onnx_file, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(onnx_file.read_bytes()[: 5000])  # truncated mid-weights
    line = one_line_error(run_pds("sample", "--engine", bad, "--steps", "1", "-n", "1", "--out", tmp_path / "out", "--device", "cpu"))
    assert "bad.onnx" in line and "ONNX" in line


def test_cli_onnx_without_metadata_needs_flags(run_pds, onnx_file, tmp_path):
    bare = _rewrite(onnx_file, tmp_path / "bare.onnx", lambda p: p.ClearField("metadata_props"))
    line = one_line_error(run_pds("sample", "--engine", bare, "--steps", "1", "-n", "1", "--out", tmp_path / "o1", "--device", "cpu"))
    assert "--sigma-min" in line and "--snr" in line
    r = run_pds("sample", "--engine", bare, *SETTINGS_FLAGS, "--sampler", "predictor", "--steps", "1", "-n", "1",
                "--out", tmp_path / "o2", "--device", "cpu", "-q")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "o2" / "000000.png").exists()


def test_cli_corrupt_trt_engine_or_missing_tensorrt(run_pds, tmp_path):
    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"\x00" * 100)
    line = one_line_error(run_pds("sample", "--engine", bad, "--steps", "1", "-n", "1", "--out", tmp_path / "out", "--device", "cpu"))
    # Without TensorRT that is what the user learns first; with it, the device / manifest / file.
    assert any(s in line for s in ("pip install", "GPU", "--device cuda", "manifest", "corrupt"))
