"""The score contract as engine files carry it: input / output names, file types, the signature
check every engine file passes when opened, the batch range an engine is built for, and the
batch adapter for engines built for fixed batch sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pdscli.errors import PdsError

ONNX_SUFFIXES = (".onnx",)
TRT_SUFFIXES = (".plan", ".engine")
INPUT_NAMES = ("x", "sigma")
OUTPUT_NAME = "score"


def check_precision(path, built: str | None, asked: str | None) -> None:
    """An engine's precision is baked in at export; asking for another one is a user error."""
    if asked and built and asked.lower() != built.lower():
        raise PdsError(
            f"{Path(path).name} was exported at {built}, not {asked}: "
            f"export one with `pds export --precision {asked}` or drop --precision"
        )


def check_io_signature(path, inputs, outputs) -> tuple[tuple[int, int, int], int | None]:
    """Check the score(x, sigma) contract on an engine's inputs and outputs.

    `inputs` / `outputs`: (name, dtype, shape) with dtype "float32" for float32 and shape
    entries int or None/str for dynamic. Returns ((C, H, W), fixed batch or None).
    """
    name = Path(path).name
    want = "inputs x [B,C,H,W] float32 and sigma [B] float32, output score [B,C,H,W] float32"
    by_name = {n: (t, s) for n, t, s in inputs}
    if set(by_name) != set(INPUT_NAMES) or len(outputs) != 1 or outputs[0][0] != OUTPUT_NAME:
        got = ", ".join(n for n, _, _ in inputs) + " -> " + ", ".join(n for n, _, _ in outputs)
        raise PdsError(f"{name} does not follow the score contract ({want}); it has {got}")
    (x_t, x_s), (s_t, s_s), (o_t, o_s) = by_name["x"], by_name["sigma"], outputs[0][1:]
    if any(t != "float32" for t in (x_t, s_t, o_t)):
        raise PdsError(f"{name}: x, sigma and score must be float32, got {x_t}, {s_t}, {o_t} ({want})")
    if len(x_s) != 4 or len(s_s) != 1 or len(o_s) != 4:
        raise PdsError(f"{name}: wrong ranks x{list(x_s)}, sigma{list(s_s)}, score{list(o_s)} ({want})")
    chw = x_s[1:]
    if not all(isinstance(d, int) for d in chw) or list(o_s[1:]) != list(chw):
        raise PdsError(f"{name}: x and score need the same fixed [C,H,W], got x{list(x_s)} and score{list(o_s)}")
    if chw[1] != chw[2]:
        raise PdsError(f"{name}: images must be square, got {chw[1]}x{chw[2]}")
    batch = x_s[0] if isinstance(x_s[0], int) else None
    return tuple(chw), batch


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine is built for (TensorRT optimisation profile)."""

    min: int
    opt: int
    max: int

    @classmethod
    def from_flags(cls, batch_size=None, min_batch=None, opt_batch=None, max_batch=None) -> BatchProfile:
        """--batch-size B (fixed) or --min/--opt/--max-batch; default a fixed batch of 1..16."""
        ranged = (min_batch, opt_batch, max_batch)
        if batch_size is not None:
            if any(v is not None for v in ranged):
                raise PdsError("--batch-size excludes --min-batch/--opt-batch/--max-batch")
            profile = cls(batch_size, batch_size, batch_size)
        else:
            lo = min_batch if min_batch is not None else 1
            hi = max_batch if max_batch is not None else max(lo, opt_batch or 0, 16)
            profile = cls(lo, opt_batch if opt_batch is not None else hi, hi)
        if not 1 <= profile.min <= profile.opt <= profile.max:
            raise PdsError(f"need 1 <= min-batch <= opt-batch <= max-batch, got {profile.min}, {profile.opt}, {profile.max}")
        return profile

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)

    def parity_batches(self) -> tuple[int, ...]:
        """Two batch sizes inside the profile (one when it is fixed)."""
        return tuple(sorted({self.min, min(self.max, max(self.min, 4))}))


class BatchAdapter:
    """Run a score function only at batch sizes it was built for.

    Batches smaller than `min_batch` are padded (with copies of their last row, a valid input:
    zeros would put sigma = 0 through log and a division); larger than `max_batch` are split.
    The padded rows' results are dropped. Every row is computed independently by the network,
    so padding never changes the real rows.
    """

    def __init__(self, fn, min_batch: int, max_batch: int):
        if not 1 <= min_batch <= max_batch:
            raise ValueError(f"bad batch range {min_batch}..{max_batch}")
        self.fn, self.min_batch, self.max_batch = fn, min_batch, max_batch

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.min_batch <= b <= self.max_batch:
            return self.fn(x, sigma)
        outs = []
        for start in range(0, b, self.max_batch):
            xs, ss = x[start : start + self.max_batch], sigma[start : start + self.max_batch]
            n = xs.shape[0]
            if n < self.min_batch:
                pad = self.min_batch - n
                xs = torch.cat([xs, xs[-1:].expand(pad, *xs.shape[1:])])
                ss = torch.cat([ss, ss[-1:].expand(pad)])
            outs.append(self.fn(xs, ss)[:n])
        return torch.cat(outs)

    def __getattr__(self, name):
        # Let callers reach the wrapped engine's attributes (e.g. `.provider`).
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)
