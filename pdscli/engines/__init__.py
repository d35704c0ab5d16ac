"""Engines at sampling time: every one is the `score(x, sigma) -> score` callable.

- PyTorch module (`pdscli.engines.torch_engine`): eager, optional torch.compile / CUDA graph.
- ONNX Runtime (`pdscli.engines.onnx_engine`): `.onnx` files, CPU / CUDA / TensorRT providers.
- TensorRT (`pdscli.engines.tensorrt_engine`): `.plan` / `.engine` files with a manifest.

`open_engine(path, ...)` picks the implementation from the file type and returns a
`pdscli.score.ScoreModel`. Nothing here imports tensorrt unless a TensorRT engine is opened.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pdscli.errors import PdsError
from pdscli.score import ScoreModel, as_inputs

ONNX_SUFFIXES = (".onnx",)
TRT_SUFFIXES = (".plan", ".engine")
INPUT_NAMES = ("x", "sigma")
OUTPUT_NAME = "score"

__all__ = ["open_engine", "BatchAdapter", "as_inputs", "check_io_signature", "INPUT_NAMES", "OUTPUT_NAME"]


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
        from pdscli.engines.onnx_engine import open_onnx

        return open_onnx(path, device=device, backend=backend, precision=precision, overrides=overrides)
    if suffix in TRT_SUFFIXES:
        if backend not in (None, "auto", "tensorrt"):
            raise PdsError(f"--backend {backend} cannot run a TensorRT engine ({path.name}); drop --backend")
        from pdscli.engines.tensorrt_engine import open_trt

        return open_trt(path, device=device, precision=precision, overrides=overrides, cuda_graph=cuda_graph)
    known = ", ".join(ONNX_SUFFIXES + TRT_SUFFIXES)
    raise PdsError(f"cannot tell the engine type of {path.name}: expected a file ending in {known}")


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
