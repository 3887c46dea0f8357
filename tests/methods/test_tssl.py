"""TSSL trainer: Eqs. 4-8 against NumPy / dense-torch oracles, fast vs reference ops, learning, resume."""
from __future__ import annotations

import json

import contextlib

import numpy as np
import pytest
import torch

import fastassoc
from fastassoc import data
from fastassoc.methods import base, get_trainer
from fastassoc.methods.base import tiny_config
from fastassoc.methods.tssl import CameraColour, NeighbourhoodNLL, TSSLTrainer, neighbourhood_loss


def _quiet(line):
    pass


def _tiny(**overrides):
    settings = dict(tracklets_per_batch=8, first_stage_epochs=1, epochs_per_stage=1, delta=0.1, max_merge_steps=3)
    settings.update(overrides)
    return tiny_config(TSSLTrainer, **settings)


def _ready(world, **overrides) -> TSSLTrainer:
    trainer = TSSLTrainer(_tiny(**overrides), dataset=world, log=_quiet)
    trainer.prepare()
    trainer.setup()
    return trainer


def _dense_neighbourhood(v, memory, exclude, target, scale):
    dist = torch.cdist(v, memory)
    logits = (-scale * dist).masked_fill(torch.arange(len(memory))[None, :] == exclude[:, None], float("-inf"))
    return scale * dist[torch.arange(len(v)), target] + torch.logsumexp(logits, 1)


@pytest.mark.parametrize("tile", [None, 7])
def test_neighbourhood_loss_matches_dense_formula_and_gradient(tile):
    torch.manual_seed(0)
    v = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(11, 6, dtype=torch.float64)
    exclude = torch.tensor([0, 3, -1, 10, 4])
    target = torch.tensor([2, 1, 5, 9, 0])
    with fastassoc.tile_limit(tile) if tile else contextlib.nullcontext():
        got = NeighbourhoodNLL.apply(v, memory, exclude, target, 3.0)
        (grad,) = torch.autograd.grad(got.sum() + 0.5 * got[1], v)
    want = _dense_neighbourhood(v, memory, exclude, target, 3.0)
    (want_grad,) = torch.autograd.grad(want.sum() + 0.5 * want[1], v)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)
    assert neighbourhood_loss(v.float(), memory.float(), exclude, target, 3.0).ndim == 0


def test_negatives_use_cyclic_ranking(world):
    trainer = _ready(world)
    # Rows 0 and 1 are each other's nearest (cyclic-consistent): they take their second nearest.
    v = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0], [5.0, 0.0], [5.0, 2.5]])
    got = trainer._negatives(v)
    dist = torch.cdist(v, v).fill_diagonal_(float("inf"))
    order = dist.argsort(dim=1, stable=True)
    expected = []
    for i in range(len(v)):
        first, second = int(order[i, 0]), int(order[i, 1])
        expected.append(second if int(order[first, 0]) == i else first)
    assert got.tolist() == expected
    trainer.config.negative = "hardest"
    assert trainer._negatives(v).tolist() == order[:, 0].tolist()


@pytest.mark.parametrize("features", ["reformulated", "original"])
def test_train_step_losses_follow_equations(world, features):
    trainer = _ready(world, alpha=2.0, scale=10.0, lambda_neighbour=0.1, tau=0.1, eta=0.5, tracklet_features=features)
    frames, index, cameras = next(iter(trainer.loader))
    count = trainer.config.frames_per_tracklet
    rng = np.random.default_rng(5)
    feats = torch.from_numpy(rng.normal(size=(frames.shape[0], 2 * count, trainer.memory.shape[1])).astype(np.float32))
    trainer.frame_features = lambda frames, model=None: feats.clone().requires_grad_()
    memory0 = trainer.memory.clone().double().numpy()
    labels = trainer.labels.numpy()
    clusters = trainer.cluster_memory.clone().double().numpy()
    torch.manual_seed(123)
    held_out = torch.randint(count, (frames.shape[0],)).numpy()
    torch.manual_seed(123)
    losses = trainer.train_step(frames, index, cameras, epoch=0)

    f = feats.double().numpy()
    idx = index.numpy()
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    pooled = [np.concatenate([f[b, :count], np.delete(f[b, count:], held_out[b], 0)]).mean(0) for b in range(len(f))]
    v = unit(np.array(pooled))
    # Eq. 1: V_i of the original tracklet (its L training-transform frames) feeds Eqs. 6-7.
    v1 = unit(f[:, :count].mean(1)) if features == "original" else v
    pos = unit(f[np.arange(len(f)), count + held_out])
    batch_dist = np.linalg.norm(v[:, None] - v[None], axis=-1)
    np.fill_diagonal(batch_dist, np.inf)
    order = batch_dist.argsort(1, kind="stable")
    neg = np.array([order[i, 1] if order[order[i, 0], 0] == i else order[i, 0] for i in range(len(v))])
    loss_f = np.maximum(2.0 + np.linalg.norm(v - pos, axis=1) - batch_dist[np.arange(len(v)), neg], 0).mean()
    assert float(losses["loss_frame"]) == pytest.approx(loss_f, rel=1e-4)

    memory = memory0.copy()                          # Eq. 6 before Eq. 5
    for b in range(len(v)):
        memory[idx[b]] = unit(0.5 * memory0[idx[b]] + 0.5 * v1[b])
    np.testing.assert_allclose(trainer.memory.numpy(), memory, atol=1e-5)
    mem_dist = np.linalg.norm(v[:, None] - memory[None], axis=-1)
    mem_dist[np.arange(len(v)), idx] = np.inf
    neighbour = mem_dist.argmin(1)
    logits = -10.0 * mem_dist
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    loss_n = 0.1 * (10.0 * mem_dist[np.arange(len(v)), neighbour] + lse).mean()
    assert float(losses["loss_neighbour"]) == pytest.approx(loss_n, rel=1e-4)

    cluster_logits = v1 @ clusters.T / 0.1            # Eq. 7
    top = cluster_logits.max(1, keepdims=True)
    log_prob = cluster_logits - (np.log(np.exp(cluster_logits - top).sum(1, keepdims=True)) + top)
    loss_c = -log_prob[np.arange(len(v)), labels[idx]].mean()
    assert float(losses["loss_cluster"]) == pytest.approx(loss_c, rel=1e-4)
    assert float(losses["loss"].detach()) == pytest.approx(loss_f + loss_n + loss_c, rel=1e-4)

    trainer.after_step(frames, index, cameras, 0)      # cluster memory EMA after the step
    expected = clusters.copy()
    for b in range(len(v)):
        expected[labels[idx[b]]] = unit(0.5 * clusters[labels[idx[b]]] + 0.5 * v1[b])
    np.testing.assert_allclose(trainer.cluster_memory.numpy(), expected, atol=1e-5)


def test_merge_schedule_and_cluster_memory(world):
    trainer = _ready(world, epochs=10, first_stage_epochs=3, epochs_per_stage=2, max_merge_steps=None)
    assert [e for e in range(10) if trainer.is_merge_epoch(e)] == [2, 4, 6, 8]
    limited = _ready(world, epochs=10, first_stage_epochs=3, epochs_per_stage=2, max_merge_steps=2)
    limited.merge_steps = 2
    assert not any(limited.is_merge_epoch(e) for e in range(10))
    num = len(trainer.train)
    merges = trainer.merge()
    assert merges == int(round(0.1 * num))
    labels = trainer.labels
    assert int(labels.max()) + 1 == num - merges == trainer.cluster_memory.shape[0]
    assert torch.equal(torch.unique(labels), torch.arange(num - merges))
    sums = torch.zeros(num - merges, trainer.memory.shape[1]).index_add_(0, labels, trainer.memory)
    torch.testing.assert_close(trainer.cluster_memory, torch.nn.functional.normalize(sums, dim=1))
    # The same merge from the op directly (cluster memory rows = one cluster each before the step).
    fresh = _ready(world)
    direct = fastassoc.agglomerative_merge(fresh.cluster_memory, torch.arange(num), merges, linkage="tssl",
                                           neighbours=4, backend="reference")
    same = direct[:, None] == direct[None, :]
    assert torch.equal(same, labels[:, None] == labels[None, :])


def test_fast_and_reference_backends_give_the_same_losses(world):
    reports = {}
    for backend in ("auto", "reference"):
        config = _tiny(epochs=3, backend=backend, baseline=False, checkpoint=False)
        reports[backend] = TSSLTrainer(config, dataset=world, log=_quiet).fit()
    for epoch, (fast, ref) in enumerate(zip(reports["auto"]["history"], reports["reference"]["history"])):
        for key in ("loss", "loss_frame", "loss_neighbour", "loss_cluster", "clusters", "purity"):
            assert fast[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-5), \
                f"epoch {epoch + 1} {key}: auto {fast[key]} vs reference {ref[key]}"


def test_tiny_run_learns_its_objective_and_merges_purely(world):
    """Its losses fall and the clusters progressive merging forms stay mostly single-identity."""
    report = TSSLTrainer(_tiny(epochs=6, checkpoint=False), dataset=world, log=_quiet).fit()
    history = report["history"]
    assert history[-1]["loss_cluster"] < history[0]["loss_cluster"] - 0.3, \
        f"cluster loss {history[0]['loss_cluster']:.3f} -> {history[-1]['loss_cluster']:.3f}"
    assert history[-1]["loss_frame"] < history[0]["loss_frame"]
    merges = sum(r["merges"] for r in history)
    assert merges == 3 * int(round(0.1 * len(world.train)))
    assert history[-1]["clusters"] == len(world.train) - merges
    assert history[-1]["purity"] >= 0.8, f"purity {history[-1]['purity']:.2f}"
    assert report["baseline_diagnostics"]["clusters"] == len(world.train)


def test_smoke_run_improves_over_untrained_network():
    """The smoke preset on its synthetic world (cameras at half strength, no camera labels used)
    beats the untrained network in retrieval and in the precision of the memory's neighbours."""
    config = TSSLTrainer.make_config("smoke", progress=False, plots=False, checkpoint=False)
    report = TSSLTrainer(config, log=_quiet).fit()
    assert report["mAP"] > report["baseline_mAP"] + 0.1, \
        f"mAP {report['mAP']:.3f} vs untrained {report['baseline_mAP']:.3f}"
    assert report["rank1"] > report["baseline_rank1"] + 0.1, \
        f"rank-1 {report['rank1']:.3f} vs untrained {report['baseline_rank1']:.3f}"
    history = report["history"]
    baseline_nn = report["baseline_diagnostics"]["nn_precision"]
    assert history[-1]["nn_precision"] > baseline_nn + 0.05, \
        f"neighbour precision {baseline_nn:.3f} -> {history[-1]['nn_precision']:.3f}"
    num = report["dataset"]["train"]
    merges = sum(r["merges"] for r in history)
    assert merges == config.max_merge_steps * int(round(config.delta * num))
    assert history[-1]["clusters"] == num - merges
    # Clusters beyond the first (one per tracklet) are mostly one person: purity well above chance.
    assert history[-1]["purity"] >= 0.6, f"purity {history[-1]['purity']:.2f}"


def test_camera_colour_applies_channel_gains_and_gamma():
    torch.manual_seed(0)
    image = torch.rand(3, 8, 4) * 0.5 + 0.25
    assert torch.equal(CameraColour(0.0, 0.0)(image), image)
    strength = 0.4
    for _ in range(20):
        # Gains only: every pixel of a channel scaled by one factor in [exp(-s), exp(s)].
        out = CameraColour(strength, 0.0)(image)
        unclipped = out < 1
        ratio = out / image
        for channel in range(3):
            values = ratio[channel][unclipped[channel]]
            if values.numel():
                torch.testing.assert_close(values, values[:1].expand_as(values), rtol=1e-5, atol=1e-6)
                assert np.exp(-strength) - 1e-6 <= float(values[0]) <= np.exp(strength) + 1e-6
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        # Gamma only: one exponent for the whole image, within [exp(-g), exp(g)].
        out = CameraColour(0.0, 0.3)(image)
        exponent = torch.log(out) / torch.log(image)
        torch.testing.assert_close(exponent, exponent.flatten()[:1].expand_as(exponent).reshape_as(exponent),
                                   rtol=1e-4, atol=1e-5)
        assert np.exp(-0.3) - 1e-5 <= float(exponent.flatten()[0]) <= np.exp(0.3) + 1e-5


def test_surrogate_transform_of_the_demo_preset(world):
    trainer = _ready(world, **{k: TSSLTrainer.PRESETS["demo"][k] for k in ("colour_jitter", "channel_gain",
                                                                              "gamma_jitter", "train_colour_jitter")})
    names = [type(t).__name__ for t in trainer.surrogate_transform().transforms]
    assert "CameraColour" in names and "ColorJitter" not in names and "RandomRotation" in names
    paper = _ready(world, colour_jitter=0.4, channel_gain=0.0, gamma_jitter=0.0)
    names = [type(t).__name__ for t in paper.surrogate_transform().transforms]
    assert "ColorJitter" in names and "CameraColour" not in names
    image = world.load_frame(world.train[0].frames[0])
    assert trainer.surrogate_transform()(image).shape == (3, *trainer.config.image_size)


def test_resume_equals_uninterrupted(tmp_path, world):
    config = _tiny(epochs=4, baseline=False)
    full = TSSLTrainer(config, tmp_path / "full", dataset=world, log=_quiet).fit()
    TSSLTrainer(config, tmp_path / "cut", dataset=world, log=_quiet).fit(stop_after=2)
    resumed = TSSLTrainer.resume(tmp_path / "cut", dataset=world, log=_quiet).fit()
    assert any(r["merges"] for r in full["history"][2:]), "the resumed epochs should include a merge"
    for epoch, (a, b) in enumerate(zip(full["history"], resumed["history"])):
        for key in ("loss", "loss_frame", "loss_neighbour", "loss_cluster", "clusters", "purity"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), f"epoch {epoch + 1} {key}: {a[key]} vs {b[key]}"
    assert resumed["mAP"] == pytest.approx(full["mAP"], abs=1e-6)


def test_every_merging_step_is_evaluated_and_the_report_gives_final_and_best_step(world, tmp_path):
    """Algorithm 1 lines 17-18: an evaluation after each merging step; the report keeps the last
    model as ``final`` and names the paper's test-set choice ``best_step``."""
    config = _tiny(epochs=4, max_merge_steps=2, eval_merge_steps=True, baseline=False)
    trainer = TSSLTrainer(config, tmp_path, dataset=world, log=_quiet)
    report = trainer.fit()
    steps = report["step_evaluations"]
    assert [entry["step"] for entry in steps] == [1, 2]
    merged = [record for record in report["history"] if record["merges"] > 0]
    assert [entry["epoch"] for entry in steps] == [record["epoch"] for record in merged]
    assert [entry["clusters"] for entry in steps] == [record["clusters"] for record in merged]
    for entry, record in zip(steps, merged):
        assert record["rank1"] == entry["rank1"] and record["mAP"] == entry["mAP"]
    assert report["final"]["rank1"] == report["rank1"] and report["final"]["mAP"] == report["mAP"]
    assert report["best_step"]["rank1"] == max(entry["rank1"] for entry in steps)
    assert "test set" in report["best_step"]["note"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["best_step"]["step"] == report["best_step"]["step"] and len(saved["step_evaluations"]) == 2


def test_step_evaluations_survive_a_resume(world, tmp_path):
    config = _tiny(epochs=4, max_merge_steps=2, eval_merge_steps=True, baseline=False)
    full = TSSLTrainer(config, tmp_path / "full", dataset=world, log=_quiet).fit()
    TSSLTrainer(config, tmp_path / "cut", dataset=world, log=_quiet).fit(stop_after=3)
    resumed = TSSLTrainer.resume(tmp_path / "cut", dataset=world, log=_quiet).fit()
    assert [e["step"] for e in resumed["step_evaluations"]] == [e["step"] for e in full["step_evaluations"]]
    assert [e["rank1"] for e in resumed["step_evaluations"]] == \
        pytest.approx([e["rank1"] for e in full["step_evaluations"]])


def test_unknown_linkage_is_refused_naming_the_choices(world):
    with pytest.raises(ValueError, match="linkage must be one of"):
        _ready(world, linkage="tssl_text")


def test_registry_and_presets():
    assert get_trainer("tssl") is TSSLTrainer
    paper = TSSLTrainer.make_config("paper")
    assert (paper.alpha, paper.scale, paper.lambda_neighbour, paper.eta, paper.tau, paper.delta, paper.neighbours) == \
        (2.0, 10.0, 0.1, 0.5, 0.1, 0.05, 4)
    assert paper.backbone == "resnet50" and paper.first_stage_epochs == 20 and paper.epochs_per_stage == 5
    assert (paper.tracklet_features, paper.eval_merge_steps, paper.max_merge_steps) == ("original", True, None)
    for preset in ("smoke", "demo"):
        config = TSSLTrainer.make_config(preset)
        # Every loss term and progressive merging stay on; no camera information is used.
        assert config.frame_weight > 0 and config.cluster_weight > 0 and config.lambda_neighbour > 0
        assert config.max_merge_steps > 0 and config.first_stage_epochs < config.epochs


def test_tssl_typeset_linkage_is_accepted_and_merges_as_the_op(world):
    trainer = _ready(world, linkage="tssl_typeset")
    num = len(trainer.train)
    memory = trainer.cluster_memory.clone()
    merges = trainer.merge()
    direct = fastassoc.agglomerative_merge(memory, torch.arange(num), merges, linkage="tssl_typeset",
                                           neighbours=4, backend="reference")
    assert torch.equal(direct[:, None] == direct[None, :], trainer.labels[:, None] == trainer.labels[None, :])
