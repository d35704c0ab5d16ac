"""Models: NCSN++ (layers, FIR resampling, configs and presets), checkpoint loading, the built-in model.

Imports the base layer (errors, settings, score, fsutil), and `precondition` for the built-in model's filters."""

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
