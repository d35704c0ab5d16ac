"""Parity of an exported engine with the PyTorch model it came from.

The reference is the fp32 PyTorch network (TF32 off); the candidate an ONNX Runtime session or a
TensorRT engine. Inputs are what a sampler feeds: x = data in [0, 1] + sigma * noise at sigmas
log-spaced over [sigma_min, sigma_max], at two batch sizes (the batch dimension is dynamic). The
measure is per sample: max|candidate - reference| / max|reference|.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pdscli.engines.onnx_engine import OnnxScore, choose_providers, create_session
from pdscli.engines.tensorrt_engine import open_trt
from pdscli.errors import PdsError
from pdscli.settings import SamplingSettings

# Per-sample relative error: max|onnx - torch| / max|torch| over the sample's pixels, against
# the fp32 PyTorch model. fp32 is a reimplementation check; the reduced-precision bounds are
# only meant to catch a broken graph (overflow, a dropped cast), not to grade accuracy.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}


@dataclass
class ParityReport:
    rows: list[tuple[int, float, float, float]] = field(default_factory=list)  # batch, sigma, abs, rel
    tolerance: float = 0.0
    checked_on: str = ""

    @property
    def max_abs(self) -> float:
        return max((r[2] for r in self.rows), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((r[3] for r in self.rows), default=0.0)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and self.max_rel <= self.tolerance


def parity_sigmas(settings: SamplingSettings, count: int) -> list[float]:
    """`count` sigmas spaced evenly in log sigma, both ends included."""
    if count == 1:
        return [settings.sigma_max]
    lo, hi = math.log(settings.sigma_min), math.log(settings.sigma_max)
    return [math.exp(lo + (hi - lo) * i / (count - 1)) for i in range(count)]


def parity_plan(levels: list[float], batches) -> list[list[float]]:
    """The sigmas of each parity batch: the largest batch size covers every level (in as many
    batches as it takes), each smaller size runs once, from the high-sigma end."""
    *small, big = sorted(set(batches))
    plan = [[levels[::-1][i % len(levels)] for i in range(b)] for b in small]
    for start in range(0, len(levels), big):
        plan.append([levels[(start + i) % len(levels)] for i in range(big)])
    return plan


def parity_cases(settings: SamplingSettings, *, sigmas: int = 4, batches=(1, 4), seed: int = 0, device="cpu"):
    """(x, sigma) batches as a sampler sees them: x = data in [0, 1] + sigma * noise, at sigmas
    log-spaced over [sigma_min, sigma_max] and at each of `batches` (the dynamic batch dimension)."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for row in parity_plan(parity_sigmas(settings, sigmas), batches):
        sig = torch.tensor(row, dtype=torch.float32)
        x0 = torch.rand(len(row), *settings.shape, generator=g)
        x = x0 + sig[:, None, None, None] * torch.randn(len(row), *settings.shape, generator=g)
        cases.append((x.to(device), sig.to(device)))
    return cases


@contextlib.contextmanager
def exact_fp32():
    """TF32 off while the reference runs: it would be the larger error on Ampere and later."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def measure_parity(reference: Callable, candidate: Callable, cases, *, tolerance: float, checked_on: str) -> ParityReport:
    """Per-sample max abs and relative error of `candidate` against `reference` on `cases`."""
    report = ParityReport(tolerance=tolerance, checked_on=checked_on)
    with torch.no_grad(), exact_fp32():
        for x, sigma in cases:
            ref = reference(x, sigma).float()
            got = candidate(x, sigma).float().to(ref.device)
            for b in range(x.shape[0]):
                err = (got[b] - ref[b]).abs().max().item()
                if not math.isfinite(err):
                    err = math.inf
                scale = ref[b].abs().max().item()
                rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
                report.rows.append((x.shape[0], float(sigma[b]), err, rel))
    return report


def format_parity(report: ParityReport) -> list[str]:
    lines = [f"parity vs PyTorch fp32 ({report.checked_on}):  batch  sigma  max-abs  rel"]
    for b, s, a, r in report.rows:
        lines.append(f"  {b:5d}  {s:10.4g}  {a:9.3g}  {r:9.3g}")
    verdict = "ok" if report.ok else "FAILED"
    lines.append(f"max abs {report.max_abs:.3g}, max rel {report.max_rel:.3g} (tolerance {report.tolerance:g}): {verdict}")
    return lines


def check_parity_or_fail(report: ParityReport, what: str) -> None:
    if not report.ok:
        worst = max(report.rows, key=lambda r: r[3])
        raise PdsError(
            f"{what} does not match the PyTorch model: relative error {worst[3]:.3g} at sigma {worst[1]:.4g} "
            f"(batch {worst[0]}) exceeds {report.tolerance:g}; nothing was written"
        )


def onnx_parity(net, data: bytes, settings, *, precision, device, batches, sigmas, tolerance, log) -> ParityReport | None:
    """Run the serialized graph in ONNX Runtime against `net`; None if ORT cannot run it here."""
    device = torch.device(device)
    try:
        session = create_session(data, choose_providers(device, None), label="the exported graph")
    except PdsError as e:
        if precision == "bf16":
            # ONNX Runtime's CPU provider has no bf16 Conv kernel (its CUDA one: not checked here).
            log(f"warning: bf16 graph not parity-checked: {e} (TensorRT engines are checked after the build)")
            return None
        raise
    candidate = OnnxScore(session, device)
    cases = parity_cases(settings, sigmas=sigmas, batches=batches, device=device)
    return measure_parity(net, candidate, cases, tolerance=tolerance, checked_on=f"ONNX Runtime {candidate.provider}")


def trt_parity(net: nn.Module, settings: SamplingSettings, engine_path: Path, *, device, batches, sigmas,
               tolerance, log) -> ParityReport:
    """Load a built TensorRT engine and compare it with the fp32 PyTorch model on the GPU."""
    model = open_trt(engine_path, device=device)
    cases = parity_cases(settings, sigmas=sigmas, batches=batches, device=device)
    report = measure_parity(net.to(device), model.score, cases, tolerance=tolerance, checked_on="TensorRT")
    for line in format_parity(report):
        log(line)
    return report
