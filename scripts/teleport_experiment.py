#!/usr/bin/env python
"""Analytic "teleportation" of the high-noise phase on the mixture model (issue 13, item 4): measured, not shipped.

Wang & Vastola ("The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion
Models") observe that at high noise the score of a data set is close to that of the Gaussian
with the data's mean and covariance, whose probability-flow ODE is solved in closed form. Here:
x_T = sigma_max z is carried to sigma_t by the exact ODE map of the mixture's moment-matched
Gaussian (`MixtureImageModel.moment_matched()`: the second-order statistics PDS filters hold),
at no network call; DPM-Solver++(2M) then spends the whole budget on a log-uniform grid from
sigma_t down to sigma_min. Against 2M from sigma_max at the same budget, same x_T:

    python scripts/teleport_experiment.py [--samples 256]

prints mode TV and the weight-averaged per-mode spectral KL (pdscli.evaluate.measures).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdscli.evaluate.measures import mixture_quality  # noqa: E402
from pdscli.evaluate.mixture import MixtureImageModel  # noqa: E402
from pdscli.noise import SampleNoise  # noqa: E402
from pdscli.samplers import REGISTRY  # noqa: E402
from pdscli.samplers.grids import geometric, steps_from_levels  # noqa: E402


def run(model, gauss, z, nfe: int, sigma_t: float | None) -> dict:
    st = model.settings
    if sigma_t is None:
        steps, start = geometric(st, nfe), z
    else:
        levels = torch.exp(torch.linspace(math.log(sigma_t), math.log(st.sigma_min), nfe, dtype=torch.float64))
        steps = steps_from_levels(levels, sigma_t)
        # The sampler starts from steps.sigma_max * (its first draw): hand it x(sigma_t) / sigma_t.
        start = gauss.ode_solution(st.sigma_max * z, st.sigma_max, sigma_t) / sigma_t
    out = REGISTRY["dpm++2m"].fn(model.score, iter([start]).__next__, steps)
    return mixture_quality(model, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = MixtureImageModel()
    gauss = model.moment_matched()
    z = SampleNoise(0, range(args.samples), model.shape)()
    print("| NFE | start | mode TV | per-mode KL | mode shares |\n|---|---|---|---|---|")
    for nfe in (10, 20):
        for sigma_t in (None, 50.0, 20.0, 10.0, 5.0, 2.0):
            q = run(model, gauss, z, nfe, sigma_t)
            start = "sigma_max (plain 2M)" if sigma_t is None else f"teleported to {sigma_t:g}"
            print(f"| {nfe} | {start} | {q['mode_tv']:.3f} | {q['mean_mode_kl']:.2e} | "
                  f"{', '.join(f'{s:.3f}' for s in q['mode_shares'])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
