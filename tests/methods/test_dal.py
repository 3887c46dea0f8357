"""DAL trainer: Eqs. 1-7 against NumPy oracles, fast vs reference ops, learning, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastassoc.methods import get_trainer
from fastassoc.methods.base import tiny_config
from fastassoc.methods.dal import DALTrainer

from ._shared import quiet, ready


def _ready(world, **overrides) -> DALTrainer:
    return ready(DALTrainer, world, **overrides)


def _oracle_cyclic(bank: np.ndarray, cams: np.ndarray, mode: str):
    """Brute-force Eq. 4 over camera-sorted rows (ties to the smaller row)."""
    dist = np.sqrt(np.maximum(((bank[:, None, :] - bank[None, :, :]) ** 2).sum(-1), 0))
    out = []
    for p in range(len(bank)):
        k = cams[p]
        own = np.flatnonzero(cams == k)
        candidates = []
        cameras = [np.flatnonzero(cams != k)] if mode == "pooled" else \
            [np.flatnonzero(cams == c) for c in np.unique(cams) if c != k]
        for members in cameras:
            if len(members) == 0:
                continue
            t = members[np.argmin(dist[p, members])]
            back = own[np.argmin(dist[t, own])]
            candidates.append((dist[p, t], t, back == p))
        if mode == "pooled":
            d, t, ok = min(candidates, key=lambda c: (c[0], c[1])) if candidates else (np.inf, -1, False)
        else:
            good = [c for c in candidates if c[2]]
            d, t, ok = min(good, key=lambda c: (c[0], c[1])) if good else (np.inf, -1, False)
        out.append((t, ok))
    return out


@pytest.mark.parametrize("mode", ["pooled", "per_camera"])
def test_cyclic_ranking_matches_bruteforce(world, mode):
    trainer = _ready(world, cyclic_search=mode)
    rng = np.random.default_rng(3)
    # Small-integer vectors: distances exact in float32, ties real.
    bank = rng.integers(-2, 3, size=trainer.intra.shape).astype(np.float32)
    trainer.intra = torch.from_numpy(bank)
    rows = torch.arange(len(bank))
    match, consistent, _ = trainer.cyclic_ranking(rows)
    cams = trainer.layout.sorted_cameras.numpy()
    for p, (t, ok) in enumerate(_oracle_cyclic(bank, cams, mode)):
        assert bool(consistent[p]) == bool(ok), f"row {p}: consistent {bool(consistent[p])}, oracle {ok}"
        if ok:
            assert int(match[p]) == t, f"row {p}: match {int(match[p])}, oracle {t}"


@pytest.mark.parametrize("cross_normalize", [False, True])
def test_train_step_losses_and_anchor_updates_follow_equations(world, cross_normalize):
    trainer = _ready(world, margin=0.3, eta=0.5, lambda_cross=0.7, cross_normalize=cross_normalize)
    frames, index, cameras = next(iter(trainer.loader))
    count = frames.shape[1]
    rng = np.random.default_rng(4)
    feats = torch.from_numpy(rng.normal(size=(frames.shape[0], count, trainer.intra.shape[1])).astype(np.float32))
    trainer.frame_features = lambda frames, model=None: feats.clone().requires_grad_()
    intra0 = trainer.intra.clone().numpy()
    cross0 = trainer.cross.clone().numpy()
    losses = trainer.train_step(frames, index, cameras, epoch=0)

    f = feats.flatten(0, 1).numpy().astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    rows = trainer.layout.position[index].repeat_interleave(count).numpy()
    fcam = cameras.repeat_interleave(count).numpy()
    cams = trainer.layout.sorted_cameras.numpy()
    dist = np.linalg.norm(f[:, None, :] - intra0[None], axis=-1)
    dist[cams[None, :] != fcam[:, None]] = np.inf
    rank1 = dist.argmin(1)
    d_rank1 = dist[np.arange(len(f)), rank1]
    d_src = np.linalg.norm(f - intra0[rows], axis=1)
    d_crs = np.linalg.norm(f - cross0[rows], axis=1)
    bar = np.array([d_rank1[fcam == c].mean() for c in fcam])
    neg = np.where(rank1 == rows, bar, d_rank1)
    loss_i = np.maximum(d_src - neg + 0.3, 0).mean()
    loss_c = np.maximum(d_crs - neg + 0.3, 0).mean()
    assert float(losses["loss_intra"]) == pytest.approx(loss_i, rel=1e-4, abs=1e-6)
    assert float(losses["loss_cross"]) == pytest.approx(loss_c, rel=1e-4, abs=1e-6)
    assert float(losses["loss"].detach()) == pytest.approx(loss_i + 0.7 * loss_c, rel=1e-4, abs=1e-6)

    # Eq. 1 (mean of a tracklet's frames, one EMA step, renormalised); untouched rows stay.
    expected = intra0.astype(np.float64).copy()
    for r in np.unique(rows):
        value = 0.5 * intra0[r] + 0.5 * f[rows == r].mean(0)
        expected[r] = value / np.linalg.norm(value)
    np.testing.assert_allclose(trainer.intra.numpy(), expected, atol=1e-5)
    # Eq. 5 from the updated anchors: merged rows hold the mean with their cyclic match, others copy x.
    updated = trainer.intra.numpy()
    matches = _oracle_cyclic(updated, cams, "pooled")
    for r in np.unique(rows):
        t, ok = matches[r]
        want = (updated[r] + updated[t]) / 2 if ok else updated[r]
        if cross_normalize:
            want = want / np.linalg.norm(want)
        np.testing.assert_allclose(trainer.cross[r].numpy(), want, atol=1e-5, err_msg=f"cross anchor row {r}")
        assert int(trainer.partner[r]) == (t if ok else -1)
    untouched = np.setdiff1d(np.arange(len(cams)), rows)
    np.testing.assert_array_equal(trainer.cross[untouched].numpy(), cross0[untouched])


def test_fast_and_reference_backends_give_the_same_losses(world):
    reports = {}
    for backend in ("auto", "reference"):
        config = tiny_config(DALTrainer, epochs=2, backend=backend, baseline=False, checkpoint=False)
        reports[backend] = DALTrainer(config, dataset=world, log=quiet).fit()
    for epoch, (fast, ref) in enumerate(zip(reports["auto"]["history"], reports["reference"]["history"])):
        for key in ("loss", "loss_intra", "loss_cross", "source_rank1", "assoc_rate"):
            assert fast[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-5), \
                f"epoch {epoch + 1} {key}: auto {fast[key]} vs reference {ref[key]}"
    assert reports["auto"]["mAP"] == pytest.approx(reports["reference"]["mAP"], abs=1e-3)


def test_smoke_run_improves_over_untrained_network(world):
    config = tiny_config(DALTrainer, epochs=6, checkpoint=False)
    report = DALTrainer(config, dataset=world, log=quiet).fit()
    assert report["mAP"] > report["baseline_mAP"] + 0.02, \
        f"mAP {report['mAP']:.3f} vs untrained {report['baseline_mAP']:.3f}"
    first, last = report["history"][0], report["history"][-1]
    assert last["source_rank1"] > first["source_rank1"], "intra-camera discrimination did not improve"


def test_resume_equals_uninterrupted(tmp_path, world):
    config = tiny_config(DALTrainer, epochs=3, baseline=False)
    full = DALTrainer(config, tmp_path / "full", dataset=world, log=quiet).fit()
    DALTrainer(config, tmp_path / "cut", dataset=world, log=quiet).fit(stop_after=2)
    resumed = DALTrainer.resume(tmp_path / "cut", dataset=world, log=quiet).fit()
    for epoch, (a, b) in enumerate(zip(full["history"], resumed["history"])):
        for key in ("loss", "loss_intra", "loss_cross", "assoc_rate"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), f"epoch {epoch + 1} {key}: {a[key]} vs {b[key]}"
    assert resumed["mAP"] == pytest.approx(full["mAP"], abs=1e-6)


def test_cross_anchors_have_unit_norm_in_the_paper_reading(world):
    """Eq. 2 ranks l2-normalised vectors: a merged cross-camera anchor is normalised too (the
    plain mean of two unit vectors is shorter, e.g. 0.71 for orthogonal ones)."""
    trainer = _ready(world, cross_normalize=True, epochs=1)
    trainer.intra[:] = torch.nn.functional.normalize(torch.randn(trainer.intra.shape), dim=1)
    for frames, index, cameras in trainer.loader:
        trainer.train_step(frames, index, cameras, epoch=0)
    merged = (trainer.partner >= 0).numpy()
    assert merged.any()
    norms = np.linalg.norm(trainer.cross.numpy().astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_paper_sampling_is_random_frames_and_an_epoch_passes_over_them(world):
    trainer = _ready(world, sampling="images", batch_size=8)
    total = sum(len(t) for t in trainer.train)
    assert len(trainer.loader) == -(-total // 8)
    frames, index, cameras = next(iter(trainer.loader))
    assert frames.shape[:2] == (8, 1)
    np.testing.assert_array_equal(cameras.numpy(), [trainer.train[i].camera for i in index.tolist()])
    losses = trainer.train_step(frames, index, cameras, epoch=0)
    assert np.isfinite(float(losses["loss"].detach()))


def test_paper_preset_small_data_schedule_and_iterations(world):
    mars = DALTrainer.make_config("paper")
    assert (mars.optimizer, mars.lr, mars.batches_per_epoch * mars.epochs, mars.milestones) == ("sgd", 0.01, 100000, (50,))
    assert (mars.sampling, mars.batch_size, mars.cross_normalize) == ("images", 64, True)
    assert (mars.train_flip, mars.train_pad, mars.train_erasing) == (0.0, 0, 0.0)
    for name in ("prid2011", "ilidsvid"):
        small = DALTrainer.make_config("paper", data=name, root="/nowhere")
        assert (small.optimizer, small.lr, small.scheduler, small.step_size, small.gamma, small.iterations,
                small.batches_per_epoch) == ("rmsprop", 0.045, "step", 2, 0.94, 20000, None)
        assert small.rmsprop_alpha == 0.9       # DAL's public train_dal.py, not torch's 0.99
    assert DALTrainer.make_config("paper", data="prid2011", root="/x", lr=0.01).lr == 0.01
    # Epochs follow from the iterations once the loader (an epoch over the frames) is known.
    trainer = _ready(world, sampling="images", batch_size=8, iterations=50, optimizer="rmsprop", rmsprop_alpha=0.9)
    assert trainer.optimizer.param_groups[0]["alpha"] == 0.9
    per_epoch = len(trainer.loader)
    assert trainer.config.epochs == -(-50 // per_epoch)


def test_registry_and_options():
    assert get_trainer("dal") is DALTrainer
    assert DALTrainer.make_config("smoke").eval_pooling == "max"
    assert DALTrainer.make_config("paper").margin == 0.2
    with pytest.raises(ValueError, match="cyclic_search"):
        DALTrainer(tiny_config(DALTrainer, cyclic_search="both"), log=quiet).fit()
