"""UTAL trainer: Eqs. 3-11 against NumPy oracles, fast vs reference ops, learning, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastassoc.methods import get_trainer
from fastassoc.methods.base import tiny_config
from fastassoc.methods.utal import UTALTrainer

from ._shared import (check_fast_matches_reference, check_resume_equals_uninterrupted, check_smoke_run_improves,
                      quiet, ready)


def _ready(world, **overrides) -> UTALTrainer:
    return ready(UTALTrainer, world, **overrides)


def _squared_distances(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def _oracle_soft_labels(x: np.ndarray, cams: np.ndarray, k: int) -> np.ndarray:
    """Eqs. 4-6 densely: self weight 1, k nearest others of the camera (ties: smaller index)."""
    d2 = _squared_distances(x)
    out = np.zeros_like(d2)
    for t in np.unique(cams):
        members = np.flatnonzero(cams == t)
        neighbours = {}
        for i in members:
            others = [j for j in members if j != i]
            neighbours[i] = sorted(others, key=lambda j: (d2[i, j], j))[:k]
        squares = [d2[i, j] for i in members for j in neighbours[i]]
        sigma2 = float(np.mean(squares)) if squares else 0.0
        for i in members:
            out[i, i] = 1.0
            for j in neighbours[i]:
                out[i, j] = np.exp(-d2[i, j] / sigma2) if sigma2 > 0 else 1.0
    return out / out.sum(1, keepdims=True)


def _oracle_partners(x: np.ndarray, cams: np.ndarray, mode: str, num_cameras: int) -> np.ndarray:
    """Eq. 9 by brute force: [T, C] partner table (-1 none), ties to the smaller index."""
    d2 = _squared_distances(x)
    num = len(x)
    partners = -np.ones((num, num_cameras), dtype=np.int64)

    def nearest(i, candidates):
        return min(candidates, key=lambda j: (d2[i, j], j)) if len(candidates) else -1

    if mode == "pooled":
        forward = [nearest(i, np.flatnonzero(cams != cams[i])) for i in range(num)]
        for i, j in enumerate(forward):
            if j >= 0 and forward[j] == i:
                partners[i, cams[j]] = j
        return partners
    for i in range(num):
        for m in range(num_cameras):
            if m == cams[i]:
                continue
            j = nearest(i, np.flatnonzero(cams == m))
            if j >= 0 and nearest(j, np.flatnonzero(cams == cams[i])) == i:
                partners[i, m] = j
    return partners


@pytest.mark.parametrize("mode", ["pooled", "per_camera"])
def test_soft_labels_and_reciprocal_pairs_match_bruteforce(world, mode):
    trainer = _ready(world, ccta_search=mode, k=3)
    rng = np.random.default_rng(5)
    # Small-integer vectors: squared distances exact in float32, ties real.
    memory = rng.integers(-2, 3, size=(len(trainer.train), 6)).astype(np.float32)
    trainer.memory = torch.from_numpy(memory)
    trainer.associate()
    cams = trainer.train_cameras.numpy()
    want = _oracle_soft_labels(memory, cams, 3)
    got = trainer.soft.to_dense().numpy()
    bad = np.argwhere(~np.isclose(got, want, atol=1e-6))
    assert not len(bad), f"soft label ({bad[0][0]}, {bad[0][1]}): {got[tuple(bad[0])]} vs oracle {want[tuple(bad[0])]}"
    partners = trainer.partners.numpy()
    oracle = _oracle_partners(memory, cams, mode, trainer.num_cameras)
    bad = np.argwhere(partners != oracle)
    assert not len(bad), f"partner {tuple(bad[0])}: {partners[tuple(bad[0])]} vs oracle {oracle[tuple(bad[0])]}"


@pytest.mark.parametrize("normalize,distance", [(False, "squared"), (True, "squared"), (False, "l2"), (True, "l2")])
def test_train_step_follows_equations(world, normalize, distance):
    trainer = _ready(world, alpha=3.0, lambda_ccta=0.7, ccta_start_epoch=0, classifier_std=0.3,
                     ccta_normalize=normalize, ccta_distance=distance)
    frames, index, cameras = next(iter(trainer.loader))
    count = frames.shape[1]
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(frames.shape[0], count, trainer.model.out_dim)).astype(np.float32)
    trainer.frame_features = lambda frames, model=None: torch.from_numpy(feats).requires_grad_()
    memory0 = trainer.memory.clone().numpy().astype(np.float64)
    soft = trainer.soft.to_dense().numpy()
    partners = _oracle_partners(trainer.memory.numpy(), trainer.train_cameras.numpy(), "pooled", trainer.num_cameras)
    losses = trainer.train_step(frames, index, cameras, epoch=0)

    weight = trainer.heads.weight.detach().numpy().astype(np.float64)
    order = trainer.layout.order.numpy()
    offsets = trainer.layout.offsets.numpy()
    tracklets = index.numpy()
    f = feats.astype(np.float64)
    # Eq. 8: soft-label cross-entropy over each frame's camera branch, averaged over frames.
    pctd = []
    for b, i in enumerate(tracklets):
        cam = int(trainer.train_cameras[i])
        seg = np.arange(offsets[cam], offsets[cam + 1])
        for n in range(count):
            logits = np.append(f[b, n], 1.0) @ weight[seg].T
            lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
            pctd.append(float((soft[i, order[seg]] * (lse - logits)).sum()))
    pctd = np.mean(pctd)
    # Eq. 10: batch tracklet means pulled to their reciprocal partners' memory rows.
    ccta = 0.0

    def unit(v):
        return v / np.linalg.norm(v) if normalize else v

    for b, i in enumerate(tracklets):
        for j in partners[i][partners[i] >= 0]:
            gap = unit(f[b].mean(0)) - unit(memory0[j])
            # Eq. 10 as typeset: the plain norm ||s_i - s||_2; "squared" is its square.
            ccta += np.linalg.norm(gap) if distance == "l2" else (gap ** 2).sum()
    ccta /= len(tracklets)
    assert float(losses["loss_pctd"]) == pytest.approx(pctd, rel=1e-4)
    assert float(losses["loss_ccta"]) == pytest.approx(ccta, rel=1e-4)
    assert float(losses["loss"].detach()) == pytest.approx(pctd + 0.7 * ccta, rel=1e-4)
    # Eq. 3 with alpha = 3: s <- (s + 3 mean(x)) / 4 for every tracklet of the batch, others unchanged.
    expected = memory0.copy()
    for i in np.unique(tracklets):
        expected[i] = (memory0[i] + 3.0 * f[tracklets == i].reshape(-1, f.shape[-1]).mean(0)) / 4.0
    np.testing.assert_allclose(trainer.memory.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_ccta_waits_for_the_second_half(world):
    trainer = _ready(world, epochs=4)
    assert trainer.ccta_start == 2
    frames, index, cameras = next(iter(trainer.loader))
    assert "loss_ccta" not in trainer.train_step(frames, index, cameras, epoch=1)
    assert "loss_ccta" in trainer.train_step(frames, index, cameras, epoch=2)


def test_fast_and_reference_backends_give_the_same_losses(world):
    check_fast_matches_reference(UTALTrainer, world, ("loss", "loss_pctd", "loss_ccta", "pairs", "pairs_precision",
                                                      "soft_same_id_similarity"),
                                 epochs=2, ccta_start_epoch=1)


def test_smoke_run_improves_over_untrained_network():
    check_smoke_run_improves(UTALTrainer)


def test_resume_equals_uninterrupted(tmp_path, world):
    check_resume_equals_uninterrupted(UTALTrainer, world, tmp_path, ("loss", "loss_pctd", "loss_ccta", "pairs",
                                                                     "soft_same_id_similarity"),
                                      epochs=3, stop_after=2, ccta_start_epoch=1)


def test_registry_and_options(world):
    assert get_trainer("utal") is UTALTrainer
    paper = UTALTrainer.make_config("paper")
    assert (paper.alpha, paper.k, paper.lambda_ccta, paper.embed_dim, paper.lr, paper.epochs) == \
        (1.0, 4, 10.0, 2048, 3.5e-4, 200)
    assert (paper.ccta_distance, paper.ccta_normalize) == ("l2", False)
    assert (paper.train_flip, paper.train_pad, paper.train_erasing) == (0.0, 0, 0.0)
    assert UTALTrainer.make_config("demo").ccta_distance == "squared"
    with pytest.raises(ValueError, match="ccta_search"):
        UTALTrainer(tiny_config(UTALTrainer, ccta_search="both"), dataset=world, log=quiet).fit()
    with pytest.raises(ValueError, match="ccta_distance"):
        UTALTrainer(tiny_config(UTALTrainer, ccta_distance="cube"), dataset=world, log=quiet).fit()


def test_paper_batch_size_holds_on_any_camera_count(world):
    """UTAL Sec. 4.1: batches of 128 frames on PRID2011 / iLIDS-VID and 384 elsewhere, the same
    number of tracklets (of 4 frames) from every camera."""
    assert UTALTrainer.make_config("paper").batch_size == 384
    assert UTALTrainer.make_config("paper", data="ilidsvid", root="/x").batch_size == 128
    trainer = UTALTrainer(tiny_config(UTALTrainer, batch_size=18, frames_per_tracklet=2), dataset=world, log=quiet)
    trainer.prepare()                                  # 3 cameras x 3 tracklets x 2 frames = 18
    assert trainer.config.tracklets_per_camera == 3
    frames, index, cameras = next(iter(trainer.loader))
    assert frames.shape[0] * frames.shape[1] == 18
