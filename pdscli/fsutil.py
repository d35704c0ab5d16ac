"""Atomic writes and output-folder rules: nothing a user made is lost or half-written."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

from pdscli.errors import PdsError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is renamed over `path` in one step."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes 0600 files; give the result the mode a plain open() would have.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save_npz(path, **arrays) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_image(path, image) -> None:
    """Save a PIL image atomically; the format comes from the file suffix."""
    buf = io.BytesIO()
    image.save(buf, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def prepare_out_dir(path, *, force: bool = False, resume: bool = False) -> Path:
    """Create (or reuse) an output folder; refuse to touch a non-empty one without --force/--resume."""
    path = Path(path)
    if force and resume:
        raise PdsError("--force and --resume exclude each other: --force starts over, --resume continues")
    if path.exists() and not path.is_dir():
        raise PdsError(f"output path {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (force or resume):
        raise PdsError(f"output folder {path} is not empty; pass --force to overwrite or --resume to continue")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PdsError(f"cannot create output folder {path}: {e.strerror}") from None
    check_writable(path)
    return path


def check_writable(folder) -> None:
    folder = Path(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pds-write-test-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise PdsError(f"cannot write to {folder}: {e.strerror}") from None


def prepare_out_file(path, *, force: bool = False) -> Path:
    """An output file's folder exists and is writable, and the file is not overwritten without --force."""
    path = Path(path)
    if path.is_dir():  # --force cannot replace a folder with a file: say so before the work, not after
        raise PdsError(f"output path {path} is a folder, not a file")
    if path.exists() and not force:
        raise PdsError(f"{path} exists; pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PdsError(f"cannot create folder {path.parent}: {e.strerror}") from None
    check_writable(path.parent)
    return path
