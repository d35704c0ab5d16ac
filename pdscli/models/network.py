"""The one opener of an NCSN++ as a module, for the commands that need the network itself
(`pds export`, `pds bench`): from a checkpoint (any form `load_score_model` reads) or from a
config / preset with seeded random weights, with what its exports are keyed and labelled by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pdscli.devices import resolve_device
from pdscli.errors import PdsError
from pdscli.models.checkpoint import load_score_model
from pdscli.models.config import resolve_config, settings_from_config
from pdscli.models.ncsnpp import NCSNpp, build_model
from pdscli.settings import SamplingSettings

RANDOM_STD = 0.01


@dataclass
class Network:
    """An fp32 NCSN++ in eval mode and where it came from (a checkpoint, or random weights)."""

    net: NCSNpp
    settings: SamplingSettings
    config: dict
    config_label: str  # "preset:cifar10", a config file, ...
    preset: str | None
    weights: str  # "ema", "raw", "state_dict" or "random(seed=N)"
    stem: str  # a default file-name stem: the checkpoint's, or "<preset or config>-random"
    checkpoint: str | None = None  # what the user passed: a file, a diffusers folder, hf:ORG/NAME
    file: str | None = None  # its name in reports (checkpoint_info["file"])
    sha256: str | None = None  # of the weights file
    seed: int | None = None  # random weights only

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


def randomize(net: nn.Module, seed: int = 0, std: float = RANDOM_STD) -> nn.Module:
    """Add N(0, std^2) to every parameter, as the reference fixture does.

    score_sde initialises the last conv of each block at scale ~1e-10 (init_scale=0), so a
    freshly built NCSN++ outputs almost nothing: fp16 flushes those weights to zero and a
    parity check compares near-zeros. The offset makes a random-weights network exercise the
    whole graph."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device, p.dtype) * std)
    return net


def open_network(checkpoint: str | Path | None = None, config: str | Path | dict | None = None,
                 preset: str | None = None, *, random_weights: bool = False, seed: int = 0, weights: str = "ema",
                 trust_checkpoint: bool = False, device: str | torch.device = "cpu") -> Network:
    """The fp32 NCSN++ of a checkpoint (config / preset optional, as in `load_score_model`) or,
    with `random_weights`, of a config / preset's architecture with seeded random weights."""
    if random_weights:
        if checkpoint is not None:
            raise PdsError("--random-weights and --checkpoint exclude each other")
        cfg, label, preset_name = resolve_config(config, preset)
        with torch.random.fork_rng(devices=[]):  # build_model's init draws from the global generator
            torch.manual_seed(seed)
            net = randomize(build_model(cfg), seed)
        stem = f"{preset or ('config' if isinstance(config, dict) else Path(config).stem)}-random"
        return Network(net.to(device if isinstance(device, torch.device) else resolve_device(device)).eval(), settings_from_config(cfg), cfg, label, preset_name,
                       f"random(seed={seed})", stem, seed=seed)
    if checkpoint is None:
        raise PdsError("pass --checkpoint FILE (or --random-weights with --preset/--config)")
    net = load_score_model(checkpoint, config, preset=preset, weights=weights, trust_checkpoint=trust_checkpoint,
                           device=device)
    info = net.checkpoint_info
    return Network(net, net.settings, net.config, info["config"], info.get("preset"), info["weights"],
                   Path(str(checkpoint)).stem, checkpoint=str(checkpoint), file=info["file"], sha256=info["sha256"])
