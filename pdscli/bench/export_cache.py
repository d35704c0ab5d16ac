"""Where the ONNX exports and TensorRT engines the backends run live: --cache-dir (kept and
reused by the next bench of the same model), else a temporary folder removed at the end.

A cached export is named by a content key (the network's weights and architecture, the export
options, the pds, torch and onnx versions), so another model, precision or exporter never
finds it; and it is only reused when its bytes still hash to the sha256 recorded beside it
(`<file>.json`), so a truncated file or a foreign graph put under that name is exported again,
with a warning, instead of failing every run or being timed as if it were this model.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pdscli import __version__
from pdscli.bench.model import BenchModel, weights_digest
from pdscli.engines.cache import read_record, why_not_reusable
from pdscli.engines.onnx_export import OPSETS, export_metadata, export_onnx
from pdscli.errors import PdsError
from pdscli.fsutil import atomic_write_bytes, atomic_write_json

RECORD_FORMAT = "pds-bench-onnx/1"


@dataclass
class CachedOnnx:
    data: bytes
    path: Path
    key: str  # the content key; its head names the file
    reused: bool


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class ExportCache:
    """The export folder; `warnings` collects the cached files it refused to trust."""

    def __init__(self, folder: Path | None, log: Callable[[str], None] = lambda s: None):
        self._tmp = None
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pds-bench-")
            folder = Path(self._tmp.name)
        self.folder = Path(folder)
        self.log = log
        self.warnings: list[str] = []
        self._digests: dict[int, str] = {}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PdsError(f"cannot create --cache-dir {self.folder}: {e.strerror}") from None

    def export_key(self, model: BenchModel, precision: str, metadata: dict) -> str:
        """sha256 over everything the exported bytes depend on."""
        if id(model) not in self._digests:
            self._digests[id(model)] = weights_digest(model)
        payload = {"format": RECORD_FORMAT, "weights": self._digests[id(model)], "precision": precision,
                   "opset": OPSETS[precision], "metadata": metadata, "pds": __version__,
                   "torch": torch.__version__, "onnx": _version("onnx"), "onnxscript": _version("onnxscript")}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def onnx(self, model: BenchModel, precision: str) -> CachedOnnx:
        """The model's ONNX graph at `precision`: the verified cached file, else a fresh export."""
        meta = export_metadata(model.settings, precision=precision, preset=model.info.get("preset"),
                               checkpoint_sha256=model.info.get("sha256"))
        key = self.export_key(model, precision, meta)
        path = self.folder / f"{key[:32]}-{precision}.onnx"
        data = self._verified(path, key)
        if data is not None:
            return CachedOnnx(data, path, key, True)
        # The parity check is skipped here: the bench measures every backend's error itself.
        # A copy, exported on the CPU: export_onnx moves the module it is given, and the original
        # must stay where the other backends run it.
        data = export_onnx(copy.deepcopy(model.net).cpu().eval(), model.settings, precision=precision,
                           metadata=meta, check=False).data
        # The graph lands first, its record second: a graph without a record is never trusted.
        atomic_write_bytes(path, data)
        atomic_write_json(record_path(path), {"format": RECORD_FORMAT, "key": key, "size": len(data),
                                              "sha256": hashlib.sha256(data).hexdigest()})
        return CachedOnnx(data, path, key, False)

    def _verified(self, path: Path, key: str) -> bytes | None:
        """The cached bytes if they are what the record beside them says; None (with a warning
        when something was there) otherwise."""
        record = record_path(path)
        if not path.exists() and not record.exists():
            return None
        why = why_not_reusable(path, read_record(record), {"format": RECORD_FORMAT, "key": key}, sha256_field="sha256")
        if why is None:
            return path.read_bytes()
        warning = f"cached export {path} is not trusted ({why}): exported again"
        self.warnings.append(warning)
        self.log(f"warning: {warning}")
        return None

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")
