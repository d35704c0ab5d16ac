"""The built-in digits model's quality check: a classifier trained on the real digits judges samples.

A classifier trained on the real 8x8 digits (scikit-learn: an RBF SVM with calibrated
probabilities) labels the model's samples, downscaled back to 8x8. A good sampler makes samples that
  - the classifier labels confidently (max class probability >= CONFIDENCE) in most cases;
  - spread over the ten classes: no class takes much more than a tenth (binomial 3-sigma bound
    for the sample count) and the label entropy is near log(10);
  - carry no more than twice the real digits' energy in the outer half of the spectrum: samples
    left with noise (too few steps) are often still "recognised" after the 8x8 average-pooling,
    but they are visibly noisy, and this figure says so.

The classifier is trained on the real digits after the same 8 -> 16 -> 8 round trip the samples
go through (bilinear up, area average down), so it sees the resampling blur it will be shown.
scikit-learn is needed (the `train` extra); scripts/quality_check.py writes the figures of
docs/builtin-model.md with it.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch

from pdscli.evaluate.fid import frechet_distance, statistics_of
from pdscli.models import builtin
from pdscli.noise import SampleNoise
from pdscli.samplers import fitted, sampler_info, sampler_kwargs
from pdscli.samplers.grids import make_steps
from pdscli.train.datasets import downscale_to_8x8, load_digits, load_digits_8x8, upscale_digits

CONFIDENCE = 0.8  # a sample counts as a recognisable digit when the classifier is this sure
MIN_CONFIDENT_SHARE = 0.7  # real digits (held out): about 0.98; uniform noise: about 0.02
MIN_ENTROPY = 0.9  # label entropy / log(10); 1 = all classes equally often
MAX_HIGH_FREQ = 2.0  # high-frequency energy / the real digits'; leftover noise drives it up (uniform noise: ~30)
IMAGE_SIZE = 16


# -- the classifier ----------------------------------------------------------------------------


def _roundtrip(images_8x8: np.ndarray) -> np.ndarray:
    """8x8 -> the model's 16x16 -> 8x8, flattened: the view the classifier is trained and tested on."""
    return downscale_to_8x8(upscale_digits(images_8x8, IMAGE_SIZE)).reshape(len(images_8x8), -1).numpy()


def digit_classifier(seed: int = 0, heldout: bool = True):
    """(fitted classifier, info): an RBF SVM with calibrated probabilities on all 1,797 real digits.

    With `heldout`, info also holds its accuracy and confident share on a held-out quarter, so
    the thresholds above can be read against real data (about 0.99 and 0.98).
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    images, labels = load_digits_8x8()
    x = _roundtrip(images)

    def make():
        # Isotonic calibration, 5 folds, averaged: real digits come out ~99% confident and uniform
        # noise ~2%. (Sigmoid calibration of the one-vs-rest SVM was under-confident on real
        # digits and over-confident on noise: a check built on it would prove little.)
        return CalibratedClassifierCV(SVC(C=3.0, gamma="scale"), method="isotonic", cv=5, ensemble=True)

    info = {}
    if heldout:
        xtr, xte, ytr, yte = train_test_split(x, labels, test_size=0.25, random_state=seed, stratify=labels)
        proba = make().fit(xtr, ytr).predict_proba(xte)
        info = {
            "heldout_accuracy": float((proba.argmax(1) == yte).mean()),
            "heldout_confident_share": float((proba.max(1) >= CONFIDENCE).mean()),
        }
    return make().fit(x, labels), info


# -- the figures -------------------------------------------------------------------------------


def high_freq_energy(images: torch.Tensor) -> float:
    """Mean |fft2|^2 outside the central half of the (centred) spectrum, per image: noise lives there."""
    spec = torch.fft.fftshift(torch.fft.fft2(images.double()), dim=(-2, -1)).abs() ** 2
    n = images.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(n) - n // 2, torch.arange(n) - n // 2, indexing="ij")
    outer = torch.maximum(yy.abs(), xx.abs()) >= n // 4
    return float(spec[..., outer].sum(-1).mean())


_REAL_HF: list[float] = []


def real_high_freq_energy() -> float:
    if not _REAL_HF:
        images, _ = load_digits_8x8()
        _REAL_HF.append(high_freq_energy(upscale_digits(images, IMAGE_SIZE)))
    return _REAL_HF[0]


def evaluate(clf, images: torch.Tensor) -> dict:
    """The figures of a set of samples [N, 1, 16, 16] in [0, 1]."""
    x = downscale_to_8x8(images.clamp(0, 1)).reshape(len(images), -1).numpy()
    proba = clf.predict_proba(x)
    labels = proba.argmax(1)
    counts = np.bincount(labels, minlength=10)
    shares = counts / counts.sum()
    nonzero = shares[shares > 0]
    return {
        "n": len(images),
        "confident_share": float((proba.max(1) >= CONFIDENCE).mean()),
        "mean_confidence": float(proba.max(1).mean()),
        "max_class_share": float(shares.max()),
        "label_entropy": float(-(nonzero * np.log(nonzero)).sum() / math.log(10)),
        "class_counts": counts.tolist(),
        "high_freq_ratio": high_freq_energy(images.clamp(0, 1)) / real_high_freq_energy(),
    }


def max_share_bound(n: int) -> float:
    """The largest class share a uniform label distribution reaches by chance: 0.1 + 3 binomial sigmas."""
    return 0.1 + 3 * math.sqrt(0.1 * 0.9 / n)


def failures(m: dict) -> list[str]:
    """Why a set of samples fails the check (empty: it passes)."""
    out = []
    if m["confident_share"] < MIN_CONFIDENT_SHARE:
        out.append(f"only {m['confident_share']:.0%} confidently classified (need {MIN_CONFIDENT_SHARE:.0%})")
    if m["max_class_share"] > max_share_bound(m["n"]):
        out.append(f"one class takes {m['max_class_share']:.0%} (at most {max_share_bound(m['n']):.0%})")
    if m["label_entropy"] < MIN_ENTROPY:
        out.append(f"label entropy {m['label_entropy']:.2f} (need {MIN_ENTROPY})")
    if m["high_freq_ratio"] > MAX_HIGH_FREQ:
        out.append(f"{m['high_freq_ratio']:.1f}x the real digits' high-frequency energy (at most {MAX_HIGH_FREQ:g}x)")
    return out


# -- the Fréchet distance in the classifier's features -------------------------------------------

FLOOR_SPLITS = 5  # real subsets drawn for the sampling floor


def features(clf, images: torch.Tensor) -> np.ndarray:
    """The classifier's features of images [N, 1, 16, 16] in [0, 1]: the 45 pairwise (one-vs-one)
    decision values of its SVMs, averaged over its calibration folds.

    The pairwise values, not the 10 per-class scores: sklearn's one-vs-rest scores are vote counts
    plus a small confidence term, nearly discrete, and a Gaussian fits them badly."""
    x = downscale_to_8x8(images.clamp(0, 1)).reshape(len(images), -1).numpy()
    out = []
    for calibrated in clf.calibrated_classifiers_:
        svm = copy.copy(calibrated.estimator)  # the fitted SVM, asked for its pairwise values
        svm.decision_function_shape = "ovo"
        out.append(svm.decision_function(x))
    return np.mean(out, axis=0)


def real_images() -> torch.Tensor:
    """All 1,797 real digits at the model's size, as the check sees them."""
    return load_digits(size=IMAGE_SIZE)


def fd(clf, images: torch.Tensor, reference: np.ndarray | None = None) -> float:
    """The Fréchet distance between the features of `images` and of `reference` (features; None:
    all the real digits)."""
    ref = features(clf, real_images()) if reference is None else reference
    a, b = (statistics_of(f, feature="digits-svm", image_size=images.shape[-2:]) for f in (features(clf, images), ref))
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fd_floor(clf, n: int, splits: int = FLOOR_SPLITS, seed: int = 0) -> dict:
    """The FD that `n` real digits reach against all of them (mean and std over `splits` random
    subsets drawn without replacement): what a perfect sampler's n samples would score."""
    real = real_images()
    ref = features(clf, real)
    rng = np.random.default_rng(seed)
    values = [fd(clf, real[torch.as_tensor(rng.choice(len(real), n, replace=False))], ref) for _ in range(splits)]
    return {"n": n, "mean": float(np.mean(values)), "std": float(np.std(values)), "splits": splits}


# -- sampling ----------------------------------------------------------------------------------


def sample(model, *, sampler: str, steps: int, n: int, seed: int = 0, alpha: float | None = None,
           batch_size: int = 128, grid: str | None = None, filters: bool | None = None) -> tuple[torch.Tensor, float]:
    """n samples [n, 1, 16, 16] clipped to [0, 1] with any registered `sampler` at `steps` steps on
    `grid` (default: the sampler's own; `stats`: fitted to the model's filters), and the seconds taken. filters: use the built-in model's
    PDS filters (default: for pds only)."""
    info = sampler_info(sampler)
    use_filters = sampler == "pds" if filters is None else filters
    precond = builtin.default_preconditioner(model.device, alpha or builtin.DEFAULT_ALPHA) if use_filters else None
    grid = grid or info.grid
    if grid == fitted.STATS_GRID:  # fitted to the built-in filters' statistics, as --schedule stats does
        points = fitted.grid_for_filters(sampler, builtin.default_filters(), model.settings, steps)
    else:
        points = make_steps(grid, model.settings, steps)
    out, t0 = [], time.perf_counter()
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        noise = SampleNoise(seed, idx, model.settings.shape, model.device)
        kw = sampler_kwargs(sampler, precond=precond, snr=model.settings.snr)
        out.append(info.fn(model.score, noise, points, **kw).clamp(0, 1).cpu())
    return torch.cat(out), time.perf_counter() - t0


# -- the table ---------------------------------------------------------------------------------


def run_label(sampler: str, grid: str | None = None, filters: bool | None = None) -> str:
    """How a run is named in the tables: PDS, vanilla PC, or the sampler's registry name (grid, filters noted)."""
    name = {"pds": "PDS", "pc": "vanilla PC"}.get(sampler, sampler)
    if grid:
        name += f" ({grid})"
    if filters and sampler != "pds":
        name += " + filters"
    return name


def table_row(m: dict) -> str:
    name = run_label(m["sampler"], m.get("grid"), m.get("filters"))
    check = "pass" if m["passes"] else "FAIL: " + "; ".join(m["failures"])
    return (f"| {name} | {m['steps']} | {m['nfe']} | {m['confident_share']:.1%} | {m['mean_confidence']:.3f} | "
            f"{m['max_class_share']:.1%} | {m['label_entropy']:.3f} | {m['high_freq_ratio']:.2f} | "
            f"{m['seconds']:.1f} s | {check} |")


def markdown_table(results: dict) -> str:
    """The figures of a run (what --json saved) as a Markdown table, the real digits last."""
    real = results["real"]
    head = ("| sampler | steps | NFE | confident (p >= 0.8) | mean confidence | max class share | label entropy "
            "| high-freq energy / data | time | check |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = [table_row(m) for m in results["runs"]]
    rows.append(f"| (real digits) | | | {real['confident_share']:.1%} | | {real['max_class_share']:.1%} | "
                f"{real['label_entropy']:.3f} | {real['high_freq_ratio']:.2f} | | |")
    return "\n".join([head, *rows])
