"""What an engine file says without starting a runtime: its `pds.*` metadata and image shape,
from the ONNX header (the weights stay on disk) or a TensorRT engine's manifest."""

from __future__ import annotations

from pathlib import Path

import onnx

from pdscli.engines.cache import read_manifest
from pdscli.errors import PdsError


def onnx_properties(path: Path) -> dict[str, str]:
    """The metadata properties of an ONNX file."""
    return onnx_header(path)[0]


def engine_shape(path) -> tuple[int, int]:
    """(image_size, num_channels) of an exported engine, read from its metadata without starting a runtime."""
    path = Path(path)
    if not path.is_file():
        raise PdsError(f"engine file {path} does not exist")
    if path.suffix.lower() == ".onnx":
        props, dims = onnx_header(path)
    else:
        props, dims = read_manifest(path).get("metadata", {}), None
    try:
        size = int(float(props["pds.image_size"])) if "pds.image_size" in props else int(dims[2])
        channels = int(float(props["pds.num_channels"])) if "pds.num_channels" in props else int(dims[1])
    except (TypeError, ValueError, IndexError):
        raise PdsError(f"{path.name} does not say its image size; pass --size (and --channels)") from None
    return size, channels


def onnx_header(path: Path):
    """The `pds.*` metadata and input x's dims of an ONNX file (weights stay on disk)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise PdsError(f"cannot read {path.name} as an ONNX model ({type(e).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    dims = None
    for inp in model.graph.input:
        if inp.name == "x":
            dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    return props, dims
