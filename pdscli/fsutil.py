"""Atomic writes and output-folder rules: nothing a user made is lost or half-written.

Every write goes to a hidden temporary file beside its target (`.NAME.XXXXXXXX.tmp`), is
flushed to disk, then renamed over the target in one step, so a reader (or a run killed at
any moment) sees the old file or the new one, never half of one. `atomic_group` extends that
to a set of files (all or none). A full disk is `DiskFull`: one line naming the file.
`FolderLock` keeps two runs out of one output folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import socket
import stat
import tempfile
from pathlib import Path

from pdscli.errors import PdsError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: a file-size limit, full as far as the write goes
LOCK_NAME = ".pds-lock"  # in an output folder: held by the run writing there


class DiskFull(PdsError, OSError):
    """No space (or quota) left while writing `path`. Also an OSError, for code that catches those."""

    def __init__(self, path, hint: str = ""):
        self.path = Path(path)
        OSError.__init__(self, errno.ENOSPC, "no space left on device")
        self.hint = hint
        self.args = (f"no space left on the device writing {self.path}{'; ' + hint if hint else ''}",)

    def __str__(self) -> str:
        return self.args[0]


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _FULL


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is renamed over `path` in one step.

    A full disk at any point raises DiskFull naming `path`, with the temporary file removed.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        # mkstemp makes 0600 files; give the result the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        _sync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise DiskFull(path) from None
        raise


def _sync(path) -> None:
    """Flush a finished temporary file to disk before it replaces anything (a crash then leaves
    the old file or the whole new one)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class atomic_group:
    """Several files that appear together or not at all.

        with atomic_group() as group:
            write(group.path(out / "a"))   # temporary paths
            write(group.path(out / "b"))
        # both renamed into place here; on any error neither is, and the temporaries are gone
    """

    def __init__(self):
        self._pending: list[tuple[Path, Path]] = []

    def path(self, target) -> Path:
        target = Path(target)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        except OSError as e:
            if is_disk_full(e):
                raise DiskFull(target) from None
            raise
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        self._pending.append((Path(tmp), target))
        return Path(tmp)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> bool:
        try:
            if error is None:
                for tmp, target in self._pending:
                    try:
                        _sync(tmp)
                    except OSError as e:
                        if is_disk_full(e):
                            raise DiskFull(target) from None
                        raise
                for tmp, target in self._pending:
                    os.replace(tmp, target)
        finally:
            for tmp, _ in self._pending:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        if error is not None and is_disk_full(error) and not isinstance(error, DiskFull):
            target = next((t for tmp, t in self._pending if str(tmp) == getattr(error, "filename", None)), None)
            raise DiskFull(target or (self._pending[-1][1] if self._pending else "?")) from None
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


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
    if path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()) and not (force or resume):
        raise PdsError(f"output folder {path} is not empty; pass --force to overwrite or --resume to continue")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PdsError(f"cannot create output folder {path}: {e.strerror}") from None
    check_writable(path)
    return path


def is_stale_temporary(name: str) -> bool:
    """A temporary file an atomic write left behind when its process was killed."""
    return (name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3) or name.startswith(".pds-write-test-")


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove what killed atomic writes left in `folder` (not below it); returns the paths removed."""
    removed = []
    for p in Path(folder).iterdir():
        if is_stale_temporary(p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p)
    return removed


class FolderLock:
    """An exclusive fcntl.flock on `folder/.pds-lock`, held while a run writes into the folder.

    The kernel drops it when the process ends, however it ends, so a killed run never leaves a
    stale lock. The file stays (deleting a lock file races with a process opening it); it names
    the holder (pid, host) for the message a second run gets.
    """

    def __init__(self, folder, *, what: str = "run"):
        self.path = Path(folder) / LOCK_NAME
        self.fd = open_regular(self.path, os.O_RDWR | os.O_CREAT, what="lock file")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(self.fd)
            raise PdsError(f"{folder} is in use by another {what} ({holder}); wait for it to end or use another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    @staticmethod
    def check_free(folder, *, what: str = "run") -> None:
        """Fail early (before slow work) if a lock on `folder` is held; creates nothing."""
        path = Path(folder) / LOCK_NAME
        if not os.path.lexists(path):
            return
        FolderLock(folder, what=what).release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def open_regular(path, flags: int, *, what: str = "file") -> int:
    """os.open that never follows a symbolic link and opens only a regular file (not a folder, a
    FIFO or a device): a link planted in an output folder must not redirect a write outside it."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666 & ~_umask())
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise NotRegular(path, what) from None
        if is_disk_full(e):
            raise DiskFull(path) from None
        raise PdsError(f"cannot open {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegular(path, what)
    return fd


class NotRegular(PdsError):
    """A path pds writes to is a symbolic link, a folder or another non-regular file."""

    def __init__(self, path, what: str = "file"):
        self.path = Path(path)
        kind = "a symbolic link" if self.path.is_symlink() else "not a regular file"
        super().__init__(f"{self.path} is {kind}; pds writes its {what} there and follows no link or "
                         f"special file: remove it, or use another output path")


def refuse_odd(path, what: str = "file") -> None:
    """Refuse (NotRegular) a path pds owns that exists as a symbolic link or as other than a regular file."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise NotRegular(path, what)


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
