"""The built-in model: a small NCSN++ trained on scikit-learn's handwritten digits, shipped in the package.

It exists so that `pds sample` (and `make demo`) run out of the box, offline, on a CPU, with a
real trained network rather than only the analytic Gaussian. 16x16 grey images, VE SDE with
sigma_max 8.6 (the data's largest pairwise distance), 1000 noise scales, snr 0.16.
How it was made: scripts/train_builtin.py and docs/builtin-model.md.

    default_score_model(device)  -> ScoreModel "builtin:digits" (EMA weights, float32)
    default_filters()            -> the PDS filters of the same data (pdscli.precondition.Filters)
    DEFAULT_STEPS                -> the steps `pds sample` runs it at when no step flag is given
    DEFAULT_ALPHA                -> the filter strength of default_preconditioner (docs/builtin-model.md)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pdscli.errors import PdsError
from pdscli.models.checkpoint import open_checkpoint
from pdscli.precondition import Preconditioner, load_filters
from pdscli.precondition.alpha import ALPHA_REFERENCE

NAME = "builtin:digits"
DATA_DIR = Path(__file__).parents[1] / "data"
WEIGHTS = DATA_DIR / "digits.pth"
CONFIG = DATA_DIR / "digits-config.json"
FILTERS = DATA_DIR / "digits-filters.npz"

# PDS at this many steps passes the same quality check as vanilla PC at all 1000 steps
# (docs/builtin-model.md, "Quality check"); the filter strength was chosen for this step count.
DEFAULT_STEPS = 30
DEFAULT_ALPHA = ALPHA_REFERENCE


def _require(path: Path) -> Path:
    if not path.is_file():
        raise PdsError(f"the built-in model's file {path.name} is missing from this installation ({path.parent})")
    return path


def default_score_model(device="cpu"):
    """The built-in digits model as a ScoreModel named "builtin:digits"."""
    model = open_checkpoint(_require(WEIGHTS), _require(CONFIG), device=device)
    info = {**model.info, "builtin": "digits", "doc": "docs/builtin-model.md"}
    return dataclasses.replace(model, name=NAME, info=info)


def default_filters():
    """The PDS filters (frequency + space statistics) of the 16x16 digits the model was trained on."""
    return load_filters(_require(FILTERS))


def default_preconditioner(device="cpu", alpha: float = DEFAULT_ALPHA):
    return Preconditioner.from_filters(default_filters(), alpha, device)
