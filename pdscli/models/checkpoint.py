"""score_sde checkpoints: read them strictly and safely, write them in the same layout.

Sources: a score_sde `.pth` (or a plain state_dict, `.pth` / `.bin` / `.safetensors`), a diffusers
model or pipeline folder, or `hf:ORG/NAME[@REVISION]` (see `pdscli.models.diffusers`): every
command opens weights through `load_score_model`.

The layout score_sde's `save_checkpoint` writes (and `pds` writes back):

    {"optimizer": Adam state_dict, "model": state_dict with "module." prefixes (raw weights),
     "ema": {"decay", "num_updates", "shadow_params": [tensors, one per *trainable* parameter,
             in parameter order, no names]}, "step": int}

The weights score_sde samples with are the EMA shadows for the trainable parameters plus the
non-trainable Fourier `W` and the `sigmas` buffer from "model"; `weights="ema"` does the same.
A plain state_dict (with or without "module.") loads too.

Files are opened with `torch.load(weights_only=True)`; a file that needs real unpickling is
refused unless the user opts in (`trust_checkpoint`, the `--trust-checkpoint` flag). Every
mismatch is an error that names it: nothing is ever loaded partially.
"""

from __future__ import annotations

import functools
import json
import math
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from rich.markup import escape
from safetensors import safe_open
from safetensors.torch import save_file

from pdscli.devices import resolve_device, resolve_precision
from pdscli.console import err_console
from pdscli.errors import PdsError, first_line
from pdscli.fsutil import atomic_path, sha256_file
from pdscli.models import diffusers
from pdscli.models.config import (
    PRESET_NAMES,
    check_memory,
    config_summary,
    get_preset,
    resolve_config,
    settings_from_config,
    validate_config,
)
from pdscli.models.ncsnpp import NCSNpp, build_model
from pdscli.score import ScoreModel, TorchScore

PREFIX = "module."  # torch.nn.DataParallel's, present in every score_sde checkpoint
WEIGHTS = ("ema", "raw")
_TRUST_HINT = "if you trust its source, pass --trust-checkpoint to unpickle it"


@dataclass
class RawCheckpoint:
    """What a checkpoint file holds, before any model is involved."""

    state_dict: dict  # keys without "module."
    ema: dict | None  # score_sde EMA state: decay, num_updates, shadow_params
    step: int | None
    layout: str  # "score_sde", "state_dict", "safetensors", or "diffusers-*" (a folder)
    config: dict | None = None  # a config the file carries (safetensors metadata written by pds)


# ---- reading ----


def read_checkpoint(path: str | Path, *, trust_checkpoint: bool = False) -> RawCheckpoint:
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _parse(_torch_load(path, trust_checkpoint), path)


def load_file(path: str | Path, *, trust_checkpoint: bool = False):
    """What `torch.load` returns for a checkpoint file, with a one-line PdsError for a missing,
    empty, truncated or foreign file, or one that needs unpickling without `trust_checkpoint`."""
    return _torch_load(Path(path), trust_checkpoint)


def _read_safetensors(path: Path) -> RawCheckpoint:
    """A safetensors file: tensors only, so nothing to trust; pds's own carry their config in the metadata."""
    if path.is_dir():
        raise PdsError(f"checkpoint {path} is a folder, not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise PdsError(f"checkpoint {path} not found") from None
    except Exception as e:  # safetensors reports damage as several error types
        detail = first_line(e, 200)
        raise PdsError(f"checkpoint {path} is not a readable safetensors file ({detail})") from None
    if not tensors:
        raise PdsError(f"checkpoint {path} holds no tensors")
    try:
        config = json.loads(meta["pds.config"]) if "pds.config" in meta else None
        step = int(meta["pds.step"]) if "pds.step" in meta else None
    except ValueError:
        raise PdsError(f"checkpoint {path}: its pds metadata is damaged") from None
    return RawCheckpoint(strip_prefix(tensors), None, step, "safetensors", config)


def _torch_load(path: Path, trust: bool):
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise PdsError(f"checkpoint {path} not found") from None
    except IsADirectoryError:
        raise PdsError(f"checkpoint {path} is a folder, not a file") from None
    except OSError as e:
        raise PdsError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if not head:
        raise PdsError(f"checkpoint {path} is empty")
    # torch.save writes a zip archive (or, before torch 1.6, a pickle stream starting with 0x80).
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise PdsError(f"{path} is not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)")
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        # The zip directory sits at the end of the file: a cut-off copy loses it first.
        raise PdsError(f"checkpoint {path} is truncated or corrupt (its zip directory is missing); copy it again")
    try:
        with warnings.catch_warnings():
            # torch warns about legacy (pre-1.6) files on its way to the error we report in one line.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        raise PdsError(_unpickling_message(path, str(e), trust)) from None
    except Exception as e:  # torch.load fails in many ways on damaged files; all mean the same to a user
        detail = first_line(e, 200)
        if "TorchScript" in detail:
            raise PdsError(f"{path} is a TorchScript archive (torch.jit.save), not a checkpoint: "
                           "save the model's state_dict with torch.save") from None
        if trust and isinstance(e, (ModuleNotFoundError, AttributeError)):
            raise PdsError(f"cannot unpickle checkpoint {path}: it refers to code that is not installed ({detail})") from None
        raise PdsError(f"checkpoint {path} is truncated or corrupt ({detail})") from None


def _unpickling_message(path: Path, text: str, trust: bool) -> str:
    if trust:
        return f"cannot unpickle checkpoint {path}: {text.strip().splitlines()[0][:200]}"
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"checkpoint {path} holds a Python object ({found.group(1)}) that torch.load(weights_only=True) "
                f"refuses to load; {_TRUST_HINT}")
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = found.group(1).strip() if found else "not plain tensors"
    return f"checkpoint {path} cannot be loaded safely with weights_only=True ({reason}); {_TRUST_HINT}"


def _parse(obj, path: Path) -> RawCheckpoint:
    if isinstance(obj, nn.Module):  # a whole pickled module (only reachable with --trust-checkpoint)
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise PdsError(f"{path} holds a {type(obj).__name__}, not a score_sde checkpoint or a state_dict")
    if isinstance(obj.get("model"), Mapping):
        state_dict, ema, step, layout = obj["model"], obj.get("ema"), obj.get("step"), "score_sde"
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict, ema, step, layout = obj, None, None, "state_dict"
    else:
        keys = ", ".join(map(str, list(obj)[:8])) or "none"
        raise PdsError(f"{path} is neither a score_sde checkpoint (no 'model' state_dict) nor a state_dict; "
                       f"top-level keys: {keys}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PdsError(f"{path}: state_dict entry {bad[0]!r} is not a tensor")
    if ema is not None and not (isinstance(ema, Mapping) and isinstance(ema.get("shadow_params"), (list, tuple))):
        raise PdsError(f"{path}: 'ema' is not a score_sde EMA state (decay, num_updates, shadow_params)")
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    return RawCheckpoint(strip_prefix(state_dict), dict(ema) if ema is not None else None,
                         int(step) if isinstance(step, (int, float)) else None, layout)


def strip_prefix(state_dict: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """Drop DataParallel's "module." from every key that has it, keeping the order."""
    return OrderedDict((k[len(PREFIX):] if k.startswith(PREFIX) else k, v) for k, v in state_dict.items())


# ---- matching a checkpoint to configs ----


@functools.lru_cache(maxsize=None)
def _preset_shapes(name: str) -> dict:
    # Built on the meta device: structure only, no memory and no init.
    model = build_model(get_preset(name), device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _ladder_fits(sigmas: torch.Tensor | None, cfg: dict) -> bool:
    """Whether the checkpoint's `sigmas` buffer is the ladder the config describes (True if absent)."""
    if sigmas is None:
        return True
    m = cfg["model"]
    return (sigmas.ndim == 1 and sigmas.numel() == m["num_scales"]
            and math.isclose(float(sigmas[0]), m["sigma_max"], rel_tol=1e-6)
            and math.isclose(float(sigmas[-1]), m["sigma_min"], rel_tol=1e-6))


def matching_presets(state_dict: Mapping) -> list[str]:
    """The presets whose network has exactly these keys and shapes (and, if stored, this sigma ladder)."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    return [name for name in PRESET_NAMES
            if _preset_shapes(name) == shapes and _ladder_fits(state_dict.get("sigmas"), get_preset(name))]


def _suggestion(state_dict: Mapping) -> str:
    hits = matching_presets(state_dict)
    if len(hits) == 1:
        return f"it matches preset {hits[0]}: pass --preset {hits[0]}"
    if hits:
        return f"it matches presets {', '.join(hits)}: pass --preset with one of them"
    return "it matches no preset: pass the --config it was trained with"


def _check_fits(model: nn.Module, raw: RawCheckpoint, path: Path, label: str) -> None:
    expected, found = model.state_dict(), raw.state_dict
    reshaped = [f"{k} is {list(v.shape)} in the file but {list(expected[k].shape)} in the config"
                for k, v in found.items() if k in expected and v.shape != expected[k].shape]
    missing = [f"{k} is missing" for k in expected if k not in found]
    unexpected = [f"{k} is unexpected" for k in found if k not in expected]
    if reshaped or missing or unexpected:
        counts = ", ".join(f"{len(items)} {what}" for items, what in
                           ((reshaped, "shapes differ"), (missing, "keys missing"), (unexpected, "keys unexpected"))
                           if items)
        first = "; ".join((reshaped + missing + unexpected)[:2])
        raise PdsError(f"checkpoint {path} does not fit config {label} ({counts}): {first}; "
                       f"{_suggestion(found)}")
    sigmas = raw.state_dict.get("sigmas")
    if not _ladder_fits(sigmas, model.config):
        m = model.config["model"]
        raise PdsError(
            f"checkpoint {path} was trained on {sigmas.numel()} noise levels from {float(sigmas[0]):g} down to "
            f"{float(sigmas[-1]):g}, config {label} says {m['num_scales']} from {m['sigma_max']:g} down to "
            f"{m['sigma_min']:g}; {_suggestion(raw.state_dict)}")


def _resolve(raw: RawCheckpoint, path: Path, config, preset: str | None) -> tuple[dict, str, str | None]:
    """(config, label, preset name or None); with neither config nor preset, the file's own or the one preset that fits."""
    if config is None and preset is None and raw.config is not None:
        return validate_config(raw.config, f"the config stored in {path}"), f"{path} (stored config)", None
    if config is None and preset is None:
        hits = matching_presets(raw.state_dict)
        if len(hits) != 1:
            found = f"it fits presets {', '.join(hits)}" if hits else "it fits no preset"
            raise PdsError(f"which config is checkpoint {path}? {found}; pass --preset NAME or --config FILE")
        preset = hits[0]
    return resolve_config(config, preset)


# ---- loading ----


def _materialize(model: NCSNpp, raw: RawCheckpoint, path: Path, label: str, device: torch.device) -> NCSNpp:
    """Give a model built on the meta device the checkpoint's tensors, on `device`.

    No random init to throw away, and no second copy of the weights. The tensors take the
    model's dtypes (float32, float64 sigmas) whatever the file stored.
    """
    _check_fits(model, raw, path, label)
    expected = model.state_dict()
    tensors = {k: v.to(device=device, dtype=expected[k].dtype).contiguous() for k, v in raw.state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.reset_constants(device)
    return model


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def _load_ema(model: nn.Module, ema: dict, path: Path) -> None:
    shadow = list(ema["shadow_params"])
    trainable = _trainable(model)
    if len(shadow) != len(trainable):
        raise PdsError(f"checkpoint {path}: the EMA holds {len(shadow)} tensors but the model has "
                       f"{len(trainable)} trainable parameters (damaged file or other config; "
                       f"--raw-weights skips the EMA)")
    for i, ((name, param), tensor) in enumerate(zip(trainable, shadow)):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != param.shape:
            got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise PdsError(f"checkpoint {path}: EMA tensor {i} is {got} but {name} is {list(param.shape)}")
    # Only after every tensor was checked, so a bad EMA never leaves a half-loaded model.
    for (_, param), tensor in zip(trainable, shadow):
        param.copy_(tensor)


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


@dataclass
class _Source:
    """A checkpoint resolved to tensors under score_sde's names, a config, and what to report about it."""

    raw: RawCheckpoint
    model: NCSNpp  # built on the meta device from the config
    label: str  # where the config came from
    preset: str | None
    path: Path  # named in error messages
    display: str  # what the user passed (a file, a folder, hf:ORG/NAME)
    weights_file: Path  # the file holding the tensors (hashed)
    extra: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


def _open_source(checkpoint, config, preset, trust: bool) -> _Source:
    text = str(checkpoint)
    if text.startswith(diffusers.HUB_PREFIX):
        repo, revision = diffusers.parse_hub_spec(text)
        folder = diffusers.hub_folder(text)
        return _from_folder(folder, text, config, preset, trust,
                            {"hub": {"repo": repo, "revision": revision, "snapshot": str(folder)}})
    path = Path(checkpoint)
    if path.is_dir():
        return _from_folder(path, str(path), config, preset, trust, {})
    raw = read_checkpoint(path, trust_checkpoint=trust)
    if diffusers.looks_like_diffusers(raw.state_dict):
        return _from_diffusers_file(raw, path, config, preset)
    cfg, label, preset_name = _resolve(raw, path, config, preset)
    return _Source(raw, build_model(cfg, device="meta"), label, preset_name, path, str(path), path)


def _from_folder(folder: Path, display: str, config, preset, trust: bool, extra: dict) -> _Source:
    if config is not None or preset is not None:
        raise PdsError(f"{display} is a diffusers folder and carries its own config; drop --config / --preset")
    # A Hub snapshot's files are links into its repo folder's blobs/.
    found = diffusers.locate_folder(folder, within=folder.parents[1] if "hub" in extra else None)
    raw = read_checkpoint(found.weights, trust_checkpoint=trust)
    if not diffusers.looks_like_diffusers(raw.state_dict):
        raise PdsError(f"{found.weights} does not hold diffusers weights (no conv_in.weight)")
    cfg, warnings = diffusers.config_from_diffusers(found.unet_config, found.scheduler, str(found.config_path))
    extra["scheduler"] = "config" if found.scheduler is not None else "defaults"
    return _convert(raw, cfg, found.weights, f"diffusers:{found.config_path}", display, found.layout, extra, warnings)


def _from_diffusers_file(raw: RawCheckpoint, path: Path, config, preset) -> _Source:
    """A single file with diffusers' names: its UNet2DModel config from --config or beside it, or a pds config."""
    candidates = [Path(config)] if isinstance(config, (str, Path)) and Path(config).is_file() else []
    if config is None and preset is None:
        candidates.append(path.parent / "config.json")
    unet_path = next((c for c in candidates if c.is_file() and diffusers.is_unet_config(diffusers.read_json(c))), None)
    if unet_path is not None:
        if preset is not None:
            raise PdsError(f"{unet_path} is a diffusers config; --preset describes a score_sde one: drop --preset")
        schedulers = [unet_path.parent / "scheduler_config.json",
                      unet_path.parent.parent / "scheduler" / "scheduler_config.json", path.parent / "scheduler_config.json"]
        sched = next((s for s in schedulers if s.is_file()), None)
        cfg, warnings = diffusers.config_from_diffusers(diffusers.read_json(unet_path),
                                                        diffusers.read_json(sched) if sched else None, str(unet_path))
        return _convert(raw, cfg, path, f"diffusers:{unet_path}", str(path), "diffusers-file", {}, warnings)
    if config is None and preset is None:
        raise PdsError(f"{path} holds diffusers weights; point --checkpoint at its folder, or pass --config with its "
                       f"config.json (UNet2DModel) or a score_sde config")
    cfg, label, preset_name = resolve_config(config, preset)
    why = diffusers.exportable(cfg)
    if why:
        raise PdsError(f"{path} holds diffusers weights, but config {label} has no diffusers form: {why}")
    source = _convert(raw, cfg, path, label, str(path), "diffusers-file", {}, [])
    source.preset = preset_name
    return source


def _convert(raw: RawCheckpoint, cfg: dict, weights_file: Path, label: str, display: str, layout: str, extra: dict,
             warnings: list) -> _Source:
    model = build_model(cfg, device="meta")
    state = diffusers.state_dict_from_diffusers(raw.state_dict, model, str(weights_file))
    return _Source(RawCheckpoint(state, None, None, layout), model, label, None, weights_file, display, weights_file,
                   extra, warnings)


def _warn(message: str) -> None:
    # escape: paths may hold brackets, which Rich would read as markup.
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def load_score_model(checkpoint: str | Path, config: str | Path | dict | None = None, *, preset: str | None = None,
                     weights: str = "ema", trust_checkpoint: bool = False, device: str | torch.device = "cpu",
                     warn: Callable[[str], None] | None = None) -> NCSNpp:
    """An NCSN++ in eval mode with a checkpoint's weights; `model(x, sigma)` is the score.

    `checkpoint`: a score_sde / pds file (.pth, a plain state_dict, .safetensors), a diffusers
    model or pipeline folder, or "hf:ORG/NAME[@REVISION]" (fetched into huggingface_hub's cache).
    `config`: a preset name, a JSON config file (fields it lacks come from `preset`) or a dict;
    with neither config nor preset, the config a file carries, else the one preset whose shapes
    and noise levels fit. Diffusers folders carry theirs (config.json + the scheduler's).
    `weights`: "ema" (what score_sde samples with) or "raw". `checkpoint_info["weights"]` says
    what was used: "ema", "raw" (also when the file has no EMA), or "state_dict" (a plain
    state_dict or a diffusers model, used as stored).
    The module carries `.config` (nested dict), `.settings` (SamplingSettings) and
    `.checkpoint_info` (file, sha256, layout, weights used, step, parameter count, ...).
    """
    if weights not in WEIGHTS:
        raise PdsError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    device = _device(device)
    source = _open_source(checkpoint, config, preset, trust_checkpoint)
    raw, cfg = source.raw, source.model.config
    check_memory(cfg, device, source.label)
    model = _materialize(source.model, raw, source.path, source.label, device)

    used = "raw" if raw.layout == "score_sde" else "state_dict"
    if weights == "ema" and raw.ema is not None:
        _load_ema(model, raw.ema, source.path)
        used = "ema"
    for message in source.warnings:
        (warn or _warn)(message)
    model.eval()
    model.settings = settings_from_config(cfg)
    model.checkpoint_info = {
        "path": source.display,
        "file": source.display if "hub" in source.extra else Path(source.display).name,
        "sha256": sha256_file(source.weights_file),
        "size_bytes": source.weights_file.stat().st_size,
        "layout": raw.layout,
        "weights": used,
        "weights_requested": weights,
        "ema_available": raw.ema is not None,
        "ema_decay": raw.ema.get("decay") if raw.ema else None,
        "ema_num_updates": raw.ema.get("num_updates") if raw.ema else None,
        "step": raw.step,
        "num_params": sum(p.numel() for p in model.parameters()),
        "config": source.label,
        "preset": source.preset,
        **({"weights_file": str(source.weights_file)} if source.display != str(source.weights_file) else {}),
        **source.extra,
        **({"warnings": list(source.warnings)} if source.warnings else {}),
    }
    return model


def open_checkpoint(checkpoint: str | Path, config: str | Path | dict | None = None, preset: str | None = None, *,
                    device: str | torch.device, precision: str = "fp32", weights: str = "ema",
                    trust_checkpoint: bool = False) -> ScoreModel:
    """A checkpoint as a `ScoreModel` for the samplers; `precision` fp16/bf16 runs the body in half."""
    dtype = resolve_precision(precision)
    model = load_score_model(checkpoint, config, preset=preset, weights=weights,
                             trust_checkpoint=trust_checkpoint, device=device)
    model.set_precision(dtype)
    info = model.checkpoint_info
    return ScoreModel(
        score=TorchScore(model, next(model.parameters()).device),
        settings=model.settings,
        name=f"checkpoint:{info['file']}",
        device=next(model.parameters()).device,
        sha256=info["sha256"],
        info={"backend": "torch", "precision": precision.lower(), "config": info["config"], "preset": info["preset"],
              "weights": info["weights"], "step": info["step"], "num_params": info["num_params"]},
    )


def checkpoint_report(model: NCSNpp) -> dict:
    """Everything `pds info` shows about a loaded checkpoint, JSON-ready."""
    info = dict(model.checkpoint_info)
    return {
        "checkpoint": info.pop("path"),
        **info,
        "settings": model.settings.to_dict(),
        "model": config_summary(model.config),
    }


# ---- writing ----


def _cpu_fp32(tensor: torch.Tensor) -> torch.Tensor:
    # The layout is float32 weights (float64 sigmas) whatever precision the model ran in.
    t = tensor.detach().to("cpu")
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t.clone()


def _ema_state(model: nn.Module, ema_params, step: int) -> dict:
    trainable = _trainable(model)
    config = getattr(model, "config", None) or {}
    decay = config.get("model", {}).get("ema_rate", 0.999)
    num_updates = int(step)
    if ema_params is None:
        shadow = [p for _, p in trainable]  # no EMA kept: the raw weights stand in for it
    elif isinstance(ema_params, Mapping):
        shadow = list(ema_params["shadow_params"])
        decay = ema_params.get("decay", decay)
        num_updates = ema_params.get("num_updates", num_updates)
    else:
        shadow = list(ema_params)
    if len(shadow) != len(trainable):
        raise ValueError(f"ema_params has {len(shadow)} tensors, the model {len(trainable)} trainable parameters")
    for (name, param), tensor in zip(trainable, shadow):
        if tensor.shape != param.shape:
            raise ValueError(f"EMA tensor for {name} is {list(tensor.shape)}, the parameter {list(param.shape)}")
    return {"decay": decay, "num_updates": num_updates, "shadow_params": [_cpu_fp32(t) for t in shadow]}


def _fresh_optimizer_state(model: nn.Module) -> dict:
    """The state_dict of the Adam score_sde builds (over all parameters), before any step.

    score_sde's restore calls `optimizer.load_state_dict` on this entry, so it must be a real
    optimizer state. Written out rather than taken from a `torch.optim.Adam`, whose construction
    imports torch's compiler stack (seconds); Adam fills in any newer per-group flags itself.
    """
    optim = (getattr(model, "config", None) or {}).get("optim", {})
    group = {
        "lr": optim.get("lr", 2e-4),
        "betas": (optim.get("beta1", 0.9), 0.999),
        "eps": optim.get("eps", 1e-8),
        "weight_decay": optim.get("weight_decay", 0),
        "amsgrad": optim.get("amsgrad", False),
        "params": list(range(sum(1 for _ in model.parameters()))),
    }
    return {"state": {}, "param_groups": [group]}


def save_checkpoint(path: str | Path, model: NCSNpp, *, ema_params=None, optimizer_state: dict | None = None,
                    step: int = 0) -> None:
    """Write `model` in score_sde's layout, atomically; `load_score_model` and score_sde both read it.

    `ema_params`: the EMA shadows of the trainable parameters (a list in parameter order, or a
    score_sde EMA state dict); None stores the model's own weights as the EMA.
    `optimizer_state`: an optimizer `state_dict()`; None stores a fresh Adam state.
    """
    state = {
        "optimizer": optimizer_state if optimizer_state is not None else _fresh_optimizer_state(model),
        "model": OrderedDict((PREFIX + k, _cpu_fp32(v)) for k, v in model.state_dict().items()),
        "ema": _ema_state(model, ema_params, step),
        "step": int(step),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_safetensors(path: str | Path, model: NCSNpp, *, ema_params=None, step: int = 0) -> None:
    """The sampling weights (EMA shadows where given, else the model's) as safetensors, atomically.

    score_sde's key names without "module.", the `sigmas` buffer included, and the config and
    step in the file's metadata, so `load_score_model(path)` needs nothing else. Tensors only:
    loading it runs no code.
    """
    state = OrderedDict((k, _cpu_fp32(v)) for k, v in model.state_dict().items())
    if ema_params is not None:
        shadow = _ema_state(model, ema_params, step)["shadow_params"]
        for (name, _), tensor in zip(_trainable(model), shadow):
            state[name] = tensor
    state = OrderedDict((k, v.contiguous()) for k, v in state.items())
    metadata = {"format": "pt", "pds.config": json.dumps(getattr(model, "config", None) or {}), "pds.step": str(int(step))}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
