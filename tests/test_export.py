"""`pds export` to ONNX: the contract, metadata, precision in the graph, parity, and bad inputs."""

from __future__ import annotations

import json
import math
import sys

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pdscli.errors import PdsError
from pdscli.engines.contract import BatchProfile
from pdscli.engines.onnx_export import export_onnx, promote_unsupported, to_onnx
from pdscli.engines.parity import parity_cases, parity_plan, parity_sigmas
from pdscli.settings import SamplingSettings

from conftest import one_line_error

SETTING_KEYS = ("pds.sigma_min", "pds.sigma_max", "pds.num_scales", "pds.snr", "pds.image_size", "pds.num_channels")
PROVENANCE_KEYS = ("pds.preset", "pds.checkpoint_sha256", "pds.precision", "pds.version")
FIXTURE_SHA256 = "e3426a8d6ef3a3b355bb4b0f46ea9901d84173c6883b2066fcfddff3f1329786"


def _props(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _value_types(proto) -> dict[str, int]:
    proto = onnx.shape_inference.infer_shapes(proto)
    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


# --- a toy score net: fast, and with an einsum (no ONNX opset has a bfloat16 Einsum) --------------


class ToyScore(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(4) * 16, requires_grad=False)
        self.emb = nn.Linear(8, 4)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.out = nn.Conv2d(4, 1, 3, padding=1)
        self.dtype = torch.float32

    def set_precision(self, dtype):
        self.dtype = dtype
        for m in (self.conv, self.out):
            m.to(dtype)
        return self

    def forward(self, x, sigma):
        phase = torch.log(sigma)[:, None] * self.W[None] * 2 * math.pi
        temb = self.emb(torch.cat([phase.sin(), phase.cos()], 1)).to(self.dtype)
        h = self.conv((2 * x - 1).to(self.dtype)) + temb[:, :, None, None]
        h = F.silu(self.norm(h.float())).to(self.dtype)
        b, c, hh, ww = h.shape
        q = h.reshape(b, c, hh * ww)
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, q) * c**-0.5, -1)
        h = h + torch.einsum("bij,bcj->bci", attn, q).reshape(b, c, hh, ww)
        return self.out(h).float() / sigma[:, None, None, None]


TOY = SamplingSettings(sigma_min=0.01, sigma_max=50.0, num_scales=10, snr=0.16, image_size=8, num_channels=1)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return ToyScore().eval()


def test_parity_failure_fails_the_export_and_leaves_no_file(toy, tmp_path):
    out = tmp_path / "toy.onnx"
    with pytest.raises(PdsError, match="does not match the PyTorch model.*nothing was written"):
        export_onnx(toy, TOY, out=out, tolerance=1e-12)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_toy_export_is_dynamic_in_the_batch(toy, tmp_path):
    lines = []
    result = export_onnx(toy, TOY, out=tmp_path / "toy.onnx", log=lines.append, batches=(1, 3))
    assert result.parity.ok and result.parity.max_rel < 1e-5
    assert {r[0] for r in result.parity.rows} == {1, 3}
    assert any("max abs" in line and "max rel" in line for line in lines)
    x = onnx.load(str(tmp_path / "toy.onnx")).graph.input[0]
    assert x.name == "x" and not x.type.tensor_type.shape.dim[0].HasField("dim_value")


def test_bf16_einsum_is_run_in_fp32_with_explicit_casts(toy):
    proto = to_onnx(toy, TOY, "bf16")
    onnx.checker.check_model(proto, full_check=True)  # a bf16 Einsum would fail here
    types = _value_types(proto)
    einsums = [n for n in proto.graph.node if n.op_type == "Einsum"]
    assert einsums and all(types[i] == onnx.TensorProto.FLOAT for n in einsums for i in n.input)
    assert any(types[n.input[0]] == onnx.TensorProto.BFLOAT16 for n in proto.graph.node if n.op_type == "Conv")
    assert promote_unsupported(proto, onnx.TensorProto.BFLOAT16) == 0  # nothing left to fix


def test_parity_cases_cover_the_sigma_range():
    levels = parity_sigmas(TOY, 4)
    assert levels[0] == pytest.approx(0.01) and levels[-1] == pytest.approx(50.0)
    cases = parity_cases(TOY, sigmas=4, batches=(1, 4))
    assert [x.shape[0] for x, _ in cases] == [1, 4]
    assert sorted(cases[1][1].tolist()) == pytest.approx(levels, rel=1e-6)
    assert cases[0][1].tolist() == pytest.approx([50.0])
    # One batch size (a fixed-batch engine): still every level.
    assert parity_plan([1.0, 2.0, 3.0], (1,)) == [[1.0], [2.0], [3.0]]
    assert parity_plan([1.0, 2.0, 3.0], (2,)) == [[1.0, 2.0], [3.0, 1.0]]
    assert parity_plan([1.0, 2.0, 3.0], (1, 2, 8)) == [[3.0], [3.0, 2.0], [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0]]


@pytest.mark.parametrize(
    "flags, expect",
    [
        (dict(), (1, 16, 16)),
        (dict(batch_size=8), (8, 8, 8)),
        (dict(min_batch=2, max_batch=32), (2, 32, 32)),
        (dict(min_batch=1, opt_batch=4, max_batch=8), (1, 4, 8)),
        (dict(max_batch=4), (1, 4, 4)),
    ],
)
def test_batch_profile_from_flags(flags, expect):
    assert BatchProfile.from_flags(**flags).as_tuple() == expect


@pytest.mark.parametrize("flags", [dict(batch_size=4, max_batch=8), dict(min_batch=8, max_batch=4), dict(batch_size=0)])
def test_batch_profile_rejects(flags):
    with pytest.raises(PdsError):
        BatchProfile.from_flags(**flags)


# --- the fixture checkpoint, through the CLI ------------------------------------------------------


def test_cli_exports_the_fixture_checkpoint(run_pds, fixture_dir, fixture_onnx):
    out, r = fixture_onnx.path, fixture_onnx.result
    summary = json.loads(r.stdout)
    assert summary["path"] == str(out) and summary["precision"] == "fp32"
    # The parity table, at sigma_min and sigma_max and two batch sizes.
    assert "max abs" in r.stderr and "max rel" in r.stderr and ": ok" in r.stderr
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    props = _props(out)
    for key in SETTING_KEYS + PROVENANCE_KEYS:
        assert key in props, key
    settings = SamplingSettings.from_metadata(props)
    assert settings == SamplingSettings(0.01, 1348.0, 2000, 0.15, 32, 3)
    assert props["pds.checkpoint_sha256"] == FIXTURE_SHA256 and props["pds.precision"] == "fp32"
    assert props["pds.weights"] == "ema"
    ins = {v.name: v for v in proto.graph.input}
    assert set(ins) == {"x", "sigma"} and [o.name for o in proto.graph.output] == ["score"]
    dims = [d.dim_value or d.dim_param for d in ins["x"].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 32, 32] and isinstance(dims[0], str)  # dynamic batch, fixed resolution

    again = run_pds("export", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json", "--out", out)
    assert "exists; pass --force" in one_line_error(again)


@pytest.mark.slow  # a graph export of the fixture network at reduced precision, with its parity check
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_graph_keeps_the_time_embedding_fp32(precision, fixture_dir, tmp_path):
    from pdscli.models.checkpoint import load_score_model

    net = load_score_model(fixture_dir / "checkpoint.pth", fixture_dir / "config.json")
    out = tmp_path / f"small-{precision}.onnx"
    result = export_onnx(net, net.settings, precision=precision, out=out, batches=(1, 2), sigmas=3)
    if precision == "fp16":  # ONNX Runtime has no bf16 Conv kernels: bf16 is checked after a TensorRT build
        assert result.parity is not None and result.parity.ok
    low = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
    proto = onnx.load(str(out))
    types = _value_types(proto)
    nodes = proto.graph.node
    # The Fourier embedding: log(sigma), the phases, sin and cos, all float32.
    embedding = [n for n in nodes if n.op_type in ("Log", "Sin", "Cos")]
    assert {n.op_type for n in embedding} == {"Log", "Sin", "Cos"}
    for n in embedding:
        assert types[n.output[0]] == onnx.TensorProto.FLOAT, (n.op_type, n.name)
    log_node = next(n for n in nodes if n.op_type == "Log")
    assert log_node.input[0] == "sigma"
    # Normalisation statistics in float32, the convolutions in the reduced type.
    norms = [n for n in nodes if n.op_type in ("GroupNormalization", "InstanceNormalization", "LayerNormalization", "ReduceMean")]
    assert norms and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert convs and all(types[n.input[0]] == low for n in convs)
    # The contract stays float32 at the edges.
    assert all(types[v.name] == onnx.TensorProto.FLOAT for v in [*proto.graph.input, *proto.graph.output])
    assert _props(out)["pds.precision"] == precision


# --- the preset architectures with random weights --------------------------------------------------


@pytest.mark.slow
def test_cli_exports_cifar10_random_weights(run_pds, tmp_path):
    out = tmp_path / "cifar10.onnx"
    r = run_pds("export", "--preset", "cifar10", "--random-weights", "--out", out, "--min-batch", "1", "--max-batch", "2",
                "--check-sigmas", "3", "--json")
    assert r.exit_code == 0, r.stderr
    onnx.checker.check_model(str(out), full_check=True)
    props = _props(out)
    assert props["pds.preset"] == "cifar10" and props["pds.weights"].startswith("random")
    assert SamplingSettings.from_metadata(props) == SamplingSettings(0.01, 50.0, 1000, 0.16, 32, 3)
    _assert_parity_within(r.stderr, 1e-4, rows=5)  # batch 1 at sigma_max; batch 2 over the 3 sigmas


@pytest.mark.slow
def test_cli_exports_bedroom_random_weights(run_pds, tmp_path):
    out = tmp_path / "bedroom.onnx"
    r = run_pds("export", "--preset", "bedroom", "--random-weights", "--out", out, "--batch-size", "1",
                "--check-sigmas", "2", "--json")
    assert r.exit_code == 0, r.stderr
    onnx.checker.check_model(str(out), full_check=True)
    assert SamplingSettings.from_metadata(_props(out)).image_size == 256
    _assert_parity_within(r.stderr, 1e-4, rows=2)


def _assert_parity_within(stderr: str, tol: float, rows: int) -> None:
    """Read the printed parity table (batch, sigma, max-abs, rel) back and check every row."""
    table = [line.split() for line in stderr.splitlines() if line.startswith("  ") and len(line.split()) == 4]
    assert len(table) == rows, stderr
    for _batch, sigma, err, rel in table:
        assert float(rel) <= tol and math.isfinite(float(err)), (sigma, rel)


# --- bad inputs through the CLI ---------------------------------------------------------------------


def test_cli_checkpoint_not_matching_the_config(run_pds, fixture_dir, tmp_path):
    line = one_line_error(run_pds("export", "--checkpoint", fixture_dir / "checkpoint.pth", "--preset", "cifar10",
                                   "--out", tmp_path / "m.onnx"))
    assert "does not fit" in line
    assert not (tmp_path / "m.onnx").exists()


def test_cli_unwritable_engines_folder(run_pds, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, so nothing can be created under it (even as root)")
    line = one_line_error(run_pds("export", "--preset", "cifar10", "--random-weights", "--out", blocker / "engines" / "m.onnx"))
    assert "cannot create folder" in line


def test_cli_trt_without_tensorrt_fails_at_once(run_pds, monkeypatch, tmp_path):
    import pdscli.engines.export

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError

    def no_model_load(*a, **k):
        raise AssertionError("the model was loaded before TensorRT was checked")

    monkeypatch.setattr(pdscli.engines.export, "open_source", no_model_load)
    line = one_line_error(run_pds("export", "--preset", "cifar10", "--random-weights", "--format", "trt",
                                   "--out", tmp_path / "m.plan"))
    assert 'pip install "pds[trt]"' in line


@pytest.mark.parametrize(
    "args, match",
    [
        (["--preset", "cifar10", "--random-weights", "--format", "tflite"], "--format must be one of onnx, trt, diffusers"),
        (["--preset", "cifar10", "--random-weights", "--precision", "fp8"], "--precision must be one of"),
        (["--preset", "cifar10", "--random-weights", "--batch-size", "4", "--max-batch", "8"], "--batch-size excludes"),
        (["--preset", "cifar10"], "pass --checkpoint"),
        (["--preset", "nope", "--random-weights"], "unknown preset"),
    ],
)
def test_cli_bad_flags(run_pds, tmp_path, args, match):
    line = one_line_error(run_pds("export", *args, "--out", tmp_path / "m.onnx"))
    assert match in line


def test_cli_random_weights_exclude_a_checkpoint(run_pds, fixture_dir, tmp_path):
    line = one_line_error(run_pds("export", "--checkpoint", fixture_dir / "checkpoint.pth", "--preset", "cifar10",
                                   "--random-weights", "--out", tmp_path / "m.onnx"))
    assert "exclude each other" in line


def test_cli_out_suffix_must_name_the_format(run_pds, tmp_path):
    line = one_line_error(run_pds("export", "--preset", "cifar10", "--random-weights", "--out", tmp_path / "m.plan"))
    assert "must end in .onnx" in line


# --- interruptions, folders, messages ----------------------------------------------------------------


def test_ctrl_c_during_the_export_is_an_interruption(run_pds, fixture_dir, tmp_path, monkeypatch):
    """A Ctrl-C that reaches the network while the exporter traces it, and that a layer below turns
    into an ordinary error (as C++ boundaries do), is still "interrupted" with exit 130, not a failed export."""
    import os
    import signal
    import time

    from pdscli.models.ncsnpp import NCSNpp

    def forward(self, x, sigma):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the signal arrives here
        except KeyboardInterrupt:
            raise RuntimeError("KeyboardInterrupt (caught and re-raised by a native layer)") from None
        raise AssertionError("no SIGINT arrived")

    monkeypatch.setattr(NCSNpp, "forward", forward)
    out = tmp_path / "m.onnx"
    r = run_pds("export", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json",
                "--out", out, "--quiet")
    assert r.exit_code == 130, r.stderr
    assert r.stderr.strip() == "interrupted"
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_output_path_that_is_a_folder_is_refused_before_the_export(run_pds, tmp_path, monkeypatch):
    import pdscli.engines.export

    def no_model_load(*a, **k):
        raise AssertionError("the model was opened before the output path was checked")

    monkeypatch.setattr(pdscli.engines.export, "open_source", no_model_load)
    (tmp_path / "m.onnx").mkdir()
    line = one_line_error(run_pds("export", "--preset", "cifar10", "--random-weights", "--out", tmp_path / "m.onnx",
                                   "--force"))
    assert "is a folder" in line


def test_messages_carry_no_escape_codes_and_no_blank_lines():
    """Other libraries' messages are quoted in ours: their colours and leading blank lines are dropped."""
    e = PdsError("\n\x1b[1;31mONNX export failed\x1b[0m: \x1b[33mshape\x1b[0m\n")
    assert str(e) == "ONNX export failed: shape"

