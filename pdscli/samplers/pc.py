"""Samplers for variance-exploding score models: predictor-corrector (PC) and PDS.

Every sampler has one signature, in the style of k-diffusion, plus its own keywords:

    sampler(score, noise, steps, *, precond=None, callback=None, **own) -> x

`score(x, sigma)` is the model (x [B, C, H, W] float32, sigma [B] float32), `noise()` returns a
fresh N(0, I) batch (its first draw makes the prior), `steps` a `Steps` grid, `precond` a
`pdscli.precondition.Preconditioner` (None = identity), `callback(info)` is called after every
step (`pdscli.samplers.common`). The result is the denoised x of the last step (not clipped).
The PC family's own keywords: snr and per_sample_step (the Langevin corrector's step size; not
`predictor`, which has no corrector) and options (below). `pdscli.samplers.sampler_kwargs`
picks a sampler's keywords out of a run's. The snr is trusted to be positive: it was checked
where it came in (--snr, or a config's sampling.snr).

The PC loop follows score_sde / PDS (sampling.py, sde_lib.py of the reference) step by step:
start x = sigma_max * M z; each step `n_steps_each` corrector steps, then one predictor step,
all evaluating the score at the continuous sigma(t); PDS is the same loop with M != I. The PC
family also takes `options=PCOptions(...)`: the parts a config's sampling section names
(`PCOptions.from_settings`). The default (reverse diffusion + Langevin, one corrector step,
noise removal) is the reference's and every official config's. As in the PDS reference, M
enters the prior, the reverse-diffusion predictor and the Langevin corrector only; the other
parts run unpreconditioned.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from pdscli.errors import PdsError
from pdscli.samplers.common import precond_maps, report, tweedie
from pdscli.samplers.grids import Steps
from pdscli.settings import CORRECTORS, PREDICTORS, SamplingSettings

# -- the updates ----------------------------------------------------------------------------


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norms, [B] float64."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).double()


def langevin_step(score, noise, x, sigma, *, snr, precond=None, per_sample_step=False):
    """One Langevin corrector step at noise level sigma ([B] float32); returns (x, x_mean).

    g = M M^T s(x, sigma), z = M z0; step = 2 (snr |z| / |g|)^2 with the norms averaged over the
    batch (the reference) or per sample; x_mean = x + step g, x = x_mean + sqrt(2 step) z.
    """
    grad, draw = precond_maps(precond)
    g = grad(score(x, sigma))
    z = draw(noise())
    g_norm, z_norm = _norms(g), _norms(z)
    if per_sample_step:
        step = 2 * (snr * z_norm / g_norm) ** 2
        step = step.float()[:, None, None, None]
    else:
        # The reference's batch-mean norms couple the samples of a batch (see `pc`).
        step = (2 * (snr * z_norm.mean() / g_norm.mean()) ** 2).float()
    x_mean = x + step * g
    return x_mean + torch.sqrt(2 * step) * z, x_mean


def ald_step(score, noise, x, sigma, *, snr):
    """One annealed Langevin dynamics step (NCSN's; score_sde's `ald` corrector): the step size
    2 (snr sigma)^2 from the noise level, not from the norms. Unpreconditioned, as in the reference."""
    step = 2 * (snr * sigma.double()) ** 2
    step = step.float()[:, None, None, None]
    x_mean = x + step * score(x, sigma)
    return x_mean + torch.sqrt(2 * step) * noise(), x_mean


def reverse_diffusion_step(score, noise, x, sigma, sigma_hi: float, sigma_lo: float, *, precond=None,
                           probability_flow: bool = False):
    """One reverse-diffusion predictor step from sigma_hi to sigma_lo; returns (x, x_mean).

    D = sigma_hi^2 - sigma_lo^2 (float64); x_mean = x + D M M^T s(x, sigma); x = x_mean + sqrt(D) M z.
    probability_flow: half the drift and no noise (the draw is still made, as the reference does).
    """
    grad, draw = precond_maps(precond)
    d = float(sigma_hi) ** 2 - float(sigma_lo) ** 2
    if probability_flow:
        x_mean = x + 0.5 * d * grad(score(x, sigma))
        draw(noise())
        return x_mean, x_mean
    x_mean = x + d * grad(score(x, sigma))
    return x_mean + math.sqrt(d) * draw(noise()), x_mean


def euler_maruyama_step(score, noise, x, sigma, *, n_steps: int, log_ratio: float, probability_flow: bool = False):
    """score_sde's Euler-Maruyama predictor on the reverse VE SDE: g^2 = 2 ln(sigma_max / sigma_min)
    sigma(t)^2 and the reference's dt = 1 / N (N steps, not the grid's spacing);
    x_mean = x + g^2 s dt, x = x_mean + g sqrt(dt) z; with probability_flow half the drift, no noise."""
    dt = 1.0 / n_steps
    g2 = 2.0 * log_ratio * sigma.double() ** 2  # [B]
    z = noise()  # drawn first and always, as the reference does
    drift = (g2 * dt * (0.5 if probability_flow else 1.0)).float()[:, None, None, None]
    x_mean = x + drift * score(x, sigma)
    if probability_flow:
        return x_mean, x_mean
    return x_mean + torch.sqrt(g2 * dt).float()[:, None, None, None] * z, x_mean


def ancestral_step(score, noise, x, sigma, sigma_hi: float, sigma_lo: float):
    """score_sde's ancestral-sampling predictor for VE (NCSN's): x_mean = x + D s, then noise with
    std sqrt(sigma_lo^2 D / sigma_hi^2), the variance of the true posterior step."""
    hi, lo = float(sigma_hi), float(sigma_lo)
    d = hi**2 - lo**2
    x_mean = x + d * score(x, sigma)
    return x_mean + math.sqrt(lo**2 * d / hi**2) * noise(), x_mean


# -- the loop -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PCOptions:
    """The PC loop's parts, as a config's sampling section names them (score_sde's fields).
    log_ratio = ln(sigma_max / sigma_min), which only euler_maruyama needs."""

    predictor: str = "reverse_diffusion"
    corrector: str = "langevin"
    n_steps_each: int = 1
    noise_removal: bool = True
    probability_flow: bool = False
    log_ratio: float | None = None

    @classmethod
    def from_settings(cls, settings: SamplingSettings, sampler: str = "pc") -> "PCOptions":
        """The parts `settings` names, for the PC-family sampler `sampler` (`predictor` drops the
        corrector, `corrector` drops the predictor)."""
        options = cls(settings.predictor, settings.corrector, settings.n_steps_each, settings.noise_removal,
                      settings.probability_flow, math.log(settings.sigma_max / settings.sigma_min)).for_sampler(sampler)
        if options.predictor == "none" and options.corrector == "none":
            part = "corrector" if sampler == "predictor" else "predictor"
            raise PdsError(f"--sampler {sampler} leaves no update: the config's sampling.{part} is 'none'")
        return options.checked()

    def for_sampler(self, sampler: str) -> "PCOptions":
        """These parts as the PC-family sampler `sampler` runs them: `predictor` drops the
        corrector, `corrector` drops the predictor, `pc` and `pds` run them all."""
        if sampler == "predictor":
            return dataclasses.replace(self, corrector="none")
        if sampler == "corrector":
            return dataclasses.replace(self, predictor="none")
        return self

    def checked(self) -> "PCOptions":
        if self.predictor not in PREDICTORS:
            raise PdsError(f"sampling.predictor is {self.predictor!r}; pds runs {', '.join(PREDICTORS)}")
        if self.corrector not in CORRECTORS:
            raise PdsError(f"sampling.corrector is {self.corrector!r}; pds runs {', '.join(CORRECTORS)}")
        if self.predictor == "euler_maruyama" and self.log_ratio is None:
            raise PdsError("the euler_maruyama predictor needs ln(sigma_max / sigma_min): build the options from_settings")
        return self

    @property
    def is_reference_default(self) -> bool:
        return (self.predictor, self.corrector, self.n_steps_each, self.noise_removal, self.probability_flow) == \
            ("reverse_diffusion", "langevin", 1, True, False)

    def nfe_per_step(self) -> int:
        return (self.n_steps_each if self.corrector != "none" else 0) + (self.predictor != "none")


DEFAULT_OPTIONS = PCOptions()


def _correct(opts, score, noise, x, x_mean, sigma, *, snr, precond, per_sample_step):
    for _ in range(opts.n_steps_each if opts.corrector != "none" else 0):
        if opts.corrector == "langevin":
            x, x_mean = langevin_step(score, noise, x, sigma, snr=snr, precond=precond, per_sample_step=per_sample_step)
        else:
            x, x_mean = ald_step(score, noise, x, sigma, snr=snr)
    return x, x_mean


def _predict(opts, score, noise, x, x_mean, sigma, hi, lo, *, precond, n_steps):
    if opts.predictor == "reverse_diffusion":
        return reverse_diffusion_step(score, noise, x, sigma, hi, lo, precond=precond,
                                      probability_flow=opts.probability_flow)
    if opts.predictor == "euler_maruyama":
        return euler_maruyama_step(score, noise, x, sigma, n_steps=n_steps, log_ratio=opts.log_ratio,
                                   probability_flow=opts.probability_flow)
    if opts.predictor == "ancestral_sampling":
        return ancestral_step(score, noise, x, sigma, hi, lo)
    return x, x_mean  # none


def _recorded(score, last: dict):
    """`score` that keeps its latest input and output in `last` (the updates use the score only
    through M M^T s, the callback's D(x) needs s itself)."""

    def recorded(x, sigma):
        s = score(x, sigma)
        last["x"], last["s"] = x, s
        return s

    return recorded


@torch.no_grad()
def _pc_loop(score, noise, steps: Steps, *, precond, snr, per_sample_step, callback, options: PCOptions):
    opts = options.checked()
    z = noise()
    x = steps.sigma_max * (precond.noise(z) if precond is not None else z)
    x_mean = x
    n, nfe, per_step = len(steps), 0, opts.nfe_per_step()
    last: dict = {}  # the step's last score evaluation, for the callback's D(x)
    if callback is not None:
        score = _recorded(score, last)
    for i in range(n):
        # The score's sigma: [B] float32 on x's device (the contract), the same for every update of the step.
        sigma = torch.full((x.shape[0],), float(steps.sigma[i]), dtype=torch.float32, device=x.device)
        x, x_mean = _correct(opts, score, noise, x, x_mean, sigma, snr=snr, precond=precond,
                             per_sample_step=per_sample_step)
        x, x_mean = _predict(opts, score, noise, x, x_mean, sigma, steps.sigma_hi[i], steps.sigma_lo[i],
                             precond=precond, n_steps=n)
        nfe += per_step
        if callback is not None:
            level = float(steps.sigma[i])
            report(callback, i, n, level, x, tweedie(last["x"], level, last["s"]), nfe)
    # noise_removal: the last update's x_mean (the reference's denoise); else its x, noise and all.
    return x_mean if opts.noise_removal else x


def pc(score, noise, steps: Steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None,
       options: PCOptions | None = None) -> torch.Tensor:
    """Predictor-corrector sampling (2 score evaluations per step by default): Langevin corrector,
    then reverse-diffusion predictor; returns the last predictor's x_mean (the reference's denoise).
    `options` runs other parts (a config's sampling section, `PCOptions.from_settings`).

    With a `precond` this is PDS. per_sample_step=False uses the reference's batch-mean norms
    for the Langevin step size, so a sample's image depends (slightly) on the rest of its batch;
    per_sample_step=True makes every sample independent of the batch it lands in.
    """
    return _pc_loop(score, noise, steps, precond=precond, snr=snr, per_sample_step=per_sample_step,
                    callback=callback, options=options or DEFAULT_OPTIONS)


def pds(score, noise, steps: Steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None,
        options: PCOptions | None = None) -> torch.Tensor:
    """Preconditioned diffusion sampling: `pc` with the preconditioner M (None = vanilla PC)."""
    return pc(score, noise, steps, precond=precond, snr=snr, per_sample_step=per_sample_step, callback=callback,
              options=options)


def predictor(score, noise, steps: Steps, *, precond=None, callback=None, options: PCOptions | None = None) -> torch.Tensor:
    """The predictor only (1 score evaluation per step; reverse diffusion unless `options` names
    another): no Langevin step, so no snr. Its samples never depend on the batch."""
    return _pc_loop(score, noise, steps, precond=precond, snr=None, per_sample_step=False,
                    callback=callback, options=(options or DEFAULT_OPTIONS).for_sampler("predictor"))


def corrector(score, noise, steps: Steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None,
              options: PCOptions | None = None) -> torch.Tensor:
    """Annealed Langevin corrector only (n_steps_each score evaluations per step) at the grid's
    sigmas. Returns the last corrector step's x_mean (without its noise); the reference's
    NonePredictor returns that x with the noise, a difference of about 2 * snr * sigma_min per
    pixel. See `corrector_stalls`: at the official snrs it needs ~1000+ steps to leave the prior."""
    return _pc_loop(score, noise, steps, precond=precond, snr=snr, per_sample_step=per_sample_step,
                    callback=callback, options=(options or DEFAULT_OPTIONS).for_sampler("corrector"))


# -- a corrector alone ------------------------------------------------------------------------


DATA_VARIANCE = 0.01  # per pixel: a std of 0.1, the low end for images in [0, 1] (so the check errs towards warning)


def corrector_spread(steps: Steps, snr: float, n_steps_each: int = 1) -> float:
    """How far a corrector-only run ends from the data: the final variance over the data's of
    Langevin steps on one white coefficient of data variance v = DATA_VARIANCE (a = sigma^2 + v),
    q <- (1 - e/a)^2 q + 2e with e = 2 snr^2 a^2 / q, the step the batch norms give. Each step
    moves x toward the data by at most 1 - 2 snr^2, and less while x lags behind its level, so
    at small snr the grid outruns it. On the exact models it is above STALL_RATIO exactly where
    the spectral KL is above 1 (docs/samplers.md)."""
    q = float(steps.sigma_max) ** 2
    c = 2.0 * float(snr) ** 2
    v = DATA_VARIANCE
    for s in steps.sigma.tolist():
        a = s * s + v
        for _ in range(n_steps_each):
            e = c * a * a / q
            q = (1.0 - e / a) ** 2 * q + 2.0 * e
    return q / v


STALL_RATIO = 4.0  # final variance over the data's: above it the samples are still mostly noise


def corrector_stalls(steps: Steps, snr: float, n_steps_each: int = 1) -> str | None:
    """A warning when a corrector alone (no predictor) stays near the prior, else None.
    On the exact model at snr 0.075 it does at every step count up to 2000 (KL ~1e5-5e5)."""
    ratio = corrector_spread(steps, snr, n_steps_each)
    if not ratio > STALL_RATIO:
        return None
    return (f"the corrector alone at snr {snr:g} and {len(steps)} steps cannot follow the noise levels: its Langevin "
            f"steps end with about {ratio:.3g}x the data's variance, so the samples stay near the prior (noise). "
            f"Use --sampler pc or pds, many more steps, or a larger --snr")
