"""Out of memory in any command is one line saying what to make smaller (docs/reliability.md)."""

from __future__ import annotations

import pytest
import torch
from conftest import image_folder, one_line_error

CPU_ALLOCATOR = RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                             "you tried to allocate 7696581394432 bytes. Error code 12 (Cannot allocate memory)")


def failing(error):
    def allocate(*args, **kwargs):
        raise error
    return allocate


@pytest.mark.parametrize("error", [CPU_ALLOCATOR, MemoryError(), torch.cuda.OutOfMemoryError("CUDA out of memory")],
                         ids=["cpu-allocator", "MemoryError", "cuda"])
@pytest.mark.parametrize("command", ["filters", "train", "bench"])
def test_out_of_memory_is_one_line_in_every_command(run_pds, tmp_path, monkeypatch, command, error):
    if command == "filters":
        monkeypatch.setattr("pdscli.precondition.filters.compute_statistics", failing(error))
        r = run_pds("filters", image_folder(tmp_path / "imgs"), "--size", "8", "--out", tmp_path / "m.npz", "--quiet")
        needle = "--size"
    elif command == "train":
        monkeypatch.setattr("pdscli.train.loop.train_step", failing(error))
        r = run_pds("train", "digits", "--iters", "2", "--out", tmp_path / "t", "--quiet", "--threads", "1")
        needle = "--batch-size"
    else:
        monkeypatch.setattr("pdscli.bench.model.GaussianImageModel", failing(error))
        r = run_pds("bench", "--model", "gaussian", "--image-size", "8", "--quick", "--threads", "1", "--quiet")
        needle = "--batch-sizes"
    one_line_error(r, "out of memory in pds " + command, needle)


def test_a_batch_of_one_that_cannot_fit_does_not_suggest_a_smaller_batch():
    from pdscli.errors import PdsError
    from pdscli.sample.setup import check_fits_in_memory

    with pytest.raises(PdsError, match="even one sample does not fit") as refused:
        check_fits_in_memory(1, (3, 10**6, 10**6), torch.device("cpu"))
    assert "--batch-size" not in str(refused.value)
    with pytest.raises(PdsError, match=r"pass a smaller --batch-size \(at most about"):
        check_fits_in_memory(10**6, (3, 1000, 1000), torch.device("cpu"))
