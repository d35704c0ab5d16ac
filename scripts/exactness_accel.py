"""Exactness figures for the accelerated samplers and `--alpha auto`, on the analytic model.

`sections()` returns markdown (appended to docs/exactness.md by scripts/exactness.py); run on
its own it prints the same:

    .venv/bin/python scripts/exactness_accel.py

Everything is measured against the analytic Gaussian's ground truth:
  * deterministic samplers: RMS distance from the closed-form probability-flow solution from the
    same x_T (then the same final denoise), and the log-log slope over 40-160 steps;
  * stochastic samplers and PC / PDS: the spectral KL of `GaussianImageModel.spectral_kl` (the
    measure of docs/exactness.md) from samples, next to its exact population value from the
    closed second-moment recursions of `pdscli.evaluate.moments` (no sampling floor; the rates are read from those).
"""

from __future__ import annotations

import math
import platform
import time
from datetime import datetime, timezone

import numpy as np
import torch

from pdscli.evaluate import moments as M
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.evaluate.divergence import mean_gaussian_kl
from pdscli.precondition import alpha as AL
from pdscli.precondition import Filters, Preconditioner, compute_statistics
from pdscli.samplers import get_sampler, pc_steps
from pdscli.samplers.pc import pds
from pdscli.samplers.grids import edm, geometric

SIZE = 32  # 32x32x1, the model's default settings (sigma_max 189, snr 0.075, 2000 scales)
ODE_STEPS = (10, 20, 40, 80, 160)
SDE_STEPS = (10, 20, 40, 80, 160)
ALPHA_STEPS = (5, 10, 20, 30, 50, 100, 200, 400)
ODE_BATCH, SDE_BATCH, PDS_BATCH, FILTER_IMAGES = 16, 512, 512, 4096


def model() -> GaussianImageModel:
    return GaussianImageModel(SIZE, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _slope(ns, values) -> float:
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


# -- deterministic: distance from the closed form ----------------------------------------------


def exact_ode_output(m, z):
    st = m.settings
    x = m.ode_solution(st.sigma_max * z, st.sigma_max, st.sigma_min)
    return x + st.sigma_min**2 * m.score(x, torch.full((len(z),), st.sigma_min))


def ode_errors(m, name, schedule, ns, z, exact):
    out = []
    for n in ns:
        it = iter([z])
        x = get_sampler(name)(m.score, lambda: next(it), schedule(m.settings, n))
        out.append(float((x - exact).double().pow(2).mean().sqrt()))
    return out


def deterministic_section(m) -> str:
    z = torch.randn(ODE_BATCH, 1, SIZE, SIZE, generator=_gen(0))
    exact = exact_ode_output(m, z)
    lines = [
        "### Deterministic samplers against the closed-form ODE solution",
        "",
        f"RMS pixel distance (data in [0, 1]) between the sampler's output and the exact probability-flow "
        f"solution from the same x_T = sigma_max z (then the same Tweedie denoise at sigma_min), "
        f"{ODE_BATCH} draws. Score calls: n for ddim and accel-ode, 2n - 1 for accel-ode2.",
        "",
        "| schedule | sampler | " + " | ".join(f"{n} steps" for n in ODE_STEPS) + " | slope 40-160 |",
        "|---|---|" + "---|" * len(ODE_STEPS) + "---|",
    ]
    keep = {}
    for schedule in (geometric, edm):
        for name in ("ddim", "accel-ode", "accel-ode2"):
            errs = ode_errors(m, name, schedule, ODE_STEPS, z, exact)
            keep[(schedule.__name__, name)] = errs
            tail = [i for i, n in enumerate(ODE_STEPS) if n >= 40]
            s = _slope([ODE_STEPS[i] for i in tail], [errs[i] for i in tail])
            lines.append(f"| {schedule.__name__} | {name} | " + " | ".join(f"{e:.3g}" for e in errs) + f" | {s:.2f} |")
    ode2_80 = ode_errors(m, "accel-ode2", geometric, (80,), z, exact)[0]
    lines += [
        "",
        f"At equal score calls (geometric): accel-ode with 160 steps (160 calls) {keep[('geometric', 'accel-ode')][-1]:.3g}, "
        f"accel-ode2 with 80 steps (159 calls) {ode2_80:.3g}.",
        "",
    ]
    return "\n".join(lines)


# -- stochastic: spectral KL --------------------------------------------------------------------


def sde_moments(m, steps, name: str, p: torch.Tensor | None = None) -> torch.Tensor:
    """E|F_ortho(x_out - mu)|^2 per coefficient for ddpm / accel-sde on the analytic model, with
    M M^T = diag(p) (None = identity), from `pdscli.evaluate.moments`' recursions."""
    p = torch.ones_like(m.lam) if p is None else p
    return {"ddpm": M.ddpm_second_moments, "accel-sde": M.accel_sde_second_moments}[name](m, steps, p)


def stochastic_section(m) -> str:
    st = m.settings
    ideal = m.lam**2 / (m.lam + st.sigma_min**2)  # an exact sampler's output, after the denoise
    floor = M.spectral_kl_of_moments(m, ideal)
    lines = [
        "### Stochastic samplers: ddpm and accel-sde",
        "",
        f"Spectral KL of {SDE_BATCH} samples (MC; its own floor with exact samples is about 1/(4n) = "
        f"{1 / (4 * SDE_BATCH):.1e}) and its exact population value from the second-moment recursion "
        "(`pdscli.evaluate.moments`). Geometric grid; both samplers make one score "
        f"call per step. Even an exact sampler has KL {floor:.1e} here: the final Tweedie denoise at "
        "sigma_min shrinks each coefficient by lam / (lam + sigma_min^2).",
        "",
        "| steps | ddpm MC | ddpm exact | accel-sde MC | accel-sde exact |",
        "|---|---|---|---|---|",
    ]
    for n in SDE_STEPS:
        row = [str(n)]
        for name in ("ddpm", "accel-sde"):
            g = _gen(100 + n)
            x = get_sampler(name)(m.score, lambda: torch.randn(SDE_BATCH, 1, SIZE, SIZE, generator=g), geometric(st, n))
            e = M.spectral_kl_of_moments(m, sde_moments(m, geometric(st, n), name))
            row += [f"{m.spectral_kl(x):.3g}", f"{e:.3g}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Observed rates: log-log slope in the number of steps of the exact KL against what an exact sampler "
        "with the same final denoise outputs (variance lam^2 / (lam + sigma_min^2)), which removes the "
        "denoise floor above:",
        "",
    ]
    for name in ("ddpm", "accel-sde"):
        k = [mean_gaussian_kl(sde_moments(m, geometric(st, n), name), ideal) for n in SDE_STEPS]
        parts = [f"{SDE_STEPS[i]}->{SDE_STEPS[i + 1]}: {math.log(k[i + 1] / k[i]) / math.log(SDE_STEPS[i + 1] / SDE_STEPS[i]):.2f}"
                 for i in range(len(k) - 1)]
        lines.append(f"- {name}: " + ", ".join(parts) + f" (KL {k[0]:.2g} at {SDE_STEPS[0]} steps, {k[-1]:.2g} at {SDE_STEPS[-1]})")
    lines.append("")
    return "\n".join(lines)


# -- --alpha auto -------------------------------------------------------------------------------


def estimated_filters(m) -> Filters:
    """Filter statistics from exact samples, clamped to [0, 1] (compute_statistics wants image
    values; the Gaussian's tails leave [0, 1] in ~1 pixel in 1000). Frequency only: the space
    statistic of stationary data is flat, its filter ~1."""
    g = _gen(7)
    batches = (m.sample(512, g).clamp(0, 1) for _ in range(FILTER_IMAGES // 512))
    return compute_statistics(batches, source="analytic model samples", freq=True, space=False)


def alpha_section(m) -> str:
    st = m.settings
    filters = estimated_filters(m)
    lines = [
        "### `--alpha auto` next to the fixed alpha = 5 and vanilla PC",
        "",
        f"PC / PDS (`pdscli.samplers.pc.pds`, reference grid `pc_steps`, snr {st.snr:g}) with frequency filters from "
        f"{filters.count} exact samples. MC: spectral KL of {PDS_BATCH} samples, the same noise for all three "
        "(floor ~5e-4). Exact: the population value from `pdscli.evaluate.moments.pc_second_moments` with the same "
        "estimated statistic. auto = `auto_alpha(n, num_scales, sigma_min=..., sigma_max=...)` (off: no filter).",
        "",
        "| steps | auto alpha | vanilla MC | alpha=5 MC | auto MC | vanilla exact | alpha=5 exact | auto exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in ALPHA_STEPS:
        a = _auto(st, n, "pds")
        mc, ex = [], []
        for alpha in (None, AL.ALPHA_REFERENCE, a):
            pre = None if alpha is None else Preconditioner.from_filters(filters, alpha)
            g = _gen(1000 + n)
            x = pds(m.score, lambda: torch.randn(PDS_BATCH, 1, SIZE, SIZE, generator=g), pc_steps(st, n), precond=pre, snr=st.snr)
            mc.append(m.spectral_kl(x))
            ex.append(M.pc_spectral_kl(m, n, alpha, statistic=filters.freq))
        lines.append(f"| {n} | {'off' if a is None else f'{a:.3g}'} | " + " | ".join(f"{v:.3g}" for v in mc + ex) + " |")
    lines.append("")
    return "\n".join(lines)


def _auto(st, n: int, sampler: str) -> float | None:
    """The calibrated alpha of `sampler` at n steps; None where auto switches the filter off."""
    a = AL.auto_alpha(n, st.num_scales, sigma_min=st.sigma_min, sigma_max=st.sigma_max, sampler=sampler)
    return None if a >= AL.ALPHA_MAX else a


def preconditioned_stochastic_section(m) -> str:
    """ddpm / accel-sde with the PDS preconditioner, exact (recursion, exact filter statistic)."""
    st = m.settings
    stat = M.expected_freq_statistic(m)
    lines = [
        "### The preconditioner with ddpm and accel-sde (heuristic)",
        "",
        "Exact spectral KL (second-moment recursion, geometric grid, frequency filter of the exact "
        "statistic); 'auto' is each sampler's own calibrated `auto_alpha(..., sampler=name)` at the same step "
        "count (its default --alpha), `(off)` where it switches the filter off.",
        "",
        "| steps | ddpm | ddpm alpha=5 | ddpm auto | accel-sde | accel-sde alpha=5 | accel-sde auto |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in (5, 10, 20, 30, 50, 100, 200):
        row = [str(n)]
        for name in ("ddpm", "accel-sde"):
            a = _auto(st, n, name)
            for alpha, is_auto in ((None, False), (AL.ALPHA_REFERENCE, False), (a, True)):
                p = None if alpha is None else M.squared_filter(stat, alpha)
                kl = M.spectral_kl_of_moments(m, sde_moments(m, geometric(st, n), name, p))
                row.append(f"{kl:.3g}" + (" (off)" if is_auto and a is None else ""))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)


def sections() -> str:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny FFTs: extra threads only contend on a shared machine
    t0 = time.time()
    try:
        m = model()
        body = [deterministic_section(m), stochastic_section(m), alpha_section(m), preconditioned_stochastic_section(m)]
    finally:
        torch.set_num_threads(before)
    head = [
        "## Accelerated samplers and `--alpha auto`",
        "",
        f"Produced by `.venv/bin/python scripts/exactness_accel.py` (`sections()`); machine: "
        f"{platform.machine()} {platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, CPU, 1 thread; date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{time.time() - t0:.0f} s. Model: {m.describe()}; sigma_max {m.settings.sigma_max:g}, "
        f"sigma_min {m.settings.sigma_min:g}, snr {m.settings.snr:g}, num_scales {m.settings.num_scales}.",
        "",
    ]
    return "\n".join(head + body)


if __name__ == "__main__":
    print(sections())
