"""Calibrate `--alpha auto` (pdscli.precondition.alpha.AUTO_TABLES) on exact analytic models.

For each sampler (pds = the PC loop, ddpm, accel-sde), calibration model (analytic Gaussians of
several sizes, sigma ranges and snrs) and step count from 2 to 2000, the exact spectral KL over
a grid of filter excesses e = 1 / (alpha - 1) comes from the closed second-moment recursions in
`pdscli.evaluate.moments` (no sampling). A step count's *safe* excesses are those where the KL
is no worse than vanilla's (to TOLERANCE), and still so with the excess doubled (a margin from
the divergence cliff), every smaller excess safe too. The table keeps, at each knot of h (the
step in log sigma), the smallest over the models near that h of each model's best safe excess
(0 = off where some model gains nothing safely); then every (model, step count) is checked
with the exact recursion at the table's excess and at twice it, and knots next to a failure are
lowered until none fails.

    .venv/bin/python scripts/calibrate_alpha.py                 # print the tables (a few minutes)
    .venv/bin/python scripts/calibrate_alpha.py --write         # also write AUTO_TABLES and docs/samplers.md
"""

from __future__ import annotations

import math
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pdscli.evaluate import moments as M
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.precondition import alpha as A

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("pds", "ddpm", "accel-sde")
SHOWN = (2, 3, 5, 10, 17, 20, 30, 50, 100, 200, 1000)
STEP_COUNTS = tuple(sorted(set(range(2, 31)) | {int(round(x)) for x in np.geomspace(32, 2000, 20)} | set(SHOWN)))
# Excess grid: e_i = 2^(i/2 - 13), so doubling is two grid steps; 4 is alpha 1.25.
E_GRID = np.array([2.0 ** (i / 2 - 13) for i in range(31)])
TOLERANCE = 1e-3  # "never worse than vanilla": KL <= (1 + TOLERANCE) KL(vanilla)
MARGIN = 2.0  # the excess may double and still be no worse than vanilla
H_KNOTS = tuple(float(h) for h in np.geomspace(0.004, 12.0, 25))
E_MIN = 1e-3  # a smaller excess (alpha > 1000) changes nothing worth the FFTs: off


def calibration_models():
    """(label, model): power-1 spectra. LSUN-type (snr 0.075, 2000 scales, sigma_max 378 * size / 64)
    at 16 and 64 px and at 32 px with 3 channels (the exact model of the samplers issue);
    CIFAR-type (sigma_max 50, snr 0.16, 1000 scales); the built-in digits' range (8.6, snr 0.16 and
    0.075); FFHQ-1024's (1348, snr 0.15)."""
    yield "16x16x1 LSUN-type", GaussianImageModel(16, 1)
    yield "32x32x3 LSUN-type", GaussianImageModel(32, 3)
    yield "64x64x1 LSUN-type", GaussianImageModel(64, 1)
    yield "32x32x1 CIFAR-type", GaussianImageModel(32, 1, sigma_max=50.0, snr=0.16, num_scales=1000)
    yield "16x16x1 sigma_max 8.6", GaussianImageModel(16, 1, sigma_max=8.6, snr=0.16, num_scales=1000)
    yield "16x16x1 sigma_max 8.6 snr 0.075", GaussianImageModel(16, 1, sigma_max=8.6)
    yield "32x32x1 sigma_max 1348", GaussianImageModel(32, 1, sigma_max=1348.0, snr=0.15)


def alpha_of(e: float) -> float | None:
    return None if e <= 0 else 1.0 + 1.0 / e


def kl_grid(model, sampler: str, n: int, stat) -> tuple[float, np.ndarray]:
    """(KL vanilla, KL at each E_GRID excess), all filters in one pass of the recursion."""
    p = torch.stack([M.squared_filter(stat, None)] + [M.squared_filter(stat, alpha_of(e)) for e in E_GRID])
    kl = M.spectral_kl_of_moments(model, M.exact_moments(model, sampler, n, p)).numpy()
    return float(kl[0]), kl[1:]


def best_safe_excess(van: float, kls: np.ndarray) -> float:
    """The best excess on the grid whose KL, and KL at twice it, are <= vanilla, with every smaller
    excess safe too; 0 when none gains."""
    ok = kls <= van * (1 + TOLERANCE)
    step = int(round(2 * math.log2(MARGIN)))
    best, best_kl = 0.0, van
    for i in range(len(E_GRID) - step):
        if not (ok[i] and ok[i + step]):
            break
        if kls[i] < best_kl:
            best, best_kl = float(E_GRID[i]), float(kls[i])
    return best


def measure(sampler: str, models) -> list[dict]:
    points = []
    for label, model in models:
        stat = M.expected_freq_statistic(model)
        st = model.settings
        for n in STEP_COUNTS:
            van, kls = kl_grid(model, sampler, n, stat)
            points.append({"label": label, "model": model, "stat": stat, "n": n, "van": van,
                           "h": A.log_step(n, st.sigma_min, st.sigma_max), "best": best_safe_excess(van, kls),
                           "kl_best_grid": float(np.min(kls)), "e_best_grid": float(E_GRID[int(np.argmin(kls))])})
    return points


def initial_knots(points) -> list[float]:
    """Per knot: the smallest best-safe excess among points between its neighbours."""
    hs = np.log(H_KNOTS)
    knots = []
    for k in range(len(hs)):
        lo = hs[max(k - 1, 0)]
        hi = hs[min(k + 1, len(hs) - 1)]
        near = [p["best"] for p in points if p["n"] >= A.MIN_STEPS and lo <= math.log(p["h"]) <= hi]
        knots.append(min(near) if near else math.nan)
    # A knot no point reaches takes its neighbour's value (the table is flat outside the data).
    for order in (range(len(knots)), reversed(range(len(knots)))):
        last = math.nan
        for k in order:
            if math.isnan(knots[k]):
                knots[k] = last
            last = knots[k]
    return [0.0 if math.isnan(e) else e for e in knots]


def with_table(sampler: str, knots):
    A.AUTO_TABLES[sampler] = tuple(zip(H_KNOTS, knots))


def check(sampler: str, points) -> list[dict]:
    """Points where the table's excess, or twice it, is worse than vanilla (exact recursion)."""
    bad = []
    for p in points:
        st = p["model"].settings
        e = A.auto_excess(p["n"], st.sigma_min, st.sigma_max, sampler)
        p["auto"] = e
        if e <= 0:
            p["kl_auto"] = p["van"]
            continue
        kl = M.recursion_spectral_kl(p["model"], sampler, p["n"], alpha_of(e), statistic=p["stat"])
        kl2 = M.recursion_spectral_kl(p["model"], sampler, p["n"], alpha_of(MARGIN * e), statistic=p["stat"])
        p["kl_auto"] = kl
        if max(kl, kl2) > p["van"] * (1 + TOLERANCE):
            bad.append(p)
    return bad


def fit(sampler: str, points) -> list[float]:
    knots = [e if e >= E_MIN else 0.0 for e in initial_knots(points)]
    hs = np.log(H_KNOTS)
    for _ in range(60):
        with_table(sampler, knots)
        bad = check(sampler, points)
        if not bad:
            return knots
        for p in bad:  # lower the two knots around each failure
            j = int(np.clip(np.searchsorted(hs, math.log(p["h"])), 1, len(hs) - 1))
            for k in (j - 1, j):
                knots[k] = 0.0 if knots[k] * 0.8 < E_MIN else knots[k] * 0.8
    raise SystemExit(f"{sampler}: the table still fails somewhere after 60 rounds")


def fmt_alpha(e: float) -> str:
    return "off" if e <= 0 else f"{1 + 1 / e:.3g}"


def markdown(results, seconds: float, models=()) -> str:
    lines = [
        "### `--alpha auto`: calibration on the exact models",
        "",
        f"Command: `.venv/bin/python scripts/calibrate_alpha.py --write`; machine: {platform.machine()} "
        f"{platform.system()}, torch {torch.__version__}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{seconds:.0f} s.",
        "",
        "Exact spectral KL from the second-moment recursions of `pdscli.evaluate.moments` (no sampling), "
        "frequency filter of each model's exact statistic. Every step count from 2 to 30 and 24 more up to 2000 "
        f"was checked: auto is never worse than vanilla (to {TOLERANCE:g}), and neither is twice its excess. "
        "`best` = the best alpha on the grid (unsafe ones included), `auto/van` = KL(auto) / KL(vanilla).",
        "",
        *alpha_by_steps(),
        *corrector_alone(models),
    ]
    for sampler, (knots, points) in results.items():
        lines += [f"**{sampler}** knots (h: alpha): "
                  + ", ".join(f"{h:.3g}: {fmt_alpha(e)}" for h, e in zip(H_KNOTS, knots)), ""]
        lines += ["| model | steps | h | KL vanilla | KL alpha 5 | best alpha | KL best | auto alpha | KL auto | auto/van |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in points:
            if p["n"] not in SHOWN:
                continue
            k5 = M.recursion_spectral_kl(p["model"], sampler, p["n"], A.ALPHA_REFERENCE, statistic=p["stat"])
            lines.append(
                f"| {p['label']} | {p['n']} | {p['h']:.3f} | {p['van']:.3g} | {k5:.3g} | {fmt_alpha(p['e_best_grid'])} "
                f"| {p['kl_best_grid']:.3g} | {fmt_alpha(p['auto'])} | {p['kl_auto']:.3g} | {p['kl_auto'] / p['van']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def alpha_by_steps() -> list[str]:
    """The shipped tables read back: auto alpha per sampler and step count for two sigma ranges."""
    ranges = (("0.01-378 (LSUN)", 0.01, 378.0), ("0.01-50 (CIFAR-10)", 0.01, 50.0))
    lines = ["auto alpha by step count (the shipped tables; `off` = no filter):", "",
             "| sigma range | sampler | " + " | ".join(str(n) for n in SHOWN) + " |",
             "|---|---|" + "---|" * len(SHOWN)]
    for label, smin, smax in ranges:
        for sampler in SAMPLERS:
            cells = [fmt_alpha(A.auto_excess(n, smin, smax, sampler)) for n in SHOWN]
            lines.append(f"| {label} | {sampler} | " + " | ".join(cells) + " |")
    return lines + [""]


def corrector_alone(models) -> list[str]:
    """The corrector without a predictor: exact KL and whether `corrector_stalls` warns."""
    from pdscli.samplers import pc_steps
    from pdscli.samplers.pc import corrector_stalls

    counts = (20, 100, 200, 400, 700, 1000, 2000)
    lines = ["The corrector alone (`--sampler corrector`, vanilla): exact spectral KL, and `warn` where "
             "`pdscli.samplers.pc.corrector_stalls` warns that it stays near the prior:", "",
             "| model | snr | " + " | ".join(str(n) for n in counts) + " |", "|---|---|" + "---|" * len(counts)]
    for label, model in models:
        st = model.settings
        p = torch.ones_like(model.lam)
        cells = []
        for n in counts:
            steps = pc_steps(st, n)
            kl = M.spectral_kl_of_moments(model, M.pc_second_moments(model, steps, p, st.snr, predictor=False))
            cells.append(f"{kl:.3g}" + (" warn" if corrector_stalls(steps, st.snr) else ""))
        lines.append(f"| {label} | {st.snr:g} | " + " | ".join(cells) + " |")
    return lines + [""]


def table_source(results) -> str:
    out = ["AUTO_TABLES: dict[str, tuple[tuple[float, float], ...]] = {"]
    for sampler, (knots, _) in results.items():
        out.append(f'    "{sampler}": (')
        out += [f"        ({h:.4g}, {e:.4g})," for h, e in zip(H_KNOTS, knots)]
        out.append("    ),")
    out.append("}")
    return "\n".join(out)


def write_source(text: str, path: Path = ROOT / "pdscli" / "precondition" / "alpha.py") -> None:
    src = path.read_text()
    new, count = re.subn(r"AUTO_TABLES: dict\[.*?\n}\n", text + "\n", src, count=1, flags=re.S)
    if count != 1:
        raise SystemExit(f"{path}: no AUTO_TABLES block to replace")
    path.write_text(new)


DOCS = ROOT / "docs" / "samplers.md"
BEGIN, END = "<!-- calibrate_alpha.py: begin -->", "<!-- calibrate_alpha.py: end -->"


def write_docs(text: str, path: Path = DOCS) -> None:
    """Replace the generated block between the BEGIN / END markers of docs/samplers.md."""
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)  # small elementwise ops: extra threads only contend
    t0 = time.time()
    models = [(label, M.reduce_model(m)) for label, m in calibration_models()]
    results = {}
    for sampler in SAMPLERS:
        points = measure(sampler, models)
        helps_at_2 = [p["label"] for p in points if p["n"] == 2 and p["best"] > 0]
        if helps_at_2:
            print(f"note: {sampler} gains safely at 2 steps on {helps_at_2} (MIN_STEPS keeps it off)", file=sys.stderr)
        results[sampler] = (fit(sampler, points), points)
        print(f"{sampler}: fitted in {time.time() - t0:.0f} s", file=sys.stderr)
    source = table_source(results)
    text = markdown(results, time.time() - t0, models)
    print(source)
    print(text)
    if "--write" in argv:
        write_source(source)
        write_docs(text)


if __name__ == "__main__":
    main(sys.argv[1:])
