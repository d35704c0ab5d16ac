"""Models: NCSN++ (layers, FIR resampling, configs and presets), checkpoint loading, the built-in model.

Imports the base layer only (errors, settings, score, fsutil)."""

from pdscli.models.config import (
    PRESET_NAMES,
    get_preset,
    load_config,
    settings_from_config,
    validate_config,
)
from pdscli.models.ncsnpp import NCSNpp, build_model

__all__ = [
    "NCSNpp",
    "PRESET_NAMES",
    "build_model",
    "get_preset",
    "load_config",
    "settings_from_config",
    "validate_config",
]
