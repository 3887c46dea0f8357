"""UGA trainer: Eqs. 1-9 against NumPy oracles, the stage switch, fast vs reference ops, learning, resume."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from fastassoc.methods import get_trainer
from fastassoc.methods.base import tiny_config
from fastassoc.methods.uga import StageSchedule, UGATrainer, split_diagonal

from ._shared import (assert_graph_equal, check_fast_matches_reference, check_resume_equals_uninterrupted,
                      check_smoke_run_improves, oracle_cross_camera_graph, oracle_segmented_ce, quiet, ready)


def _ready(world, **overrides) -> UGATrainer:
    return ready(UGATrainer, world, **overrides)


def test_stage_switch_replaces_classifier_with_centres_and_builds_the_graph(world):
    trainer = _ready(world, epochs=2, intra_epochs=1, threshold=0.2, centre_scale=0.5)
    weight = trainer.heads.weight
    trainer.optimizer.state[weight] = {"step": torch.tensor(3.0)}          # stage-1 moments to be dropped
    trainer.model.eval()
    trainer.on_epoch_start(0)
    assert trainer.graph is None, "no graph in the intra-camera stage"
    trainer.on_epoch_start(1)
    centres = trainer.train_features("mean").numpy()                         # Eq. 3, tracklet order
    np.testing.assert_allclose(weight.detach().numpy(), 0.5 * centres[trainer.layout.order.numpy()], rtol=1e-5,
                               atol=1e-6)
    assert weight not in trainer.optimizer.state
    want = oracle_cross_camera_graph(centres, trainer.train_cameras.numpy(), 1, 0.2)
    assert_graph_equal(trainer.graph.to_dense().numpy(), want)


@pytest.mark.parametrize("k, threshold", [(1, 0.0), (2, -1.0)])
def test_graph_follows_eqs_4_5(world, k, threshold):
    trainer = _ready(world, graph_k=k, threshold=threshold)
    rng = np.random.default_rng(7)
    centres = rng.normal(size=tuple(trainer.heads.weight.shape)).astype(np.float32)
    with torch.no_grad():
        trainer.heads.weight.copy_(torch.from_numpy(centres))
    graph = trainer.build_graph().to_dense().numpy()
    tracklet_order = centres[trainer.layout.position.numpy()]
    assert_graph_equal(graph, oracle_cross_camera_graph(tracklet_order, trainer.train_cameras.numpy(), k, threshold))
    diagonal, off = split_diagonal(trainer.build_graph())
    np.testing.assert_array_equal(diagonal.numpy(), np.diag(graph))
    np.testing.assert_array_equal(off.to_dense().numpy(), graph - np.diag(np.diag(graph)))


def test_train_step_follows_eqs_2_and_8(world):
    trainer = _ready(world, epochs=2, intra_epochs=1, threshold=0.0)
    frames, index, cameras = next(iter(trainer.loader))
    count = frames.shape[1]
    rng = np.random.default_rng(8)
    feats = rng.normal(size=(frames.shape[0], count, trainer.model.out_dim)).astype(np.float32)
    trainer.frame_features = lambda frames, model=None: torch.from_numpy(feats).requires_grad_()
    position = trainer.layout.position.numpy()
    offsets = trainer.layout.offsets.numpy()
    num = len(trainer.train)
    flat = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
    rows = np.repeat(index.numpy(), count)

    # Stage 1, Eq. 2: one-hot cross-entropy over each frame's camera branch.
    weight = trainer.heads.weight.detach().numpy().astype(np.float64)
    one_hot = np.zeros((len(rows), num))
    one_hot[np.arange(len(rows)), position[rows]] = 1.0
    losses = trainer.train_step(frames, index, cameras, epoch=0)
    assert float(losses["loss"].detach()) == pytest.approx(oracle_segmented_ce(flat, weight, one_hot, offsets),
                                                           rel=1e-4)

    # Stage 2, Eq. 8: the graph row (self loop + cross-camera edges) weights each camera's cross-entropy.
    with torch.no_grad():
        trainer.heads.weight.copy_(torch.from_numpy(rng.normal(size=weight.shape).astype(np.float32) * 0.05))
    trainer.graph = trainer.build_graph()
    weight = trainer.heads.weight.detach().numpy().astype(np.float64)
    graph = trainer.graph.to_dense().numpy()
    assert (graph - np.eye(num)).any(), "the test graph should have cross-camera edges"
    targets = np.zeros((len(rows), num))
    targets[:, position] = graph[rows]                                     # columns to class (camera-sorted) order
    self_targets = np.zeros_like(targets)
    self_targets[np.arange(len(rows)), position[rows]] = np.diag(graph)[rows]
    losses = trainer.train_step(frames, index, cameras, epoch=1)
    want = oracle_segmented_ce(flat, weight, targets, offsets)
    want_self = oracle_segmented_ce(flat, weight, self_targets, offsets)
    assert float(losses["loss"].detach()) == pytest.approx(want, rel=1e-4)
    assert float(losses["loss_self"]) == pytest.approx(want_self, rel=1e-4)
    assert float(losses["loss_cross"]) == pytest.approx(want - want_self, rel=1e-4, abs=1e-5)


def test_schedule_restarts_with_the_second_stage():
    schedule = StageSchedule("multistep", restart=4, step_size=1, gamma=0.1, milestones=(2, 3))
    assert [round(schedule(e), 6) for e in range(8)] == [1, 1, 0.1, 0.01, 1, 1, 0.1, 0.01]
    step = StageSchedule("step", restart=3, step_size=2, gamma=0.5, milestones=())
    assert [step(e) for e in range(6)] == [1, 1, 0.5, 1, 1, 0.5]


def test_fast_and_reference_backends_give_the_same_losses(world):
    check_fast_matches_reference(UGATrainer, world, ("loss", "loss_self", "loss_cross", "pairs", "pairs_precision"),
                                 epochs=3, intra_epochs=1, threshold=0.3)


def test_smoke_run_improves_over_untrained_network():
    check_smoke_run_improves(UGATrainer, intra_epochs=8)


def test_resume_equals_uninterrupted(tmp_path, world):
    # Interrupted right before the stage switch: the resumed run must replace the classifier itself.
    check_resume_equals_uninterrupted(UGATrainer, world, tmp_path, ("loss", "loss_self", "loss_cross", "pairs", "lr"),
                                      epochs=3, stop_after=1, intra_epochs=1, threshold=0.3)


def test_registry_and_options(world):
    assert get_trainer("uga") is UGATrainer
    paper = UGATrainer.make_config("paper")
    assert (paper.threshold, paper.graph_k, paper.embed_dim, paper.intra_epochs, paper.epochs, paper.lr) == \
        (0.65, 1, 1024, 80, 160, 3.5e-4)
    assert paper.data_options["tracklets"] == "one_per_camera"
    with pytest.raises(ValueError, match="graph_mode"):
        UGATrainer(tiny_config(UGATrainer, graph_mode="all"), dataset=world, log=quiet).fit()


def test_paper_preset_samples_images_evenly_over_cameras_and_epochs_pass_over_frames(world):
    """UGA Sec. 4.2: "randomly sampling the same number images from each camera in a mini batch.
    The batch size of our experiments is set to 60"; resize only."""
    paper = UGATrainer.make_config("paper")
    assert (paper.sampling, paper.batch_size, paper.batches_per_epoch) == ("camera_images", 60, None)
    assert (paper.train_flip, paper.train_pad, paper.train_erasing) == (0.0, 0, 0.0)
    assert (paper.milestones, paper.intra_epochs, paper.epochs) == ((40, 60), 80, 160)
    trainer = UGATrainer(tiny_config(UGATrainer, sampling="camera_images", batch_size=6), dataset=world, log=quiet)
    trainer.prepare()
    frames_total = sum(len(t) for t in trainer.train)
    assert len(trainer.loader) == -(-frames_total // 6)
    counts = Counter()
    for frames, index, cameras in trainer.loader:
        assert frames.shape[:2] == (6, 1)
        assert Counter(cameras.tolist()) == {0: 2, 1: 2, 2: 2}      # 3 cameras divide 6
        counts.update(cameras.tolist())
    assert len(set(counts.values())) == 1


def test_resume_with_frame_batches_equals_uninterrupted(tmp_path, world):
    """The frame sampler's epoch is checkpointed like the tracklet sampler's."""
    check_resume_equals_uninterrupted(UGATrainer, world, tmp_path, ("loss", "loss_self", "loss_cross", "pairs"),
                                      epochs=3, stop_after=2, intra_epochs=1, threshold=0.3,
                                      sampling="camera_images", batch_size=6, batches_per_epoch=4)
