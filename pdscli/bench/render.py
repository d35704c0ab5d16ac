"""The report as people read it: one table definition per part (columns and formatted cells,
built from the report dict), rendered as Rich tables for the terminal and as Markdown for
docs/benchmarks.md (scripts/bench_docs.py), so both always show the same figures."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table as RichTable
from rich.text import Text

from pdscli.bench.mfu import mfu_note
from pdscli.machine import machine_summary


# --- number formats ------------------------------------------------------------------------


def ms(seconds) -> str:
    if seconds is None:
        return "—"
    v = seconds * 1e3
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def num(v, fmt: str = ".3g") -> str:
    return "—" if v is None else format(v, fmt)


def pct(fraction) -> str:
    if fraction is None:
        return "—"
    v = fraction * 100
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def pct_or_dash(fraction) -> str:
    """A share as a percentage with its sign, or a dash."""
    return "—" if fraction is None else f"{pct(fraction)} %"


def rate(v) -> str:
    return "—" if v is None else (f"{v:,.0f}" if v >= 1000 else f"{v:.4g}")


def quality_text(q: dict | None) -> str:
    """A quality figure with its floor; NaN when the samples had no finite figure."""
    if not q:
        return "—"
    if q.get("value") is None:
        return "NaN"
    floor = f" (floor {q['floor']:.2g})" if q.get("floor") is not None else ""
    return f"{q['value']:.3g}{floor}"


def fid_text(f: dict | None) -> str:
    """FID / KID ± its spread over subsets, or why there is none."""
    if not f:
        return "—"
    if f.get("fid") is None:
        return f.get("reason") or "—"
    k = f["kid"]
    return f"{f['fid']:.3g} / {k['mean']:.2g}±{k['std']:.1g}"


def fid_notes(report: dict, count: int) -> list[str]:
    """What the FID column is, and its caveat; nothing without --fid-ref."""
    info = report.get("fid")
    if not info:
        return []
    return [f"FID / KID ± std over KID's subsets: {count} samples per run against {info['path']} ({info['count']} "
            f"images, {info['kind']}), features {info['features']}. FID is biased upward at this count "
            "(papers use 50,000 samples): compare within this table only, and trust KID's spread."]


# --- the tables ------------------------------------------------------------------------------


@dataclass
class Table:
    """One part of the report as a table. `title` heads it in the terminal; `caption` is the
    sentence before it in Markdown and `notes` the lines after it."""

    title: str
    caption: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def nfe_table(report: dict) -> Table | None:
    ok = [e for e in report.get("backends", []) if e["status"] == "ok"]
    if not ok:
        return None
    base = next((k for k in ok[0]["batches"][0] if k.startswith("speedup_vs_")), None)
    # MFU exists only against a listed peak (a GPU of pdscli.bench.mfu's table): no column of dashes elsewhere.
    with_mfu = any(r.get("mfu") is not None for e in ok for r in e["batches"])
    rows = []
    for e in ok:
        for r in e["batches"]:
            rows.append([e["name"], e.get("precision") or "?", str(r["batch"]), ms(r["median_s"]), ms(r["iqr_s"]),
                         f"{ms(r['min_s'])}–{ms(r['max_s'])}", rate(r["images_per_s"]),
                         num(r.get(base), ".2f") + "×" if base and r.get(base) else "—",
                         num(r["achieved_flops_per_s"] / 1e9 if r.get("achieved_flops_per_s") else None)]
                        + ([pct_or_dash(r.get("mfu"))] if with_mfu else [])
                        + [num(r.get("max_rel_err_vs_eager_fp32"), ".1e")])
    s, flops = report["settings"], report["flops"]
    timed = f"{s['repeats']} timed calls after {s['warmup']} warm-up"
    caption = (f"Per network call, {timed}"
               + (f"; model FLOPs {flops['per_image'] / 1e9:.3g} GFLOP per image per call ({flops['method']})"
                  if flops.get("per_image") else "") + ":")
    columns = ["backend", "precision", "batch", "median ms", "IQR ms", "min–max ms", "images/s",
               f"vs {base.removeprefix('speedup_vs_') if base else '—'}", "GFLOP/s"] + (["MFU"] if with_mfu else []) \
        + ["rel. error vs eager fp32"]
    notes = _nfe_notes(ok) + ([mfu_note(ok)] if with_mfu else [])
    return Table(f"Network call (NFE) latency, {timed}", caption, columns, rows, notes)


def _nfe_notes(ok: list[dict]) -> list[str]:
    setup = [f"{e['name']} {e['setup_s']:.1f} s" for e in ok if e.get("setup_s", 0) > 0.5]
    # A first call much slower than the steady state holds compilation or lazy set-up: say so.
    first = [f"{e['name']} {max(r['first_call_s'] for r in e['batches']):.3g} s" for e in ok
             if any((r.get("first_call_s") or 0) > 2 * max(x["median_s"] for x in e["batches"]) + 0.1 for r in e["batches"])]
    notes = []
    if setup:
        notes.append(f"Set-up before the first call (export, model copies): {', '.join(setup)}.")
    if first:
        notes.append(f"Slowest first (warm-up, untimed) call: {', '.join(first)}.")
    return notes


def overhead_table(report: dict) -> Table | None:
    part = report.get("pds_overhead", {})
    if part.get("status") != "ok":
        return None
    rows = [[str(r["batch"]), ms(r["noise"]["median_s"]), ms(r["grad"]["median_s"]), ms(r["per_nfe_s"]),
             pct(r.get("fraction_of_e2e_backend_nfe")),
             (pct(r["fraction_of_fastest_nfe"]) + f" ({r['fastest_backend']})") if r.get("fastest_backend") else "—"]
            for r in part["batches"]]
    return Table("PDS overhead per NFE (one M z + one M Mᵀ g)",
                 "PDS overhead per network call (one M z and one M Mᵀ g; a PC step makes two of each):",
                 ["batch", "M z ms", "M Mᵀ g ms", "per NFE ms", "% of one NFE (e2e backend)", "% of the fastest NFE"],
                 rows)


def e2e_table(report: dict) -> Table | None:
    part = report.get("end_to_end", {})
    if part.get("status") != "ok":
        return None
    rows, with_fid = [], bool(report.get("fid"))
    for r in part["runs"]:
        alpha = f", α {r['alpha']:.3g}" if r.get("alpha") is not None else ""
        rows.append([f"{r['label']} ({r['sampler']}{alpha})", str(r["steps"]), str(r["nfe"]),
                     f"{r['timing']['median_s']:.4g}", f"{r['timing']['iqr_s']:.2g}", str(r["timing"]["count"]),
                     rate(r["images_per_s"]), quality_text(r["quality"])] + ([fid_text(r.get("fid"))] if with_fid else []))
    speedup = f"PDS speedup {part['speedup']:.2f}×"
    caption = (f"End to end on `{part['backend']}`, batch {part['batch']}, {part['samples']} images per run (the two "
               f"runs interleaved batch by batch): **{speedup}** in wall time for an NFE ratio of "
               f"{part['nfe_ratio']:.2f}×. Quality: {report['quality']['metric'] or 'none (no reference)'}.")
    return Table(f"End to end on {part['backend']}, batch {part['batch']}: {speedup} (NFE ratio {part['nfe_ratio']:.2f}×)",
                 caption, ["run", "steps", "NFE", "median s per batch", "IQR s", "batches timed", "images/s", "quality"]
                 + (["FID / KID"] if with_fid else []), rows, fid_notes(report, part["samples"]))


def samplers_table(report: dict) -> Table | None:
    part = report.get("samplers", {})
    if part.get("status") != "ok":
        return None
    rows, with_fid = [], bool(report.get("fid"))
    for r in part["rows"]:
        if r["status"] != "ok":
            rows.append([r["sampler"], str(r["nfe_budget"]), str(r["steps"]), "—", "—", "—", f"skipped: {r['reason']}"]
                        + (["—"] if with_fid else []))
            continue
        alpha = f" (α {r['alpha']:.3g})" if r.get("alpha") is not None else ""
        rows.append([r["sampler"] + alpha, str(r["nfe_budget"]), str(r["steps"]), str(r["nfe"]),
                     f"{r['per_image_s'] * 1e3:.3g}", rate(r["images_per_s"]), quality_text(r["quality"])]
                    + ([fid_text(r.get("fid"))] if with_fid else []))
    return Table(f"Samplers at equal NFE budgets, batch {part['batch']}",
                 f"Samplers at equal NFE budgets, batch {part['batch']}, {part['samples']} images each:",
                 ["sampler", "NFE budget", "steps", "NFE", "ms per image", "images/s", "quality"]
                 + (["FID / KID"] if with_fid else []), rows, fid_notes(report, part["samples"]))


PART_TABLES = (nfe_table, overhead_table, e2e_table, samplers_table)


def not_measured(report: dict) -> list[dict]:
    """The backends skipped or failed, each with its reason."""
    return [e for e in report.get("backends", []) if e["status"] != "ok"]


# --- the terminal ----------------------------------------------------------------------------


def to_rich(report: dict) -> list:
    """The report as Rich renderables: a header, one table per part that ran, the backends not
    measured, the warnings."""
    m, s = report["model"], report["settings"]
    head = Text()
    head.append(f"pds bench: {m['name']} ({m['kind']}, {'x'.join(map(str, m['shape']))})", style="bold")
    head.append(f" on {s['device']}\nmachine: {machine_summary(report['machine'])}")
    per_image = report["flops"].get("per_image")
    if per_image:
        head.append(f"\nmodel FLOPs per image per call: {per_image / 1e9:.3g} GFLOP ({report['flops']['method']})")
    q = report["quality"]
    if q["metric"]:
        against = f", against {q['reference']}" if q.get("reference") else ""
        head.append(f"\nquality: {q['metric']}{against} = {q['description']}")
    f = report.get("fid")
    if f:
        head.append(f"\nFID / KID ± std (over KID's subsets): against {f['path']} ({f['count']} images, {f['kind']}), "
                    f"features {f['features']}; FID is biased upward at small sample counts: compare within this report only")
    out = [head]
    for build in PART_TABLES:
        t = build(report)
        if t is not None:
            out.append(_rich_table(t.title, t.columns, t.rows))
        rest = not_measured(report)
        if build is nfe_table and rest:  # the backends not measured, right under those measured
            out.append(_rich_table("Backends not measured", ["backend", "status", "reason"],
                                   [[e["name"], e["status"], e["reason"]] for e in rest], numbers=False))
    out += [Text(f"warning: {w}", style="yellow") for w in report.get("warnings", [])]
    return out


def _rich_table(title: str, columns: list[str], rows: list[list[str]], numbers: bool = True) -> RichTable:
    """Cells are plain Text: reasons quote `pip install "pds[trt]"`, which Rich would otherwise
    read as markup."""
    table = RichTable(title=title, title_justify="left", title_style="bold")
    for i, c in enumerate(columns):
        table.add_column(c, justify="right" if numbers and i > 0 else "left")
    for row in rows:
        table.add_row(*(Text(str(c)) for c in row))
    return table


# --- Markdown --------------------------------------------------------------------------------


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_provenance(report: dict, command: str, full_report: str) -> str:
    """Where the figures come from: the command, the machine and its load, the versions, the run
    time, and the file with every raw timing."""
    m = report["machine"]
    load = m.get("load_average") or ["?"]
    end = m.get("load_average_end") or ["?"]
    libs = m["libraries"]
    return (f"Command: `{command}`  \n"
            f"Measured {report['created']} on {m['cpu']} ({m['usable_cores']} cores usable, "
            f"{report['settings']['torch_threads']} torch thread), load average {load[0]} at the start and {end[0]} at the end "
            f"(the machine was shared); torch {libs['torch']}, onnxruntime {libs['onnxruntime']}, pds {libs['pds']}; "
            f"the run took {report['elapsed_s']:.0f} s. The full report (every raw timing): `{full_report}`.")


def flops_line(report: dict) -> str:
    """The FLOP count of a run that timed nothing (a timed run's latency table states it)."""
    per_call = report["flops"].get("per_call")
    if not per_call or any(e["status"] == "ok" for e in report["backends"]):
        return ""
    counts = ", ".join(f"batch {b}: {f / 1e9:,.1f} GFLOP" for b, f in per_call.items())
    return (f"Model FLOPs per network call of `{report['model']['name']}` ({report['model'].get('num_params', 0):,} "
            f"parameters, {'x'.join(map(str, report['model']['shape']))}): {counts} ({report['flops']['method']}; "
            f"{report['flops']['counts']}). Nothing was timed in this run.")


def to_markdown(report: dict, *, command: str, full_report: str) -> str:
    """The report as the Markdown of a docs/benchmarks.md block: provenance, the tables, the
    backends not measured, the warnings."""
    parts = [markdown_provenance(report, command, full_report), flops_line(report)]
    for build in PART_TABLES:
        t = build(report)
        if t is not None:
            notes = ("\n\n" + " ".join(t.notes)) if t.notes else ""
            parts.append(f"{t.caption}\n\n{markdown_table(t.columns, t.rows)}{notes}")
    skipped = [f"`{e['name']}` ({e['reason']})" for e in not_measured(report)]
    if skipped:
        parts.append("Not measured: " + "; ".join(skipped) + ".")
    if report.get("warnings"):
        parts.append("Warnings the run printed: " + " ".join(f"*{w}.*" for w in report["warnings"]))
    return "\n\n".join(p for p in parts if p)
