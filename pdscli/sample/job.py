"""The typed job of a `pds sample` run, and the errors a run ends with.

A `SampleJob` is built by pdscli.sample.setup, which checks every flag once; everything below
trusts its fields. `fingerprint()` is what must not change between a run and its --resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pdscli.devices import tf32_state
from pdscli.errors import PdsError
from pdscli.noise import NOISE_VERSION
from pdscli.precondition import Preconditioner
from pdscli.sample.model import FiltersInfo
from pdscli.samplers import Steps, fitted
from pdscli.samplers.teleport import DataGaussian, TeleportChoice
from pdscli.score import ScoreModel


class RunInterrupted(PdsError):
    """Ctrl-C: what was finished is on disk; exit code 130 as a shell expects."""

    exit_code = 130

    def __init__(self, written: int, total: int):
        self.written, self.total = written, total
        super().__init__(f"interrupted: {written} of {total} images written; rerun with --resume")


class NonFiniteState(PdsError):
    """A NaN or Inf appeared in the sampler state."""


class OutOfMemory(PdsError):
    """A batch did not fit in the device's memory."""


@dataclass(frozen=True)
class SampleJob:
    """Everything a run needs, checked. The last block only goes into run.json."""

    model: ScoreModel
    sampler: str  # a name in pdscli.samplers.REGISTRY
    steps: Steps
    out: Path | None  # None: the samples stay in memory (pdscli.sample), no file is written
    num_samples: int
    batch_size: int
    seed: int
    snr: float
    precond: Preconditioner | None = None  # None: vanilla
    per_sample_step: bool = False
    resume: bool = False
    force: bool = False
    step_path: str = "off"  # how whole steps run where possible: off, cuda-graph or compile (pdscli.engines.graph_step)
    # For run.json: what the flags asked for and where things came from.
    schedule: str = "pc"
    alpha: float | None = None  # the filter strength used (None without a preconditioner)
    alpha_given: float | str | None = None  # --alpha as given: "auto" or the number
    filters: FiltersInfo | None = None
    precision: str = "fp32"
    steps_flag: int | None = None
    speed_up_flag: float | None = None
    model_load_s: float = 0.0
    nfe_budget: dict | None = None  # --nfe: {"budget", "planned", "reason"} (pdscli.samplers.recommend)
    # The PC family's parts when a config names other ones (keyword arguments of the sampler).
    sampler_options: dict = field(default_factory=dict)
    filter_off: str | None = None  # why --alpha auto switched the filters off
    warnings: tuple[str, ...] = ()  # shown on stderr when the run starts, kept in run.json
    # The output folder's FolderLock, taken before the model load (pdscli.sample.setup); the run releases it.
    lock: object | None = field(default=None, compare=False, repr=False)
    # Teleportation (pdscli.samplers.teleport): what --teleport decided, and the statistics it uses.
    teleport: TeleportChoice | None = None
    data_gaussian: DataGaussian | None = None

    @property
    def teleport_to(self) -> float | None:
        """The noise level the run teleports to from the model's sigma_max (None: no teleport)."""
        return self.teleport.sigma_t if self.teleport is not None else None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.settings.shape

    @property
    def coupled_batches(self) -> bool:
        """The reference's batch-mean corrector step makes a sample depend on its batch mates."""
        return not self.per_sample_step

    def fingerprint(self) -> dict:
        """What must not change between a run and its --resume (the count may grow; the batch
        size may change only where it cannot change the images)."""
        preconditioned = self.precond is not None
        record = {
            "model": self.model.name,
            "model_sha256": self.model.sha256,
            "settings": self.model.settings.to_dict(),
            "sampler": self.sampler,
            "seed": self.seed,
            "steps": len(self.steps.sigma),
            "sigma_max": float(self.steps.sigma_max),
            "schedule": self.schedule,
            "snr": float(self.snr),
            "per_sample_step": self.per_sample_step,
            "alpha": self.alpha if preconditioned else None,
            "filters": self.filters.sha256 if preconditioned and self.filters else None,
            "noise_version": NOISE_VERSION,
            # The arithmetic: another precision, device type or TF32 policy makes other images.
            "precision": self.precision,
            "device": self.model.device.type,
            "tf32": tf32_state(self.model.device)["policy"] if self.model.device.type == "cuda" else None,
        }
        if self.coupled_batches:
            record["batch_size"] = self.batch_size
        if self.schedule == fitted.STATS_GRID:  # the fitted levels follow the filters and the fit: hold the grid itself
            record["levels"] = [float(s) for s in self.steps.sigma]
        if self.teleport_to is not None:  # absent otherwise, so runs made before teleportation still resume
            record["teleport"] = {"from": float(self.model.settings.sigma_max), "to": self.teleport_to}
        return record

    def meta(self) -> dict:
        """The caller-side settings as run.json records them."""
        preconditioned = self.precond is not None
        return {
            "precision": self.precision,
            "alpha": self.alpha if preconditioned else None,
            "alpha_given": self.alpha_given if preconditioned or self.filter_off else None,
            "filter_off": self.filter_off,
            "pc_parts": {k: v for k, v in vars(self.sampler_options["options"]).items()}
            if "options" in self.sampler_options else None,
            "warnings": list(self.warnings),
            "filters": self.filters.to_dict() if self.filters else None,
            "schedule": self.schedule,
            "steps_requested": {"steps": self.steps_flag, "speed_up": self.speed_up_flag},
            "model_load_s": round(self.model_load_s, 4),
            "nfe_budget": self.nfe_budget,
            "teleport": self.teleport.to_dict() if self.teleport is not None else None,
        }
