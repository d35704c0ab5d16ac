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

import math
from dataclasses import dataclass

import torch

from pdscli.evaluate.divergence import gaussian_kl
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
    return float(gaussian_kl(r).mean())


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
                    samples: int = PILOT_SAMPLES, statistics_calls: int = 0) -> tuple[Candidate, dict]:
    """The candidate whose pilot samples are closest to the data's spectrum, and the pilot's record
    for run.json (each candidate's distance, the network calls spent). `statistics_calls`: the calls
    `own_gaussian` spent on `samples` images to find the data's Gaussian (0: the statistics were at hand)."""
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
    if statistics_calls:
        record["statistics"] = {"from": "the model's own denoiser", "network_calls": statistics_calls,
                                "nfe": statistics_calls * samples}
        record["network_calls"] += statistics_calls
        record["nfe"] += statistics_calls * samples
    return best, record


# The model's own statistics, for a network that comes without a filters file: its denoiser
# D(x, sigma) = x + sigma^2 score(x, sigma) on the data's Gaussian is, per orthonormal Fourier
# coefficient k, mean_k + G_k (x_k - mean_k) with the channels' gain G_k = S_k (S_k + sigma^2)^-1
# (S_k the channels' covariance there). Antithetic inputs x = c +- sigma z give G_k from the
# difference alone (whatever the centre c), by least squares over the pairs, and (1 - G_k) mean_k
# from the sum. One level resolves only the variances near sigma^2 (a gain far from 0 and 1), so a
# few levels from sigma_max down are read and each coefficient takes the level where its gain is
# best conditioned. Exact on a Gaussian model; on a network, what it learned.
OWN_LEVELS = 6  # noise levels read, one batched network call each
OWN_GAIN = 0.5  # the gain a level reads best at


def own_gaussian(model: ScoreModel, *, seed: int, samples: int = PILOT_SAMPLES,
                 levels: int = OWN_LEVELS) -> tuple[DataGaussian, int]:
    """(the data's Gaussian as the model's denoiser sees it, network calls spent: one per level, on
    `samples` images: samples // 2 antithetic pairs)."""
    settings = model.settings
    pairs = max(settings.num_channels + 1, samples // 2)
    z = SampleNoise(seed, range(PILOT_INDEX - pairs, PILOT_INDEX), settings.shape, model.device)().double().cpu()
    z_hat = torch.fft.fft2(z, norm="ortho")
    zz = torch.einsum("bchw,bdhw->hwcd", z_hat, z_hat.conj())
    eye = torch.eye(settings.num_channels, dtype=torch.complex128)
    sigmas = torch.logspace(math.log10(settings.sigma_max), math.log10(max(settings.sigma_min, 1e-3)), levels,
                            dtype=torch.float64).tolist()
    mean = torch.zeros(settings.shape, dtype=torch.float64)
    best_gain = torch.full(settings.shape, math.inf, dtype=torch.float64)
    spectrum = torch.zeros(settings.shape, dtype=torch.float64)
    for i, sigma in enumerate(sigmas):
        x = torch.cat([mean + sigma * z, mean - sigma * z])
        with torch.no_grad():
            score = model.score(x.float().to(model.device), torch.full((2 * pairs,), sigma, device=model.device))
        d_hat = torch.fft.fft2(x + sigma**2 * score.double().cpu(), norm="ortho")
        half = (d_hat[:pairs] - d_hat[pairs:]) / (2 * sigma)  # G z_hat
        gain = torch.linalg.solve(zz, torch.einsum("bchw,bdhw->hwcd", half, z_hat.conj()), left=False)  # [H, W, C, C]
        rest = eye - gain
        if i == 0:  # far above the data's spread: G ~ 0, the sum gives the mean
            total = (d_hat[:pairs] + d_hat[pairs:]).mean(0) / 2  # (1 - G) mean_hat, [C, H, W]
            centre = torch.linalg.solve(rest, total.permute(1, 2, 0).unsqueeze(-1)).squeeze(-1).permute(2, 0, 1)
            mean = torch.fft.ifft2(centre, norm="ortho").real
        cov = sigma**2 * torch.linalg.solve(rest, gain, left=False)  # S = sigma^2 G (1 - G)^-1
        variance = torch.diagonal(cov, dim1=-2, dim2=-1).real.permute(2, 0, 1)
        conditioning = (torch.diagonal(gain, dim1=-2, dim2=-1).real.permute(2, 0, 1) - OWN_GAIN).abs()
        better = conditioning < best_gain
        best_gain = torch.where(better, conditioning, best_gain)
        spectrum = torch.where(better, variance, spectrum)
    return DataGaussian(mean, spectrum.clamp(min=0.0)), levels
