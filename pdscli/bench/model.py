"""The model under test (the analytic Gaussian, an NCSN++ network or an engine file), the inputs
a network call is timed on, and the model's FLOPs per call."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from pdscli.bench.config import ANALYTIC, ENGINE, BenchConfig, error_line
from pdscli.engines.torch_engine import torch_score
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.evaluate.mixture import MixtureImageModel
from pdscli.models import build_model, builtin
from pdscli.models.network import Network, open_network
from pdscli.sample.model import GAUSSIAN_CHANNELS, GAUSSIAN_SIZE, check_shape_flags, open_model
from pdscli.settings import SamplingSettings

NETWORK = "network"


@dataclass
class BenchModel:
    """What is benchmarked: `score` is the fp32 reference callable (eager, analytic or engine)."""

    kind: str  # ANALYTIC | NETWORK | ENGINE
    score: Callable
    settings: SamplingSettings
    device: torch.device
    name: str
    net: torch.nn.Module | None = None  # the fp32 NCSN++ (network kind)
    net_config: dict | None = None
    gaussian: GaussianImageModel | None = None  # the analytic kind
    mixture: MixtureImageModel | None = None  # the analytic kind, --model mixture
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.settings.shape)

    @property
    def is_builtin(self) -> bool:
        return self.name == builtin.NAME and builtin.FILTERS.is_file()


def open_bench_model(cfg: BenchConfig, device: torch.device) -> BenchModel:
    model, spec = cfg.default_model, cfg.spec
    if spec.engine:
        return _open_engine(cfg, device)
    if model == "gaussian":
        return _open_gaussian(cfg, device)
    if model == "mixture":
        return _open_mixture(cfg, device)
    if model == "builtin":
        opened = _network_from_checkpoint(builtin.WEIGHTS, builtin.CONFIG, None, False, device, name=builtin.NAME)
    elif spec.random_weights:
        opened = _open_random(cfg, device)
    else:
        opened = _network_from_checkpoint(spec.checkpoint, spec.config, spec.preset, spec.trust_checkpoint, device)
    check_shape_flags(spec, opened.settings, opened.name)
    return opened


def _open_gaussian(cfg: BenchConfig, device: torch.device) -> BenchModel:
    g = GaussianImageModel(cfg.spec.image_size or GAUSSIAN_SIZE, cfg.spec.channels or GAUSSIAN_CHANNELS, device=device)
    return BenchModel(ANALYTIC, g.score, g.settings, device, "gaussian", gaussian=g,
                      info={"description": g.describe()})


def _open_mixture(cfg: BenchConfig, device: torch.device) -> BenchModel:
    m = MixtureImageModel(cfg.spec.image_size or GAUSSIAN_SIZE, cfg.spec.channels or GAUSSIAN_CHANNELS, device=device)
    return BenchModel(ANALYTIC, m.score, m.settings, device, "mixture", mixture=m, info={"description": m.describe()})


def _network_from_checkpoint(path, config, preset, trust, device, *, name=None) -> BenchModel:
    network = open_network(path, config, preset, trust_checkpoint=trust, device=device)
    return _network_model(network, device, name or f"checkpoint:{network.file}",
                          {"checkpoint": str(path), "sha256": network.sha256, "preset": network.preset,
                           "config": network.config_label, "weights": network.weights})


def _open_random(cfg: BenchConfig, device: torch.device) -> BenchModel:
    return random_network_model(device, config=cfg.spec.config, preset=cfg.spec.preset, seed=cfg.seed)


def random_network_model(device: torch.device, *, config: Path | dict | None = None, preset: str | None = None,
                         seed: int = 0) -> BenchModel:
    """An architecture (a config file, a config dict or a preset) with seeded random weights: what
    --random-weights benches, and scripts/gpu_bench.py's networks."""
    network = open_network(config=config, preset=preset, random_weights=True, seed=seed, device=device)
    return _network_model(network, device, f"random:{network.stem.removesuffix('-random')}",
                          {"preset": preset, "config": str(config) if isinstance(config, (str, Path)) else None,
                           "weights": f"random (seed {seed}): an architecture benchmark, not a trained model"})


def _network_model(network: Network, device: torch.device, name: str, info: dict) -> BenchModel:
    """A BenchModel of an fp32 NCSN++ (pdscli.models.network.open_network), run eager."""
    return BenchModel(NETWORK, torch_score(network.net, device=device), network.settings, device, name,
                      net=network.net, net_config=network.config, info={**info, "num_params": network.num_params})


def _open_engine(cfg: BenchConfig, device: torch.device) -> BenchModel:
    # An engine file opens as `pds sample` opens it; the shape flags fill in missing metadata.
    sm = open_model(dataclasses.replace(cfg.spec, device=str(device)))
    return BenchModel(ENGINE, sm.score, sm.settings, device, sm.name,
                      info={"engine": str(cfg.spec.engine), "sha256": sm.sha256, **sm.info})


def weights_digest(model: BenchModel) -> str:
    """sha256 of the network's architecture and weights themselves (names, dtypes, shapes and
    bytes of every tensor of its state_dict): what an export of it depends on, wherever the
    weights came from (a checkpoint file, a seed)."""
    h = hashlib.sha256(json.dumps(model.net_config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.net.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Raw bytes via a byte view: numpy has no bfloat16.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def nfe_inputs(settings, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as a sampler sees it: x = data-like [0, 1] values + sigma z, sigmas log-spaced
    from sigma_min to sigma_max across the batch (a network's cost does not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(settings.sigma_min), math.log(settings.sigma_max)
    sigma = torch.exp(torch.linspace(hi, lo, batch, dtype=torch.float64)).float()
    x = torch.rand((batch, *settings.shape), generator=g) + sigma[:, None, None, None] * torch.randn(
        (batch, *settings.shape), generator=g)
    return x.to(device), sigma.to(device)


def count_flops(model: BenchModel, batches: list[int]) -> dict:
    """Model FLOPs per network call at each batch size, counted by torch's FlopCounterMode on
    the meta device (no memory, no compute). It counts matmuls, convolutions and attention
    (2 FLOPs per multiply-add), not elementwise ops or normalisation: a slight undercount."""
    if model.net_config is None:
        why = ("the analytic score is FFTs, which FlopCounterMode does not count" if model.kind == ANALYTIC
               else "an engine file's FLOPs are not counted; bench its --checkpoint or --preset --random-weights")
        return {"per_call": None, "note": why}
    per_call, method = {}, "FlopCounterMode on the meta device"
    try:
        meta = build_model(model.net_config, device="meta").eval()
        for b in batches:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                meta(torch.empty((b, *model.shape), device="meta"), torch.ones(b, device="meta"))
            per_call[b] = int(counter.get_total_flops())
    except Exception as e:  # a model the meta device cannot trace: count batch 1 for real and scale
        per_call = _flops_by_running(model, batches)
        method = f"FlopCounterMode at batch 1 on {model.device}, scaled ({error_line(e)})"
    return {"per_call": per_call, "per_image": per_call[min(batches)] / min(batches), "method": method,
            "counts": "matmul, convolution and attention FLOPs (2 per multiply-add); elementwise ops not counted"}


def _flops_by_running(model: BenchModel, batches: list[int]) -> dict:
    x, sigma = nfe_inputs(model.settings, 1, model.device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.net(x, sigma)
    one = int(counter.get_total_flops())
    return {b: one * b for b in batches}
