"""Helpers shared by the trainer tests: quiet trainers, NumPy oracles used by several
methods, and the checks every graph / memory method repeats (fast vs reference ops,
resume, smoke run)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from torch.nn import functional as F

from fastassoc import data
from fastassoc.methods import base
from fastassoc.methods.base import Trainer, TrainConfig, tiny_config


@dataclass
class ToyConfig(TrainConfig):
    temperature: float = 0.1


class ToyTrainer(Trainer):
    """Memory-softmax instance discrimination: just enough method to drive the base loop."""

    name = "toy"
    Config = ToyConfig
    PRESETS = {"smoke": {"temperature": 0.2}}

    def setup(self):
        with self.association("init memory"):
            self.memory = self.train_features(normalize=True)

    def on_epoch_start(self, epoch):
        with self.association("renormalise memory"):   # an association step, timed as one
            self.memory = F.normalize(self.memory, dim=1)

    def train_step(self, frames, index, cameras, epoch):
        feats = F.normalize(self.frame_features(frames).mean(1), dim=1)
        loss = F.cross_entropy(feats @ self.memory.T / self.config.temperature, index)
        self._last = (index, feats.detach())
        return {"loss": loss, "loss_copy": loss.detach()}

    def after_step(self, frames, index, cameras, epoch):
        index, feats = self._last
        self.memory[index] = F.normalize(self.memory[index] + feats, dim=1)

    def on_epoch_end(self, epoch):
        # memory_norm stays 1 (a constant series, left out of the plots); the mean similarity varies.
        return {"memory_norm": float(self.memory.norm(dim=1).mean()),
                "memory_similarity": float((self.memory @ self.memory.T).mean())}

    def method_state(self):
        return {"memory": self.memory}

    def load_method_state(self, state):
        self.memory = state["memory"]


def quiet(line):
    pass


def ready(trainer_class, world, **overrides):
    """A ``trainer_class`` on the tiny config (with ``overrides``), prepared and set up."""
    trainer = trainer_class(tiny_config(trainer_class, **overrides), dataset=world, log=quiet)
    trainer.prepare()
    trainer.setup()
    return trainer


def oracle_cross_camera_graph(x: np.ndarray, cams: np.ndarray, k: int, threshold: float | None) -> np.ndarray:
    """UGA Eqs. 4-5 / EEA Eqs. 6-7 densely: cosine edges between mutual per-camera-pair k-NN
    above ``threshold`` (none when ``None``), 1 on the diagonal."""
    x = x.astype(np.float64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    num = len(x)
    graph = np.eye(num)

    def top(i, camera):
        members = np.flatnonzero(cams == camera)
        return sorted(members, key=lambda a: (-sim[i, a], a))[:k]

    for i in range(num):
        for j in range(num):
            if cams[i] == cams[j]:
                continue
            if j in top(i, cams[j]) and i in top(j, cams[i]) and (threshold is None or sim[i, j] > threshold):
                graph[i, j] = sim[i, j]
    return graph


def assert_graph_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Same edges (reported by the first differing one), weights within 1e-5."""
    structure = np.argwhere((got != 0) != (want != 0))
    if len(structure):
        edge = tuple(structure[0])
        raise AssertionError(f"edge {edge}: got {got[edge]}, oracle {want[edge]}")
    np.testing.assert_allclose(got, want, atol=1e-5)


def oracle_segmented_ce(feats: np.ndarray, weight: np.ndarray, targets: np.ndarray, offsets: np.ndarray,
                        scale: float = 1.0) -> float:
    """Mean over rows of sum_j t_j (logsumexp over j's camera segment - z_j), z = scale f . w."""
    logits = scale * feats @ weight.T
    total = 0.0
    for b in range(len(feats)):
        for s in range(len(offsets) - 1):
            seg = slice(offsets[s], offsets[s + 1])
            t = targets[b, seg]
            if not t.any():
                continue
            z = logits[b, seg]
            lse = np.log(np.exp(z - z.max()).sum()) + z.max()
            total += float((t * (lse - z)).sum())
    return total / len(feats)


def check_fast_matches_reference(trainer_class, world, keys, **overrides) -> None:
    """Training with the fast ops (``backend="auto"``) and the reference ops gives the same
    per-epoch ``keys`` (those the reference run reports; rel 1e-3, abs 1e-5, NaN == NaN) and mAP (1e-3)."""
    reports = {}
    for backend in ("auto", "reference"):
        config = tiny_config(trainer_class, backend=backend, baseline=False, checkpoint=False, **overrides)
        reports[backend] = trainer_class(config, dataset=world, log=quiet).fit()
    for epoch, (fast, ref) in enumerate(zip(reports["auto"]["history"], reports["reference"]["history"])):
        for key in keys:
            if key not in ref:
                continue
            assert fast[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-5, nan_ok=True), \
                f"epoch {epoch + 1} {key}: auto {fast[key]} vs reference {ref[key]}"
    assert reports["auto"]["mAP"] == pytest.approx(reports["reference"]["mAP"], abs=1e-3)


def check_resume_equals_uninterrupted(trainer_class, world, tmp_path, keys, *, epochs: int, stop_after: int,
                                      **overrides) -> None:
    """A run cut after ``stop_after`` epochs and resumed equals the uninterrupted run: all
    ``epochs`` epochs, per-epoch ``keys`` (those reported; rel 1e-6, abs 1e-7), mAP and rank-1 (1e-6)."""
    config = tiny_config(trainer_class, epochs=epochs, baseline=False, **overrides)
    full = trainer_class(config, tmp_path / "full", dataset=world, log=quiet).fit()
    trainer_class(config, tmp_path / "cut", dataset=world, log=quiet).fit(stop_after=stop_after)
    resumed = trainer_class.resume(tmp_path / "cut", dataset=world, log=quiet).fit()
    assert len(resumed["history"]) == len(full["history"]) == epochs
    for epoch, (a, b) in enumerate(zip(full["history"], resumed["history"])):
        for key in keys:
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7, nan_ok=True), \
                    f"epoch {epoch + 1} {key}: {a[key]} vs {b[key]}"
    assert resumed["mAP"] == pytest.approx(full["mAP"], abs=1e-6)
    assert resumed["rank1"] == pytest.approx(full["rank1"], abs=1e-6)


def check_smoke_run_improves(trainer_class, **overrides) -> None:
    """A 16-epoch run on the smoke world beats the untrained network: mAP by 0.05, rank-1 at all.

    The tiny world is too small for re-id to generalise; the smoke world at 32 x 16 still
    trains in seconds.
    """
    world = data.SyntheticTracklets(**base.SMOKE_WORLD, image_size=(32, 16))
    config = tiny_config(trainer_class, epochs=16, train_colour_jitter=0.0, checkpoint=False, **overrides)
    report = trainer_class(config, dataset=world, log=quiet).fit()
    assert report["mAP"] > report["baseline_mAP"] + 0.05, \
        f"mAP {report['mAP']:.3f} vs untrained {report['baseline_mAP']:.3f}"
    assert report["rank1"] > report["baseline_rank1"], \
        f"rank-1 {report['rank1']:.3f} vs untrained {report['baseline_rank1']:.3f}"
