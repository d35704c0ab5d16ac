"""PDS inside diffusers pipelines (docs/api.md, "diffusers"). Needs diffusers: pip install "pds[diffusers]".

`PdsScoreSdeVeScheduler` replaces `ScoreSdeVeScheduler` in a `ScoreSdeVePipeline`:

    pipe.scheduler = PdsScoreSdeVeScheduler.from_config(pipe.scheduler.config, filters="masks/ffhq-256.npz")

It has diffusers' config keys and the calls the pipeline makes (`set_timesteps`, `set_sigmas`,
`step_correct`, `step_pred`, `init_noise_sigma`). With filters, each step is the preconditioned
Langevin corrector and reverse-diffusion predictor of pds's PDS loop (pdscli.samplers.pc: the
same functions); without, it is the vanilla predictor-corrector of diffusers' scheduler.

The grid: diffusers ends every run at t = sampling_eps (1e-5); the PDS reference and `pds
sample` scale eps with the speed-up, eps = 1e-5 * num_train_timesteps / steps. `scale_eps=True`
makes the scheduler walk pds's grid, so that with the same noise a pipeline equals `pds sample
--sampler pds --steps N` to float32 rounding.

`sample(pipe, n, nfe=...)` runs any pds sampler (`--nfe`'s recommendation, dpm++2m, ...) on a
pipeline's network in one call: `pdscli.sample` on the pipeline's UNet.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pdscli.api import DEFAULT_BATCH_SIZE, Model, sample as sample_model
from pdscli.errors import PdsError
from pdscli.precondition import Filters, Preconditioner, load_filters
from pdscli.precondition.alpha import ALPHA_REFERENCE
from pdscli.sample.loop import SampleProgress
from pdscli.sample.model import ModelSpec
from pdscli.samplers.grids import VE_EPS, pc_steps
from pdscli.samplers.pc import langevin_step, reverse_diffusion_step
from pdscli.score import ScoreModel
from pdscli.settings import SamplingSettings

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_sde_ve import SdeVeOutput
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # an optional extra: say how to get it, in one line
    raise PdsError(f'pdscli.diffusers needs diffusers: pip install "pds[diffusers]" ({type(e).__name__}: {e})') from None

__all__ = ["PdsScoreSdeVeScheduler", "sample"]


class PreconditionedSigma(float):
    """`init_noise_sigma` of a preconditioned scheduler: sigma_max as a number, and `z * it` is
    the PDS prior sigma_max * M z. `ScoreSdeVePipeline` draws its start as
    `randn_tensor(shape) * scheduler.init_noise_sigma` before any scheduler call, so this is
    where the prior's preconditioning can happen."""

    def __new__(cls, sigma_max: float, precond: Preconditioner):
        value = super().__new__(cls, sigma_max)
        value.precond = precond
        return value

    def __getnewargs__(self):  # copy.deepcopy and pickle rebuild it with its preconditioner
        return float(self), self.precond

    def _prior(self, other):
        if isinstance(other, torch.Tensor):
            return float(self) * self.precond.noise(other)
        return float(self) * other

    __rmul__ = __mul__ = _prior

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Hand `tensor * sigma` back to Python, which then calls __rmul__ (torch would treat a float as a scalar).
        return NotImplemented


def _filters_of(value: Filters | str | Path | None) -> Filters | None:
    if value is None or isinstance(value, Filters):
        return value
    return load_filters(Path(value).expanduser())


def _check_alpha(alpha) -> float:
    if isinstance(alpha, str) or not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        # "auto" depends on the step count, which a pipeline sets only after it has drawn the prior.
        raise PdsError(f"alpha must be a positive number (the reference's is {ALPHA_REFERENCE:g}), got {alpha!r}")
    return float(alpha)


class PdsScoreSdeVeScheduler(SchedulerMixin, ConfigMixin):
    """diffusers' `ScoreSdeVeScheduler` with PDS: the same config keys, plus

    filters    a filters .npz (`pds filters`) or a `pdscli.Filters`; None: the vanilla scheduler.
               A path is kept in the config (save_pretrained writes it); a Filters object is not.
    alpha      the filter strength (the reference's 5); larger is weaker.
    scale_eps  end at t = sampling_eps * num_train_timesteps / steps, as `pds sample` and the
               PDS reference do; False (default) ends at sampling_eps, as diffusers does.
    """

    order = 1
    _compatibles = ["ScoreSdeVeScheduler"]

    @register_to_config
    def __init__(self, num_train_timesteps: int = 2000, snr: float = 0.15, sigma_min: float = 0.01,
                 sigma_max: float = 1348.0, sampling_eps: float = VE_EPS, correct_steps: int = 1,
                 filters: Filters | str | None = None, alpha: float = ALPHA_REFERENCE, scale_eps: bool = False):
        if filters is not None:
            # A path is saved as text; a Filters object (not JSON) stays out of the saved config.
            self.register_to_config(filters=None if isinstance(filters, Filters) else str(filters))
        self.filters = _filters_of(filters)
        alpha = _check_alpha(alpha)
        self.precond = Preconditioner.from_filters(self.filters, alpha) if self.filters is not None else None
        self.init_noise_sigma = sigma_max if self.precond is None else PreconditionedSigma(sigma_max, self.precond)
        self.timesteps = self.steps = None
        self.eps = float(sampling_eps)
        self.set_sigmas(num_train_timesteps, sigma_min, sigma_max, sampling_eps)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, sampling_eps: float | None = None,
                      device: str | torch.device | None = None):
        """t = linspace(1, eps, N) in float32, as diffusers; with scale_eps, eps grows with the speed-up."""
        eps = self.config.sampling_eps if sampling_eps is None else sampling_eps
        if self.config.scale_eps:
            eps = eps * self.config.num_train_timesteps / num_inference_steps
        self.eps = float(eps)
        self.timesteps = torch.linspace(1, eps, num_inference_steps, device=device)
        self._set_steps(num_inference_steps, self.config.sigma_min, self.config.sigma_max)

    def set_sigmas(self, num_inference_steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
                   sampling_eps: float | None = None):
        """The score's sigma per step (`sigmas`) and the predictor's ladder (`discrete_sigmas`)."""
        if self.timesteps is None:
            self.set_timesteps(num_inference_steps, sampling_eps)
        self._set_steps(num_inference_steps, self.config.sigma_min if sigma_min is None else sigma_min,
                        self.config.sigma_max if sigma_max is None else sigma_max)

    def _set_steps(self, n: int, sigma_min: float, sigma_max: float) -> None:
        """pds's PC grid on these times (pdscli.samplers.grids.pc_steps, float64): the score is
        called at float32(sigma) exactly as `pds sample` calls it."""
        settings = SamplingSettings(sigma_min=float(sigma_min), sigma_max=float(sigma_max), num_scales=int(n),
                                    snr=float(self.config.snr), image_size=1, num_channels=1)
        self.steps = pc_steps(settings, n, eps=self.eps)
        self.sigmas = self.steps.sigma.float()
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), n,
                                                        dtype=torch.float64)).float()

    def _index(self, timestep) -> int:
        """The step of `timestep` (a value of `timesteps`, as the pipeline passes it)."""
        if self.timesteps is None:
            raise ValueError("`self.timesteps` is not set, you need to run 'set_timesteps' after creating the scheduler")
        t = torch.as_tensor(timestep, dtype=self.timesteps.dtype).reshape(-1)[0].to(self.timesteps.device)
        return int(torch.argmin((self.timesteps - t).abs()))

    def step_pred(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                  generator: torch.Generator | None = None, return_dict: bool = True):
        """Reverse diffusion from the step's sigma to the one below: x_mean = x + D M M^T s,
        x = x_mean + sqrt(D) M z (M = I without filters)."""
        i = self._index(timestep)
        z = randn_tensor(sample.shape, layout=sample.layout, generator=generator, device=sample.device, dtype=sample.dtype)
        prev, mean = reverse_diffusion_step(lambda x, s: model_output, lambda: z, sample, None,
                                            self.steps.sigma_hi[i], self.steps.sigma_lo[i], precond=self.precond)
        return SdeVeOutput(prev_sample=prev, prev_sample_mean=mean) if return_dict else (prev, mean)

    def step_correct(self, model_output: torch.Tensor, sample: torch.Tensor, generator: torch.Generator | None = None,
                     return_dict: bool = True):
        """One Langevin step with the batch-mean step size 2 (snr |M z| / |M M^T s|)^2."""
        if self.timesteps is None:
            raise ValueError("`self.timesteps` is not set, you need to run 'set_timesteps' after creating the scheduler")
        z = randn_tensor(sample.shape, layout=sample.layout, generator=generator).to(sample.device)
        prev, _ = langevin_step(lambda x, s: model_output, lambda: z, sample, None, snr=self.config.snr,
                                precond=self.precond)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor | None, timesteps: torch.Tensor) -> torch.Tensor:
        """x + sigma_j z at the ladder's levels j = `timesteps` (unpreconditioned: the forward process)."""
        sigmas = self.discrete_sigmas.to(original_samples.device)[timesteps.to(original_samples.device)]
        noise = torch.randn_like(original_samples) if noise is None else noise
        return original_samples + noise * sigmas[:, None, None, None]

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# ----------------------------------------------------------------------------------------
# pds's samplers on a pipeline's network.


def pipeline_model(pipe) -> Model:
    """A `ScoreSdeVePipeline`'s UNet as a pds Model: `unet(x, sigma).sample` is the score (its
    Fourier embedding divides by sigma), with the settings of the pipeline's scheduler config."""
    unet, config = pipe.unet, pipe.scheduler.config
    size = unet.config.sample_size
    if not isinstance(size, int):
        raise PdsError(f"pds samples square images; this UNet's sample_size is {size}")
    settings = SamplingSettings(sigma_min=float(config.sigma_min), sigma_max=float(config.sigma_max),
                                num_scales=int(config.num_train_timesteps), snr=float(config.snr), image_size=size,
                                num_channels=int(unet.config.in_channels)).validated()
    device = unet.device

    @torch.no_grad()
    def score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return unet(x.to(device, unet.dtype), sigma.to(device)).sample.float()

    name = str(getattr(pipe, "name_or_path", "") or "pipeline")
    opened = ScoreModel(score=score, settings=settings, name=f"diffusers:{name}", device=device,
                        info={"backend": "diffusers"})
    return Model(spec=ModelSpec(checkpoint=Path(name)), opened=opened)  # a network: not the built-in, not analytic


def sample(pipe, n: int = 1, *, nfe: int | None = None, sampler: str | None = None, steps: int | None = None,
           schedule: str | None = None, filters: Filters | str | Path | None = None, alpha: float | str | None = None,
           seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool | SampleProgress = False,
           teleport: float | str | None = None) -> torch.Tensor:
    """`n` images from a `ScoreSdeVePipeline`'s network with a pds sampler, float32 [n, 3, H, W]
    in [0, 1] on the CPU: `pdscli.sample` with the same arguments (`nfe=10` alone: the sampler
    recommended for 10 network calls). The noise is pds's (sample i from seed and i), not a
    torch generator's. `pipe.numpy_to_pil(x.permute(0, 2, 3, 1).numpy())` makes PIL images."""
    return sample_model(pipeline_model(pipe), n, nfe=nfe, sampler=sampler, steps=steps, schedule=schedule,
                        filters=_filters_of(filters), alpha=alpha, seed=seed, batch_size=batch_size, progress=progress,
                        teleport=teleport)
