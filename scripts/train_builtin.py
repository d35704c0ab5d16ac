#!/usr/bin/env python
"""The exact recipe of the built-in model (pdscli/data/digits*): train, export the EMA weights, make the filters.

    python scripts/train_builtin.py                 # everything: about 40 min on one busy CPU core
    python scripts/train_builtin.py --skip-train    # re-export and re-make the filters from an existing run
    python scripts/train_builtin.py --filters-only  # only re-make the filters file (step 3)

Steps:
1. `pds train digits --config pdscli/data/digits-config.json --seed 0 --threads 1 --out RUN`
   (the config is the whole recipe: 16x16 grey NCSN++, nf 16, sigma_max 8.6, 1000 scales, ...).
2. The EMA weights of RUN/checkpoint.pth -> pdscli/data/digits.pth (a plain state_dict, float32).
3. The PDS filters of the same data: the 1,797 digits, upscaled to 16x16 exactly as for
   training, written as 8-bit PNGs to a temporary folder and measured with
   `pdscli.precondition.filters.folder_statistics` (what `pds filters DIR --size 16 --channels 1` runs)
   -> pdscli/data/digits-filters.npz.
Training is deterministic given the seed (every step's draws are seeded from (seed, step)) on
the same torch build and thread count; see docs/builtin-model.md for the time it took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DATA = REPO / "pdscli" / "data"
CONFIG = DATA / "digits-config.json"


def train(run: Path, force: bool) -> float:
    cmd = [sys.executable, "-m", "pdscli", "train", "digits", "--config", str(CONFIG), "--seed", "0",
           "--threads", "1", "--out", str(run)]
    if force:
        cmd.append("--force")
    elif (run / "checkpoint.pth").exists():
        cmd.append("--resume")  # an interrupted recipe continues exactly where it stopped
    print("$", " ".join(cmd[1:]).replace("-m pdscli", "pds"), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def check_recipe(run: Path) -> None:
    """The run's config.json must be the shipped config: the weights belong to that recipe."""
    used = json.loads((run / "config.json").read_text())
    shipped = json.loads(CONFIG.read_text())
    if used != shipped:
        raise SystemExit(f"{run}/config.json differs from {CONFIG}: the run is not the shipped recipe")


def export(run: Path) -> dict:
    from pdscli.train.loop import export_ema_weights

    info = export_ema_weights(run / "checkpoint.pth", CONFIG, DATA / "digits.pth")
    (DATA / "digits.pth").chmod(0o644)
    return info


def make_filters() -> str:
    from PIL import Image

    from pdscli.train.datasets import load_digits
    from pdscli.precondition.filters import folder_statistics
    from pdscli.images import to_uint8

    images = load_digits(size=16)  # exactly the training images
    with tempfile.TemporaryDirectory(prefix="pds-digits-") as tmp:
        for i, x in enumerate(images):
            Image.fromarray(to_uint8(x)[..., 0]).save(Path(tmp) / f"{i:04d}.png")
        filters = folder_statistics(tmp, size=16, channels=1)
    filters.source = "sklearn digits, bilinear 8x8 -> 16x16, 8-bit PNGs (scripts/train_builtin.py)"
    path = filters.save(DATA / "digits-filters.npz")
    path.chmod(0o644)
    return filters.describe()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "builtin-digits", help="training output folder")
    ap.add_argument("--skip-train", action="store_true", help="use the run as it is")
    ap.add_argument("--force", action="store_true", help="start the training over")
    ap.add_argument("--filters-only", action="store_true", help="only re-make the filters file (step 3)")
    args = ap.parse_args(argv)
    if args.filters_only:
        print(f"filters: {make_filters()} -> {DATA / 'digits-filters.npz'}")
        return 0

    if not args.skip_train:
        seconds = train(args.run, args.force)
        print(f"training: {seconds / 60:.1f} min wall (this invocation)")
    check_recipe(args.run)
    summary = json.loads((args.run / "train.json").read_text())
    info = export(args.run)
    print(f"weights: {DATA / 'digits.pth'} ({info['bytes'] / 1e6:.2f} MB, {info['num_params']:,} parameters, "
          f"EMA at step {info['step']}; training took {summary['seconds'] / 60:.1f} min in all)")
    print(f"filters: {make_filters()} -> {DATA / 'digits-filters.npz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
