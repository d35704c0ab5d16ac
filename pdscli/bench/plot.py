"""--plot: time per image and quality against NFE (one line per sampler, the end-to-end runs as
stars) and per-call time per image against batch size (one line per backend). matplotlib is an
optional dependency (`pds[plot]`): imported only here, only when a plot is asked for."""

from __future__ import annotations

import io
from pathlib import Path

from pdscli.errors import PdsError
from pdscli.fsutil import atomic_write_bytes

PLOT_FORMATS = (".png", ".pdf", ".svg")


def require_matplotlib():
    """matplotlib's Figure, or the one line that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PdsError('--plot needs matplotlib: pip install "pds[plot]" (or pip install matplotlib)') from None
    return Figure


def write_plot(report: dict, path: Path) -> None:
    """Draw the report and write it to `path` atomically (a full disk leaves no half a file)."""
    figure = require_matplotlib()(figsize=(15, 4.5), layout="constrained")
    series = _sampler_series(report)
    axes = figure.subplots(1, 3)
    _plot_lines(axes[0], series, "per_image_s", "seconds per image (end to end)")
    _plot_lines(axes[1], series, "quality", report["quality"]["metric"] or "quality (none measured)")
    _plot_backends(axes[2], report)
    gpu = report["machine"].get("gpu")
    figure.suptitle(f"pds bench: {report['model']['name']} on {report['settings']['device']} "
                    f"({gpu['name'] if gpu else report['machine']['cpu']})")
    buf = io.BytesIO()
    figure.savefig(buf, format=Path(path).suffix.lstrip(".").lower(), dpi=120)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise PdsError(f"cannot write the plot {path}: {e.strerror or e}") from None


def _sampler_series(report: dict) -> dict[str, list[tuple[int, float | None, float | None]]]:
    """label -> [(NFE, seconds per image, quality)] from the samplers and end-to-end parts."""
    series: dict[str, list] = {}
    for r in report.get("samplers", {}).get("rows", []):
        if r.get("status") == "ok":
            series.setdefault(r["sampler"], []).append((r["nfe"], r["per_image_s"], (r["quality"] or {}).get("value")))
    for r in report.get("end_to_end", {}).get("runs", []):
        series.setdefault(f"end to end: {r['label']}", []).append(
            (r["nfe"], r["per_image_s"], (r["quality"] or {}).get("value")))
    return {k: sorted(v) for k, v in series.items()}


def _plot_lines(ax, series: dict, what: str, ylabel: str) -> None:
    index = 1 if what == "per_image_s" else 2
    for label, points in series.items():
        pts = [(p[0], p[index]) for p in points if p[index] is not None and p[index] > 0]
        if pts:
            # The end-to-end runs are single points (full steps, 1/k of them): stars, no line.
            single = label.startswith("end to end")
            ax.plot(*zip(*pts), marker="*" if single else "o", markersize=12 if single else 6,
                    linestyle="none" if single else "-", label=label)
    ax.set_xlabel("NFE per image")
    ax.set_ylabel(ylabel)
    _log_axes(ax)


def _plot_backends(ax, report: dict) -> None:
    for e in report.get("backends", []):
        if e["status"] == "ok":
            ax.plot([r["batch"] for r in e["batches"]], [r["per_image_s"] for r in e["batches"]], marker="o", label=e["name"])
    ax.set_xlabel("batch size")
    ax.set_ylabel("seconds per image per network call")
    _log_axes(ax)


def _log_axes(ax) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter  # optional dependency, see above

    if ax.lines:
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Plain numbers (20, 50, 100) rather than 2x10^1 on the NFE and batch axes.
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({float(x) for line in ax.lines for x in line.get_xdata()}))
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, which="both", alpha=0.3)
