"""tlhelpers.files: a file is replaced whole or left as it was."""

import os
import stat

import pytest
import torch

from tlhelpers import files


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_text_replaces_the_file_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "gradebook.csv"
    assert files.write_text(target, "a,b\n") == target
    files.write_text(target, "a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"
    assert leftovers(target.parent) == []
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644


def test_a_failure_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"the learner's checkpoint")
    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half a chec")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"the learner's checkpoint"
    assert leftovers(tmp_path) == []


def test_an_interrupt_keeps_the_old_file(tmp_path):
    target = tmp_path / "cache.pt"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_save_round_trips_through_torch_load(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    path = files.save(state, tmp_path / "state.pt")
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"])


def test_mode_none_keeps_the_file_private(tmp_path):
    target = tmp_path / "private.txt"
    with files.atomic_path(target, mode=None) as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_sha256_reads_the_file_in_chunks(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000  # 1.28 MB: more than one chunk
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    assert files.sha256(path) == hashlib.sha256(data).hexdigest()
    assert files.sha256(path, chunk=7) == hashlib.sha256(data).hexdigest()
