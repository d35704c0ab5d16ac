"""NCSN++ score networks with score_sde's checkpoint format, and their configs."""

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
