#!/usr/bin/env python
"""Every sampler's quality per budget of network calls, and the recommendation per budget:
measures into docs/data/samplers-*.json, renders the "Quality per budget" section of docs/samplers.md,
and the peers section ("pds beside k-diffusion and ComfyUI") from docs/data/peers-*.json, which
scripts/peers.py measures.

    python scripts/samplers_doc.py measure --only gaussian,mixture,builtin   # writes docs/data/samplers-*.json
    python scripts/samplers_doc.py render                                    # rewrites the section in docs/samplers.md

Measures (one thread; the whole `measure` takes minutes on one core):
  * gaussian: the exact Gaussian model (pdscli.evaluate.analytic, 3x32x32, its defaults). Every
    sampler outside the PC family on the geometric (log-uniform) and edm (Karras rho 7) grids:
    the exact spectral KL of its output (pdscli.evaluate.moments.exact_spectral_kl: no samples,
    no floor); PC and PDS (alpha 5 and auto) by the exact second-moment recursion
    (pdscli.evaluate.moments). Deterministic samplers also: the RMS distance from the exact
    probability-flow solution (same x_T, 8 samples), the ODE map sigma_max -> sigma_min followed
    by the Tweedie denoise every sampler ends with.
  * mixture: the mixture model (pdscli.evaluate.mixture, 3x32x32), N samples from the same x_T
    for every sampler: mode TV and the weight-averaged per-mode spectral KL (with its floor).
  * builtin: the built-in digits model's classifier check (pdscli.evaluate.digits), N samples.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdscli.evaluate import digits as qc  # noqa: E402
from pdscli.evaluate import moments as M  # noqa: E402
from pdscli.evaluate.analytic import GaussianImageModel  # noqa: E402
from pdscli.evaluate.measures import mixture_quality  # noqa: E402
from pdscli.evaluate.mixture import MixtureImageModel  # noqa: E402
from pdscli.noise import SampleNoise  # noqa: E402
from pdscli.precondition import alpha as AL  # noqa: E402
from pdscli.samplers import REGISTRY, nfe_count, sampler_info, sampler_kwargs  # noqa: E402
from pdscli.samplers.grids import make_steps  # noqa: E402
from pdscli.samplers.plan import steps_for_nfe  # noqa: E402
from pdscli.samplers.recommend import EXACT, FILTERS, NETWORK, PLAIN_EXACT, TABLE, recommend  # noqa: E402

DATA = REPO / "docs" / "data"  # samplers-{gaussian,mixture,builtin}.json
DOC = REPO / "docs" / "samplers.md"
BEGIN, END = "<!-- samplers_doc.py: begin -->", "<!-- samplers_doc.py: end -->"
BUDGETS = [10, 20, 35, 50, 100, 200]
MIXTURE_BUDGETS = [10, 20, 35, 50]
GRIDS = ["geometric", "edm"]
BUILTIN_RUNS = {  # (sampler, filters) per budget: the stochastic candidates, PDS/PC and the ODE baselines
    5: [("dpm++2m-sde", False), ("dpm++2m-sde-mid", False), ("euler-a", False), ("dpm++2m", False), ("ipndm", False),
        ("gradient-estimation", False)],
    8: [("dpm++2m-sde", False), ("dpm++2m-sde-mid", False), ("euler-a", False), ("dpm++2m", False), ("ipndm", False),
        ("gradient-estimation", False)],
    10: [("dpm++2m-sde", False), ("dpm++2m-sde-mid", False), ("dpm++3m-sde", False), ("euler-a", False), ("edm-sde", False),
         ("accel-sde", False), ("accel-sde", True), ("pds", True), ("dpm++2m", False), ("ipndm", False)],
    20: [("dpm++2m-sde", False), ("dpm++2m-sde-mid", False), ("dpm++3m-sde", False), ("euler-a", False), ("edm-sde", False),
         ("accel-sde", False), ("accel-sde", True), ("pds", True), ("pc", False), ("dpm++2m", False)],
    35: [("dpm++2m-sde", False), ("dpm++2m-sde-mid", False), ("dpm++3m-sde", False)],
    50: [("dpm++2m-sde", False), ("dpm++2m-sde-mid", False), ("dpm++3m-sde", False)],
}


def others() -> list[str]:
    return [n for n, s in REGISTRY.items() if not s.pc_grid]


def ode_distance(model, name: str, steps, z: torch.Tensor) -> float:
    st = model.settings
    x = model.ode_solution(st.sigma_max * z, st.sigma_max, st.sigma_min)
    exact = x + st.sigma_min**2 * model.score(x, torch.full((len(z),), st.sigma_min))
    out = REGISTRY[name].fn(model.score, iter([z]).__next__, steps)
    return float((out - exact).double().pow(2).mean().sqrt())


def measure_gaussian(log) -> dict:
    model = GaussianImageModel()
    z = torch.randn(8, *model.shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in others():
        info = sampler_info(name)
        for grid in GRIDS:
            for nfe in BUDGETS:
                n = steps_for_nfe(name, nfe)
                steps = make_steps(grid, model.settings, n)
                row = {"sampler": name, "grid": grid, "nfe": nfe, "spent": info.nfe(n), "steps": n,
                       "kl": M.kl_of_moments(model, M.exact_second_moments(model, info.fn, steps,
                                                                        max_draws=1 if info.deterministic else None))}
                if info.deterministic:
                    row["ode_rms"] = ode_distance(model, name, steps, z)
                rows.append(row)
            log(f"gaussian {name} {grid}: " + " ".join(f"{r['kl']:.2e}" for r in rows[-len(BUDGETS):]))
    stat = M.expected_freq_statistic(model)
    for label, alpha in (("pc", None), ("pds", 5.0), ("pds", "auto")):
        for nfe in BUDGETS:
            n = steps_for_nfe(label, nfe)
            a = alpha if alpha != "auto" else AL.resolve_alpha("auto", model.settings, n)
            kl = M.pc_spectral_kl(model, n, a, statistic=stat)
            rows.append({"sampler": label, "grid": "pc", "nfe": nfe, "spent": nfe_count(label, n), "steps": n,
                         "alpha": None if alpha is None else (alpha if alpha != "auto" else f"auto ({a:.3g})"),
                         "kl": kl if math.isfinite(kl) else None})
        log(f"gaussian {label} alpha {alpha}: done")
    return {"model": model.describe(), "settings": model.settings.to_dict(), "rows": rows}


def measure_mixture(log, n_samples: int) -> dict:
    model = MixtureImageModel()
    ref, _ = model.sample(n_samples, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in [*others(), "pc"]:
        info = sampler_info(name)
        for nfe in MIXTURE_BUDGETS:
            n = steps_for_nfe(name, nfe)
            steps = make_steps(info.grid, model.settings, n)
            t0 = time.perf_counter()
            kw = sampler_kwargs(name, snr=model.settings.snr)
            out = info.fn(model.score, SampleNoise(0, range(n_samples), model.shape), steps, **kw)
            q = mixture_quality(model, out) if torch.isfinite(out).all() else None
            rows.append({"sampler": name, "grid": info.grid, "nfe": nfe, "spent": info.nfe(n), "steps": n, **(q or {}),
                         "seconds": round(time.perf_counter() - t0, 1)})
        log(f"mixture {name}: " + " ".join(f"{r.get('mode_tv', float('nan')):.3f}" for r in rows[-len(MIXTURE_BUDGETS):]))
    return {"model": model.describe(), "num_samples": n_samples, "exact_samples": mixture_quality(model, ref), "rows": rows}


def measure_builtin(log, n_samples: int) -> dict:
    from pdscli.models import builtin

    clf, _ = qc.digit_classifier(heldout=False)
    model = builtin.default_score_model("cpu")
    rows = []
    for nfe, runs in BUILTIN_RUNS.items():
        for name, filters in runs:
            n = steps_for_nfe(name, nfe)
            x, seconds = qc.sample(model, sampler=name, steps=n, n=n_samples, filters=filters)
            m = qc.evaluate(clf, x)
            fails = qc.failures(m)
            rows.append({"sampler": name, "filters": filters, "grid": sampler_info(name).grid, "nfe": nfe,
                         "spent": nfe_count(name, n), "steps": n, **m, "passes": not fails, "failures": fails,
                         "seconds": round(seconds, 1)})
            log(f"builtin {nfe} {name}{' + filters' if filters else ''}: {'pass' if not fails else 'FAIL'} "
                f"({m['confident_share']:.0%}, {m['high_freq_ratio']:.2f}x)")
    return {"num_samples": n_samples, "rows": rows}


# ---------------------------------------------------------------------------- rendering


def fmt(v, digits=2) -> str:
    if v is None:
        return "diverged"
    return f"{v:.{digits}e}" if abs(v) < 0.01 or abs(v) >= 1000 else f"{v:.{digits + 1}g}"


def render(data: dict) -> str:
    g, mx, bi = data.get("gaussian"), data.get("mixture"), data.get("builtin")
    meta = next((part["meta"] for part in (g, mx, bi) if part), {})
    out = [BEGIN, "", "## Quality per budget and the recommendation (`--nfe N`)", "",
           (f"Generated by `python scripts/samplers_doc.py render` from docs/data/samplers-*.json, measured by "
           f"`python scripts/samplers_doc.py measure` ({meta.get('machine', '?')}, {meta.get('date', '?')}, one thread). "
           "NFE = network calls per image; every sampler takes the most steps that fit the budget "
           "(`pdscli.samplers.plan.steps_for_nfe`), so a 2-call sampler at 35 NFE runs 18 steps (35 calls)."), ""]
    out += ["### Recommendation per budget", "",
            ("`pds sample --nfe N` without `--sampler` runs this (`pdscli.samplers.recommend.TABLE`; run.json's "
            "`nfe_budget.reason` names it). *exact*: an analytic model (`--model gaussian` / `mixture`); "
            "*network*: a trained network; *network + filters*: with PDS filters at hand (given, or the built-in model's)."), "",
            "| NFE | exact | network | network + filters |", "|---|---|---|---|"]
    low = 1
    for bound, _ in TABLE:
        cells = []
        for key in (EXACT, NETWORK, FILTERS):
            c = recommend(bound if bound < 10**9 else low, filters=key == FILTERS, analytic=key == EXACT)
            cells.append(f"`{c.sampler}` ({c.grid}{', filters' if c.filters else ''})")
        span = f"{low}-{bound}" if bound < 10**9 else f"{low}+"
        out.append(f"| {span} | " + " | ".join(cells) + " |")
        low = bound + 1
    plain, low = [], 1
    for bound, c in PLAIN_EXACT:
        plain.append(f"{low}-{bound} NFE `{c.sampler}` ({c.grid})")
        low = bound + 1
    out += ["", (f"*exact* without the data's statistics (`--teleport off`; `pdscli.samplers.recommend.PLAIN_EXACT`, "
                 f"from the peers' table below): {', '.join(plain)}, then as above.")]
    out.append("")
    if g:
        out += ["### Exact Gaussian model: spectral KL without floor", "",
                (f"{g['model']}; sigma {g['settings']['sigma_min']:g} to {g['settings']['sigma_max']:g}. "
                "Exact output spectra (no samples). Even a perfect ODE solver scores about 6e-5 here: every "
                "sampler stops at sigma_min and ends with the Tweedie denoise, which shrinks the variance of the "
                "weakest frequencies; values below that are errors that happen to cancel it."), "",
                "| sampler | grid | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |",
                "|---|---|" + "---|" * len(BUDGETS)]
        def key(r):  # "auto (8.78)" -> "auto": one row for --alpha auto, its value in the cells
            alpha = r.get("alpha")
            return r["sampler"], r["grid"], "auto" if str(alpha).startswith("auto") else alpha

        def cell(r):
            auto = str(r.get("alpha")).startswith("auto")
            return fmt(r["kl"]) + (f" (alpha {r['alpha'][6:-1]})" if auto else "")

        keys = list(dict.fromkeys(key(r) for r in g["rows"]))
        for k in keys:
            cells = {r["nfe"]: r for r in g["rows"] if key(r) == k}
            name = k[0] + (f" (alpha {k[2]})" if k[2] is not None else "")
            out.append(f"| {name} | {k[1]} | " + " | ".join(cell(cells[b]) if b in cells else "" for b in BUDGETS) + " |")
        out += ["", ("Distance to the exact probability-flow solution (RMS per pixel, same x_T, 8 images; "
                "deterministic samplers):"), "",
                "| sampler | grid | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |", "|---|---|" + "---|" * len(BUDGETS)]
        for k in keys:
            cells = {r["nfe"]: r for r in g["rows"] if key(r) == k and "ode_rms" in r}
            if cells:
                out.append(f"| {k[0]} | {k[1]} | " + " | ".join(fmt(cells[b]["ode_rms"]) for b in BUDGETS) + " |")
        out.append("")
    if mx:
        ex = mx["exact_samples"]
        out += ["### Mixture model: mode proportions and per-mode spectral KL", "",
                (f"{mx['model']}. {mx['num_samples']} samples from the same x_T for every sampler, each on its "
                f"default grid; mode TV = 1/2 sum |share - weight| with each sample assigned to its most likely "
                f"mode; KL = the per-mode spectral KL averaged with the weights (with the sampling floor). "
                f"{mx['num_samples']} exact draws score TV {ex['mode_tv']:.3f} and KL {fmt(ex['mean_mode_kl'])}: "
                f"differences below that are noise."), "",
                "| sampler | grid | " + " | ".join(f"NFE {b}: TV / KL" for b in MIXTURE_BUDGETS) + " |",
                "|---|---|" + "---|" * len(MIXTURE_BUDGETS)]
        names = list(dict.fromkeys(r["sampler"] for r in mx["rows"]))
        for name in names:
            cells = {r["nfe"]: r for r in mx["rows"] if r["sampler"] == name}
            grid = next(iter(cells.values()))["grid"]
            out.append(f"| {name} | {grid} | " + " | ".join(
                f"{cells[b]['mode_tv']:.3f} / {fmt(cells[b]['mean_mode_kl'])}" if "mode_tv" in cells[b] else "diverged"
                for b in MIXTURE_BUDGETS) + " |")
        out.append("")
    if bi:
        out += ["### Built-in digits model: the classifier check", "",
                (f"pdscli.evaluate.digits' check (docs/builtin-model.md) on {bi['num_samples']} samples; "
                "`+ filters` = the model's own PDS filters at alpha 5."), "",
                "| NFE | sampler | grid | steps (NFE spent) | confident | high-freq energy / data | max class share | check |",
                "|---|---|---|---|---|---|---|---|"]
        for r in bi["rows"]:
            name = r["sampler"] + (" + filters" if r["filters"] and r["sampler"] != "pds" else "")
            check = "pass" if r["passes"] else "FAIL: " + "; ".join(r["failures"])
            out.append(f"| {r['nfe']} | {name} | {r['grid']} | {r['steps']} ({r['spent']}) | {r['confident_share']:.1%} | "
                       f"{r['high_freq_ratio']:.2f} | {r['max_class_share']:.1%} | {check} |")
        out.append("")
    out.append(END)
    return "\n".join(out)


PEERS_BEGIN, PEERS_END = "<!-- samplers_doc.py peers: begin -->", "<!-- samplers_doc.py peers: end -->"
WITHOUT_STATS = ("geometric", "edm")  # pds's grids that need no statistics


def _label(r: dict) -> str:
    return f"{r['library']} `{r['sampler']}`"


def _best(rows: list[dict], nfe: int, key: str, pick, floor: float) -> dict | None:
    """The best row: the lowest value, where every value at or below the floor counts as the floor
    (below it, a solver error cancels the final denoise's shrinkage: no better in quality), and
    among those the one closest to the floor."""
    found = [r for r in rows if r["nfe"] == nfe and pick(r) and r.get(key) is not None]
    return min(found, key=lambda r: (max(r[key], floor), abs(r[key] - floor))) if found else None


def _ratio(a: dict | None, b: dict | None, key: str, floor: float) -> str:
    if a is None or b is None:
        return ""
    x, y = max(a[key], floor), max(b[key], floor)
    if x <= 1.25 * floor and y <= 1.25 * floor:
        return "both at the floor"
    return f"{x / y:.2g}x"


def render_peers(g: dict | None, mx: dict | None) -> str:
    """docs/samplers.md's peers section, from docs/data/peers-{gaussian,mixture}.json (scripts/peers.py)."""
    meta = next((part["meta"] for part in (g, mx) if part), None)
    out = [PEERS_BEGIN, "", "## pds beside k-diffusion and ComfyUI (5-50 NFE)", ""]
    if meta is None:
        return "\n".join([*out, "Not measured yet: run `python scripts/peers.py`.", "", PEERS_END])
    commands = "; ".join(f"`{part['meta']['command']}` on pds {part['meta']['pds'][:10]}" for part in (g, mx) if part)
    out += [(f"Generated by `python scripts/samplers_doc.py render` from docs/data/peers-*.json, measured by "
             f"{commands} ({meta['machine']}, {meta['date']}). "
             "The peers' sampling functions ran from their own code (the script imports them from the checkouts "
             "named on its command line; nothing is copied). The model is the same for all, as the EDM denoiser "
             "D(x, sigma) = x + sigma^2 s(x, sigma); all start from the same x_T, and the stochastic ones draw "
             "the same later noise through `noise_sampler`. NFE = counted score calls; each peer takes the most "
             "levels that fit, on k-diffusion's own grid functions (log-uniform = `get_sigmas_exponential`, "
             "Karras = `get_sigmas_karras`, rho 7). pds grids: `geometric` (log-uniform), `edm` (Karras), "
             "`stats` (`--schedule stats`, fitted to the data's second-order statistics: "
             "`pdscli.samplers.fitted`), `teleport` (`--teleport auto`: x_T carried to sigma_t by the data's "
             "Gaussian, then log-uniform from sigma_t; the samplers and budgets auto teleports)."), "",
            "Peers and their source versions:", ""]
    for lib, src in meta["sources"].items():
        out.append(f"- **{lib}** {src['version']}: {src['source']}")
    out.append("")

    def summary(part: dict, key: str, title: str, also: str | None = None) -> list[str]:
        rows, budgets = part["rows"], sorted({r["nfe"] for r in part["rows"]})
        floor = part["floor"][key]
        lines = [f"**{title}**: the best of each (lower is better; values at or below the floor {fmt(floor)} rank as "
                 "the floor); ratio = pds / best peer.", "",
                 "| NFE | best peer | pds without statistics | ratio | pds with statistics (`--schedule stats` or `--teleport auto`) | ratio |",
                 "|---|---|---|---|---|---|"]
        for nfe in budgets:
            peer = _best(rows, nfe, key, lambda r: r["library"] != "pds", floor)
            plain = _best(rows, nfe, key, lambda r: r["library"] == "pds" and r["grid"] in WITHOUT_STATS, floor)
            stats = _best(rows, nfe, key, lambda r: r["library"] == "pds" and r["grid"] in ("stats", "teleport"), floor)

            def cell(r):
                if r is None:
                    return "not measured"
                names = {"mode_tv": "TV", "mean_mode_kl": "KL"}
                extra = f", {names.get(also, also)} {fmt(r[also])}" if also and r.get(also) is not None else ""
                return f"{fmt(r[key])} ({_label(r)}, {r['grid']}{extra})"

            lines.append(f"| {nfe} | {cell(peer)} | {cell(plain)} | {_ratio(plain, peer, key, floor)} | {cell(stats)} | "
                         f"{_ratio(stats, peer, key, floor)} |")
        return [*lines, ""]

    def full(part: dict, key: str, fmt_cell) -> list[str]:
        rows, budgets = part["rows"], sorted({r["nfe"] for r in part["rows"]})
        lines = ["| library | sampler | grid | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
                 "|---|---|---|" + "---|" * len(budgets)]
        keys = list(dict.fromkeys((r["library"], r["sampler"], r["grid"]) for r in rows))
        for k in keys:
            cells = {r["nfe"]: r for r in rows if (r["library"], r["sampler"], r["grid"]) == k}
            lines.append(f"| {k[0]} | `{k[1]}` | {k[2]} | " + " | ".join(
                fmt_cell(cells[b]) if b in cells else "" for b in budgets) + " |")
        return [*lines, ""]

    def kl_cell(r):
        return "error" if "error" in r else fmt(r.get("kl"))

    def mix_cell(r):
        if "error" in r:
            return "error"
        return "diverged" if r.get("mode_tv") is None else f"{r['mode_tv']:.3f} / {fmt(r['mean_mode_kl'])}"

    if g:
        out += ["### Exact Gaussian model: spectral KL", "",
                (f"{g['model']}. Exact output spectra (no samples, no sampling noise). Floor: the exact "
                 f"probability-flow map to sigma_min followed by the Tweedie denoise every sampler here ends with "
                 f"scores {fmt(g['floor']['kl'])}; a value below it is a solver error that cancels the denoise's "
                 "shrinkage, which the fitted grids exploit on purpose."), ""]
        out += summary(g, "kl", "Gaussian, KL")
        grids = [gr for gr in ("geometric", "edm", "ays", "gits", "stats") if any(r["grid"] == gr for r in g["rows"])]
        fitted_names = list(dict.fromkeys(r["sampler"] for r in g["rows"] if r["grid"] == "stats"))
        budgets = sorted({r["nfe"] for r in g["rows"] if r["grid"] == "stats"})
        if fitted_names:
            out += ["**The grids compared** (pds's solvers, KL): log-uniform (`geometric`), Karras rho 7 (`edm`), "
                    "ComfyUI's AYS (SD1 table) and GITS (coefficient 1.20) tables as its scheduler nodes build them, "
                    "their sigma range mapped onto the model's (affinely in log sigma), and the grid fitted to the "
                    "statistics (`stats`).", "",
                    "| sampler | " + " | ".join(f"NFE {b}: " + " / ".join(grids) for b in budgets) + " |",
                    "|---|" + "---|" * len(budgets)]
            for name in fitted_names:
                cells = []
                for b in budgets:
                    by = {r["grid"]: r for r in g["rows"] if r["library"] == "pds" and r["sampler"] == name and r["nfe"] == b}
                    cells.append(" / ".join(fmt(by[gr].get("kl")) if gr in by else "-" for gr in grids))
                out.append(f"| `{name}` | " + " | ".join(cells) + " |")
            out.append("")
        out += ["<details><summary>Every sampler and grid</summary>", "", *full(g, "kl", kl_cell), "</details>", ""]
    if mx:
        out += ["### Mixture model: mode TV and per-mode KL", "",
                (f"{mx['model']}. {mx['num_samples']} samples per run, the same noise for all, on the log-uniform "
                 f"grid (and `stats` for pds, fitted to the mixture's moment-matched Gaussian: what PDS filters of "
                 f"its samples hold). Floor ({mx['num_samples']} exact draws): mode TV "
                 f"{mx['floor']['mode_tv']:.3f}, per-mode KL {fmt(mx['floor']['mean_mode_kl'])}; differences below "
                 "those are sampling noise."), ""]
        out += summary(mx, "mean_mode_kl", "Mixture, per-mode KL", also="mode_tv")
        out += summary(mx, "mode_tv", "Mixture, mode TV", also="mean_mode_kl")
        out += ["<details><summary>Every sampler: mode TV / per-mode KL</summary>", "", *full(mx, "mode_tv", mix_cell),
                "</details>", ""]
    out.append(PEERS_END)
    return "\n".join(out)


BUILTIN_PEERS_BEGIN = "<!-- samplers_doc.py peers-builtin: begin -->"
BUILTIN_PEERS_END = "<!-- samplers_doc.py peers-builtin: end -->"


def render_builtin_peers(b: dict | None) -> str:
    """The built-in network's peers table, from docs/data/peers-builtin.json (scripts/peers.py --only builtin)."""
    out = [BUILTIN_PEERS_BEGIN, "", "### Built-in digits network: Fréchet distance and the digit check (5-10 NFE)", ""]
    if b is None:
        return "\n".join([*out, "Not measured yet: run `python scripts/peers.py --only builtin`.", "", BUILTIN_PEERS_END])
    meta, floor, rows = b["meta"], b["floor"]["fd"], b["rows"]
    out += [(f"Generated by `python scripts/samplers_doc.py render` from docs/data/peers-builtin.json, measured by "
             f"`{meta['command']}` on pds {meta['pds'][:10]} ({meta['machine']}, {meta['date']}). "
             f"{b['num_samples']} samples per run from the same noise (`SampleNoise(0, range({b['num_samples']}))`), "
             "the peers as above on both grids; pds as a user runs it: `pdscli.sample(builtin, n, nfe=N)`, which is "
             "`pds sample --nfe N` (the planner's pick, the built-in filters, `--teleport auto`). "
             "FD: the Fréchet distance between Gaussians fitted to the digit classifier's features "
             "(`pdscli.evaluate.digits.features`: its SVMs' 45 pairwise decision values) of the samples and of all "
             f"1,797 real digits; floor: {floor['n']} real digits drawn without replacement, "
             f"{floor['mean']:.2f} ± {floor['std']:.2f} (mean ± std over {floor['splits']} draws). "
             "Check: the classifier check of docs/builtin-model.md (HF = high-frequency energy / the data's)."), "",
            "Peers and their source versions:", ""]
    out += [f"- **{lib}** {src['version']}: {src['source']}" for lib, src in meta["sources"].items()]
    out += ["", "| NFE | best peer by FD | pds `--nfe N` | pds - best peer, in floor stds |", "|---|---|---|---|"]

    def cell(r):
        check = "passes" if r["passes"] else "fails"
        return f"{r['fd']:.2f} ({_label(r)}, {r['grid']}; HF {r['high_freq_ratio']:.2f}, check {check})"

    for nfe in sorted({r["nfe"] for r in rows}):
        peers = [r for r in rows if r["nfe"] == nfe and r["library"] != "pds" and r.get("fd") is not None]
        pds = next((r for r in rows if r["nfe"] == nfe and r["library"] == "pds"), None)
        best = min(peers, key=lambda r: r["fd"]) if peers else None
        if best is None or pds is None:
            continue
        sigma_t = pds["teleport"].get("sigma_t")
        picked = f"`{pds['picked']}`, {pds['levels']} levels" + (f", teleported to sigma {sigma_t:.3g}" if sigma_t else "")
        out.append(f"| {nfe} | {cell(best)} | {pds['fd']:.2f} ({picked}; HF {pds['high_freq_ratio']:.2f}, check "
                   f"{'passes' if pds['passes'] else 'fails'}) | {(pds['fd'] - best['fd']) / floor['std']:+.1f} |")
    budgets = sorted({r["nfe"] for r in rows})
    out += ["", ("The last column is (pds's FD - the best peer's) / the floor's std: within about 2 is sampling noise. "
                 "`tests/test_builtin.py::test_nfe_10_is_within_noise_of_the_best_peer_fd` (slow) samples `--nfe 10` "
                 "again, checks that it reproduces the recorded FD, and that it is at most the best peer's + 2 floor stds."),
            "", "<details><summary>Every run: FD / HF, check</summary>", "",
            "| library | sampler | grid | " + " | ".join(f"NFE {n}" for n in budgets) + " |",
            "|---|---|---|" + "---|" * len(budgets)]

    def run_cell(r):
        if r.get("fd") is None:
            return "error" if "error" in r else "diverged"
        return f"{r['fd']:.2f} / {r['high_freq_ratio']:.2f}, {'pass' if r['passes'] else 'FAIL'}"

    for key in dict.fromkeys((r["library"], r["sampler"], r["grid"]) for r in rows):
        cells = {r["nfe"]: r for r in rows if (r["library"], r["sampler"], r["grid"]) == key}
        out.append(f"| {key[0]} | `{key[1]}` | {key[2]} | " + " | ".join(
            run_cell(cells[n]) if n in cells else "" for n in budgets) + " |")
    return "\n".join([*out, "", "</details>", "", BUILTIN_PEERS_END])


def _replace(text: str, begin: str, end: str, section: str) -> str:
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def write_doc(data: dict) -> None:
    text = _replace(DOC.read_text(), BEGIN, END, render(data))
    text = _replace(text, PEERS_BEGIN, PEERS_END, render_peers(data.get("peers-gaussian"), data.get("peers-mixture")))
    text = _replace(text, BUILTIN_PEERS_BEGIN, BUILTIN_PEERS_END, render_builtin_peers(data.get("peers-builtin")))
    DOC.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["measure", "render"])
    ap.add_argument("--only", default="gaussian,mixture,builtin", help="comma list of gaussian, mixture, builtin")
    ap.add_argument("--mixture-samples", type=int, default=128)
    ap.add_argument("--builtin-samples", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "measure":
        log = lambda msg: print(msg, flush=True)
        meta = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
                "date": time.strftime("%Y-%m-%d")}
        for part in args.only.split(","):
            if part == "gaussian":
                result = measure_gaussian(log)
            elif part == "mixture":
                result = measure_mixture(log, args.mixture_samples)
            elif part == "builtin":
                result = measure_builtin(log, args.builtin_samples)
            else:
                raise SystemExit(f"--only: unknown part {part!r}")
            DATA.mkdir(parents=True, exist_ok=True)
            (DATA / f"samplers-{part}.json").write_text(json.dumps({**result, "meta": meta}, indent=1) + "\n")
    data = {part: json.loads((DATA / f"samplers-{part}.json").read_text())
            for part in ("gaussian", "mixture", "builtin") if (DATA / f"samplers-{part}.json").exists()}
    data.update({f"peers-{part}": json.loads((DATA / f"peers-{part}.json").read_text())
                 for part in ("gaussian", "mixture", "builtin") if (DATA / f"peers-{part}.json").exists()})
    write_doc(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
