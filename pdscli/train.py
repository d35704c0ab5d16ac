"""A small, honest trainer for VE score models: score_sde's continuous denoising score matching.

What it does, and nothing more (read score_sde's losses.py / run_lib.py for the original):
- t ~ U(eps, 1), sigma = sigma_min (sigma_max / sigma_min)^t, z ~ N(0, I), x~ = x + sigma z;
- loss per image = reduce over pixels of (s(x~, sigma) sigma + z)^2, where reduce is the mean
  (`training.reduce_mean`) or half the sum; averaged over the batch. With
  `training.likelihood_weighting` the weighting of Song et al. 2021 (g(t)^2 / sigma^2) instead;
- Adam (`optim.*`), linear learning-rate warm-up over `optim.warmup` steps, gradient clipping
  at `optim.grad_clip` (off when negative), an EMA of the weights (`model.ema_rate`) with
  score_sde's warm-up of the decay;
- checkpoints in the score_sde layout (`optimizer`, `model`, `ema`, `step`), written atomically,
  so that `pds sample --checkpoint` loads them and `--resume` continues from them.

Every random draw of step k comes from generators seeded from (seed, k), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdscli.errors import PdsError
from pdscli.noise import sample_seed

CHECKPOINT_NAME = "checkpoint.pth"
CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
SUMMARY_NAME = "train.json"
TRAIN_EPS = 1e-5  # score_sde's smallest training time for the VE SDE


# ----------------------------------------------------------------------------- the objective


def sigmas_at(t: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The VE SDE's noise scale at time t: sigma_min (sigma_max / sigma_min)^t."""
    return sigma_min * (sigma_max / sigma_min) ** t


def dsm_loss(
    net,
    x: torch.Tensor,
    *,
    sigma_min: float,
    sigma_max: float,
    generator: torch.Generator,
    reduce_mean: bool = True,
    likelihood_weighting: bool = False,
    eps: float = TRAIN_EPS,
) -> torch.Tensor:
    """score_sde's continuous VE denoising score-matching loss on one batch (a scalar)."""
    b = x.shape[0]
    t = torch.rand(b, generator=generator, device=x.device) * (1.0 - eps) + eps
    z = torch.randn(x.shape, generator=generator, device=x.device)
    sigma = sigmas_at(t, sigma_min, sigma_max)
    s4 = sigma[:, None, None, None]
    score = net(x + s4 * z, sigma)  # a continuous VE net is conditioned on sigma itself
    if likelihood_weighting:
        # g(t)^2 = d sigma^2/dt = 2 sigma^2 log(sigma_max / sigma_min); residual measured on the score.
        g2 = sigma**2 * (2.0 * math.log(sigma_max / sigma_min))
        per_pixel = torch.square(score + z / s4)
    else:
        g2 = None
        per_pixel = torch.square(score * s4 + z)
    flat = per_pixel.reshape(b, -1)
    per_image = flat.mean(dim=1) if reduce_mean else 0.5 * flat.sum(dim=1)
    if g2 is not None:
        per_image = per_image * g2
    return per_image.mean()


# ----------------------------------------------------------------------------- optimisation


class EMA:
    """Exponential moving average of the trainable parameters, as score_sde keeps it.

    The decay ramps up as min(rate, (1 + n) / (10 + n)) over the first updates, so early
    weights do not dominate a short run. `shadow` follows the order of the trainable
    parameters, which is also the order score_sde stores (`ema.shadow_params`).
    """

    def __init__(self, params, rate: float, num_updates: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise PdsError(f"model.ema_rate must lie in [0, 1], got {rate}")
        self.rate = rate
        self.num_updates = num_updates
        self.shadow = [p.detach().clone() for p in params if p.requires_grad]

    @torch.no_grad()
    def update(self, params) -> None:
        self.num_updates += 1
        decay = min(self.rate, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, (p for p in params if p.requires_grad)):
            s.sub_((1.0 - decay) * (s - p.detach()))

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow, (p for p in params if p.requires_grad)):
            p.copy_(s)


def warmup_lr(step: int, lr: float, warmup: int) -> float:
    """score_sde's schedule: linear from 0 to lr over `warmup` steps, then constant."""
    return lr * min(step / warmup, 1.0) if warmup > 0 else lr


def make_optimizer(params, optim: dict) -> torch.optim.Optimizer:
    name = str(optim.get("optimizer", "Adam"))
    if name != "Adam":
        raise PdsError(f"optim.optimizer {name!r} is not supported; only Adam (as score_sde)")
    return torch.optim.Adam(
        params,
        lr=float(optim.get("lr", 2e-4)),
        betas=(float(optim.get("beta1", 0.9)), 0.999),
        eps=float(optim.get("eps", 1e-8)),
        weight_decay=float(optim.get("weight_decay", 0.0)),
    )


def step_generator(seed: int, step: int, device) -> torch.Generator:
    """The generator for all draws of training step `step`: independent of where a run was resumed."""
    g = torch.Generator(device=device)
    g.manual_seed(sample_seed(seed, step))
    return g


def sample_batch(data: torch.Tensor, batch_size: int, generator: torch.Generator, *, random_flip: bool) -> torch.Tensor:
    """A batch drawn with replacement (so an epoch boundary never matters), optionally mirrored left-right."""
    idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator, device=generator.device)
    x = data[idx.to(data.device)]
    if random_flip:
        flip = torch.rand(batch_size, generator=generator, device=generator.device).to(data.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainState:
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    step: int = 0


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    start_step: int
    seconds: float
    final_loss: float | None
    losses: list = field(default_factory=list)  # (step, mean loss since the previous log line)


def train_step(state: TrainState, data: torch.Tensor, cfg: dict, *, seed: int, batch_size: int, lr: float) -> float:
    """One optimisation step (number `state.step`) of score_sde's recipe; returns the batch loss."""
    model, optim, training = cfg["model"], cfg["optim"], cfg["training"]
    g = step_generator(seed, state.step, data.device)
    # Dropout draws from torch's global generator: seed it per step too, for exact resumes.
    torch.manual_seed(sample_seed(seed ^ 0x5EED, state.step))
    x = sample_batch(data, batch_size, g, random_flip=bool(cfg["data"].get("random_flip", False)))
    state.net.train()
    state.optimizer.zero_grad(set_to_none=True)
    loss = dsm_loss(
        state.net,
        x,
        sigma_min=float(model["sigma_min"]),
        sigma_max=float(model["sigma_max"]),
        generator=g,
        reduce_mean=bool(training.get("reduce_mean", True)),
        likelihood_weighting=bool(training.get("likelihood_weighting", False)),
    )
    loss.backward()
    for group in state.optimizer.param_groups:
        group["lr"] = warmup_lr(state.step, lr, int(optim.get("warmup", 0)))
    clip = float(optim.get("grad_clip", -1.0))
    if clip >= 0:
        torch.nn.utils.clip_grad_norm_(state.net.parameters(), max_norm=clip)
    state.optimizer.step()
    state.step += 1
    state.ema.update(state.net.parameters())
    return float(loss.detach())


# ----------------------------------------------------------------------------- checkpoints


def _strip_module(state_dict: dict) -> dict:
    """score_sde wraps the net in DataParallel, so its keys start with `module.`."""
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def save_training_checkpoint(path, state: TrainState) -> None:
    """The score_sde layout (`optimizer`, `model`, `ema`, `step`), renamed into place in one step."""
    from pdscli.checkpoint import save_checkpoint
    from pdscli.fsutil import atomic_path

    with atomic_path(path) as tmp:
        save_checkpoint(
            tmp,
            state.net,
            ema_params=state.ema.shadow,
            optimizer_state=state.optimizer.state_dict(),
            step=state.step,
        )


def restore_training_checkpoint(path, state: TrainState) -> None:
    """Load what `save_training_checkpoint` wrote into `state` (weights, Adam moments, EMA, step)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state.net.load_state_dict(_strip_module(raw["model"]))
        shadow = raw["ema"]["shadow_params"]
        if len(shadow) != len(state.ema.shadow):
            raise ValueError(f"{len(shadow)} EMA tensors, the model has {len(state.ema.shadow)} trainable parameters")
        device = next(state.net.parameters()).device
        state.ema.shadow = [s.to(device=device, dtype=torch.float32).clone() for s in shadow]
        state.step = int(raw["step"])
        state.ema.num_updates = state.step  # one EMA update per step, whatever the file says
        if raw.get("optimizer"):
            state.optimizer.load_state_dict(raw["optimizer"])
    except (KeyError, RuntimeError, ValueError, OSError) as e:
        raise PdsError(f"cannot resume from {path}: {str(e).splitlines()[0]}") from None
