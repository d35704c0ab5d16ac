"""The `score(x, sigma) -> score` contract and the bundle a sampler runs on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

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
