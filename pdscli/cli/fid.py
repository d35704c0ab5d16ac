"""`pds fid SAMPLES REFERENCE`: FID and KID of samples against real images (or their saved statistics)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pdscli.cli import options
from pdscli.cli.app import Command, app
from pdscli.cli.output import print_json, print_line
from pdscli.console import err_console

MEASURE = "Measurement"
SMALL_N = 10_000  # below this many images, the text output repeats FID's small-sample caveat

EPILOG = (
    "Examples:\n\n"
    "  pds fid samples/cifar10 ~/data/cifar10-train --save-stats stats/cifar10-train.npz   (first time)\n\n"
    "  pds fid samples/cifar10/samples.npz stats/cifar10-train.npz --device cuda --json\n\n"
    "  pds fid samples/a samples/b --features ~/weights-inception-2015-12-05-6726825d.pth   (offline)\n\n"
    "SAMPLES and REFERENCE are each a folder of images (recursive; a `pds sample` folder without its "
    "grid.png), a `pds sample` samples.npz, or a statistics .npz from --save-stats. Both sets must have "
    "one image size. Features: torch-fidelity's Inception (the TensorFlow FID network score_sde and PDS "
    "report), downloaded by torch-fidelity on first use; needs pip install \"pds\\[eval]\". "
    "FID is biased upward at small sample counts: compare only at equal counts (papers use 50,000). "
    "docs/evaluation.md says how these numbers relate to the papers'."
)


@app.command(
    "fid", cls=Command,
    help="FID and KID of generated images against real ones (a folder, a samples.npz or saved statistics).",
    epilog=EPILOG,
)
def fid(
    samples: Path = typer.Argument(..., help="Generated images: a folder, a samples.npz, or a statistics .npz.", show_default=False),
    reference: Path = typer.Argument(..., help="Real images: a folder, a samples.npz, or a statistics .npz from --save-stats.", show_default=False),
    features: Optional[Path] = typer.Option(None, "--features", help="Feature network file: a local copy of torch-fidelity's Inception weights, or a pds stand-in network (docs/evaluation.md). Default: the Inception weights torch-fidelity downloads.", rich_help_panel=options.MODEL),
    device: options.Device = "auto",
    batch_size: str = typer.Option("64", "--batch-size", metavar="N", help="Images per feature-network call.", rich_help_panel=MEASURE),
    workers: Optional[str] = typer.Option(None, "--workers", metavar="N", help="Image decoding threads (default: CPU count, at most 8).", rich_help_panel=MEASURE),
    kid_subsets: str = typer.Option("100", "--kid-subsets", metavar="N", help="KID: random subsets averaged.", rich_help_panel=MEASURE),
    kid_subset_size: Optional[str] = typer.Option(None, "--kid-subset-size", metavar="N", help="KID: images per subset (default 1000, or the smaller set's count).", rich_help_panel=MEASURE),
    save_stats: Optional[Path] = typer.Option(None, "--save-stats", help="Write REFERENCE's statistics to this .npz, for later runs.", rich_help_panel=options.OUTPUT),
    force: options.Force = False,
    quiet: options.Quiet = False,
    as_json: options.Json = False,
):
    from pdscli.api import fid as measure
    from pdscli.cli.progress import Progress

    # The flags' text goes to the library as it is: pdscli.api.fid checks it by the flags' rules.
    counts = {"batch_size": batch_size, "kid_subsets": kid_subsets, "workers": workers,
              "kid_subset_size": kid_subset_size}

    with Progress(enabled=not quiet) as bars:
        lanes = {}  # one bar per image set: the measurement calls progress(label, done, total)

        def progress(label: str, done: int, total: int) -> None:
            if label not in lanes:
                lanes[label] = bars.counter(label)
            lanes[label](done, total)

        result = measure(samples, reference, features=features, device=device, save_stats=save_stats, force=force,
                         progress=progress, **counts)
    if as_json:
        print_json(result)
        return
    k = result["kid"]
    print_line(
        f"FID {result['fid']:.3f}  KID {k['mean']:.5f} ± {k['std']:.5f} ({k['subsets']} subsets of {k['subset_size']})\n"
        f"samples {result['samples_count']} ({result['samples']['path']}), reference {result['reference_count']} "
        f"({result['reference']['path']}), features {result['features']}"
    )
    if min(result["samples_count"], result["reference_count"]) < SMALL_N:
        err_console.print(f"note: {result['note']}", highlight=False, soft_wrap=True, markup=False)
    if save_stats is not None:
        err_console.print(f"wrote {save_stats}", highlight=False, markup=False)
