"""The Python API (pdscli.load / sample / filters / fid): the same images as `pds sample`, bit for
bit, for every sampler; one-line errors; and `import pdscli` stays light."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import pdscli
from conftest import one_line_error
from pdscli.errors import PdsError
from pdscli.samplers import REGISTRY

# Few samples in batches of 2 (the last one short), few steps: every path of the batch plan, fast.
N, BATCH = 3, 2
MODELS = {"builtin": ["--model", "builtin"], "gaussian": ["--model", "gaussian", "--image-size", "8"]}
API_MODELS = {"builtin": {}, "gaussian": {"image_size": 8}}


@pytest.fixture(scope="module")
def models():
    return {name: pdscli.load(name, device="cpu", **kw) for name, kw in API_MODELS.items()}


def cli_samples(run_pds, out, model: str, *flags) -> np.ndarray:
    r = run_pds("sample", *MODELS[model], "-n", N, "-b", BATCH, "--device", "cpu", "--out", out, "--quiet", *flags)
    assert r.exit_code == 0, r.stderr
    with np.load(out / "samples.npz") as z:
        return z["samples"]


def steps_for(name: str) -> int:
    return 2 if name == "corrector" else 3


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("sampler", sorted(REGISTRY))
def test_sample_equals_the_cli_bit_for_bit(models, run_pds, tmp_path, model, sampler):
    steps = steps_for(sampler)
    flags, kwargs = [], {}
    if sampler == "pds" and model == "gaussian":  # a model without filters of its own: pds needs some
        filters_file = tmp_path / "f.npz"
        pdscli.filters(torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))).save(filters_file)
        flags, kwargs = ["--masks", filters_file], {"filters": filters_file}
    expected = cli_samples(run_pds, tmp_path / "out", model, "--sampler", sampler, "--steps", steps, "--seed", 5, *flags)
    got = pdscli.sample(models[model], N, sampler=sampler, steps=steps, seed=5, batch_size=BATCH, **kwargs)
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    assert np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_nfe_default_equals_the_cli(models, run_pds, tmp_path, model):
    expected = cli_samples(run_pds, tmp_path / "out", model, "--nfe", 6)
    got = pdscli.sample(models[model], N, nfe=6, batch_size=BATCH)
    assert np.array_equal(got.numpy(), expected)


@pytest.mark.slow  # the built-in model's default 30 PDS steps, twice
def test_default_run_and_filters_file_equal_the_cli(models, run_pds, tmp_path):
    # No flag at all: the built-in model's own filters, PDS, its default steps.
    expected = cli_samples(run_pds, tmp_path / "a", "builtin")
    assert np.array_equal(pdscli.sample(models["builtin"], N, batch_size=BATCH).numpy(), expected)
    # Filters given as a file or as Filters, with an alpha, on a model that has none of its own.
    images = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    stats = pdscli.filters(images)
    stats.save(tmp_path / "f.npz")
    expected = cli_samples(run_pds, tmp_path / "b", "gaussian", "--masks", tmp_path / "f.npz", "--steps", 3, "--alpha", 3)
    for given in (tmp_path / "f.npz", stats):
        got = pdscli.sample(models["gaussian"], N, filters=given, steps=3, alpha=3, batch_size=BATCH)
        assert np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize("teleport", ["off", "5"])
def test_teleport_equals_the_cli(models, run_pds, tmp_path, teleport):
    expected = cli_samples(run_pds, tmp_path / "out", "gaussian", "--sampler", "dpm++2m", "--steps", 3, "--teleport", teleport)
    got = pdscli.sample(models["gaussian"], N, sampler="dpm++2m", steps=3, teleport=teleport, batch_size=BATCH)
    assert np.array_equal(got.numpy(), expected)


def test_sample_i_of_a_seed_does_not_depend_on_the_count(models):
    # The per-sample step makes a sample independent of its batch mates: then any count and batch agree.
    a = pdscli.sample(models["gaussian"], 4, sampler="pc", steps=3, per_sample_step=True, seed=1, batch_size=4)
    b = pdscli.sample(models["gaussian"], 2, sampler="pc", steps=3, per_sample_step=True, seed=1, batch_size=1)
    assert torch.equal(a[:2], b)


def test_bad_input_is_a_one_line_pds_error(models, tmp_path):
    cases = [
        lambda: pdscli.sample(models["gaussian"], 0),
        lambda: pdscli.sample(models["gaussian"], "three"),
        lambda: pdscli.sample(models["gaussian"], 2, seed=-1),
        lambda: pdscli.sample(models["gaussian"], 2, seed=2**64),
        lambda: pdscli.sample(models["gaussian"], 2, steps=2.5),
        lambda: pdscli.sample(models["gaussian"], 2, speed_up=float("nan")),
        lambda: pdscli.sample(models["gaussian"], 2, sampler="nope"),
        lambda: pdscli.sample(models["gaussian"], 2, steps=3, nfe=4),
        lambda: pdscli.sample(models["gaussian"], 2, sampler="pds"),  # no filters
        lambda: pdscli.sample(models["gaussian"], 2, filters=pdscli.filters(torch.rand(4, 1, 8, 8))),  # wrong shape
        lambda: pdscli.load("mixture", device="cpu", precision="fp17"),
        lambda: pdscli.load(tmp_path / "missing.pth", device="cpu"),
        lambda: pdscli.filters(torch.rand(4, 3, 8, 8), size=16),
        lambda: pdscli.filters(tmp_path),  # no size
    ]
    for case in cases:
        with pytest.raises(PdsError) as e:
            case()
        assert "\n" not in str(e.value) and str(e.value)


# (keywords of pdscli.sample, the same values as `pds sample` flags): both refuse them with one line.
SAME_REFUSALS = [
    ({"n": 0}, ["--num-samples", "0"]),
    ({"batch_size": 1.5}, ["--batch-size", "1.5"]),
    ({"seed": -1}, ["--seed", "-1"]),
    ({"seed": 2**64}, ["--seed", str(2**64)]),
    ({"steps": 2.5}, ["--steps", "2.5"]),
    ({"nfe": 0}, ["--nfe", "0"]),
    ({"speed_up": float("nan")}, ["--speed-up", "nan"]),
    ({"speed_up": 0}, ["--speed-up", "0"]),
]


@pytest.mark.parametrize("keywords, flags", SAME_REFUSALS, ids=[" ".join(f) for _, f in SAME_REFUSALS])
def test_the_library_and_the_command_line_refuse_with_the_same_line(models, run_pds, tmp_path, keywords, flags):
    given = {"n": 2, **keywords}
    with pytest.raises(PdsError) as e:
        pdscli.sample(models["gaussian"], given.pop("n"), **given)
    line = one_line_error(run_pds("sample", *MODELS["gaussian"], *flags, "--out", tmp_path / "out", "--quiet"))
    assert line == f"error: {e.value}" and line.startswith(f"error: {flags[0]} must be ")


def test_fid_refuses_its_counts_as_pds_fid_does(run_pds, tmp_path):
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(PdsError) as e:
        pdscli.fid(images, images, batch_size=0)
    line = one_line_error(run_pds("fid", tmp_path, tmp_path, "--batch-size", "0"))
    assert line == f"error: {e.value}" == "error: --batch-size must be at least 1, not 0"


def test_load_names_every_kind(models, fixture_dir):
    m = models["builtin"]
    assert m.filters is not None and m.shape == m.filters.shape == (1, 16, 16)
    x = torch.rand(2, *m.shape)
    assert torch.equal(m.score(x, 1.0), m.score(x, torch.tensor([1.0, 1.0])))
    g = models["gaussian"]
    assert g.filters is None and g.shape == (3, 8, 8) and g.settings.image_size == 8
    ckpt = pdscli.load(fixture_dir / "checkpoint.pth", config=fixture_dir / "config.json", device="cpu")
    assert ckpt.name.startswith("checkpoint:") and ckpt.score(torch.rand(1, *ckpt.shape), 5.0).shape == (1, *ckpt.shape)


def test_filters_of_a_folder_equal_the_cli(run_pds, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    r = run_pds("filters", folder, "--size", 8, "--out", tmp_path / "f.npz", "--quiet")
    assert r.exit_code == 0, r.stderr
    got = pdscli.filters(folder, 8)
    saved = np.load(tmp_path / "f.npz")
    assert isinstance(got, pdscli.Filters) and got.count == 5 and np.array_equal(got.freq, saved["freq"]) and np.array_equal(got.space, saved["space"])


def test_fid_takes_tensors_and_files(tmp_path):
    from pdscli.evaluate.features import save_tiny_features

    net = save_tiny_features(tmp_path / "tiny.pt")
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(12, 3, 16, 16, generator=g), 0.3 * torch.rand(12, 3, 16, 16, generator=g)  # b: darker
    np.savez(tmp_path / "samples.npz", samples=b.numpy())
    same = pdscli.fid(a, a, features=net, device="cpu")
    other = pdscli.fid(a, tmp_path / "samples.npz", features=net, device="cpu")
    assert abs(same["fid"]) < 1e-6 and other["fid"] > 1e-3
    assert other["samples_count"] == other["reference_count"] == 12


def test_import_pdscli_stays_light():
    code = ("import sys, pdscli\n"
            "heavy = [m for m in ('diffusers', 'torch', 'pdscli.api') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert pdscli.__version__\n"
            # Using the API does not import diffusers either: only pdscli.diffusers does.
            "pdscli.sample(pdscli.load('gaussian', image_size=4, device='cpu'), 1, sampler='ddim', steps=2)\n"
            "assert 'diffusers' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_sample_is_the_package_and_the_function():
    import pdscli.sample.setup as setup

    assert pdscli.sample.setup is setup and callable(pdscli.sample)
    from pdscli import sample

    assert sample is pdscli.sample
    import inspect

    assert list(inspect.signature(pdscli.sample).parameters)[:3] == ["model", "n", "nfe"]


def test_one_version_everywhere(run_pds):
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pdscli.__version__"}
    r = run_pds("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"pds {pdscli.__version__}"
    # The changelog has a section for the version the package says it is.
    assert f"## {pdscli.__version__}" in (root / "CHANGELOG.md").read_text()


def test_fid_says_a_missing_input_before_a_missing_feature_network(tmp_path, run_pds):
    # Without --features the Inception network needs torch-fidelity: the missing folder is said first.
    with pytest.raises(PdsError, match="no such file or folder"):
        pdscli.fid(tmp_path / "missing", tmp_path / "missing")
    r = run_pds("fid", tmp_path / "missing", tmp_path / "missing")
    assert r.exit_code == 2 and "no such file or folder" in r.stderr


def test_progress_line_on_stderr(models, capsys):
    quiet = pdscli.sample(models["gaussian"], N, sampler="ddim", steps=3, batch_size=BATCH)
    shown = pdscli.sample(models["gaussian"], N, sampler="ddim", steps=3, batch_size=BATCH, progress=True)
    err = capsys.readouterr().err
    assert torch.equal(quiet, shown)
    assert f"{N}/{N} images" in err and "step 3/3" in err and err.endswith("\n")


def test_load_reads_a_name_as_the_cli_flags_would(tmp_path):
    from pdscli.api import model_spec

    assert model_spec("gaussian").model == "gaussian" and model_spec("builtin").uses_builtin
    assert model_spec("hf:google/ncsnpp-ffhq-256@abc").checkpoint == "hf:google/ncsnpp-ffhq-256@abc"
    assert model_spec(tmp_path / "m.onnx").engine == tmp_path / "m.onnx"
    assert model_spec(tmp_path / "m.plan").engine == tmp_path / "m.plan"
    spec = model_spec(tmp_path / "ckpt.pth", preset="cifar10", device="cpu", precision="fp16")
    assert (spec.checkpoint, spec.preset, spec.device, spec.precision) == (tmp_path / "ckpt.pth", "cifar10", "cpu", "fp16")
    assert model_spec(tmp_path / "pipeline").checkpoint == tmp_path / "pipeline"  # a diffusers folder
    with pytest.raises(PdsError, match="describe a checkpoint"):
        model_spec(tmp_path / "m.onnx", preset="cifar10")
