"""pdscli.fsutil directly: atomic writes, groups of files, a full disk, the folder lock, the output-folder rules."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

import pytest

from pdscli import fsutil
from pdscli.errors import PdsError
from pdscli.fsutil import DiskFull, FolderLock, atomic_group, atomic_path, atomic_write_bytes, atomic_write_json


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents" and leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(ValueError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("killed half-way")
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_the_temporary_is_hidden_beside_the_target_and_recognised_as_stale(tmp_path):
    path = tmp_path / "000007.png"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".000007.png.") and tmp.name.endswith(".tmp")
        assert fsutil.is_stale_temporary(tmp.name)
        tmp.write_bytes(b"x")
    assert not fsutil.is_stale_temporary("notes.tmp") and not fsutil.is_stale_temporary(".notes.tmp")


def test_written_files_get_the_mode_of_a_plain_open(tmp_path):
    mask = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a", b"x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o640


def test_json_round_trips(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": [1, 2], "p": tmp_path})
    assert (tmp_path / "r.json").read_text().startswith("{\n") and str(tmp_path) in (tmp_path / "r.json").read_text()


def _full_disk(monkeypatch, after: int = 0):
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "big.npz"
    path.write_bytes(b"old")
    _full_disk(monkeypatch)
    with pytest.raises(DiskFull) as e:
        atomic_write_bytes(path, b"new")
    assert str(path) in str(e.value) and "no space left" in str(e.value)
    assert isinstance(e.value, PdsError) and isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_group_appears_whole(tmp_path):
    with atomic_group() as group:
        for name in ("a", "b", "c"):
            group.path(tmp_path / name).write_text(name)
            assert not (tmp_path / name).exists()  # nothing visible before the end
    assert [(tmp_path / n).read_text() for n in "abc"] == ["a", "b", "c"] and leftovers(tmp_path) == []


def test_a_group_that_fails_writes_nothing(tmp_path, monkeypatch):
    (tmp_path / "a").write_text("old a")
    with pytest.raises(RuntimeError), atomic_group() as group:
        group.path(tmp_path / "a").write_text("new a")
        group.path(tmp_path / "b").write_text("new b")
        raise RuntimeError
    assert (tmp_path / "a").read_text() == "old a" and not (tmp_path / "b").exists() and leftovers(tmp_path) == []
    # A full disk on the last file's flush: none of them replaced, the last one named.
    _full_disk(monkeypatch, after=1)
    with pytest.raises(DiskFull, match="b$"), atomic_group() as group:
        group.path(tmp_path / "a").write_text("new a")
        group.path(tmp_path / "b").write_text("new b")
    assert (tmp_path / "a").read_text() == "old a" and not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    stale = [".000001.png.abcd1234.tmp", ".samples.npz.x_y_z.tmp", ".pds-write-test-abc"]
    kept = ["000001.png", "notes.tmp", ".hidden"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    removed = fsutil.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_the_folder_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with FolderLock(tmp_path, what="pds sample run"):
        with pytest.raises(PdsError, match=rf"pid {os.getpid()} on .*another --out"):
            FolderLock(tmp_path, what="pds sample run")
        with pytest.raises(PdsError, match="in use by another pds sample run"):
            FolderLock.check_free(tmp_path, what="pds sample run")
    FolderLock(tmp_path).release()  # free again once released


def test_the_folder_lock_is_an_flock_other_processes_see(tmp_path):
    with FolderLock(tmp_path), open(tmp_path / fsutil.LOCK_NAME) as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_check_free_creates_nothing(tmp_path):
    FolderLock.check_free(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_output_folder_rules(tmp_path):
    out = tmp_path / "o"
    assert fsutil.prepare_out_dir(out) == out and out.is_dir()
    (out / fsutil.LOCK_NAME).write_text("")
    fsutil.prepare_out_dir(out)  # a lock file alone does not make a folder "not empty"
    (out / "x.png").write_text("")
    with pytest.raises(PdsError, match="not empty"):
        fsutil.prepare_out_dir(out)
    fsutil.prepare_out_dir(out, force=True)
    fsutil.prepare_out_dir(out, resume=True)
    with pytest.raises(PdsError, match="exclude each other"):
        fsutil.prepare_out_dir(out, force=True, resume=True)
    with pytest.raises(PdsError, match="not a folder"):
        fsutil.prepare_out_dir(out / "x.png")
    with pytest.raises(PdsError, match="cannot create"):
        fsutil.prepare_out_dir(out / "x.png" / "below")


def test_output_file_rules(tmp_path):
    path = tmp_path / "d" / "r.json"
    assert fsutil.prepare_out_file(path) == path and path.parent.is_dir()
    path.write_text("{}")
    with pytest.raises(PdsError, match="--force"):
        fsutil.prepare_out_file(path)
    fsutil.prepare_out_file(path, force=True)


def test_sha256_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert fsutil.sha256_file(tmp_path / "f", chunk=2) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
