"""Checkpoint files: sealed writes, one-line errors for empty / truncated / damaged / foreign
files, weights-only loading, RNG states, write failures, stale temporaries, and resuming with
other settings."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import zipfile

import numpy as np
import pytest
import torch

from fastassoc.methods import CheckpointError, SettingsMismatchError, read_checkpoint, write_checkpoint
from fastassoc.methods import checkpoint as ck
from fastassoc.methods.base import tiny_config

from ._shared import ToyTrainer, quiet

STATE = {"method": "toy", "config": {"lr": 0.1, "image_size": (32, 16)}, "epoch": 3,
         "model": {"w": torch.arange(6.0).reshape(2, 3)}, "history": [{"loss": 1.5, "pairs": np.int64(4)}]}


def _written(tmp_path, state=STATE, name="checkpoint.pt"):
    return write_checkpoint(state, tmp_path / name)


def _one_line_error(path, match):
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and match in message, message
    return message


def test_round_trip_is_a_plain_weights_only_archive(tmp_path):
    path = _written(tmp_path)
    state = read_checkpoint(tmp_path)   # a folder means its checkpoint.pt
    assert torch.equal(state["model"]["w"], STATE["model"]["w"])
    assert state["config"] == STATE["config"] and state["epoch"] == 3
    assert state["history"][0]["pairs"] == 4 and type(state["history"][0]["pairs"]) is int
    # Still an ordinary torch archive: plain torch.load (weights only) and zipfile read it.
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], STATE["model"]["w"])
    comment = zipfile.ZipFile(path).comment.decode()
    # The recorded digest is SHA-256 of the archive with its comment emptied (an independent recomputation).
    data = path.read_bytes()
    archive = data[:len(data) - len(comment) - 2] + b"\0\0"
    assert comment == f"fastassoc-checkpoint format=2 sha256={hashlib.sha256(archive).hexdigest()}"


def test_empty_file_is_named(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    _one_line_error(tmp_path / "checkpoint.pt", "empty file")


@pytest.mark.parametrize("keep", [0.5, 0.99, -3])
def test_truncated_file_is_named(tmp_path, keep):
    path = _written(tmp_path)
    data = path.read_bytes()
    cut = int(len(data) * keep) if keep > 0 else len(data) + keep
    path.write_bytes(data[:cut])
    message = _one_line_error(path, "")
    assert "truncated" in message or "damaged" in message, message


def test_flipped_bytes_are_detected(tmp_path):
    path = _written(tmp_path, {**STATE, "model": {"w": torch.randn(64, 64)}})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    path.write_bytes(bytes(data))
    _one_line_error(path, "damaged")
    # One flipped bit inside the tensor bytes: zip's own structure is intact, only the digest sees it.
    path = _written(tmp_path, {**STATE, "model": {"w": torch.zeros(256)}}, "one_bit.pt")
    data = bytearray(path.read_bytes())
    data[data.find(bytes(1024)) + 10] ^= 0x01
    path.write_bytes(bytes(data))
    _one_line_error(path, "damaged")


def test_foreign_files_are_refused(tmp_path):
    torch.save({"config": 1}, tmp_path / "plain.pt")
    _one_line_error(tmp_path / "plain.pt", "not a fastassoc checkpoint")
    (tmp_path / "notes.txt").write_text("hello\n")
    _one_line_error(tmp_path / "notes.txt", "not a fastassoc checkpoint")
    write_checkpoint({"weights": torch.ones(2)}, tmp_path / "other.pt")
    _one_line_error(tmp_path / "other.pt", "not a fastassoc trainer checkpoint")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_checkpoint(tmp_path / "missing.pt")


def test_newer_format_is_refused(tmp_path):
    path = _written(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"format=2 ", b"format=9 "))
    _one_line_error(path, "newer fastassoc (format 9")


def test_pickled_code_never_runs(tmp_path):
    # A sealed archive holding an arbitrary object (pickled code) is refused by the weights-only loader.
    buffer = io.BytesIO()
    torch.save({"method": "toy", "config": {}, "epoch": 0, "model": {}, "x": zipfile.ZipInfo("x")}, buffer)
    (tmp_path / "code.pt").write_bytes(ck.seal(buffer.getvalue()))
    _one_line_error(tmp_path / "code.pt", "cannot be loaded")


def test_unsupported_state_is_refused_when_written(tmp_path):
    with pytest.raises(TypeError, match=r"state\.method_state\.sampler is a ZipInfo"):
        write_checkpoint({**STATE, "method_state": {"sampler": zipfile.ZipInfo("x")}}, tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.normal()   # a cached Gaussian in NumPy's state
    write_checkpoint({**STATE, "rng": ck.rng_state()}, tmp_path / "checkpoint.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ck.set_rng_state(read_checkpoint(tmp_path)["rng"])
    assert (random.random(), np.random.normal(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_write_failure_names_the_path_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck.os, "fsync", full_disk)
    target = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(OSError) as info:
        write_checkpoint(STATE, target)
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)
    assert list((tmp_path / "run").iterdir()) == []


def test_fit_removes_temporaries_of_a_killed_write(tmp_path, world):
    stale = [tmp_path / ".checkpoint.pt.abc123.tmp", tmp_path / ".report.json.x.tmp"]
    kept = tmp_path / ".other.tmp"
    for path in [*stale, kept]:
        path.write_bytes(b"partial")
    lines = []
    ToyTrainer(tiny_config(ToyTrainer, epochs=1, baseline=False), tmp_path, dataset=world, log=lines.append).fit()
    assert not any(path.exists() for path in stale) and kept.exists()
    assert sum("interrupted write" in line for line in lines) == 2


# -- resuming with other settings -------------------------------------------------------------------

@pytest.fixture(scope="module")
def cut_run(tmp_path_factory, world):
    out = tmp_path_factory.mktemp("cut")
    config = tiny_config(ToyTrainer, epochs=2, baseline=False, lr=1e-3)
    assert ToyTrainer(config, out, dataset=world, log=quiet).fit(stop_after=1) is None
    return out


def test_resume_refuses_other_settings_and_lists_each(cut_run, world):
    with pytest.raises(SettingsMismatchError) as info:
        ToyTrainer.resume(cut_run, dataset=world, log=quiet, requested={"epochs": 4, "lr": 0.5, "seed": 0})
    assert sorted(info.value.differences) == [("epochs", 2, 4), ("lr", 1e-3, 0.5)]
    message = str(info.value)
    assert "epochs: saved 2, requested 4" in message and "lr: saved 0.001, requested 0.5" in message
    assert "override" in message and "\n" not in message
    # A config field passed as a keyword counts as requested too; runtime fields do not.
    with pytest.raises(SettingsMismatchError, match="epochs"):
        ToyTrainer.resume(cut_run, dataset=world, log=quiet, epochs=3)
    same = ToyTrainer.resume(cut_run, dataset=world, log=quiet, device="cpu", progress=False,
                             requested={"epochs": 2, "image_size": [32, 16]})
    assert same.start_epoch == 1 and same.config.epochs == 2


def test_resume_with_override_applies_the_requested_settings(cut_run, world):
    trainer = ToyTrainer.resume(cut_run, dataset=world, log=quiet, requested={"epochs": 3, "lr": 0.5},
                                override=True)
    assert (trainer.config.epochs, trainer.config.lr, trainer.start_epoch) == (3, 0.5, 1)


def test_resume_refuses_another_method_and_unknown_fields(cut_run, world):
    class Other(ToyTrainer):
        name = "other"

    with pytest.raises(CheckpointError, match="holds a 'toy' run, not 'other'"):
        Other.resume(cut_run, dataset=world, log=quiet)
    with pytest.raises(CheckpointError, match="method 'dal' was requested"):
        ToyTrainer.resume(cut_run, dataset=world, log=quiet, requested={"method": "dal"})
    with pytest.raises(TypeError, match="no field"):
        ToyTrainer.resume(cut_run, dataset=world, log=quiet, requested={"not_a_field": 1})
