"""TensorRT engine cache: a content key, a JSON manifest beside each engine, a build lock.

An engine is only valid for the exact ONNX bytes, precision, batch profile and builder
options it was built from, and only on the TensorRT version and GPU model that built it.
All of these go into the key, so the key names the engine's content, never its path; the
manifest (`<engine>.json`) records them so that a stale engine is refused with a reason
instead of being loaded (or failing deep inside TensorRT).

Nothing here imports tensorrt: it is plain data, tested without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pdscli.errors import PdsError
from pdscli.fsutil import atomic_write_json, sha256_file

MANIFEST_FORMAT = "pds-tensorrt-engine/1"
TIMING_CACHE_NAME = "tensorrt-timing.cache"


@dataclass(frozen=True)
class BuildEnv:
    """Where an engine is built or loaded: what TensorRT's serialized engines depend on."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class BuildSpec:
    """What an engine is built from."""

    onnx_sha256: str
    precision: str
    profile: tuple[int, int, int]  # min, opt, max batch
    options: dict = field(default_factory=dict)  # builder options (opt level, workspace, ...)


def cache_key(spec: BuildSpec, env: BuildEnv) -> str:
    """sha256 over everything the engine depends on, in a canonical JSON form."""
    payload = {
        "format": MANIFEST_FORMAT,
        "onnx_sha256": spec.onnx_sha256,
        "precision": spec.precision,
        "profile": list(spec.profile),
        "options": spec.options,
        **dataclasses.asdict(env),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def manifest_path(engine: str | os.PathLike) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def lock_path(engine: str | os.PathLike) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".lock")


def timing_cache_path(engine: str | os.PathLike) -> Path:
    """One timing cache per engines folder: tactic timings are reusable across engines."""
    return Path(engine).parent / TIMING_CACHE_NAME


def make_manifest(
    spec: BuildSpec, env: BuildEnv, *, engine_sha256: str, metadata: dict[str, str], onnx_path=None
) -> dict:
    """The manifest written beside an engine. `metadata` are the ONNX `pds.*` properties."""
    return {
        "format": MANIFEST_FORMAT,
        "key": cache_key(spec, env),
        "engine_sha256": engine_sha256,
        "onnx_sha256": spec.onnx_sha256,
        "onnx_path": str(onnx_path) if onnx_path else None,
        "precision": spec.precision,
        "profile": {"min": spec.profile[0], "opt": spec.profile[1], "max": spec.profile[2]},
        "builder_options": spec.options,
        **dataclasses.asdict(env),
        "metadata": dict(metadata),
    }


def write_manifest(engine: str | os.PathLike, manifest: dict) -> None:
    atomic_write_json(manifest_path(engine), manifest)


def read_manifest(engine: str | os.PathLike) -> dict:
    """The manifest of `engine`, or a PdsError saying why there is none to trust."""
    path = manifest_path(engine)
    if not path.exists():
        raise PdsError(
            f"{engine} has no manifest {path.name}: pds cannot tell what it was built from; "
            "rebuild it with `pds export --format trt`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PdsError(f"cannot read engine manifest {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise PdsError(f"{path} is not a pds TensorRT manifest (expected format {MANIFEST_FORMAT})")
    return manifest


def stale_reason(manifest: dict, env: BuildEnv) -> str | None:
    """Why an engine described by `manifest` cannot run in `env`, or None if it can."""
    built = (manifest.get("gpu_name"), manifest.get("compute_capability"))
    here = (env.gpu_name, env.compute_capability)
    if built != here:
        return f"it was built on {built[0]} (sm {built[1]}), this is {here[0]} (sm {here[1]})"
    if manifest.get("tensorrt_version") != env.tensorrt_version:
        return (
            f"it was built with TensorRT {manifest.get('tensorrt_version')}, "
            f"this is TensorRT {env.tensorrt_version}"
        )
    return None


def check_manifest(manifest: dict, env: BuildEnv, engine: str | os.PathLike) -> None:
    """Refuse an engine built for another GPU or TensorRT: TensorRT engines are not portable."""
    reason = stale_reason(manifest, env)
    if reason:
        raise PdsError(f"refusing stale engine {engine}: {reason}; rebuild it with `pds export --format trt --force`")


def read_record(path: str | os.PathLike) -> dict | None:
    """A JSON record kept beside an exported file (an engine's manifest, a cached graph's record),
    or None when there is none that parses to an object."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def why_not_reusable(path: str | os.PathLike, record: dict | None, wanted: dict, *,
                     sha256_field: str | None = None) -> str | None:
    """The one rule for reusing an exported file instead of making it again: None when `path`
    exists, its `record` (what the file says it was made from: a record beside it or its own
    metadata) holds every `wanted` value, and, given `sha256_field`, the file's bytes still hash
    to the sha256 the record gives under that name. Otherwise why not, as a phrase."""
    path = Path(path)
    if not path.is_file():
        return "there is no such file"
    if record is None:
        return "it has no readable record of what it was made from"
    differ = sorted(k for k in wanted if record.get(k) != wanted[k])
    if differ:
        return f"it was made from something else (differs in {', '.join(differ)})"
    if sha256_field is not None:
        recorded = record.get(sha256_field)
        if sha256_file(path) != recorded:
            return f"its bytes do not match the recorded sha256 ({path.stat().st_size} bytes)"
    return None


def is_up_to_date(engine: str | os.PathLike, key: str) -> bool:
    """True when `engine` exists with a manifest for exactly `key` and the bytes it records (a cache hit)."""
    manifest = read_record(manifest_path(engine))
    wanted = {"format": MANIFEST_FORMAT, "key": key}
    return why_not_reusable(engine, manifest, wanted, sha256_field="engine_sha256") is None


@contextlib.contextmanager
def build_lock(engine: str | os.PathLike):
    """Exclusive lock on `<engine>.lock`: a second builder of the same engine waits, then
    finds the first one's result (the caller re-checks the key after acquiring)."""
    path = lock_path(engine)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PdsError(f"cannot create lock file {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        # The lock file stays: unlinking it would let a third builder lock a new inode
        # while the second still holds the old one.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def differences(manifest: dict, spec: BuildSpec, env: BuildEnv) -> list[str]:
    """What differs between an existing engine's manifest and the engine about to be built."""
    want = make_manifest(spec, env, engine_sha256="", metadata={})
    fields = ("onnx_sha256", "precision", "profile", "builder_options", "tensorrt_version", "gpu_name",
              "compute_capability")
    return [f"{f} {manifest.get(f)!r} -> {want[f]!r}" for f in fields if manifest.get(f) != want[f]]
