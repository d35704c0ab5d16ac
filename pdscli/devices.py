"""Device and precision flags shared by the commands."""

from __future__ import annotations

import torch

from pdscli.errors import PdsError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:i` -> a usable torch.device, or a one-line error."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise PdsError(f"--device {spec}: no CUDA GPU is visible to torch (torch {torch.__version__})")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PdsError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible")
        return dev
    raise PdsError(f"--device must be auto, cpu, cuda or cuda:N, not {spec!r}")


def resolve_precision(name: str) -> torch.dtype:
    try:
        return PRECISIONS[name.lower()]
    except KeyError:
        raise PdsError(f"--precision must be one of {', '.join(PRECISIONS)}, not {name!r}") from None


def set_threads(n: int) -> None:
    """--threads: torch's intra-op CPU threads."""
    if n < 1:
        raise PdsError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
