"""A pilot at the budget: which sampler suits the network at hand (`pds sample --nfe N` on a network).

The best sampler at a small budget depends on the model, not only the budget: on an accurate
score (an exact model, a strong network) the probability-flow ODE solvers win by a wide margin,
while on a weak network every ODE solver leaves many times the data's high-frequency energy (its
score errors), which a stochastic solver repairs. A guess about the model is wrong for one kind.
With the data's statistics at hand, a short pilot tells them apart: each candidate makes a few
dozen samples at the run's budget and grid, and the one whose samples' spectrum is closest to the
data's wins. The spectra are compared per channel and radial frequency band (averaging over a
band keeps the estimate steady at a few dozen samples): the mean of
1/2 (r - 1 - ln r), r = the samples' band power / the data's, over every channel and band.

The pilot's draws are the run seed's, at sample indices no run uses (from PILOT_INDEX), so a run
stays a function of its seed; its network calls are counted and reported in run.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdscli.noise import SampleNoise
from pdscli.samplers import Steps, sampler_info, sampler_kwargs
from pdscli.samplers.teleport import DataGaussian, TeleportChoice, TeleportNoise
from pdscli.score import CountingScore, ScoreModel

PILOT_SAMPLES = 32
PILOT_INDEX = 1 << 48  # the pilot's sample indices start here: far past any run's


@dataclass(frozen=True)
class Candidate:
    sampler: str
    grid: str
    steps: Steps
    teleport: TeleportChoice


def band_index(size: int) -> torch.Tensor:
    """Radial band of each unshifted DFT coefficient of a size x size image, [size, size] long:
    band b holds |k| in [b, b + 1) (integer wavenumbers, the corners in the last band)."""
    k = torch.fft.fftfreq(size, dtype=torch.float64) * size
    radius = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    return radius.floor().long().clamp(max=size // 2)


def spectral_distance(samples: torch.Tensor, gaussian: DataGaussian) -> float:
    """How far the samples' band powers are from the data's: mean over channels and radial bands of
    1/2 (r - 1 - ln r); 0 for a perfect match. Samples [N, C, H, W] in the data's units."""
    x = samples.detach().to("cpu", torch.float64) - gaussian.mean
    power = (torch.fft.fft2(x, norm="ortho").abs() ** 2).mean(0)  # [C, H, W]
    bands = band_index(x.shape[-1]).reshape(-1)
    count = torch.bincount(bands).to(torch.float64)
    keep = count > 0

    def per_band(a: torch.Tensor) -> torch.Tensor:  # [C, n_bands]
        flat = a.reshape(a.shape[0], -1)
        total = torch.zeros(a.shape[0], len(count), dtype=torch.float64).index_add_(1, bands, flat)
        return total[:, keep] / count[keep]

    r = per_band(power) / per_band(gaussian.spectrum).clamp(min=1e-12)
    return float((0.5 * (r - 1 - torch.log(r))).mean())


def run_candidate(model: ScoreModel, gaussian: DataGaussian, candidate: Candidate, *, seed: int,
                  samples: int = PILOT_SAMPLES) -> tuple[float, int]:
    """(spectral distance of the candidate's pilot samples, network calls per sample)."""
    info = sampler_info(candidate.sampler)
    score = CountingScore(model.score)
    noise = SampleNoise(seed, range(PILOT_INDEX, PILOT_INDEX + samples), model.settings.shape, model.device)
    if candidate.teleport.sigma_t is not None:
        noise = TeleportNoise(noise, gaussian, model.settings.sigma_max, candidate.teleport.sigma_t,
                              stochastic=not info.deterministic)
    with torch.no_grad():
        out = info.fn(score, noise, candidate.steps, **sampler_kwargs(candidate.sampler, snr=model.settings.snr))
    return spectral_distance(out.clamp(0.0, 1.0), gaussian), score.calls


def choose_by_pilot(model: ScoreModel, gaussian: DataGaussian, candidates: list[Candidate], *, seed: int,
                    samples: int = PILOT_SAMPLES) -> tuple[Candidate, dict]:
    """The candidate whose pilot samples are closest to the data's spectrum, and the pilot's record
    for run.json (each candidate's distance, the network calls spent)."""
    scores, calls = {}, 0
    for c in candidates:
        scores[c.sampler], spent = run_candidate(model, gaussian, c, seed=seed, samples=samples)
        calls += spent
    best = min(candidates, key=lambda c: scores[c.sampler])
    record = {
        "samples": samples,
        "network_calls": calls,  # batched calls, one per step and candidate: calls x samples images went through
        "nfe": calls * samples,  # per-image network evaluations the pilot spent
        "distance": {k: round(v, 6) for k, v in scores.items()},
        "chosen": best.sampler,
    }
    return best, record
