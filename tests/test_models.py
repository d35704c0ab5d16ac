"""NCSN++: presets and parameter counts, state_dict layout, FIR resampling, option variants, precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdscli.errors import PdsError
from pdscli.models import PRESET_NAMES, build_model, get_preset, load_config, settings_from_config
from pdscli.models.fir import FirConvDownsample, FirConvUpsample, FirDownsample, FirUpsample, fir_kernel_2d

# The parameter counts of the official score_sde VE networks.
OFFICIAL_PARAMS = {
    "cifar10": 62_758_915,
    "cifar10-deep": 107_587_075,
    "celebahq-256": 65_574_549,
    "ffhq-256": 65_574_549,
    "bedroom": 65_574_549,
    "church": 65_574_549,
    "ffhq-1024": 105_785_896,
}

# (image_size, sigma_max, num_scales, snr) of the official VE configs; sigma_min is always 0.01.
OFFICIAL_SETTINGS = {
    "cifar10": (32, 50, 1000, 0.16),
    "cifar10-deep": (32, 50, 1000, 0.16),
    "celebahq-256": (256, 348, 2000, 0.075),
    "ffhq-256": (256, 348, 2000, 0.075),
    "bedroom": (256, 378, 2000, 0.075),
    "church": (256, 380, 2000, 0.075),
    "ffhq-1024": (1024, 1348, 2000, 0.15),
}


def test_presets_are_the_official_ones():
    assert set(PRESET_NAMES) == set(OFFICIAL_PARAMS)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_preset_parameter_count(name):
    model = build_model(get_preset(name), device="meta")
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", sorted(OFFICIAL_SETTINGS))
def test_preset_settings(name):
    cfg = get_preset(name)
    assert {"model", "data", "training", "sampling"} <= set(cfg)
    s = settings_from_config(cfg)
    assert (s.image_size, s.sigma_max, s.num_scales, s.snr) == OFFICIAL_SETTINGS[name]
    assert s.sigma_min == 0.01 and s.num_channels == 3


def test_get_preset_returns_a_copy():
    get_preset("cifar10")["model"]["nf"] = 1
    assert get_preset("cifar10")["model"]["nf"] == 128


def test_unknown_preset_is_a_user_error():
    with pytest.raises(PdsError, match="did you mean 'cifar10'"):
        get_preset("cifar-10")


# ---- configs ----


def _fixture_config(fixture_dir) -> dict:
    return json.loads((fixture_dir / "config.json").read_text())


def test_fixture_config_loads_and_gives_settings(fixture_dir):
    cfg = _fixture_config(fixture_dir)
    s = settings_from_config(load_config(fixture_dir / "config.json"))
    assert s.sigma_min == cfg["model"]["sigma_min"] and s.sigma_max == cfg["model"]["sigma_max"]
    assert s.num_scales == cfg["model"]["num_scales"] and s.snr == cfg["sampling"]["snr"]
    assert s.image_size == cfg["data"]["image_size"] and s.num_channels == cfg["data"]["num_channels"]


def test_partial_config_takes_missing_fields_from_preset(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"model": {"nf": 64, "unknown_field": 1}, "data": {"image_size": 64}, "extra": {}}))
    cfg = load_config(path, "church")
    assert cfg["model"]["nf"] == 64 and cfg["data"]["image_size"] == 64
    assert cfg["model"]["sigma_max"] == get_preset("church")["model"]["sigma_max"]


def test_partial_config_without_preset_names_missing_fields(tmp_path):
    path = tmp_path / "partial.json"
    cfg = get_preset("cifar10")
    del cfg["model"]["sigma_max"], cfg["data"]["image_size"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(PdsError, match=r"model\.sigma_max, data\.image_size.*--preset"):
        load_config(path, None)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"model": {"progressive": "sideways"}}), "progressive"),
        (json.dumps({"model": {"name": "ddpm"}}), "ncsnpp"),
        (json.dumps({"data": {"image_size": 30}}), "divisible"),
        (json.dumps({"sampling": {"snr": "high"}}), "positive number"),
        (json.dumps({"model": []}), "must be an object"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PdsError, match=message):
        load_config(path, "cifar10")


def test_no_config_and_no_preset_is_an_error():
    with pytest.raises(PdsError, match="--preset"):
        load_config(None, None)


# ---- state_dict layout ----


def test_state_dict_is_the_references(fixture_dir):
    manifest = json.loads((fixture_dir / "state_dict_manifest.json").read_text())
    model = build_model(load_config(fixture_dir / "config.json"), device="meta")
    state = model.state_dict()
    assert list(state) == [e["key"].removeprefix("module.") for e in manifest]
    for entry in manifest:
        tensor = state[entry["key"].removeprefix("module.")]
        assert list(tensor.shape) == entry["shape"], entry["key"]
        assert str(tensor.dtype).removeprefix("torch.") == entry["dtype"], entry["key"]
    # The EMA covers exactly the trainable parameters, in order.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [e["key"].removeprefix("module.") for e in manifest if e["in_ema"]]


# ---- FIR resampling ----


def _upfirdn(x, k, up=1, down=1, pad=(0, 0)):
    """upfirdn2d spelled out: zero-insert, pad, convolve (flipped kernel), subsample, per channel."""
    b, c, h, w = x.shape
    if up > 1:
        y = x.new_zeros(b, c, h * up, w * up)
        y[..., ::up, ::up] = x
        x = y
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    size = k.shape[0]
    weight = torch.flip(k, (0, 1)).reshape(1, 1, size, size).repeat(c, 1, 1, 1)
    return F.conv2d(x, weight, groups=c)[..., ::down, ::down]


TAPS = [[1, 3, 3, 1], [1, 1], [1, 2, 1], [2.0, 1.0, 3.0, 0.5, 1.0], [[1, 2], [3, 4]]]


@pytest.mark.parametrize("taps", TAPS)
def test_fir_resampling_matches_upfirdn(taps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    k = fir_kernel_2d(taps)
    p = k.shape[0] - 2
    up = _upfirdn(x, k * 4, up=2, pad=((p + 1) // 2 + 1, p // 2))
    torch.testing.assert_close(FirUpsample(3, taps)(x), up, rtol=0, atol=1e-6)
    down = _upfirdn(x, k, down=2, pad=((p + 1) // 2, p // 2))
    torch.testing.assert_close(FirDownsample(3, taps)(x), down, rtol=0, atol=1e-6)

    conv = FirConvDownsample(3, 5, taps=taps)
    torch.nn.init.normal_(conv.weight, generator=g)
    torch.nn.init.normal_(conv.bias, generator=g)
    expected = F.conv2d(_upfirdn(x, k, pad=((p + 3) // 2, (p + 2) // 2)), conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("taps", TAPS[:3])
def test_fused_up_conv_is_upsample_then_conv(taps):
    # Zero-insertion then correlation with the weight: away from the borders, exactly the
    # unfused FIR upsampling followed by a 3x3 conv.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, 8, generator=g)
    layer = FirConvUpsample(3, 4, taps=taps)
    torch.nn.init.normal_(layer.weight, generator=g)
    unfused = F.conv2d(FirUpsample(3, taps)(x), layer.weight, layer.bias, padding=1)
    fused = layer(x)
    assert fused.shape == unfused.shape == (1, 4, 16, 16)
    torch.testing.assert_close(fused[..., 2:-2, 2:-2], unfused[..., 2:-2, 2:-2], rtol=0, atol=1e-5)


# ---- every option of the architecture ----


def _small_config(**model) -> dict:
    cfg = get_preset("ffhq-1024")
    cfg["data"]["image_size"] = 16
    cfg["model"].update(nf=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], num_scales=50, **model)
    return cfg


VARIANTS = [
    dict(),
    dict(resblock_type="ddpm", fir=True, progressive="residual", progressive_input="residual"),
    dict(resblock_type="ddpm", fir=False, progressive="output_skip", progressive_input="input_skip"),
    dict(fir=False, progressive="residual", progressive_input="none", skip_rescale=False),
    dict(progressive="none", progressive_input="residual", embedding_type="positional"),
    dict(progressive_combine="cat", nonlinearity="elu", dropout=0.1),
    dict(conditional=False, scale_by_sigma=False),
]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_variants_run_and_keep_only_reference_state(options):
    torch.manual_seed(0)
    model = build_model(_small_config(**options)).eval()
    params = {n for n, _ in model.named_parameters()}
    assert set(model.state_dict()) == params | {"sigmas"}  # FIR kernels etc. are not persistent
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([0.5, 20.0]))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_positional_model_maps_sigma_to_its_ladder():
    torch.manual_seed(0)
    model = build_model(_small_config(embedding_type="positional")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # make the zero-initialised layers matter
        labels = torch.tensor([3, 40])
        ladder = model.sigmas[labels].float()
        x = torch.rand(2, 3, 16, 16)
        by_label = model(x, labels)
        by_sigma = model(x, ladder * 1.001)  # off-ladder sigmas round to the nearest rung
    torch.testing.assert_close(by_sigma, by_label, rtol=0, atol=0)
    assert by_label.dtype == torch.float32


def test_forward_creates_no_tensors_and_uses_no_einsum(fixture_dir, monkeypatch):
    from pdscli.models.checkpoint import load_score_model

    model = load_score_model(fixture_dir / "checkpoint.pth", fixture_dir / "config.json")
    x, sigma = torch.rand(1, 3, 32, 32), torch.tensor([1.0])

    def forbidden(*args, **kwargs):
        raise AssertionError("tensor created inside forward")

    for name in ("tensor", "as_tensor", "arange", "zeros", "ones", "empty", "full", "einsum", "linspace"):
        monkeypatch.setattr(torch, name, forbidden)
    with torch.no_grad():
        assert torch.isfinite(model(x, sigma)).all()


# ---- reduced precision ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_body_keeps_the_noise_embedding_fp32(fixture_dir, dtype):
    from pdscli.models.checkpoint import load_score_model

    io = np.load(fixture_dir / "reference_io.npz")
    x, sigma = torch.from_numpy(io["x"][:1]), torch.from_numpy(io["sigmas"][:1])
    model = load_score_model(fixture_dir / "checkpoint.pth", fixture_dir / "config.json")
    with torch.no_grad():
        full = model(x, sigma)
    embeddings = []
    model.all_modules[2].register_forward_hook(lambda m, i, o: embeddings.append(o))
    model.set_precision(dtype)

    for module in model.noise_embedding_modules():
        assert all(p.dtype == torch.float32 for p in module.parameters())
    assert model.all_modules[0].W.dtype == torch.float32
    assert model.sigmas.dtype == torch.float64
    assert model.all_modules[3].weight.dtype == dtype  # the body is cast
    with torch.no_grad():
        half = model(x, sigma)
    assert embeddings[-1].dtype == torch.float32
    torch.testing.assert_close(embeddings[-1].squeeze(0), torch.from_numpy(io["temb"][0]), rtol=0, atol=1e-4)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - full).abs().max() <= 0.05 * full.abs().max()

    model.set_precision(torch.float32)
    with torch.no_grad():
        again = model(x, sigma)
    assert (again - full).abs().max() <= 0.05 * full.abs().max()
