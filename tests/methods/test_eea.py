"""EEA trainer: Eqs. 5-11 against NumPy oracles, fast vs reference ops, learning, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastassoc.methods import get_trainer
from fastassoc.methods.base import tiny_config
from fastassoc.methods.eea import EEATrainer

from ._shared import (assert_graph_equal, check_fast_matches_reference, check_resume_equals_uninterrupted,
                      check_smoke_run_improves, oracle_cross_camera_graph, oracle_segmented_ce, quiet, ready)


def _ready(world, **overrides) -> EEATrainer:
    return ready(EEATrainer, world, **overrides)


def test_threshold_rises_linearly_after_the_warm_up(world):
    trainer = _ready(world, epochs=6, warmup_epochs=2, threshold_low=0.5, threshold_high=0.7)
    # Eq. 11: eta = (U - L) / (ep_max - ep_warm) = 0.05 per epoch after the warm-up.
    want = [0.5, 0.5, 0.5, 0.55, 0.6, 0.65]
    got = [trainer.threshold(e) for e in range(6)]
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("epoch", [0, 5])
def test_graph_over_normalised_exemplars_follows_eqs_6_7(world, epoch):
    trainer = _ready(world, epochs=6, warmup_epochs=2, threshold_low=-0.2, threshold_high=0.4)
    rng = np.random.default_rng(9)
    exemplars = rng.normal(size=tuple(trainer.heads.weight.shape)).astype(np.float32) * rng.uniform(0.1, 3.0, (
        trainer.heads.weight.shape[0], 1)).astype(np.float32)
    with torch.no_grad():
        trainer.heads.weight.copy_(torch.from_numpy(exemplars))
    trainer.on_epoch_start(epoch)
    got = trainer.graph.to_dense().numpy()
    want = oracle_cross_camera_graph(exemplars[trainer.layout.position.numpy()], trainer.train_cameras.numpy(), 1,
                                     trainer.threshold(epoch))
    assert_graph_equal(got, want)
    assert (trainer._graph_in_use is not None) == (epoch >= 2), "the graph is used only after the warm-up"


def test_train_step_follows_eqs_5_and_10(world):
    trainer = _ready(world, epochs=4, warmup_epochs=1, threshold_low=0.0, threshold_high=0.2, scale=7.0)
    frames, index, cameras = next(iter(trainer.loader))
    count = frames.shape[1]
    rng = np.random.default_rng(10)
    feats = rng.normal(size=(frames.shape[0], count, trainer.model.out_dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    trainer.frame_features = lambda frames, model=None: torch.from_numpy(feats).requires_grad_()
    with torch.no_grad():
        trainer.heads.weight.copy_(torch.randn(trainer.heads.weight.shape, generator=torch.Generator().manual_seed(1)))
    weight = trainer.heads.weight.detach().numpy().astype(np.float64)
    exemplars = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    position = trainer.layout.position.numpy()
    offsets = trainer.layout.offsets.numpy()
    num = len(trainer.train)
    flat = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
    rows = np.repeat(index.numpy(), count)
    one_hot = np.zeros((len(rows), num))
    one_hot[np.arange(len(rows)), position[rows]] = 1.0
    intra = oracle_segmented_ce(flat, exemplars, one_hot, offsets, 7.0)

    trainer.on_epoch_start(0)                                               # warm-up: Eq. 5 only
    losses = trainer.train_step(frames, index, cameras, epoch=0)
    assert float(losses["loss"].detach()) == pytest.approx(intra, rel=1e-4)
    assert "loss_inter" not in losses

    trainer.on_epoch_start(3)                                               # Eq. 10 with the graph of epoch 3
    graph = trainer.graph.to_dense().numpy()
    assert (graph - np.eye(num)).any(), "the test graph should have cross-camera edges"
    targets = np.zeros((len(rows), num))
    targets[:, position] = graph[rows]
    total = oracle_segmented_ce(flat, exemplars, targets, offsets, 7.0)
    losses = trainer.train_step(frames, index, cameras, epoch=3)
    assert float(losses["loss"].detach()) == pytest.approx(total, rel=1e-4)
    assert float(losses["loss_intra"]) == pytest.approx(intra, rel=1e-4)
    assert float(losses["loss_inter"]) == pytest.approx(total - intra, rel=1e-4, abs=1e-5)


def test_exemplars_learn_by_backpropagation(world):
    trainer = _ready(world, epochs=1)
    before = trainer.heads.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, trainer.heads.weight.detach()), "the exemplar memory did not change"


def test_fast_and_reference_backends_give_the_same_losses(world):
    check_fast_matches_reference(EEATrainer, world, ("loss", "loss_intra", "loss_inter", "pairs", "pairs_precision"),
                                 epochs=3, warmup_epochs=1, threshold_low=0.0, threshold_high=0.3)


def test_smoke_run_improves_over_untrained_network():
    check_smoke_run_improves(EEATrainer, warmup_epochs=4)


def test_resume_equals_uninterrupted(tmp_path, world):
    check_resume_equals_uninterrupted(EEATrainer, world, tmp_path, ("loss", "loss_intra", "loss_inter", "pairs",
                                                                    "threshold"),
                                      epochs=3, stop_after=2, warmup_epochs=1, threshold_low=0.0, threshold_high=0.3)


def test_registry_and_options(world):
    assert get_trainer("eea") is EEATrainer
    paper = EEATrainer.make_config("paper")
    assert (paper.graph_k, paper.embed_dim, paper.epochs, paper.lr) == (1, 1024, 80, 3.5e-4)
    assert paper.data_options["tracklets"] == "one_per_camera"
    with pytest.raises(ValueError, match="exemplar_init"):
        EEATrainer(tiny_config(EEATrainer, exemplar_init="zeros"), dataset=world, log=quiet).fit()


def test_paper_preset_follows_the_paper():
    """Eq. 2: plain cosine logits; 60 frames per batch evenly over the cameras, epochs over the
    frames, resize only; warm-up 30 epochs on MARS and 10 on the other datasets."""
    paper = EEATrainer.make_config("paper")
    assert (paper.scale, paper.sampling, paper.batch_size) == (1.0, "camera_images", 60)
    assert (paper.train_flip, paper.train_pad, paper.train_erasing) == (0.0, 0, 0.0)
    assert paper.warmup_epochs == 30
    assert EEATrainer.make_config("paper", data="prid2011", root="/x").warmup_epochs == 10
    assert EEATrainer.make_config("paper", data="prid2011", root="/x", warmup_epochs=7).warmup_epochs == 7
    assert EEATrainer.make_config("demo").scale == 10.0


def test_scale_multiplies_the_cosine_logits(world):
    trainer = ready(EEATrainer, world, scale=1.0)
    frames, index, cameras = next(iter(trainer.loader))
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(frames.shape[0], frames.shape[1], trainer.model.out_dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=2, keepdims=True)
    trainer.frame_features = lambda frames, model=None: torch.from_numpy(feats).requires_grad_()
    trainer.on_epoch_start(0)
    loss = float(trainer.train_step(frames, index, cameras, epoch=0)["loss"].detach())
    exemplars = trainer.heads.weight.detach().numpy().astype(np.float64)
    exemplars /= np.linalg.norm(exemplars, axis=1, keepdims=True)
    offsets, position = trainer.layout.offsets.numpy(), trainer.layout.position.numpy()
    want = []
    for b, i in enumerate(index.tolist()):
        camera = trainer.train[i].camera
        seg = np.arange(offsets[camera], offsets[camera + 1])
        for f in feats[b].astype(np.float64):
            cosines = exemplars[seg] @ f                                 # Eq. 2: logits are cosines
            lse = np.log(np.exp(cosines - cosines.max()).sum()) + cosines.max()
            want.append(lse - cosines[position[i] - offsets[camera]])
    assert loss == pytest.approx(float(np.mean(want)), rel=1e-4)
