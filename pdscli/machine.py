"""What a measurement ran on: CPU, GPU, driver, CUDA and library versions.

A benchmark figure means nothing without its machine, so `pds bench` puts `describe_machine()`
into every report. Nothing here imports an optional library (TensorRT, matplotlib): versions
come from the installed distributions' metadata, which is cheap and never fails.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from pdscli import __version__

# Distribution names to report, with the alternatives that install the same module.
LIBRARIES = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "onnx": ("onnx",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"),
    "numpy": ("numpy",),
    "pds": ("pds",),
    "matplotlib": ("matplotlib",),
}


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else whatever the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: a shared, busy machine makes every CPU figure slower."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def library_versions() -> dict[str, str | None]:
    """Installed versions (None = not installed); `pds` falls back to the imported package."""
    versions: dict[str, str | None] = {}
    for name, dists in LIBRARIES.items():
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    if versions["pds"] is None:
        versions["pds"] = __version__
    versions["torch"] = torch.__version__  # the imported one (a local build may lack metadata)
    return versions


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except ImportError:
        return []


def nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi (torch does not expose it); None without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.stdout.strip().splitlines()
    return first[0].strip() if out.returncode == 0 and first else None


def gpu_info(device: torch.device | None = None) -> dict | None:
    """Name, compute capability, memory, driver, CUDA and cuDNN of the GPU used (None on a CPU run)."""
    if not torch.cuda.is_available():
        return None
    index = device.index if device is not None and device.type == "cuda" and device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "index": index,
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "driver": nvidia_driver(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "count": torch.cuda.device_count(),
    }


def describe_machine(device: torch.device | None = None) -> dict:
    """Everything a reader needs to place a figure: CPU, cores, threads, load, GPU, versions."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "memory_gib": memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gpu": gpu_info(device),
        "libraries": library_versions(),
        "onnxruntime_providers": onnxruntime_providers(),
    }


def machine_summary(machine: dict) -> str:
    """One line: CPU (cores, threads, load), GPU (driver, CUDA) and the main library versions."""
    libs = machine.get("libraries", {})
    load = machine.get("load_average")
    load_text = f", load {load[0]:g}" if load else ""
    cpu = (f"{machine['cpu']} ({machine['usable_cores']} cores usable, {machine['torch_threads']} torch "
           f"thread{'s' if machine['torch_threads'] != 1 else ''}{load_text})")
    gpu = machine.get("gpu")
    gpu_text = "no GPU"
    if gpu:
        gpu_text = f"{gpu['name']} (driver {gpu['driver'] or '?'}, CUDA {gpu['cuda']})"
    versions = ", ".join(f"{k} {v}" for k, v in libs.items() if k in ("torch", "onnxruntime", "tensorrt", "pds") and v)
    return f"{cpu}; {gpu_text}; {versions}"
