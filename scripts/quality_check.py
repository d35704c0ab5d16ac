#!/usr/bin/env python
"""Quality check of the built-in digits model: the figures and sample grids for docs/builtin-model.md.

The check itself (the classifier, the figures, the thresholds) is `pdscli.evaluate.digits`.

    python scripts/quality_check.py                      # figures: vanilla 1000, PDS 30, vanilla 30, ...
    python scripts/quality_check.py --quick              # a small, fast run: PDS and vanilla at 30 steps

Writes docs/img/builtin-*.png (sample grids) and prints a Markdown table; --json FILE saves the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdscli.evaluate.digits import (  # noqa: E402
    IMAGE_SIZE,
    digit_classifier,
    evaluate,
    failures,
    markdown_table,
    sample,
    table_row,
)
from pdscli.models import builtin  # noqa: E402
from pdscli.samplers import nfe_count  # noqa: E402
from pdscli.train.datasets import load_digits_8x8, upscale_digits  # noqa: E402


def save_grid(images: torch.Tensor, path: Path, scale: int = 3, count: int = 64) -> None:
    """The first `count` samples as one PNG, enlarged `scale` times (nearest) so 16x16 digits are visible."""
    from PIL import Image

    from pdscli.images import make_grid

    grid = make_grid(images[:count], nrow=16, padding=1)
    a = (np.clip(grid[0], 0, 1) * 255 + 0.5).astype(np.uint8)
    im = Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


# ---------------------------------------------------------------------------- main

FULL_RUNS = [("pds", 30), ("pc", 30), ("pds", 20), ("pds", 50), ("pc", 100), ("pc", 1000)]
QUICK_RUNS = [("pds", 30), ("pc", 30)]


def parse_run(text: str) -> dict:
    """`sampler:steps[:grid][+f]`, e.g. pc:1000, dpm++2m-sde:20:geometric, accel-sde:20+f."""
    filters = text.endswith("+f")
    parts = text.removesuffix("+f").split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--runs: expected sampler:steps[:grid][+f], got {text!r}")
    return {"sampler": parts[0], "steps": int(parts[1]), "grid": parts[2] if len(parts) == 3 else None,
            "filters": True if filters else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="64 samples, PDS and vanilla at 30 steps only")
    ap.add_argument("--runs", default=None, help="comma list of sampler:steps[:grid][+f], e.g. pc:1000,pds:30,dpm++2m-sde:20:geometric")
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--no-images", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = [{"sampler": s, "steps": k, "grid": None, "filters": None} for s, k in (QUICK_RUNS if args.quick else FULL_RUNS)]
    if args.runs:
        runs = [parse_run(r) for r in args.runs.split(",")]
    n = 64 if args.quick and args.num_samples == 256 else args.num_samples
    clf, clf_info = digit_classifier(args.seed)
    model = builtin.default_score_model("cpu")
    images, _ = load_digits_8x8()
    real = evaluate(clf, upscale_digits(images, IMAGE_SIZE))
    print(f"classifier: held-out accuracy {clf_info['heldout_accuracy']:.3f}, "
          f"held-out confident share {clf_info['heldout_confident_share']:.3f}; "
          f"all real digits: confident {real['confident_share']:.3f}, max class share {real['max_class_share']:.3f}",
          flush=True)
    results = {"classifier": clf_info, "real": real, "num_samples": n, "seed": args.seed,
               "alpha": args.alpha or builtin.DEFAULT_ALPHA, "runs": []}
    for run in runs:
        sampler, steps = run["sampler"], run["steps"]
        x, seconds = sample(model, n=n, seed=args.seed, alpha=args.alpha, **run)
        m = evaluate(clf, x)
        fails = failures(m)
        m.update(sampler=sampler, steps=steps, grid=run["grid"], filters=run["filters"], nfe=nfe_count(sampler, steps),
                 seconds=round(seconds, 2), passes=not fails, failures=fails)
        results["runs"].append(m)
        if not args.no_images:
            save_grid(x, args.img_dir / f"builtin-{sampler}-{steps}.png")
        print(table_row(m), flush=True)
    print()
    print(markdown_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
