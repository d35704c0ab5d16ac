"""Engines at sampling time: every one is the `score(x, sigma) -> score` callable.

- PyTorch module (`engines.torch_engine`): eager, optional torch.compile / CUDA graph.
- ONNX Runtime (`engines.onnx_engine`): `.onnx` files, CPU / CUDA / TensorRT providers.
- TensorRT (`engines.tensorrt_engine`): `.plan` / `.engine` files with a manifest (`engines.cache`).
- Making the files: `engines.export` (the whole `pds export` flow: ONNX, TensorRT, diffusers), `engines.onnx_export`
  (the graph) and `engines.parity` (the check against PyTorch).

`open_engine(path, ...)` picks the implementation from the file type and returns a
`pdscli.score.ScoreModel`. Imports the base layer and `pdscli.models`; tensorrt is imported only
when a TensorRT engine is built or opened.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pdscli.engines.contract import (
    INPUT_NAMES,
    ONNX_SUFFIXES,
    OUTPUT_NAME,
    TRT_SUFFIXES,
    BatchAdapter,
    check_io_signature,
    check_precision,
)
from pdscli.engines.onnx_engine import open_onnx
from pdscli.engines.tensorrt_engine import open_trt
from pdscli.errors import PdsError
from pdscli.score import ScoreModel, as_inputs

__all__ = [
    "INPUT_NAMES",
    "ONNX_SUFFIXES",
    "OUTPUT_NAME",
    "TRT_SUFFIXES",
    "BatchAdapter",
    "as_inputs",
    "check_io_signature",
    "check_precision",
    "open_engine",
]


def open_engine(
    path,
    *,
    device="cpu",
    backend: str | None = None,
    precision: str | None = None,
    overrides: dict | None = None,
    cuda_graph: bool = False,
) -> ScoreModel:
    """Open an exported engine file as a ScoreModel.

    `overrides` are sampling settings from flags (sigma_min, ...; None = unset): they win over
    the file's metadata and fill in what it lacks. `precision`, when given, must match the
    precision the file was exported at (an engine cannot change it). `cuda_graph` captures
    TensorRT engine calls in a CUDA graph (the first call's batch size is the graph's).
    """
    path = Path(path)
    if not path.exists():
        raise PdsError(f"engine file {path} does not exist")
    if path.is_dir():
        raise PdsError(f"engine path {path} is a folder, not a file")
    suffix = path.suffix.lower()
    device = torch.device(device)
    if suffix in ONNX_SUFFIXES:
        return open_onnx(path, device=device, backend=backend, precision=precision, overrides=overrides)
    if suffix in TRT_SUFFIXES:
        if backend not in (None, "auto", "tensorrt"):
            raise PdsError(f"--engine-backend {backend} cannot run a TensorRT engine ({path.name}); drop --engine-backend")
        return open_trt(path, device=device, precision=precision, overrides=overrides, cuda_graph=cuda_graph)
    known = ", ".join(ONNX_SUFFIXES + TRT_SUFFIXES)
    raise PdsError(f"cannot tell the engine type of {path.name}: expected a file ending in {known}")
