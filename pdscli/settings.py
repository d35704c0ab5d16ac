"""Sampling settings of a VE score model: what a sampler needs to know about the model.

Besides the noise range, steps, snr and image shape, a config's sampling section names the
reference PC loop's parts (score_sde's `sampling.predictor`, `corrector`, `n_steps_each`,
`noise_removal`, `probability_flow`); the `pc` / `pds` samplers run what it names. The defaults
are every official config's values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pdscli.errors import PdsError

FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
# What the PC loop can run (score_sde's registered names, lower case as the reference reads them).
PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral_sampling", "none")
CORRECTORS = ("langevin", "ald", "none")


@dataclass(frozen=True)
class SamplingSettings:
    sigma_min: float
    sigma_max: float
    num_scales: int
    snr: float
    image_size: int
    num_channels: int
    predictor: str = "reverse_diffusion"
    corrector: str = "langevin"
    n_steps_each: int = 1
    noise_removal: bool = True
    probability_flow: bool = False

    def replace(self, **overrides) -> "SamplingSettings":
        """A copy with the given fields replaced; None values are ignored (unset CLI flags)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown sampling settings: {sorted(unknown)}")
        return dataclasses.replace(self, **given).validated()

    def validated(self) -> "SamplingSettings":
        for name in ("sigma_min", "sigma_max", "snr"):
            value = getattr(self, name)
            # The sampler runs in float32: a larger (or NaN) value would only show up as NaN images.
            if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                raise PdsError(f"{name} must be a number within float32's range (up to {FLOAT32_MAX:.3g}), got {value!r}")
        if not (0 < self.sigma_min < self.sigma_max):
            raise PdsError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}")
        if self.num_scales < 1:
            raise PdsError(f"num_scales must be at least 1, got {self.num_scales}")
        if self.snr <= 0:
            raise PdsError(f"snr must be positive, got {self.snr}")
        if self.image_size < 1 or self.num_channels < 1:
            raise PdsError(f"bad image shape: size {self.image_size}, channels {self.num_channels}")
        self._check_pc_parts()
        return self

    def _check_pc_parts(self) -> None:
        """The sampling section's PC fields: one line naming the field a value is wrong in."""
        for name, allowed in (("predictor", PREDICTORS), ("corrector", CORRECTORS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise PdsError(f"sampling.{name} is {value!r}; pds runs {', '.join(allowed)}")
        n = self.n_steps_each
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PdsError(f"sampling.n_steps_each is {n!r}; it must be a positive integer (corrector steps per step)")
        for name in ("noise_removal", "probability_flow"):
            if not isinstance(getattr(self, name), bool):
                raise PdsError(f"sampling.{name} is {getattr(self, name)!r}; it must be true or false")
        if self.predictor == "none" and self.corrector == "none":
            raise PdsError("sampling.predictor and sampling.corrector are both 'none': nothing would move the prior")
        if self.probability_flow and self.predictor == "ancestral_sampling":
            raise PdsError("sampling.probability_flow is true, which the ancestral_sampling predictor does not support "
                           "(nor does the reference)")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_channels, self.image_size, self.image_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # Names of the ONNX metadata properties that carry these settings.
    METADATA_KEYS = ("sigma_min", "sigma_max", "num_scales", "snr", "image_size", "num_channels")

    def to_metadata(self) -> dict[str, str]:
        return {f"pds.{k}": repr(getattr(self, k)) for k in self.METADATA_KEYS}

    @classmethod
    def from_metadata(cls, props: dict[str, str], **overrides) -> "SamplingSettings":
        """Settings from `pds.*` properties; flags in `overrides` win; missing ones are an error."""
        values = {}
        for field in (f for f in dataclasses.fields(cls) if f.name in cls.METADATA_KEYS):
            given = overrides.get(field.name)
            if given is not None:
                values[field.name] = given
                continue
            raw = props.get(f"pds.{field.name}")
            if raw is None:
                continue
            caster = int if field.type in (int, "int") else float
            try:
                values[field.name] = caster(float(raw)) if caster is int else caster(raw)
            except ValueError:
                raise PdsError(f"metadata property pds.{field.name}={raw!r} is not a number") from None
        missing = [k for k in cls.METADATA_KEYS if k not in values]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise PdsError(f"the model carries no {', '.join('pds.' + m for m in missing)} metadata; pass {flags}")
        return cls(**values).validated()
