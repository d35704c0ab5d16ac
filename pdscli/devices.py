"""Device and precision flags shared by the commands."""

from __future__ import annotations

import os

import torch

from pdscli import flag_rules
from pdscli.errors import PdsError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:i` -> a usable torch.device, or a one-line error."""
    spec = flag_rules.device(spec or "auto")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    # cuda or cuda:N (the rule admits nothing else)
    if not torch.cuda.is_available():
        raise PdsError(f"--device {spec}: no CUDA GPU is visible to torch (torch {torch.__version__})")
    dev = torch.device(spec)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PdsError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev


def resolve_precision(name: str) -> torch.dtype:
    return PRECISIONS[flag_rules.one_of("--precision", name, PRECISIONS)]


def set_threads(n: int) -> None:
    """--threads: torch's intra-op CPU threads."""
    torch.set_num_threads(flag_rules.whole_number("--threads", n, 1))


# -- TF32 ------------------------------------------------------------------------------------
# On Ampere and later GPUs torch may run float32 matmuls and convolutions on TF32 tensor cores
# (inputs rounded to a 10-bit mantissa, several times the float32 rate). Torch's own default
# (convolutions yes, matmuls no) silently changes what "fp32" computes, so pds sets a policy
# explicitly and records it.

TF32_POLICIES = ("off", "on", "torch")
DEFAULT_TF32 = "off"  # fp32 means IEEE float32 unless asked otherwise


def set_tf32(policy: str = DEFAULT_TF32) -> dict:
    """Apply a TF32 policy to torch's CUDA float32 matmuls and cuDNN convolutions; returns `tf32_state()`.

    off: IEEE float32 for both; on: TF32 for both; torch: leave torch's settings as they are.
    The flags are process-wide (torch has no per-model switch).
    """
    policy = flag_rules.one_of("--tf32", policy, TF32_POLICIES)
    if policy != "torch":
        on = policy == "on"
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    return tf32_state()


def tf32_state(device: torch.device | str | None = None) -> dict:
    """The TF32 flags in force, named by the policy they amount to (`mixed` if none matches).

    `applies`: whether they can change anything here (a CUDA device; None = not known)."""
    matmul, conv = bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)
    policy = "on" if matmul and conv else "off" if not (matmul or conv) else "torch" if conv else "mixed"
    applies = None if device is None else torch.device(device).type == "cuda"
    return {"policy": policy, "matmul": matmul, "conv": conv, "applies": applies}


def memory_bytes(device: torch.device) -> int:
    """The device's total memory in bytes (a GPU's, or the machine's RAM for the CPU); 0 if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown: the callers' out-of-memory messages are the fallback

