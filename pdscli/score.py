"""The `score(x, sigma) -> score` contract, the bundle a sampler runs on, and the one wrapper that
makes a PyTorch module follow the contract (every engine and checkpoint opener uses it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from pdscli.settings import SamplingSettings


class ScoreFn(Protocol):
    """x [B, C, H, W] float32, sigma [B] float32 -> score [B, C, H, W] float32."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ScoreModel:
    """A score callable with what is known about it. Samplers only ever see `score`."""

    score: ScoreFn
    settings: SamplingSettings
    name: str  # e.g. "gaussian", "preset:cifar10", "onnx:path"
    device: torch.device
    sha256: str | None = None  # of the checkpoint or engine file, for run.json
    info: dict = field(default_factory=dict)  # backend, precision, ... for run.json


class CountingScore:
    """A score callable that counts its network evaluations (NFE), whatever a sampler reports."""

    def __init__(self, score: ScoreFn):
        self.score, self.calls = score, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.score(x, sigma)


def as_inputs(x: torch.Tensor, sigma: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32, contiguous, on `device`; a scalar sigma is broadcast to the batch."""
    x = x.detach().to(device=device, dtype=torch.float32).contiguous()
    sigma = torch.as_tensor(sigma).detach().to(device=device, dtype=torch.float32).reshape(-1)
    if sigma.numel() == 1 and x.shape[0] != 1:
        sigma = sigma.expand(x.shape[0])
    return x, sigma.contiguous()


class TorchScore:
    """A PyTorch module `net(x, sigma) -> score` as the score contract: eval mode on `device`,
    float32 inputs and output, under inference mode. `compile=True` runs the module through
    `torch.compile` with fixed shapes (a sampler's batch does not change within a run).
    `channels_last=True` stores the weights and feeds the input NHWC (what cuDNN's tensor-core
    convolutions read natively); the score handed back is in the ordinary layout."""

    def __init__(self, net: nn.Module, device: str | torch.device, *, compile: bool = False,
                 channels_last: bool = False):
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.net = net.eval().to(self.device)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # dynamic=False: one graph per batch size is what a sampler needs, and it is the fastest.
        self.fn = torch.compile(self.net, dynamic=False) if compile else self.net

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x, sigma = as_inputs(x, sigma, self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.fn(x, sigma).float()
        # The samplers' state is in the ordinary layout: mixing layouts in their updates is slow.
        return out.contiguous() if self.channels_last else out
