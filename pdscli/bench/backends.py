"""Backends: which can run for this model on this device (and why not), and the score callable
of each: PyTorch eager / bf16 / fp16 / compile / CUDA graph, ONNX Runtime with a chosen
execution provider, TensorRT engines, or the model's own callable (analytic, engine file)."""

from __future__ import annotations

import importlib.util
import shutil
from typing import Callable

import torch

from pdscli.bench.config import (
    ANALYTIC, BACKEND_HELP, ENGINE, NETWORK_BACKENDS, QUICK_BACKENDS, BenchConfig,
)
from pdscli.bench.export_cache import ExportCache
from pdscli.bench.model import BenchModel
from pdscli.engines.onnx_engine import OnnxScore, choose_providers, create_session
from pdscli.engines.onnx_export import at_precision, export_metadata
from pdscli.engines.tensorrt_engine import build_engine, open_trt
from pdscli.engines.torch_engine import torch_score
from pdscli.machine import library_versions, onnxruntime_providers

ORT_PROVIDERS = {"onnx-cpu": "CPUExecutionProvider", "onnx-cuda": "CUDAExecutionProvider",
                 "onnx-trt": "TensorrtExecutionProvider"}


def backend_plan(cfg: BenchConfig, model: BenchModel) -> list[tuple[str, str | None]]:
    """(name, None) for each backend to measure, (name, reason) for each one skipped.

    Default: every backend of the model's kind (the analytic model and an engine file have
    exactly one); --quick measures only the first of them and lists the rest as skipped."""
    default = cfg.backends is None
    names = cfg.backends if not default else {ANALYTIC: [ANALYTIC], ENGINE: [ENGINE]}.get(model.kind, list(NETWORK_BACKENDS))
    plan = []
    for name in names:
        reason = unavailable_reason(name, model)
        if reason is None and default:
            reason = _default_set_reason(name, model, cfg.quick)
        plan.append((name, reason))
    return plan


def _default_set_reason(name: str, model: BenchModel, quick: bool) -> str | None:
    """Why an available backend is still left out of the default set (naming it measures it)."""
    if quick and name not in QUICK_BACKENDS:
        return "not in --quick's default set (name it in --backends to measure it)"
    if name == "fp16" and model.device.type == "cpu":
        return ("fp16 is not a CPU deployment target: PyTorch runs its CPU convolutions on slow fallback "
                "kernels (name it in --backends to measure it anyway)")
    return None


def unavailable_reason(name: str, model: BenchModel) -> str | None:
    """Why backend `name` cannot run for this model on this device; None if it can."""
    if model.kind == ANALYTIC:
        return None if name == ANALYTIC else "the analytic model has no network"
    if model.kind == ENGINE:
        return None if name == ENGINE else ("an --engine file runs on its own backend; bench the network's "
                                             "--checkpoint (or --preset --random-weights) to compare backends")
    if name in (ANALYTIC, ENGINE):
        return f"`{name}` applies to {'--model gaussian' if name == ANALYTIC else '--engine'} only"
    return _device_reason(name, model.device)


def _device_reason(name: str, device: torch.device) -> str | None:
    cuda = device.type == "cuda"
    if name in ("eager", "fp16"):
        return None
    if name == "bf16":
        return None if not cuda or torch.cuda.is_bf16_supported() else "this GPU has no bfloat16 support"
    if name == "compile":
        if cuda:
            return None if importlib.util.find_spec("triton") else "torch.compile on CUDA needs triton (not installed)"
        return None if (shutil.which("cc") or shutil.which("g++") or shutil.which("clang")) else \
            "torch.compile on the CPU needs a C++ compiler (none found)"
    if name == "cuda-graph":
        return None if cuda else f"CUDA graphs need --device cuda (this run is on {device})"
    if name.startswith("onnx-"):
        return _onnx_reason(name, device)
    if name.startswith("trt-"):
        if not cuda:
            return f"TensorRT engines need --device cuda (this run is on {device})"
        return None if importlib.util.find_spec("tensorrt") else 'TensorRT is not installed (pip install "pds[trt]")'
    return f"unknown backend {name!r}"


def _onnx_reason(name: str, device: torch.device) -> str | None:
    providers = onnxruntime_providers()
    if not providers:
        return "onnxruntime is not installed"
    want_cpu = name == "onnx-cpu"
    if want_cpu != (device.type == "cpu"):
        return f"{name} runs on the {'CPU' if want_cpu else 'GPU'}; this run is on {device}"
    if ORT_PROVIDERS[name] not in providers:
        return f"this onnxruntime ({library_versions()['onnxruntime']}) has no {ORT_PROVIDERS[name]}"
    return None


class Backend:
    """One backend's score callable(s). Most serve every batch size with one callable; a CUDA
    graph is captured per batch size."""

    def __init__(self, name: str, make: Callable[[int], Callable], info: dict, per_batch: bool = False):
        self.name, self.info, self._make, self._per_batch = name, info, make, per_batch
        self._scores: dict[int, Callable] = {}

    def score_for(self, batch: int) -> Callable:
        key = batch if self._per_batch else 0
        if key not in self._scores:
            self._scores[key] = self._make(batch)
        return self._scores[key]


def make_backend(name: str, model: BenchModel, cache: ExportCache, threads: int | None, batches: list[int]) -> Backend:
    """The backend called `name` (availability was checked by `unavailable_reason`)."""
    info = {"description": BACKEND_HELP[name]}
    if name == ENGINE and str(model.info.get("engine", "")).lower().endswith(".onnx"):
        # open_engine makes its own session: --threads sets torch's threads, not this one's.
        info["intra_op_threads"] = "onnxruntime default (--threads does not reach an --engine session)"
    if name in (ANALYTIC, ENGINE, "eager"):
        return Backend(name, lambda b: model.score, {**info, "precision": "fp32" if name != ENGINE else model.info.get("precision")})
    if name in ("bf16", "fp16"):
        score = torch_score(at_precision(model.net, name), device=model.device)
        return Backend(name, lambda b: score, {**info, "precision": name})
    if name == "compile":
        score = torch_score(model.net, device=model.device, compile=True)
        return Backend(name, lambda b: score, {**info, "precision": "fp32", "note": "first call per batch size compiles"})
    if name == "cuda-graph":
        def make(b):
            return torch_score(model.net, device=model.device, cuda_graph=True, batch_size=b, shape=model.shape)
        return Backend(name, make, {**info, "precision": "fp32"}, per_batch=True)
    if name.startswith("onnx-"):
        return _onnx_backend(name, model, cache, threads, info)
    return _trt_backend(name, model, cache, batches, info)


def _onnx_backend(name, model, cache, threads, info) -> Backend:
    onnx = cache.onnx(model, "fp32")
    backend_flag = {"onnx-cpu": "cpu", "onnx-cuda": "cuda", "onnx-trt": "tensorrt"}[name]
    providers = choose_providers(model.device, backend_flag, cache_dir=cache.folder / "ort-trt-cache")
    score = OnnxScore(create_session(onnx.data, providers, threads=threads, label=f"the {name} graph"), model.device)
    return Backend(name, lambda b: score, {**info, "precision": "fp32", "provider": score.provider,
                                           "onnx_reused_from_cache": onnx.reused,
                                           "intra_op_threads": threads or "onnxruntime default"})


def _trt_backend(name, model, cache, batches, info) -> Backend:
    precision = name.split("-", 1)[1]
    onnx = cache.onnx(model, precision)
    profile = (min(batches), max(batches), max(batches))
    path = cache.folder / f"{onnx.key[:32]}-{precision}-b{profile[0]}-{profile[2]}.plan"
    meta = export_metadata(model.settings, precision=precision, preset=model.info.get("preset"),
                           checkpoint_sha256=model.info.get("sha256"))
    _, cached = build_engine(onnx.data, path, precision=precision, profile=profile, chw=model.shape, metadata=meta,
                             device=model.device, force=True)
    sm = open_trt(path, device=model.device, precision=precision)
    return Backend(name, lambda b: sm.score, {**info, "precision": precision, "profile": list(profile),
                                              "engine_reused_from_cache": cached})


def e2e_backend_name(cfg: BenchConfig, model: BenchModel, ok: list[str]) -> str | None:
    """--e2e-backend, else the baseline (eager / analytic / engine) when it ran, else the first that ran."""
    if cfg.e2e_backend is not None:
        return cfg.e2e_backend
    base = {ANALYTIC: ANALYTIC, ENGINE: ENGINE}.get(model.kind, "eager")
    return base if base in ok or not ok else ok[0]
