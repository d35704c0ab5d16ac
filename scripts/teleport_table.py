#!/usr/bin/env python
"""Measure teleportation (pdscli.samplers.teleport) per sampler, budget and target level on the exact models.

For each sampler and budget, samples from sigma_max (no teleport) and teleported to
sigma_t = ratio * spread for each ratio, where spread = sqrt(sum of the data's spectrum) is the
data's RMS distance from its mean (`pdscli.samplers.teleport.spread`). The Gaussian is judged by
its exact spectral KL, the mixture by mode TV and weight-averaged per-mode KL
(pdscli.evaluate.measures), the built-in network (--models builtin) by scripts/quality_check.py's
digit check. The statistics are each model's own (the Gaussian's spectrum, the
mixture's moment-matched one, the built-in model's shipped filters file). Same noise for every cell (seed 0, samples 0..N-1).

    python scripts/teleport_table.py [--samples 512] [--out docs/data/teleport.json]

`pdscli.samplers.teleport.AUTO_RATIOS` is read off this file: per sampler and budget, the ratio
that is best on both models (the mixture's KL without a worse mode TV), where it beats no teleport.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality_check, for the built-in model

from pdscli.evaluate.analytic import GaussianImageModel  # noqa: E402
from pdscli.evaluate.measures import mixture_quality  # noqa: E402
from pdscli.evaluate.mixture import MixtureImageModel  # noqa: E402
from pdscli.fsutil import atomic_write_text  # noqa: E402
from pdscli.noise import SampleNoise  # noqa: E402
from pdscli.samplers import REGISTRY  # noqa: E402
from pdscli.samplers.grids import geometric  # noqa: E402
from pdscli.samplers.plan import steps_for_nfe  # noqa: E402
from pdscli.samplers.teleport import DataGaussian, TeleportNoise, spread  # noqa: E402

RATIOS = (1.0, 0.6, 0.4, 0.25, 0.15, 0.1)
BUDGETS = (5, 8, 10, 15, 20)
SAMPLERS = ("dpm++2m", "dpm++3m", "heun", "dpm++2m-sde", "euler-a")


def models() -> dict:
    g, m = GaussianImageModel(), MixtureImageModel()
    mm = m.moment_matched()
    return {
        "gaussian": (g, DataGaussian(torch.full(g.shape, g.mean), g.lam)),
        "mixture": (m, DataGaussian(torch.full(m.shape, mm.mean), mm.lam)),
    }


def builtin_model():
    """The built-in digits network with the moments of its shipped filters file."""
    from pdscli.models import builtin

    filters = builtin.default_filters()
    return builtin.default_score_model("cpu"), DataGaussian(filters.mean, filters.spectrum)


_CHECK = {}


def digit_quality(out: torch.Tensor) -> dict:
    """scripts/quality_check.py's figures (docs/builtin-model.md) and whether the check passes."""
    import quality_check

    if "clf" not in _CHECK:
        _CHECK["clf"], _ = quality_check.digit_classifier(heldout=False)
    m = quality_check.evaluate(_CHECK["clf"], out.clamp(0, 1))
    return {"confident": m["confident_share"], "hf": m["high_freq_ratio"], "max_share": m["max_class_share"],
            "passes": not quality_check.failures(m)}


def quality(name: str, model, out: torch.Tensor) -> dict:
    if name == "builtin":
        return digit_quality(out)
    if name == "gaussian":
        return {"kl": model.spectral_kl(out)}
    q = mixture_quality(model, out)
    return {"kl": q["mean_mode_kl"], "tv": q["mode_tv"]}


def run(model, gaussian, sampler: str, nfe: int, sigma_t: float | None, samples: int) -> torch.Tensor:
    info = REGISTRY[sampler]
    st = model.settings
    n = steps_for_nfe(sampler, nfe)
    noise = SampleNoise(0, range(samples), st.shape)
    if sigma_t is None:
        return info.fn(model.score, noise, geometric(st, n))
    start = TeleportNoise(noise, gaussian, st.sigma_max, sigma_t, stochastic=not info.deterministic)
    return info.fn(model.score, start, geometric(st.replace(sigma_max=sigma_t), n))


def user_check(model_name: str, budgets, *, samples: int, own: int, work: Path) -> list[dict]:
    """As a user would: PNGs of the model's own samples (`pds sample --nfe 50`), `pds filters` on them,
    then `pds sample --nfe N --masks FILE` for each budget; the samples judged against the exact model."""
    import subprocess

    import numpy as np

    from pdscli.evaluate.measures import mixture_quality

    def pds(*args) -> dict:
        done = subprocess.run([sys.executable, "-m", "pdscli", *map(str, args), "--json"], check=True,
                              capture_output=True, text=True)
        return json.loads(done.stdout)

    pds("sample", "--model", model_name, "--nfe", 50, "-n", own, "-b", 256, "--out", work / "own", "--force")
    pds("filters", work / "own", "--size", 32, "--out", work / "own.npz", "--force")
    model = GaussianImageModel() if model_name == "gaussian" else MixtureImageModel()
    rows = []
    for nfe in budgets:
        for teleport in ("auto", "off"):
            out = work / f"n{nfe}-{teleport}"
            record = pds("sample", "--model", model_name, "--nfe", nfe, "--masks", work / "own.npz", "--teleport", teleport,
                         "-n", samples, "-b", 512, "--out", out, "--force")
            with np.load(out / "samples.npz") as z:
                x = torch.from_numpy(z["samples"])
            if model_name == "gaussian":
                q = {"kl": model.spectral_kl(x)}
            else:
                m = mixture_quality(model, x)
                q = {"kl": m["mean_mode_kl"], "tv": m["mode_tv"]}
            rows.append({"model": model_name, "nfe": nfe, "teleport": teleport, "sampler": record["sampler"],
                         "sigma_t": (record.get("teleport") or {}).get("sigma_t"), **q})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def cell(row: dict) -> str:
    if "passes" in row:
        return f"{row['hf']:.2f} / {row['confident']:.0%}{'' if row['passes'] else ' ✗'}"
    if "tv" in row:
        return f"{row['kl']:.1e} / {row['tv']:.2f}"
    return f"{row['kl']:.1e}"


WHAT = {
    "gaussian": "spectral KL (sampled)",
    "mixture": "per-mode KL / mode TV",
    "builtin": "high-frequency energy (data = 1) / confidently classified; ✗: fails the digit check",
}


def user_markdown(record: dict) -> list[str]:
    """--user-check's table: each budget with --teleport auto and off."""
    rows = record["rows"]
    model = rows[0]["model"]
    out = [f"**{model}, as a user would** ({WHAT[model].replace(' (sampled)', '')}): `{record['command']}`", "",
           "| NFE | --teleport | sampler | sigma_t | " + ("KL / TV" if "tv" in rows[0] else "KL") + " |", "|---|---|---|---|---|"]
    for r in rows:
        sigma = f"{r['sigma_t']:.3g}" if r["sigma_t"] is not None else "-"
        out.append(f"| {r['nfe']} | {r['teleport']} | {r['sampler']} | {sigma} | {cell(r)} |")
    return out + [""]


def markdown(record: dict) -> str:
    """The measured tables as markdown, one per model: rows sampler x budget, columns the target level."""
    out = []
    for user in record.get("user", []):
        out += user_markdown(user)
    for run in record["runs"]:
        rows = run["rows"]
        model = rows[0]["model"]
        ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None}, reverse=True)
        head = ["sampler", "NFE", "from sigma_max", *(f"{r:g} x spread" for r in ratios)]
        out += [f"**{model}** ({WHAT[model]}; {run['samples']} samples): `{run['command']}`", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        cells: dict = {}
        for r in rows:
            cells.setdefault((r["sampler"], r["nfe"]), {})[r["ratio"]] = cell(r)
        for (sampler, nfe), by_ratio in cells.items():
            line = [sampler, str(nfe), by_ratio.get(None, ""), *(by_ratio.get(r, "") for r in ratios)]
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


BEGIN, END = "<!-- teleport_table.py: begin -->", "<!-- teleport_table.py: end -->"


def write_block(doc: Path, tables: str) -> None:
    """Replace what stands between the markers in `doc` (generated; edit the JSON or this script, not the block)."""
    text = doc.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(doc, f"{head}{BEGIN}\n{tables}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--models", default="gaussian,mixture", help="gaussian, mixture, builtin")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="print the tables of a JSON this script wrote, and stop")
    ap.add_argument("--write-doc", type=Path, default=None, metavar="MD",
                    help="with --markdown: put the tables between MD's teleport_table.py markers instead of printing them")
    ap.add_argument("--user-check", default=None, metavar="MODEL",
                    help="gaussian or mixture: statistics from PNGs of the model's own samples, then pds sample --nfe")
    ap.add_argument("--work", type=Path, default=Path("teleport-check"), help="--user-check's working folder")
    args = ap.parse_args(argv)
    if args.user_check:
        rows = user_check(args.user_check, list(map(int, args.budgets.split(","))), samples=args.samples, own=1024,
                          work=args.work)
        if args.out:
            atomic_write_text(args.out, json.dumps({"command": "python scripts/teleport_table.py "
                                                    + " ".join(argv or sys.argv[1:]), "rows": rows}, indent=1) + "\n")
        return 0
    if args.markdown:
        tables = markdown(json.loads(args.markdown.read_text()))
        if args.write_doc is None:
            print(tables)
        else:
            write_block(args.write_doc, tables)
        return 0
    torch.set_num_threads(1)
    rows = []
    chosen = args.models.split(",")
    table = {k: v for k, v in models().items() if k in chosen}
    if "builtin" in chosen:
        table["builtin"] = builtin_model()
    for model_name, (model, gaussian) in table.items():
        scale = spread(gaussian)
        for sampler in args.samplers.split(","):
            for nfe in map(int, args.budgets.split(",")):
                for ratio in (None, *map(float, args.ratios.split(","))):
                    sigma_t = None if ratio is None else ratio * scale
                    t0 = time.perf_counter()
                    q = quality(model_name, model, run(model, gaussian, sampler, nfe, sigma_t, args.samples))
                    row = {"model": model_name, "sampler": sampler, "nfe": nfe, "ratio": ratio,
                           "sigma_t": sigma_t, **q}
                    rows.append(row)
                    print(json.dumps(row), f"{time.perf_counter() - t0:.1f}s", flush=True)
    if args.out:
        record = {"runs": [{"command": "python scripts/teleport_table.py " + " ".join(argv or sys.argv[1:]),
                            "samples": args.samples, "rows": rows}]}
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
