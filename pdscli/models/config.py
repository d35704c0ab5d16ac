"""Model configs: score_sde's official VE presets, JSON configs, and the sampling settings they imply.

A config is a nested dict in score_sde's own layout and field names (`model`, `data`,
`training`, `sampling`, `optim`), as `config.to_json()` writes an ml_collections config. The
presets copy the values of score_sde's `configs/ve/*_continuous.py` with their defaults
(`configs/default_{cifar10,lsun}_configs.py`); runtime fields (`device`, the `eval` section,
tfrecords paths) are left out.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

from pdscli.devices import memory_bytes
from pdscli.errors import PdsError
from pdscli.settings import SamplingSettings

# ---- presets ----

_NCSNPP = {
    "name": "ncsnpp",
    "scale_by_sigma": True,
    "normalization": "GroupNorm",
    "nonlinearity": "swish",
    "attn_resolutions": [16],
    "resamp_with_conv": True,
    "conditional": True,
    "fir": True,
    "fir_kernel": [1, 3, 3, 1],
    "skip_rescale": True,
    "resblock_type": "biggan",
    "progressive_combine": "sum",
    "attention_type": "ddpm",
    "init_scale": 0.0,
    "fourier_scale": 16,
    "conv_size": 3,
    "embedding_type": "fourier",
}

_OPTIM = {"weight_decay": 0, "optimizer": "Adam", "lr": 2e-4, "beta1": 0.9, "eps": 1e-8, "warmup": 5000,
          "grad_clip": 1.0}

_PC_SAMPLING = {"method": "pc", "predictor": "reverse_diffusion", "corrector": "langevin", "n_steps_each": 1,
                "noise_removal": True, "probability_flow": False}

_TRAINING = {"sde": "vesde", "continuous": True, "likelihood_weighting": False, "log_freq": 50, "eval_freq": 100,
             "snapshot_freq": 50000, "snapshot_sampling": True}


def _cifar10(num_res_blocks: int, n_iters: int) -> dict:
    """configs/default_cifar10_configs.py + configs/ve/cifar10_ncsnpp[_deep]_continuous.py."""
    return {
        "training": {**_TRAINING, "batch_size": 128, "n_iters": n_iters, "snapshot_freq_for_preemption": 10000,
                     "reduce_mean": False},
        "sampling": {**_PC_SAMPLING, "snr": 0.16},
        "data": {"dataset": "CIFAR10", "image_size": 32, "random_flip": True, "centered": False,
                 "uniform_dequantization": False, "num_channels": 3},
        "model": {**_NCSNPP, "sigma_min": 0.01, "sigma_max": 50, "num_scales": 1000, "beta_min": 0.1,
                  "beta_max": 20.0, "dropout": 0.1, "ema_rate": 0.999, "nf": 128, "ch_mult": [1, 2, 2, 2],
                  "num_res_blocks": num_res_blocks, "progressive": "none", "progressive_input": "residual"},
        "optim": dict(_OPTIM),
        "seed": 42,
    }


def _image256(dataset: str, sigma_max: float, **data) -> dict:
    """configs/default_lsun_configs.py + configs/ve/{celebahq_256,ffhq_256,bedroom,church}_ncsnpp_continuous.py."""
    return {
        "training": {**_TRAINING, "batch_size": 64, "n_iters": 2400001, "snapshot_freq_for_preemption": 5000,
                     "reduce_mean": False},
        "sampling": {**_PC_SAMPLING, "snr": 0.075},
        "data": {"dataset": dataset, "image_size": 256, "random_flip": True, "uniform_dequantization": False,
                 "centered": False, "num_channels": 3, **data},
        "model": {**_NCSNPP, "sigma_min": 0.01, "sigma_max": sigma_max, "num_scales": 2000, "beta_min": 0.1,
                  "beta_max": 20.0, "dropout": 0.0, "ema_rate": 0.999, "nf": 128, "ch_mult": [1, 1, 2, 2, 2, 2, 2],
                  "num_res_blocks": 2, "progressive": "output_skip", "progressive_input": "input_skip"},
        "optim": dict(_OPTIM),
        "seed": 42,
    }


def _ffhq1024() -> dict:
    """configs/ve/ffhq_ncsnpp_continuous.py (self-contained, no defaults file)."""
    return {
        "training": {**_TRAINING, "batch_size": 8, "n_iters": 2400001, "snapshot_freq_for_preemption": 5000,
                     "reduce_mean": True},
        "sampling": {**_PC_SAMPLING, "snr": 0.15},
        "data": {"dataset": "FFHQ", "image_size": 1024, "centered": False, "random_flip": True,
                 "uniform_dequantization": False, "num_channels": 3},
        "model": {**_NCSNPP, "sigma_min": 0.01, "sigma_max": 1348, "num_scales": 2000, "dropout": 0.0,
                  "ema_rate": 0.9999, "nf": 16, "ch_mult": [1, 2, 4, 8, 16, 32, 32, 32], "num_res_blocks": 1,
                  "progressive": "output_skip", "progressive_input": "input_skip"},
        "optim": {**_OPTIM, "amsgrad": False},
        "seed": 42,
    }


# Each preset is one of score_sde's configs/ve/*_ncsnpp*_continuous.py (cifar10, cifar10_deep,
# celebahq_256, ffhq_256, bedroom, church, ffhq for 1024).
_PRESETS = {
    "cifar10": _cifar10(num_res_blocks=4, n_iters=1300001),
    "cifar10-deep": _cifar10(num_res_blocks=8, n_iters=950001),
    "celebahq-256": _image256("CelebAHQ", 348),
    "ffhq-256": _image256("FFHQ", 348),
    "bedroom": _image256("LSUN", 378, category="bedroom"),
    "church": _image256("LSUN", 380, category="church_outdoor"),
    "ffhq-1024": _ffhq1024(),
}

PRESET_NAMES = tuple(_PRESETS)


def get_preset(name: str) -> dict:
    """A fresh copy of a preset config (safe to modify)."""
    try:
        return copy.deepcopy(_PRESETS[name])
    except KeyError:
        raise PdsError(f"unknown preset {name!r}{_did_you_mean(name)}; presets: {', '.join(PRESET_NAMES)}") from None


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(str(name), PRESET_NAMES, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- what a config must say ----

REQUIRED_FIELDS = {
    "model": ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "conditional",
              "fir", "fir_kernel", "skip_rescale", "resblock_type", "progressive", "progressive_input",
              "progressive_combine", "embedding_type", "init_scale", "nonlinearity", "scale_by_sigma",
              "sigma_min", "sigma_max", "num_scales"),
    "data": ("image_size", "num_channels", "centered"),
    "sampling": ("snr",),
}

_CHOICES = {
    ("model", "resblock_type"): ("biggan", "ddpm"),
    ("model", "progressive"): ("none", "output_skip", "residual"),
    ("model", "progressive_input"): ("none", "input_skip", "residual"),
    ("model", "progressive_combine"): ("sum", "cat"),
    ("model", "embedding_type"): ("fourier", "positional"),
    ("model", "nonlinearity"): ("swish", "elu", "relu", "lrelu"),
    # Optional fields: when present they must name what this implementation is.
    ("model", "name"): ("ncsnpp",),
    ("model", "normalization"): ("groupnorm",),
    ("model", "attention_type"): ("ddpm",),
    ("training", "sde"): ("vesde",),
}


def missing_fields(cfg: dict) -> list[str]:
    """Required fields the config lacks, as `section.field`."""
    missing = []
    for section, names in REQUIRED_FIELDS.items():
        given = cfg.get(section) if isinstance(cfg.get(section), dict) else {}
        missing += [f"{section}.{n}" for n in names if n not in given]
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    if str(model.get("embedding_type", "")).lower() == "fourier" and "fourier_scale" not in model:
        missing.append("model.fourier_scale")
    return missing


def validate_sections(cfg: dict, source: str = "config") -> None:
    # Checked before merging too: a section that is not an object would replace the preset's.
    for section in ("model", "data", "training", "sampling"):
        if section in cfg and not isinstance(cfg[section], dict):
            raise PdsError(f"{source}: '{section}' must be an object (a section of fields)")


def validate_config(cfg: dict, source: str = "config") -> dict:
    """Check that `cfg` describes a VE NCSN++ this package can build; returns it unchanged."""
    validate_sections(cfg, source)
    missing = missing_fields(cfg)
    if missing:
        raise PdsError(
            f"{source} lacks {', '.join(missing)}; add them, or pass --preset NAME to take missing fields "
            f"from a preset ({', '.join(PRESET_NAMES)})"
        )
    for (section, name), allowed in _CHOICES.items():
        value = cfg.get(section, {}).get(name)
        if value is not None and str(value).lower() not in allowed:
            raise PdsError(f"{source}: {section}.{name} is {value!r}; supported: {', '.join(allowed)}")
    m, data = cfg["model"], cfg["data"]
    conv_size = m.get("conv_size", 3)
    if conv_size != 3:
        raise PdsError(f"{source}: model.conv_size is {conv_size!r}; NCSN++ uses 3")
    for section, name in (("model", "nf"), ("model", "num_res_blocks"), ("model", "num_scales"),
                          ("data", "image_size"), ("data", "num_channels")):
        value = cfg[section][name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PdsError(f"{source}: {section}.{name} must be a positive integer, not {value!r}")
    ch_mult = m["ch_mult"]
    if not isinstance(ch_mult, (list, tuple)) or not ch_mult or not all(isinstance(c, int) and c > 0 for c in ch_mult):
        raise PdsError(f"{source}: model.ch_mult must be a list of positive integers, not {ch_mult!r}")
    for section, name, value, most in (("model", "num_res_blocks", m["num_res_blocks"], MAX_RES_BLOCKS),
                                       ("model", "num_scales", m["num_scales"], MAX_SCALES),
                                       ("model", "ch_mult", len(ch_mult), MAX_LEVELS),
                                       ("model", "nf", m["nf"] * max(ch_mult), MAX_CHANNELS)):
        if value > most:  # bounded before anything is built: 10^12 scales or 10^5 blocks never finish
            what = {"ch_mult": "levels", "nf": "channels (nf x the largest ch_mult)"}.get(name, "")
            raise PdsError(f"{source}: {section}.{name} gives {value:,} {what or name}; pds builds at most {most:,}")
    if data["image_size"] % 2 ** (len(ch_mult) - 1):
        raise PdsError(f"{source}: data.image_size {data['image_size']} is not divisible by "
                       f"2**{len(ch_mult) - 1} (one halving per extra model.ch_mult entry)")
    for section, name in (("model", "sigma_min"), ("model", "sigma_max"), ("sampling", "snr")):
        value = cfg[section][name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise PdsError(f"{source}: {section}.{name} must be a positive number, not {value!r}")
    if not m["sigma_min"] < m["sigma_max"]:
        raise PdsError(f"{source}: need 0 < model.sigma_min < model.sigma_max, got {m['sigma_min']} and {m['sigma_max']}")
    return cfg


MAX_RES_BLOCKS = 64  # score_sde's deepest has 8 per level
MAX_SCALES = 1_000_000  # noise levels (and steps): a float64 ladder of 8 MB
MAX_LEVELS = 16
MAX_CHANNELS = 1 << 16


def activation_bytes(cfg: dict, batch: int = 1) -> int:
    """A lower bound on the memory one forward pass of `batch` images holds: the skip connections
    NCSN++ keeps from its down path until the up path takes them (float32). Weights not counted."""
    m, size = cfg["model"], cfg["data"]["image_size"]
    held = sum((m["num_res_blocks"] + 1) * m["nf"] * c * (size // 2**level) ** 2 for level, c in enumerate(m["ch_mult"]))
    return 4 * batch * held


def check_memory(cfg: dict, device, source: str = "config") -> None:
    """Refuse, before anything is built, a model whose one-image forward pass cannot fit the device."""
    need, have = activation_bytes(cfg), memory_bytes(device)
    if have and need > have:
        size = cfg["data"]["image_size"]
        raise PdsError(f"{source}: one {size}x{size} image through this NCSN++ holds at least {need / 2**30:,.3g} GiB "
                       f"of activations, and {device} has {have / 2**30:.3g} GiB; use a smaller image size or model")


# ---- loading ----


def deep_merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, section by section; neither is modified."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PdsError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PdsError(f"cannot read config file {path}: {e}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise PdsError(f"config file {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(cfg, dict):
        raise PdsError(f"config file {path} must hold a JSON object with model/data/sampling sections")
    return cfg


def load_config(config: str | Path | dict | None, preset: str | None = None) -> dict:
    """The config to build a model from: a JSON file (or dict) over an optional preset, or the preset alone.

    Unknown fields are kept but never used; fields the file lacks come from `preset`, and
    without one a config that lacks required fields is an error naming them.
    """
    if config is None and preset is None:
        raise PdsError(f"pass --config FILE or --preset NAME (presets: {', '.join(PRESET_NAMES)})")
    base = get_preset(preset) if preset is not None else None
    if config is None:
        return base
    user = copy.deepcopy(config) if isinstance(config, dict) else read_config_json(config)
    source = "config" if isinstance(config, dict) else f"config file {config}"
    validate_sections(user, source)
    cfg = deep_merge(base, user) if base is not None else user
    return validate_config(cfg, source)


def resolve_config(config: str | Path | dict | None, preset: str | None = None) -> tuple[dict, str, str | None]:
    """Like `load_config`, but `config` may also be a preset name.

    Returns (config, a label saying where it came from, the preset it is or builds on, or None).
    """
    if isinstance(config, str) and config in _PRESETS and not Path(config).exists():
        return get_preset(config), f"preset:{config}", config
    if config is not None and not isinstance(config, dict) and not Path(config).exists():
        raise PdsError(f"{config} is neither a preset nor a config file{_did_you_mean(config)}; "
                       f"presets: {', '.join(PRESET_NAMES)}")
    cfg = load_config(config, preset)
    if config is None:
        return cfg, f"preset:{preset}", preset
    label = "dict" if isinstance(config, dict) else str(config)
    return cfg, (label if preset is None else f"{label} over preset:{preset}"), preset


def settings_from_config(cfg: dict) -> SamplingSettings:
    """The sampler's view of a config: noise range and steps (model), image shape (data), and from
    the sampling section snr and the PC loop's parts (absent fields: the official configs' values).
    A value the PC loop cannot run is a PdsError naming the field."""
    m, data, sampling = cfg["model"], cfg["data"], cfg["sampling"]
    return SamplingSettings(
        sigma_min=float(m["sigma_min"]),
        sigma_max=float(m["sigma_max"]),
        num_scales=int(m["num_scales"]),
        snr=float(sampling["snr"]),
        image_size=int(data["image_size"]),
        num_channels=int(data["num_channels"]),
        **_pc_parts(sampling),
    ).validated()


def _pc_parts(sampling: dict) -> dict:
    """The PC loop's fields the section sets; names lower-cased, as the reference reads them."""
    parts = {k: sampling[k] for k in ("predictor", "corrector", "n_steps_each", "noise_removal", "probability_flow")
             if k in sampling}
    for k in ("predictor", "corrector"):
        if isinstance(parts.get(k), str):
            parts[k] = parts[k].lower()
    return parts


def config_summary(cfg: dict) -> dict:
    """The architecture facts worth showing a user, flat."""
    m, data = cfg["model"], cfg["data"]
    keys = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "resblock_type", "progressive",
            "progressive_input", "progressive_combine", "embedding_type", "fir", "skip_rescale", "scale_by_sigma",
            "dropout")
    summary = {"dataset": data.get("dataset"), "image_size": data["image_size"], "num_channels": data["num_channels"],
               "centered": data["centered"]}
    summary.update({k: m.get(k) for k in keys})
    return summary
