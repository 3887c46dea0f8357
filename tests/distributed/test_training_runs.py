"""Multi-process training of the five trainers over gloo (2 forked processes, tiny smoke configs).

What a two-process run must equal of a one-process run on the same seed, and what it may not:

- the untrained network's evaluation and the association state :meth:`Trainer.setup` builds
  from it (memories, anchors, exemplars: features of every tracklet, extracted in row blocks
  per rank and all-gathered) equal the one-process ones (to float rounding: the frame batches
  of the extraction have other sizes);
- one optimisation step on a batch split over the ranks equals the step on the whole batch
  (parameters, replicated banks, the mean of the ranks' losses) where the step is deterministic:
  the network in eval mode (train-mode BatchNorm normalises with each rank's share) and fixed
  frames (a run's frame choice and augmentation come from each rank's own generator). TSSL is
  left out of that check: its in-batch negatives and held-out frames depend on the rank's share;
- a full run is therefore not the one-process run; what it must keep is the ranks identical
  (parameters, buffers, banks), rank 0's outputs, and checkpoints that resume under another
  world size.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fastassoc import data as fdata
from fastassoc.distributed import training
from fastassoc.methods import get_trainer
from fastassoc.methods.config import TINY_WORLD, tiny_config

from ._harness import run_cases

METHODS = ("dal", "utal", "uga", "eea", "tssl")
# Methods whose step is deterministic given the frames (see the module docstring).
STEP_METHODS = ("dal", "utal", "uga", "eea")
# Forked workers inherit this (set by the fixtures before they spawn).
_SHARED: dict = {}


def _config(method: str, **overrides):
    trainer_class = get_trainer(method)
    # 2 tracklets per camera split over 2 ranks; no BatchNorm warm-up (it would draw augmented
    # training batches, which differ per rank); epoch 1 of 2 runs each method's second stage.
    settings = dict(tracklets_per_camera=2, bn_warmup_batches=0, device="cpu", epochs=2, seed=3)
    if method == "tssl":
        settings.update(tracklets_per_batch=6)
    if method == "eea":
        settings.update(warmup_epochs=1)
    settings.update(overrides)
    return trainer_class, tiny_config(trainer_class, **settings)


def _parameters(trainer) -> torch.Tensor:
    modules = [trainer.model] + ([trainer.heads] if trainer.heads is not None else [])
    return torch.cat([t.detach().reshape(-1).double() for m in modules
                      for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]])


def _banks(trainer) -> dict:
    """Tensors of the method state, and the heads (EEA's exemplars, UGA's centres live there)."""
    banks = {key: value.detach().cpu().clone() for key, value in sorted(trainer.method_state().items())
             if isinstance(value, torch.Tensor)}
    if trainer.heads is not None:
        banks.update({f"heads.{key}": value.detach().cpu().clone()
                      for key, value in trainer.heads.state_dict().items()})
    return banks


def _setup_state(method: str, world_size: int = 1, rank: int = 0):
    trainer_class, config = _config(method)
    trainer = trainer_class(config)
    trainer.prepare()
    baseline = trainer.evaluate(desc="baseline")
    trainer.setup()
    return ({k: baseline[k] for k in ("rank1", "mAP", "mINP")}, trainer.initial_diagnostics(), _banks(trainer))


def _steps(method: str, world_size: int = 1, rank: int = 0):
    # SGD: Adam's first step is the sign of each gradient, which float noise flips where a gradient is ~0.
    trainer_class, config = _config(method, optimizer="sgd", lr=0.05)
    trainer = trainer_class(config)
    trainer.prepare()
    trainer.setup()
    epoch = config.epochs - 1
    trainer.on_epoch_start(epoch)
    trainer.model.eval()
    if trainer.heads is not None:
        trainer.heads.eval()
    sampler = fdata.CameraBalancedSampler(trainer.train, config.tracklets_per_camera, num_batches=2, seed=11)
    generator = torch.Generator().manual_seed(7)
    height, width = config.image_size
    losses = []
    for batch in sampler:
        index = torch.tensor(batch)
        frames = torch.rand(len(batch), config.frames_per_tracklet, 3, height, width, generator=generator)
        share = slice(rank, None, world_size)
        out = trainer.step(frames[share], index[share], trainer.train_cameras[index][share], epoch)
        losses.append(float(out["loss"].detach()))
    return _parameters(trainer), _banks(trainer), losses


def _smoke(method: str, world_size: int, rank: int):
    trainer_class, config = _config(method)
    trainer = trainer_class(config, _SHARED["out"] / method, log=lambda line: None)
    report = trainer.fit()
    return _parameters(trainer), _banks(trainer), report


def _resume_first_epoch(world_size: int, rank: int):
    trainer_class, config = _config("utal")
    trainer = trainer_class(config, _SHARED["out"] / "resume", log=lambda line: None)
    assert trainer.fit(stop_after=1) is None
    return (_parameters(trainer),)


CASES = [(f"smoke_{m}", lambda w, r, m=m: _smoke(m, w, r)) for m in METHODS]
CASES += [(f"setup_{m}", lambda w, r, m=m: _setup_state(m, w, r)) for m in METHODS]
CASES += [(f"step_{m}", lambda w, r, m=m: _steps(m, w, r)) for m in STEP_METHODS]
CASES += [("resume_first_epoch", _resume_first_epoch)]


def _frame_batches(world_size: int, rank: int):
    # DAL's paper sampling: batches of single frames in a random order (FrameSampler), split over the ranks.
    trainer_class, config = _config("dal", sampling="images", batch_size=8, batches_per_epoch=3, epochs=1)
    trainer = trainer_class(config, log=lambda line: None)
    report = trainer.fit()
    return _parameters(trainer), _banks(trainer), len(trainer.sampler), report["history"][-1]["steps"]


CASES += [("frame_batches_dal", _frame_batches)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    _SHARED["out"] = tmp_path_factory.mktemp("two_ranks")
    results = run_cases(__name__, [name for name, _ in CASES], 2)
    for rank, result in enumerate(results):
        for name, (status, value, _) in result.items():
            assert status == "ok", f"rank {rank}, {name}: {value}"
    return {name: [result[name][1] for result in results] for name, _ in CASES}


def _assert_close(actual, expected, what, rtol=1e-4, atol=1e-5):
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol)
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ, first at {first}: "
                             f"{actual[first].item()} vs {expected[first].item()}")


@pytest.mark.parametrize("method", METHODS)
def test_two_process_run_finishes_with_identical_replicas(two_ranks, method):
    (params0, banks0, report0), (params1, banks1, report1) = two_ranks[f"smoke_{method}"]
    assert torch.equal(params0, params1), "the ranks' parameters / BatchNorm statistics drifted apart"
    assert banks0.keys() == banks1.keys()
    for key in banks0:
        assert torch.equal(banks0[key], banks1[key]), f"bank {key!r} differs between the ranks"
    out = _SHARED["out"] / method
    written = json.loads((out / "report.json").read_text())
    assert [r["epoch"] for r in written["history"]] == [1, 2] and written["world_size"] == 2
    assert written["rank1"] == pytest.approx(report0["rank1"]) and report0["rank1"] == report1["rank1"]
    assert (out / "checkpoint.pt").is_file()
    # Rank 0 writes alone: no temporary or per-rank file is left next to its outputs.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "report.json"]
    # The logged losses are the ranks' means, the same number on both.
    assert report0["history"][-1]["loss"] == report1["history"][-1]["loss"]


@pytest.mark.parametrize("method", METHODS)
def test_setup_association_equals_one_process(two_ranks, method):
    baseline, diagnostics, banks = _setup_state(method)
    for rank, (baseline_r, diagnostics_r, banks_r) in enumerate(two_ranks[f"setup_{method}"]):
        for key in baseline:
            assert baseline_r[key] == pytest.approx(baseline[key], abs=1e-9), (rank, key)
        assert diagnostics_r.keys() == diagnostics.keys()
        for key in diagnostics:
            assert diagnostics_r[key] == pytest.approx(diagnostics[key], abs=1e-9, nan_ok=True), (rank, key)
        assert banks_r.keys() == banks.keys()
        for key in banks:
            _assert_close(banks_r[key], banks[key], f"rank {rank} bank {key!r}")


@pytest.mark.parametrize("method", STEP_METHODS)
def test_split_steps_equal_the_whole_batch_step(two_ranks, method):
    params, banks, losses = _steps(method)
    (params0, banks0, losses0), (params1, banks1, losses1) = two_ranks[f"step_{method}"]
    assert torch.equal(params0, params1)
    _assert_close(params0, params, "parameters after two steps")
    for key in banks:
        _assert_close(banks0[key], banks[key], f"bank {key!r}")
        assert torch.equal(banks0[key], banks1[key])
    # Equal shares: the mean of the ranks' mean losses is the whole batch's mean loss.
    _assert_close([(a + b) / 2 for a, b in zip(losses0, losses1)], losses, "losses", rtol=1e-5)


def test_two_process_checkpoint_resumes_in_one_process(two_ranks):
    (params0,), (params1,) = two_ranks["resume_first_epoch"]
    assert torch.equal(params0, params1)
    out = _SHARED["out"] / "resume"
    assert not (out / "report.json").exists()
    trainer_class = get_trainer("utal")
    trainer = trainer_class.resume(out, log=lambda line: None)
    assert trainer.start_epoch == 1
    # The checkpoint is the unwrapped network's: the same keys as a one-process trainer's.
    _, config = _config("utal")
    fresh = trainer_class(config)
    fresh.prepare()
    assert list(trainer.model.state_dict()) == list(fresh.model.state_dict())
    torch.testing.assert_close(_parameters(trainer), params0, rtol=0, atol=0)
    report = trainer.fit()
    assert [r["epoch"] for r in report["history"]] == [1, 2]
    assert json.loads((out / "report.json").read_text())["history"][1]["epoch"] == 2


def test_frame_batches_train_on_two_processes(two_ranks):
    (params0, banks0, batches0, steps0), (params1, banks1, batches1, steps1) = two_ranks["frame_batches_dal"]
    assert batches0 == batches1 == steps0 == steps1 == 3
    assert torch.equal(params0, params1)
    for key in banks0:
        assert torch.equal(banks0[key], banks1[key]), key


def test_frame_sampler_split_keeps_cameras_balanced():
    tracklets = fdata.SyntheticTracklets(**{**TINY_WORLD, "image_size": (32, 16)}).train
    whole = list(fdata.FrameSampler(tracklets, 12, num_batches=3, seed=1))
    shares = [list(training.RankSplitSampler(fdata.FrameSampler(tracklets, 12, num_batches=3, seed=1), rank, 2))
              for rank in range(2)]
    camera = {i: t.camera for i, t in enumerate(tracklets)}
    for step, batch in enumerate(whole):
        assert sorted(shares[0][step] + shares[1][step]) == sorted(batch)
        assert len(shares[0][step]) == len(shares[1][step]) == 6
        per_camera = np.bincount([camera[i] for i, _ in batch], minlength=3)
        for rank in range(2):
            mine = np.bincount([camera[i] for i, _ in shares[rank][step]], minlength=3)
            assert (np.abs(mine - per_camera / 2) <= 0.5).all(), (step, rank, mine, per_camera)


def test_split_refuses_a_batch_size_the_world_size_does_not_divide():
    tracklets = fdata.SyntheticTracklets(**{**TINY_WORLD, "image_size": (32, 16)}).train
    with pytest.raises(ValueError, match=r"batch_size \(9\) must be a multiple of the world size \(2\)"):
        training.RankSplitSampler(fdata.FrameSampler(tracklets, 9), 0, 2)
    trainer_class, config = _config("utal", tracklets_per_camera=3)
    with pytest.raises(ValueError, match=r"tracklets_per_camera \(3\) must be a multiple of the world size"):
        fdata.config_loader(config, tracklets, lambda path: None, rank_split=(0, 2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_worker(rank: int, port: int, argv: list[str], codes: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastassoc import cli

    code = cli.main(argv)
    Path(codes, f"rank{rank}").write_text(str(code))


def test_cli_train_under_torchrun_environment(capfd):
    world = {k: v for k, v in TINY_WORLD.items()}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder, "run")
        argv = ["train", "--method", "utal", "--out", str(out), "--no-progress", "--epochs", "1", "--device", "cpu",
                "--set", f"data_options={json.dumps(world)}", "image_size=[32,16]", "small_width=8",
                "tracklets_per_camera=2", "frames_per_tracklet=2", "eval_max_frames=3", "bn_warmup_batches=0",
                "plots=false"]
        mp.start_processes(_cli_worker, args=(_free_port(), argv, folder), nprocs=2, join=True, start_method="fork")
        assert [Path(folder, f"rank{r}").read_text() for r in range(2)] == ["0", "0"]
        printed = [line for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
        assert len(printed) == 1, f"rank 0 alone prints the result, got {printed}"
        report = json.loads((out / "report.json").read_text())
        assert json.loads(printed[0])["rank1"] == pytest.approx(report["rank1"])
        assert (out / "checkpoint.pt").is_file()
