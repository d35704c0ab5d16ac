"""The PC / PDS samplers against an independent transcription of the reference loop.

The transcription below follows fudan-zvg/PDS sampling.py + sde_lib.py (VESDE, continuous
score labels) line by line: float32 time grid, `discretize` with j = (t (N-1)).long(), masks
loaded from .npy and applied with the reference's complex dft2d / idft2d, corrector then
predictor, x_mean of the last step. Both sides are fed the same recorded noise sequence.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pdscli.errors import PdsError
from pdscli.noise import SampleNoise
from pdscli.precondition import Preconditioner, compute_statistics, load_reference_npy
from pdscli.samplers import REGISTRY, Steps, get_sampler, nfe_count, pc_steps, sampler_kwargs
from pdscli.samplers.pc import corrector, pc, pds, predictor
from pdscli.settings import SamplingSettings

SHAPE = (2, 8, 8)
BATCH = 3


def _settings(**kw) -> SamplingSettings:
    base = dict(sigma_min=0.01, sigma_max=20.0, num_scales=400, snr=0.16, image_size=SHAPE[1], num_channels=SHAPE[0])
    base.update(kw)
    return SamplingSettings(**base)


# -- the transcription ----------------------------------------------------------------------


def _dft2d(x):
    return torch.fft.fft(torch.fft.fft(x, dim=2), dim=3)


def _idft2d(x):
    return torch.fft.ifft(torch.fft.ifft(x, dim=2), dim=3)


def _reference_masks(freq_path, space_path, alpha, shape):
    """get_sampling_fn's mask loading."""
    c, h, w = shape
    if space_path is not None:
        space_mask = np.load(space_path).reshape([1, c, h, w])
        space_mask /= space_mask.max()
        space_mask = torch.from_numpy(space_mask)
        space_mask = ((space_mask + alpha - 1) / alpha).pow(-1)
    else:
        space_mask = torch.ones(1)
    if freq_path is not None:
        freq_mask = np.load(freq_path).reshape([1, c, h, w])
        freq_mask /= freq_mask.max()
        freq_mask = (freq_mask + alpha - 1) / alpha
        freq_mask = torch.from_numpy(freq_mask).pow(-1)
    else:
        freq_mask = 1
    return freq_mask, space_mask


def reference_sampler(model, draws, settings, *, speed_up=1, snr, freq_path=None, space_path=None, alpha=5.0,
                      use_corrector=True, use_predictor=True, slip=None):
    """The reference's pc_sampler; `model(x, sigma)` is the net called with continuous labels.
    `slip` injects one deliberate mistake, to prove the comparison can fail."""
    draws = iter(draws)
    smin, smax = settings.sigma_min, settings.sigma_max
    n = int(settings.num_scales / speed_up)
    eps = 1e-5 * speed_up
    discrete_sigmas = torch.exp(torch.linspace(np.log(smin), np.log(smax), n))
    freq_mask, space_mask = _reference_masks(freq_path, space_path, alpha, SHAPE)

    def score_fn(x, t):  # models/utils.py get_score_fn, VESDE, continuous=True
        labels = smin * (smax / smin) ** t
        return model(x, labels)

    def discretize(x, t):  # VESDE.discretize, then RSDE.discretize (probability_flow=False)
        timestep = (t * (n - 1) / 1).long()
        if slip == "index":
            timestep = (timestep + 1).clamp(max=n - 1)
        sigma = discrete_sigmas[timestep]
        adjacent = torch.where(timestep == 0, torch.zeros_like(t), discrete_sigmas[timestep - 1])
        g = torch.sqrt(sigma**2 - adjacent**2)
        score_t = t if slip != "discrete-sigma" else torch.log(sigma / smin) / math.log(smax / smin)
        rev_f = torch.zeros_like(x) - g[:, None, None, None] ** 2 * score_fn(x, score_t)
        return rev_f, g

    def precondition_grad(v):
        return _idft2d(freq_mask * _dft2d(space_mask.pow(2) * _idft2d(freq_mask * _dft2d(v)))).real.float()

    def precondition_noise():
        return _idft2d(_dft2d(next(draws) * space_mask) * freq_mask).real.float()

    def corrector_update(x, t):  # LangevinCorrector.update_fn, n_steps = 1, VE: alpha = 1
        grad = precondition_grad(score_fn(x, t))
        noise = precondition_noise()
        grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
        noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
        step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * torch.ones_like(t)
        x_mean = x + step_size[:, None, None, None] * grad
        x = x_mean + torch.sqrt(step_size * 2)[:, None, None, None] * noise
        return x, x_mean

    def predictor_update(x, t):  # ReverseDiffusionPredictor.update_fn
        f, g = discretize(x, t)
        f = precondition_grad(f)
        z = precondition_noise()
        x_mean = x - f if slip != "sign" else x + f
        x = x_mean + g[:, None, None, None] * z
        return x, x_mean

    x = _idft2d(_dft2d(next(draws) * space_mask) * freq_mask).real * smax
    x = x.float()
    timesteps = torch.linspace(1.0, eps, n)
    corrector_mean = None
    for i in range(n):
        vec_t = torch.ones(x.shape[0]) * timesteps[i]
        if slip == "order":
            x, x_mean = predictor_update(x, vec_t)
            x, x_mean = corrector_update(x, vec_t)
            continue
        if use_corrector:
            x, x_mean = corrector_update(x, vec_t)
            corrector_mean = x_mean
        else:
            x_mean = x  # NoneCorrector
        if use_predictor:
            x, x_mean = predictor_update(x, vec_t)
        else:
            x_mean = x  # NonePredictor returns (x, x)
    return x_mean, corrector_mean


# -- fixtures -------------------------------------------------------------------------------


def toy_model(x, sigma):
    """A nonlinear, sigma-dependent, spatially mixing 'score', so every slip shows."""
    s = sigma.float()[:, None, None, None]
    target = torch.linspace(0.2, 0.8, x[0].numel()).reshape(x.shape[1:])
    pull = -(x - target) / (s**2 + 0.5)
    mix = 0.3 * torch.tanh(torch.roll(x, 1, dims=-1) - x) / (1 + s)
    return pull + mix


class Recorder:
    """A noise() that records what it hands out; `replay` repeats the sequence."""

    def __init__(self, seed=0, batch=BATCH, shape=SHAPE):
        self.noise = SampleNoise(seed, range(batch), shape)
        self.draws = []

    def __call__(self):
        z = self.noise()
        self.draws.append(z.clone())
        return z


@pytest.fixture(scope="module")
def mask_files(tmp_path_factory):
    """Reference-format freq_mask.npy / space_mask.npy from smooth random images."""
    folder = tmp_path_factory.mktemp("masks")
    g = torch.Generator().manual_seed(3)
    images = torch.rand((64, *SHAPE), generator=g)
    images = (images + torch.roll(images, 1, dims=-1) + torch.roll(images, 1, dims=-2)) / 3  # some spectrum
    images[:, :, 0, 0] = 0.0  # a black pixel: the space statistic reaches 0
    filters = compute_statistics([images])
    np.save(folder / "freq_mask.npy", filters.freq)
    np.save(folder / "space_mask.npy", filters.space)
    return folder / "freq_mask.npy", folder / "space_mask.npy"


def _ours(fn, settings, *, speed_up, snr, precond=None):
    rec = Recorder()
    steps = pc_steps(settings, speed_up=speed_up)
    out = fn(toy_model, rec, steps, **sampler_kwargs(fn.__name__, precond=precond, snr=snr))
    return out, rec.draws


TOL = 1e-5  # relative to max(1, |x|): float32 FFTs (complex vs real) and a float64 vs float32 grid


def _assert_close(a, b, tol=TOL):
    err = float((a - b).abs().max() / max(1.0, float(b.abs().max())))
    assert err < tol, f"relative max difference {err:.3g}"


# -- the sampler against the transcription --------------------------------------------------


@pytest.mark.parametrize("speed_up", [10, 20])
def test_pc_matches_reference(speed_up):
    settings = _settings()
    ours, draws = _ours(pc, settings, speed_up=speed_up, snr=0.16)
    ref, _ = reference_sampler(toy_model, draws, settings, speed_up=speed_up, snr=0.16)
    _assert_close(ours, ref)


@pytest.mark.parametrize("which", ["freq", "space", "both"])
def test_pds_matches_reference(mask_files, which):
    freq_path, space_path = mask_files
    freq_path = freq_path if which in ("freq", "both") else None
    space_path = space_path if which in ("space", "both") else None
    settings, alpha = _settings(), 4.0
    filters = load_reference_npy(freq_path, space_path, channels=SHAPE[0], size=SHAPE[1])
    precond = Preconditioner.from_filters(filters, alpha=alpha)
    ours, draws = _ours(pds, settings, speed_up=20, snr=0.2, precond=precond)
    ref, _ = reference_sampler(toy_model, draws, settings, speed_up=20, snr=0.2, freq_path=freq_path,
                               space_path=space_path, alpha=alpha)
    _assert_close(ours, ref)


def test_predictor_only_matches_reference(mask_files):
    settings = _settings()
    filters = load_reference_npy(*mask_files, channels=SHAPE[0], size=SHAPE[1])
    ours, draws = _ours(predictor, settings, speed_up=20, snr=0.16, precond=Preconditioner.from_filters(filters))
    ref, _ = reference_sampler(toy_model, draws, settings, speed_up=20, snr=0.16, freq_path=mask_files[0],
                               space_path=mask_files[1], use_corrector=False)
    _assert_close(ours, ref)


def test_corrector_only_returns_the_last_corrector_mean():
    settings = _settings()
    ours, draws = _ours(corrector, settings, speed_up=20, snr=0.16)
    ref_x, ref_corrector_mean = reference_sampler(toy_model, draws, settings, speed_up=20, snr=0.16, use_predictor=False)
    _assert_close(ours, ref_corrector_mean)
    # The reference returns x, i.e. with the last Langevin noise sqrt(2 step) z still in it; we return the mean.
    # For a real score (|s| ~ |z| / sigma) that noise is about 2 snr sigma_min per pixel.
    assert 0 < float((ours - ref_x).abs().max()) < 0.2


@pytest.mark.parametrize("slip", ["index", "discrete-sigma", "sign", "order"])
def test_the_comparison_catches_slips(mask_files, slip):
    """A sign, index or order slip in the loop moves the result far beyond the tolerance."""
    settings = _settings()
    filters = load_reference_npy(*mask_files, channels=SHAPE[0], size=SHAPE[1])
    precond = Preconditioner.from_filters(filters, alpha=4.0)
    ours, draws = _ours(pds, settings, speed_up=20, snr=0.2, precond=precond)
    ref, _ = reference_sampler(toy_model, draws, settings, speed_up=20, snr=0.2, freq_path=mask_files[0],
                               space_path=mask_files[1], alpha=4.0, slip=slip)
    err = float((ours - ref).abs().max() / max(1.0, float(ref.abs().max())))
    assert not err < 20 * TOL, f"slip {slip!r} went unnoticed (difference {err:.3g})"


# -- the grid --------------------------------------------------------------------------------


def _reference_grid(settings, speed_up, dtype):
    n = int(settings.num_scales / speed_up)
    eps = 1e-5 * speed_up
    t = torch.linspace(1.0, eps, n, dtype=dtype)
    smin, smax = settings.sigma_min, settings.sigma_max
    ladder = torch.exp(torch.linspace(np.log(smin), np.log(smax), n, dtype=dtype))
    j = (t * (n - 1)).long()
    lo = torch.where(j == 0, torch.zeros_like(t), ladder[j - 1])
    return t, smin * (smax / smin) ** t, ladder[j], lo, j


OFFICIAL = [(50.0, 1000), (348.0, 2000), (378.0, 2000), (1348.0, 2000)]


@pytest.mark.parametrize("sigma_max,num_scales", OFFICIAL)
@pytest.mark.parametrize("speed_up", [1, 2, 3, 10, 12, 20, 30, 66])
def test_pc_steps_is_the_reference_grid(sigma_max, num_scales, speed_up):
    settings = _settings(sigma_max=sigma_max, num_scales=num_scales)
    steps = pc_steps(settings, speed_up=speed_up)
    assert len(steps) == int(num_scales / speed_up)
    assert steps.sigma.dtype == torch.float64 and steps.sigma_max == sigma_max
    # Same arithmetic in float64: identical.
    _, sigma, hi, lo, _ = _reference_grid(settings, speed_up, torch.float64)
    torch.testing.assert_close(steps.sigma, sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(steps.sigma_hi, hi, rtol=1e-12, atol=0)
    torch.testing.assert_close(steps.sigma_lo, lo, rtol=1e-12, atol=0)
    # The reference's float32: sigmas within float32 rounding, and the ladder index j the same
    # except where float32 puts t (N - 1) within rounding of an integer (then either is right).
    t32, sigma32, hi32, lo32, j32 = _reference_grid(settings, speed_up, torch.float32)
    torch.testing.assert_close(steps.sigma, sigma32.double(), rtol=2e-5, atol=0)
    j64 = torch.floor(torch.linspace(1.0, 1e-5 * speed_up, len(steps), dtype=torch.float64) * (len(steps) - 1)).long()
    ambiguous = ((t32.double() * (len(steps) - 1)) - (t32.double() * (len(steps) - 1)).round()).abs() < 1e-3
    ambiguous &= (t32.double() * (len(steps) - 1)).round() != 0
    assert bool(((j32 == j64) | ambiguous).all())
    same = j32 == j64
    torch.testing.assert_close(steps.sigma_hi[same], hi32[same].double(), rtol=2e-5, atol=0)
    torch.testing.assert_close(steps.sigma_lo[same], lo32[same].double(), rtol=2e-5, atol=1e-12)


def test_pc_steps_shape_and_ends():
    settings = _settings(num_scales=1000, sigma_max=50.0)
    steps = pc_steps(settings)
    assert len(steps) == 1000
    assert steps.sigma[0] == pytest.approx(50.0) and steps.sigma_hi[0] == pytest.approx(50.0)
    assert float(steps.sigma_lo[-1]) == 0.0 and steps.sigma_hi[-1] == pytest.approx(0.01)
    assert steps.sigma[-1] == pytest.approx(0.01 * 5000 ** 1e-5)
    assert bool((steps.sigma_hi > steps.sigma_lo).all())


def test_pc_steps_steps_and_speed_up_agree():
    settings = _settings(num_scales=2000, sigma_max=378.0)
    a, b = pc_steps(settings, 100), pc_steps(settings, speed_up=20)
    torch.testing.assert_close(a.sigma, b.sigma, rtol=0, atol=0)
    torch.testing.assert_close(a.sigma_lo, b.sigma_lo, rtol=0, atol=0)
    c = pc_steps(settings, 100, eps=1e-3)
    assert c.sigma[-1] == pytest.approx(0.01 * 37800**1e-3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_steps=10, speed_up=2), "not both"),
    (dict(n_steps=0), "at least 1"),
    (dict(speed_up=1000), "leaves no steps"),
    (dict(n_steps=10, eps=0.0), "eps"),
])
def test_pc_steps_errors(kwargs, message):
    with pytest.raises(PdsError, match=message):
        pc_steps(_settings(), **kwargs)


def test_steps_validation_and_conversion():
    steps = Steps(10, [3.0, 2.0], np.array([3.0, 2.0]), torch.tensor([2.0, 0.0], dtype=torch.float32))
    assert len(steps) == 2 and steps.sigma_lo.dtype == torch.float64 and isinstance(steps.sigma_max, float)
    with pytest.raises(ValueError):
        Steps(10, [3.0, 2.0], [3.0], [2.0, 0.0])


# -- the loop's plumbing --------------------------------------------------------------------


def _counting(model):
    calls = []

    def score(x, sigma):
        assert sigma.dtype == torch.float32 and sigma.shape == (x.shape[0],) and sigma.device == x.device
        assert x.dtype == torch.float32
        calls.append(float(sigma[0]))
        return model(x, sigma)

    return score, calls


@pytest.mark.parametrize("name", [n for n, s in REGISTRY.items() if s.pc_grid])
def test_callback_nfe_and_sigmas(name):
    settings = _settings()
    steps = pc_steps(settings, 7)
    score, calls = _counting(toy_model)
    infos = []
    kw = sampler_kwargs(name, snr=0.16, callback=infos.append)
    out = get_sampler(name)(score, SampleNoise(0, range(2), SHAPE), steps, **kw)
    assert out.shape == (2, *SHAPE) and out.dtype == torch.float32
    assert [info["i"] for info in infos] == list(range(7)) and all(info["n"] == 7 for info in infos)
    assert infos[-1]["nfe"] == len(calls) == nfe_count(name, 7) == REGISTRY[name].nfe_per_step * 7
    assert {"i", "n", "sigma", "x", "nfe"} <= set(infos[0])
    # Every score call at step i is at the continuous sigma(t_i).
    per_step = REGISTRY[name].nfe_per_step
    expected = [float(s) for s in steps.sigma for _ in range(per_step)]
    assert calls == pytest.approx(expected, rel=1e-6)


def test_get_sampler_unknown_lists_choices():
    with pytest.raises(PdsError, match="--sampler must be one of pc, pds, predictor, corrector, .*, not 'nope'"):
        get_sampler("nope")
    assert get_sampler("pds") is pds


def test_pds_without_preconditioner_is_pc():
    settings = _settings()
    steps = pc_steps(settings, 5)
    a = pc(toy_model, SampleNoise(1, range(2), SHAPE), steps)
    b = pds(toy_model, SampleNoise(1, range(2), SHAPE), steps, precond=None)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("snr", [0, -1.0, float("nan"), "high"])
def test_a_bad_snr_is_refused_where_it_comes_in(snr):
    """The samplers trust their snr: --snr (ModelSpec) and a config's sampling.snr refuse a bad one."""
    from pdscli.sample.model import ModelSpec

    with pytest.raises(PdsError, match=r"^--snr must be a positive number, not "):
        ModelSpec(model="gaussian", snr=snr)
    if not isinstance(snr, str):
        with pytest.raises(PdsError, match="snr must be"):
            _settings_with(snr=snr)


# -- per-sample reproducibility -------------------------------------------------------------


def _gaussian():
    from pdscli.evaluate.analytic import GaussianImageModel

    return GaussianImageModel(8, 1, num_scales=200)


@pytest.mark.parametrize("name", ["pc", "pds", "corrector"])
def test_per_sample_step_makes_images_independent_of_the_batch(name):
    model = _gaussian()
    steps = pc_steps(model.settings, 15)
    precond = Preconditioner.from_filters(compute_statistics([model.sample(64).clamp(0, 1)])) if name == "pds" else None
    fn = get_sampler(name)
    together = fn(model.score, SampleNoise(7, range(4), model.shape), steps, precond=precond, per_sample_step=True)
    alone = torch.cat([
        fn(model.score, SampleNoise(7, [i], model.shape), steps, precond=precond, per_sample_step=True) for i in range(4)
    ])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_batch_mean_step_couples_the_batch():
    """The reference's batch-mean Langevin step: a sample's image depends on its batch mates."""
    model = _gaussian()
    steps = pc_steps(model.settings, 15)
    together = pc(model.score, SampleNoise(7, range(4), model.shape), steps)
    first = pc(model.score, SampleNoise(7, [0], model.shape), steps)
    assert float((together[:1] - first).abs().max()) > 1e-4


def test_predictor_never_depends_on_the_batch():
    model = _gaussian()
    steps = pc_steps(model.settings, 15)
    together = predictor(model.score, SampleNoise(7, range(4), model.shape), steps)
    alone = torch.cat([predictor(model.score, SampleNoise(7, [i], model.shape), steps) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


# -- a config's sampling section: the other PC parts against the reference --------------------


def reference_sampler_parts(model, draws, settings, *, speed_up, snr, predictor_name, corrector_name, n_steps_each=1,
                            noise_removal=True, probability_flow=False, freq_path=None, space_path=None, alpha=5.0):
    """The reference's pc_sampler with any registered predictor / corrector (score_sde sampling.py,
    sde_lib.py VESDE and its reverse(); the PDS masks enter the prior, ReverseDiffusionPredictor and
    LangevinCorrector only). Returns (the sampler's output, the last corrector x_mean)."""
    draws = iter(draws)
    smin, smax = settings.sigma_min, settings.sigma_max
    n = int(settings.num_scales / speed_up)
    eps = 1e-5 * speed_up
    discrete_sigmas = torch.exp(torch.linspace(np.log(smin), np.log(smax), n))
    freq_mask, space_mask = _reference_masks(freq_path, space_path, alpha, SHAPE)
    pf_scale = 0.5 if probability_flow else 1.0

    def score_fn(x, t):
        return model(x, smin * (smax / smin) ** t)

    def precondition_grad(v):
        return _idft2d(freq_mask * _dft2d(space_mask.pow(2) * _idft2d(freq_mask * _dft2d(v)))).real.float()

    def precondition_noise():
        return _idft2d(_dft2d(next(draws) * space_mask) * freq_mask).real.float()

    def vesde_discretize(t):
        timestep = (t * (n - 1) / 1).long()
        sigma = discrete_sigmas[timestep]
        adjacent = torch.where(timestep == 0, torch.zeros_like(t), discrete_sigmas[timestep - 1])
        return sigma, adjacent

    def reverse_diffusion(x, t):
        sigma, adjacent = vesde_discretize(t)
        g = torch.sqrt(sigma**2 - adjacent**2)
        rev_f = -(g**2)[:, None, None, None] * score_fn(x, t) * pf_scale
        rev_g = torch.zeros_like(g) if probability_flow else g
        f = precondition_grad(rev_f)
        z = precondition_noise()
        x_mean = x - f
        return x_mean + rev_g[:, None, None, None] * z, x_mean

    def euler_maruyama(x, t):
        dt = -1.0 / n
        z = next(draws)
        diffusion = smin * (smax / smin) ** t * np.sqrt(2 * (np.log(smax) - np.log(smin)))
        drift = -(diffusion**2)[:, None, None, None] * score_fn(x, t) * pf_scale
        diffusion = torch.zeros_like(diffusion) if probability_flow else diffusion
        x_mean = x + drift * dt
        return x_mean + diffusion[:, None, None, None] * np.sqrt(-dt) * z, x_mean

    def ancestral(x, t):
        sigma, adjacent = vesde_discretize(t)
        x_mean = x + score_fn(x, t) * (sigma**2 - adjacent**2)[:, None, None, None]
        std = torch.sqrt(adjacent**2 * (sigma**2 - adjacent**2) / sigma**2)
        return x_mean + std[:, None, None, None] * next(draws), x_mean

    def langevin(x, t):
        for _ in range(n_steps_each):
            grad = precondition_grad(score_fn(x, t))
            noise = precondition_noise()
            grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
            noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
            step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * torch.ones_like(t)
            x_mean = x + step_size[:, None, None, None] * grad
            x = x_mean + torch.sqrt(step_size * 2)[:, None, None, None] * noise
        return x, x_mean

    def ald(x, t):
        std = smin * (smax / smin) ** t
        for _ in range(n_steps_each):
            grad = score_fn(x, t)
            noise = next(draws)
            step_size = (snr * std) ** 2 * 2
            x_mean = x + step_size[:, None, None, None] * grad
            x = x_mean + noise * torch.sqrt(step_size * 2)[:, None, None, None]
        return x, x_mean

    predictors = {"reverse_diffusion": reverse_diffusion, "euler_maruyama": euler_maruyama,
                  "ancestral_sampling": ancestral, "none": lambda x, t: (x, x)}
    correctors = {"langevin": langevin, "ald": ald, "none": lambda x, t: (x, x)}
    x = (_idft2d(_dft2d(next(draws) * space_mask) * freq_mask).real * smax).float()
    corrector_mean = None
    for t in torch.linspace(1.0, eps, n):
        vec_t = torch.ones(x.shape[0]) * t
        x, x_mean = correctors[corrector_name](x, vec_t)
        corrector_mean = x_mean
        x, x_mean = predictors[predictor_name](x, vec_t)
    return (x_mean if noise_removal else x), corrector_mean


def _settings_with(**parts) -> SamplingSettings:
    return _settings(**parts).validated()


PARTS = [
    dict(predictor="euler_maruyama", corrector="langevin"),
    dict(predictor="ancestral_sampling", corrector="langevin"),
    dict(predictor="reverse_diffusion", corrector="ald"),
    dict(predictor="euler_maruyama", corrector="ald", n_steps_each=2),
    dict(predictor="reverse_diffusion", corrector="langevin", n_steps_each=3),
    dict(predictor="reverse_diffusion", corrector="langevin", noise_removal=False),
    dict(predictor="reverse_diffusion", corrector="langevin", probability_flow=True),
    dict(predictor="euler_maruyama", corrector="none", probability_flow=True),
    dict(predictor="reverse_diffusion", corrector="none"),
    dict(predictor="ancestral_sampling", corrector="ald", noise_removal=False),
]


@pytest.mark.parametrize("parts", PARTS, ids=lambda p: "-".join(str(v) for v in p.values()))
@pytest.mark.parametrize("filtered", [False, True])
def test_config_parts_match_reference(mask_files, parts, filtered):
    from pdscli.samplers.pc import PCOptions

    settings = _settings_with(**parts)
    options = PCOptions.from_settings(settings)
    precond = None
    kw = {}
    if filtered:
        precond = Preconditioner.from_filters(load_reference_npy(*mask_files, channels=SHAPE[0], size=SHAPE[1]), alpha=4.0)
        kw = dict(freq_path=mask_files[0], space_path=mask_files[1], alpha=4.0)
    rec = Recorder()
    ours = pds(toy_model, rec, pc_steps(settings, speed_up=20), precond=precond, snr=0.2, options=options)
    ref, _ = reference_sampler_parts(toy_model, rec.draws, settings, speed_up=20, snr=0.2, predictor_name=parts["predictor"],
                                     corrector_name=parts["corrector"], n_steps_each=parts.get("n_steps_each", 1),
                                     noise_removal=parts.get("noise_removal", True),
                                     probability_flow=parts.get("probability_flow", False), **kw)
    _assert_close(ours, ref)


def test_corrector_with_predictor_none_returns_its_own_mean():
    from pdscli.samplers.pc import PCOptions

    settings = _settings_with(predictor="none", corrector="ald")
    rec = Recorder()
    ours = pc(toy_model, rec, pc_steps(settings, speed_up=20), snr=0.2, options=PCOptions.from_settings(settings))
    _, ref_mean = reference_sampler_parts(toy_model, rec.draws, settings, speed_up=20, snr=0.2, predictor_name="none",
                                          corrector_name="ald")
    _assert_close(ours, ref_mean)


def test_default_parts_are_the_plain_call():
    """A config with the official sampling section runs exactly the default loop (bit for bit)."""
    from pdscli.samplers.pc import PCOptions

    settings = _settings_with(predictor="reverse_diffusion", corrector="langevin", n_steps_each=1, noise_removal=True,
                              probability_flow=False)
    options = PCOptions.from_settings(settings)
    assert options.is_reference_default
    steps = pc_steps(settings, 9)
    a = pc(toy_model, SampleNoise(4, range(2), SHAPE), steps, snr=0.2)
    b = pc(toy_model, SampleNoise(4, range(2), SHAPE), steps, snr=0.2, options=options)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("parts,nfe_per_step", [
    (dict(n_steps_each=3), 4), (dict(corrector="none"), 1), (dict(predictor="none", n_steps_each=2), 2),
    (dict(predictor="euler_maruyama", corrector="ald", n_steps_each=2), 3),
])
def test_parts_nfe(parts, nfe_per_step):
    from pdscli.samplers.pc import PCOptions

    settings = _settings_with(**parts)
    score, calls = _counting(toy_model)
    infos = []
    pc(score, SampleNoise(0, range(2), SHAPE), pc_steps(settings, 6), snr=0.2, callback=infos.append,
       options=PCOptions.from_settings(settings))
    assert len(calls) == infos[-1]["nfe"] == 6 * nfe_per_step


@pytest.mark.parametrize("section,field", [
    ({"predictor": "heun"}, "sampling.predictor"),
    ({"corrector": "hmc"}, "sampling.corrector"),
    ({"n_steps_each": 0}, "sampling.n_steps_each"),
    ({"n_steps_each": 1.5}, "sampling.n_steps_each"),
    ({"noise_removal": "yes"}, "sampling.noise_removal"),
    ({"probability_flow": 1}, "sampling.probability_flow"),
    ({"predictor": "ancestral_sampling", "probability_flow": True}, "sampling.probability_flow"),
    ({"predictor": "none", "corrector": "none"}, "sampling.predictor"),
])
def test_config_refuses_what_the_loop_cannot_run(section, field):
    from pdscli.models.config import get_preset, settings_from_config

    cfg = get_preset("cifar10")
    cfg["sampling"].update(section)
    with pytest.raises(PdsError, match=field.replace(".", r"\.")) as e:
        settings_from_config(cfg)
    assert "\n" not in str(e.value)


def test_config_carries_the_sampling_section():
    from pdscli.models.config import get_preset, settings_from_config

    cfg = get_preset("ffhq-1024")
    official = settings_from_config(cfg)
    assert (official.predictor, official.corrector, official.n_steps_each, official.noise_removal,
            official.probability_flow) == ("reverse_diffusion", "langevin", 1, True, False)
    cfg["sampling"].update(predictor="Euler_Maruyama", corrector="ALD", n_steps_each=2, noise_removal=False,
                           probability_flow=True)
    s = settings_from_config(cfg)
    assert (s.predictor, s.corrector, s.n_steps_each, s.noise_removal, s.probability_flow) == \
        ("euler_maruyama", "ald", 2, False, True)
    del cfg["sampling"]["predictor"]  # absent fields: the official value
    assert settings_from_config(cfg).predictor == "reverse_diffusion"


@pytest.mark.parametrize("speed_up", [2.5, 0.5, 7.3, 66])
def test_pc_steps_any_positive_speed_up(speed_up):
    """The reference's step count int(num_scales / speed_up) and eps 1e-5 * speed_up, for any k > 0."""
    settings = _settings(num_scales=2000, sigma_max=378.0)
    steps = pc_steps(settings, speed_up=speed_up)
    assert len(steps) == int(2000 / speed_up)
    _, sigma, hi, lo, _ = _reference_grid(settings, speed_up, torch.float64)
    torch.testing.assert_close(steps.sigma, sigma, rtol=1e-12, atol=0)


# -- a corrector alone ------------------------------------------------------------------------


def test_corrector_stall_warning_matches_the_exact_model():
    """The warning fires exactly where the exact model says the corrector alone stays near the prior."""
    from pdscli.evaluate import moments as M
    from pdscli.evaluate.analytic import GaussianImageModel
    from pdscli.samplers.pc import corrector_stalls

    models = (GaussianImageModel(16, 1), GaussianImageModel(16, 1, sigma_max=50.0, snr=0.16, num_scales=1000),
              GaussianImageModel(16, 1, sigma_max=8.6), GaussianImageModel(16, 1, sigma_max=8.6, snr=0.16, num_scales=1000),
              GaussianImageModel(16, 1, sigma_max=1348.0, snr=0.15))
    for model in models:
        reduced = M.reduce_model(model)
        p = torch.ones_like(reduced.lam)
        for n in (20, 200, 400, 600, 1000, 1500, 2000, 3000):
            steps = pc_steps(model.settings, n)
            kl = M.spectral_kl_of_moments(reduced, M.pc_second_moments(reduced, steps, p, model.settings.snr,
                                                                          predictor=False))
            stalls = corrector_stalls(steps, model.settings.snr)
            assert (stalls is not None) == (kl > 1.0), (model.settings.snr, n, kl)
            if stalls:
                assert "prior" in stalls and "--snr" in stalls


# -- through the CLI ------------------------------------------------------------------------------

GAUSS = ("sample", "--model", "gaussian", "--image-size", "8", "--channels", "1", "--quiet", "-n", "2", "-b", "2")


def _run_json(out):
    import json

    return json.loads((out / "run.json").read_text())


def _gauss_filters(path):
    from pdscli.evaluate import moments as M
    from pdscli.evaluate.analytic import GaussianImageModel
    from pdscli.precondition import Filters

    model = GaussianImageModel(8, 1)
    Filters(freq=M.expected_freq_statistic(model), space=None, size=8, channels=1, count=1).save(path)
    return path


def test_cli_speed_up_any_positive_number(run_pds, tmp_path):
    r = run_pds(*GAUSS, "--num-scales", "50", "--speed-up", "2.5", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    assert _run_json(tmp_path / "o")["steps"]["count"] == int(50 / 2.5)
    r = run_pds(*GAUSS, "--speed-up", "0", "--out", tmp_path / "p")
    assert r.exit_code == 2 and "--speed-up" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_auto_switches_the_filter_off_and_says_so(run_pds, tmp_path):
    masks = _gauss_filters(tmp_path / "f.npz")
    r = run_pds(*GAUSS, "--masks", masks, "--alpha", "auto", "--steps", "2", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    assert "warning" in r.stderr and "filter off" in r.stderr
    record = _run_json(tmp_path / "o")
    assert record["preconditioned"] is False and record["alpha"] is None
    assert "filter off" in record["filter_off"] and record["warnings"]
    # Where it helps, auto runs the filter at its calibrated alpha, without a warning.
    r = run_pds(*GAUSS, "--masks", masks, "--alpha", "auto", "--steps", "20", "--out", tmp_path / "p")
    assert r.exit_code == 0 and "warning" not in r.stderr
    record = _run_json(tmp_path / "p")
    assert record["preconditioned"] is True and record["filter_off"] is None and 3 < record["alpha"] < 20


def test_cli_corrector_alone_warns(run_pds, tmp_path):
    r = run_pds(*GAUSS, "--sampler", "corrector", "--steps", "10", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    assert "warning" in r.stderr and "prior" in r.stderr
    assert any("prior" in w for w in _run_json(tmp_path / "o")["warnings"])
    r = run_pds(*GAUSS, "--sampler", "pc", "--steps", "10", "--out", tmp_path / "p")
    assert "warning" not in r.stderr and _run_json(tmp_path / "p")["warnings"] == []


def _fixture_config(fixture_dir, tmp_path, **sampling):
    import json

    cfg = json.loads((fixture_dir / "config.json").read_text())
    cfg["sampling"].update(sampling)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_cli_refuses_a_predictor_it_cannot_run(run_pds, fixture_dir, tmp_path):
    config = _fixture_config(fixture_dir, tmp_path, predictor="heun")
    r = run_pds("sample", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", config, "--steps", "2", "-n", "1",
                "--quiet", "--out", tmp_path / "o")
    assert r.exit_code == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "sampling.predictor" in lines[0] and "Traceback" not in r.stderr


def test_cli_runs_the_config_parts(run_pds, fixture_dir, tmp_path):
    """The fixture's config with another predictor/corrector: run.json records the parts and the
    NFE they spend (ancestral + ald, 2 corrector steps: 3 calls per step)."""
    config = _fixture_config(fixture_dir, tmp_path, predictor="ancestral_sampling", corrector="ald", n_steps_each=2)
    r = run_pds("sample", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", config, "--steps", "3", "-n", "1",
                "--quiet", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    record = _run_json(tmp_path / "o")
    assert record["pc_parts"]["predictor"] == "ancestral_sampling" and record["pc_parts"]["corrector"] == "ald"
    assert record["settings"]["n_steps_each"] == 2
    assert record["nfe"]["per_sample"] == 3 * 3


def test_cli_ddpm_filters_default_to_auto(run_pds, tmp_path):
    """ddpm / accel-sde: an unset --alpha is auto, so their filters are off where they hurt."""
    from pdscli.evaluate.analytic import GaussianImageModel
    from pdscli.precondition import alpha as AL

    masks = _gauss_filters(tmp_path / "f.npz")
    st = GaussianImageModel(8, 1).settings
    r = run_pds(*GAUSS, "--sampler", "ddpm", "--masks", masks, "--steps", "1000", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    record = _run_json(tmp_path / "o")
    assert "filter off" in r.stderr and record["preconditioned"] is False and record["alpha_given"] == "auto"
    r = run_pds(*GAUSS, "--sampler", "accel-sde", "--masks", masks, "--steps", "15", "--out", tmp_path / "p")
    record = _run_json(tmp_path / "p")
    assert record["preconditioned"] is True
    assert record["alpha"] == AL.auto_alpha(15, sigma_min=st.sigma_min, sigma_max=st.sigma_max, sampler="accel-sde")
