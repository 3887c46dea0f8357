"""The base trainer: diagnostics against NumPy oracles, camera layout, sparse helpers, configs,
backbones, the epoch loop's outputs, checkpoints and resume."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fastassoc.methods import base
from fastassoc.methods.base import (CameraLayout, atomic_save, cluster_diagnostics, csr_rows, graph_diagnostics,
                                    one_hot_csr, pair_diagnostics, soft_label_diagnostics, tiny_config)

from ._shared import ToyTrainer as _Toy


def _csr(dense: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.from_numpy(dense).float().to_sparse_csr()


# -- diagnostics -----------------------------------------------------------------------------------

def test_pair_diagnostics_counts_and_precision():
    pids = torch.tensor([0, 0, 1, 1, 2, -1])
    ia = torch.tensor([0, 2, 4, 5, 1])
    ib = torch.tensor([1, 3, 0, 5, 2])
    out = pair_diagnostics(ia, ib, pids)
    # same identity: (0,1) yes, (2,3) yes, (4,0) no, (5,5) unknown pid -> no, (1,2) no
    assert out == {"pairs": 5, "pairs_precision": pytest.approx(2 / 5)}
    empty = pair_diagnostics(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), pids, "x")
    assert empty["x"] == 0 and np.isnan(empty["x_precision"])


def test_graph_diagnostics_counts_each_cross_camera_edge_once():
    rng = np.random.default_rng(0)
    n = 12
    pids = rng.integers(0, 4, n)
    cams = rng.integers(0, 3, n)
    upper = np.triu(rng.random((n, n)) < 0.3, 1)
    dense = (upper | upper.T).astype(np.float32)
    np.fill_diagonal(dense, 1.0)
    expected_pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if dense[i, j] and cams[i] != cams[j]]
    expected_same = sum(pids[i] == pids[j] for i, j in expected_pairs)
    out = graph_diagnostics(_csr(dense), torch.from_numpy(pids), torch.from_numpy(cams))
    assert out["pairs"] == len(expected_pairs)
    assert out["pairs_precision"] == pytest.approx(expected_same / len(expected_pairs))
    every = graph_diagnostics(_csr(dense), torch.from_numpy(pids))
    assert every["pairs"] == int(upper.sum())


def test_soft_label_diagnostics_matches_numpy_oracle():
    rng = np.random.default_rng(1)
    n = 14
    cams = np.sort(rng.integers(0, 2, n))
    pids = rng.integers(0, 4, n)
    dense = np.zeros((n, n))
    for i in range(n):
        same_cam = np.flatnonzero(cams == cams[i])
        chosen = rng.choice(same_cam, size=min(3, len(same_cam)), replace=False)
        dense[i, chosen] = rng.random(len(chosen)) + 0.1
        dense[i, i] = 1.0
    dense /= dense.sum(1, keepdims=True)
    sims, shares = [], []
    for i in range(n):
        off = [j for j in range(n) if j != i and dense[i, j] > 0]
        if off:
            shares.append(sum(dense[i, j] for j in off if pids[j] == pids[i]) / sum(dense[i, j] for j in off))
        for j in range(n):
            if j != i and pids[i] == pids[j] and cams[i] == cams[j]:
                sims.append(dense[i] @ dense[j] / np.linalg.norm(dense[i]) / np.linalg.norm(dense[j]))
    out = soft_label_diagnostics(_csr(dense), torch.from_numpy(pids), torch.from_numpy(cams))
    assert sims, "the oracle data should hold same-identity pairs"
    assert out["soft_same_id_similarity"] == pytest.approx(np.mean(sims), abs=1e-6)
    assert out["soft_label_precision"] == pytest.approx(np.mean(shares), abs=1e-6)


def test_cluster_diagnostics_purity():
    labels = torch.tensor([5, 5, 5, 2, 2, 9])
    pids = torch.tensor([0, 0, 1, 1, 1, 3])
    out = cluster_diagnostics(labels, pids)
    # cluster 5: majority 2 of 3; cluster 2: 2 of 2; cluster 9: 1 of 1 -> 5 / 6
    assert out == {"clusters": 3, "purity": pytest.approx(5 / 6), "ids": 3}


# -- layout and sparse helpers --------------------------------------------------------------------

def test_camera_layout_sorts_rows_by_camera_stably():
    cameras = torch.tensor([2, 0, 2, 1, 0, 2])
    layout = CameraLayout.from_cameras(cameras, num_cameras=4)
    assert layout.order.tolist() == [1, 4, 3, 0, 2, 5]
    assert layout.offsets.tolist() == [0, 2, 3, 6, 6]
    assert torch.equal(layout.position[layout.order], torch.arange(6))
    assert torch.equal(layout.sorted_cameras, cameras[layout.order])
    assert layout.num_cameras == 4


def test_one_hot_and_csr_rows_match_dense():
    rng = np.random.default_rng(2)
    columns = torch.tensor([3, 0, 3, 1])
    assert torch.equal(one_hot_csr(columns, 5).to_dense(), F.one_hot(columns, 5).float())
    dense = np.where(rng.random((6, 6)) < 0.4, rng.random((6, 6)), 0.0).astype(np.float32)
    matrix = _csr(dense)
    rows = torch.tensor([4, 0, 4, 5])
    picked = csr_rows(matrix, rows)
    assert torch.equal(picked.to_dense(), torch.from_numpy(dense[[4, 0, 4, 5]]))
    perm = torch.from_numpy(rng.permutation(6))
    renumbered = csr_rows(matrix, rows, columns=perm)
    expected = np.zeros((4, 6), np.float32)
    expected[:, perm.numpy()] = dense[[4, 0, 4, 5]]
    assert torch.equal(renumbered.to_dense(), torch.from_numpy(expected))
    for r in range(4):  # columns sorted per row after renumbering
        crow, col = renumbered.crow_indices(), renumbered.col_indices()
        seg = col[crow[r]:crow[r + 1]]
        assert torch.all(seg[1:] > seg[:-1]), f"row {r} columns not sorted: {seg.tolist()}"


def test_atomic_save_leaves_no_temporary(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"a": torch.arange(3)}, path)
    atomic_save({"a": torch.arange(4)}, path)
    assert torch.equal(torch.load(path)["a"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


# -- configs and models -----------------------------------------------------------------------------

def test_make_config_layers_presets_and_rejects_unknown_fields():
    config = _Toy.make_config("smoke", lr=0.5, data_options={"num_cameras": 2})
    assert isinstance(config, _Toy.Config)
    assert (config.method, config.preset, config.temperature, config.lr) == ("toy", "smoke", 0.2, 0.5)
    assert config.data_options["num_cameras"] == 2
    assert config.data_options["num_train_ids"] == base.SMOKE_WORLD["num_train_ids"]
    assert _Toy.make_config("demo").temperature == 0.1
    assert _Toy.make_config("paper", data="mars", root="/x").data_options == {}
    # A dataset on disk drops the synthetic world's options but keeps the method's and the caller's.
    _Toy.PRESETS["smoke"] = {"temperature": 0.2, "data_options": {"tracklets": "one_per_camera"}}
    try:
        on_disk = _Toy.make_config("smoke", data="mars", root="/x", data_options={"min_frames": 2})
        assert on_disk.data_options == {"tracklets": "one_per_camera", "min_frames": 2}
        assert _Toy.make_config("smoke").data_options["tracklets"] == "one_per_camera"
    finally:
        _Toy.PRESETS["smoke"] = {"temperature": 0.2}
    with pytest.raises(TypeError, match="no field"):
        _Toy.make_config("smoke", not_a_field=1)
    with pytest.raises(ValueError, match="preset"):
        _Toy.make_config("huge")
    json.dumps(config.to_dict())


def test_small_backbone_shapes():
    net = base.build_backbone("small", small_width=4)
    assert net(torch.zeros(3, 3, 32, 16)).shape == (3, net.out_dim) == (3, 32)
    with pytest.raises(ValueError, match="weights"):
        base.build_backbone("small", weights="x.pth")


def test_torchvision_backbone_loads_local_weights_and_drops_classifier(tmp_path):
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(source.state_dict(), path)
    net = base.build_backbone("mobilenet_v2", weights=str(path))
    loaded = dict(net.body.named_parameters())
    for name, value in source.named_parameters():
        if not name.startswith("classifier."):
            assert torch.equal(loaded[name], value), f"parameter {name} not loaded"
    assert net.out_dim == 1280 and net(torch.zeros(2, 3, 64, 32)).shape == (2, 1280)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not hold"):
        base.build_backbone("mobilenet_v2", weights=str(tmp_path / "bad.pth"))


def test_calibrate_batchnorm_estimates_running_statistics(world):
    trainer = _Toy(tiny_config(_Toy), dataset=world)
    trainer.prepare()
    first = trainer.model.backbone.features[1]
    assert torch.equal(first.running_mean, torch.zeros_like(first.running_mean))
    trainer.calibrate_batchnorm(2)
    assert first.running_mean.abs().sum() > 0 and first.momentum == 0.1


# -- the loop, outputs, resume -----------------------------------------------------------------------

def test_fit_writes_report_plots_and_checkpoint(tmp_path, world):
    trainer = _Toy(tiny_config(_Toy, plots=True), tmp_path, dataset=world, log=lambda line: None)
    report = trainer.fit()
    for key in ("rank1", "mAP", "baseline_rank1", "baseline_mAP", "cmc", "history", "config"):
        assert key in report, f"report lacks {key}"
    assert len(report["history"]) == 2
    first = report["history"][0]
    assert {"epoch", "loss", "loss_copy", "memory_norm", "lr", "time"} <= set(first)
    assert first["loss"] == pytest.approx(first["loss_copy"])
    assert report["setup_times"]["time_init_memory"] >= 0
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["rank1"] == pytest.approx(report["rank1"])
    for name in ("losses.png", "diagnostics.png", "cmc.png", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_size > 0, f"{name} missing"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2 and state["method"] == "toy"
    assert {"model", "optimizer", "scheduler", "method_state", "rng", "sampler"} <= set(state)
    assert {"python", "numpy", "torch"} <= set(state["rng"])


def test_resume_equals_uninterrupted(tmp_path, world):
    config = tiny_config(_Toy, epochs=3, scheduler="step", step_size=1, gamma=0.5, baseline=False)
    full = _Toy(config, tmp_path / "full", dataset=world, log=lambda line: None).fit()
    assert _Toy(config, tmp_path / "cut", dataset=world, log=lambda line: None).fit(stop_after=1) is None
    resumed_trainer = _Toy.resume(tmp_path / "cut", dataset=world, log=lambda line: None)
    assert resumed_trainer.start_epoch == 1
    resumed = resumed_trainer.fit()
    for epoch, (a, b) in enumerate(zip(full["history"], resumed["history"])):
        for key in ("loss", "memory_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), f"epoch {epoch + 1} {key}: {a[key]} vs {b[key]}"
    assert len(resumed["history"]) == 3
    assert resumed["mAP"] == pytest.approx(full["mAP"], abs=1e-6)
    assert resumed["rank1"] == pytest.approx(full["rank1"], abs=1e-6)


# -- paper preset: pretraining and an explicit dataset (issue 14 item 3) -------------------------------

def test_paper_preset_without_weights_is_refused_unless_from_scratch(tmp_path):
    config = _Toy.make_config("paper", data="synthetic")   # building the config is fine...
    with pytest.raises(ValueError, match=r"preset 'paper' starts from ImageNet weights.*from_scratch=True"):
        _Toy(config)                                        # ...training a random ResNet-50 with it is not
    _Toy(_Toy.make_config("paper", data="synthetic", from_scratch=True))
    weights = tmp_path / "resnet50.pth"
    weights.write_bytes(b"")   # only named here; the backbone is built later, in prepare()
    _Toy(_Toy.make_config("paper", data="synthetic", weights=str(weights)))
    with pytest.raises(ValueError, match="contradicts"):
        _Toy(_Toy.make_config("paper", data="synthetic", weights=str(weights), from_scratch=True))
    _Toy(tiny_config(_Toy))   # other presets train from scratch as before


def test_explicit_data_overrides_the_presets_dataset():
    _Toy.PRESETS["paper"] = {"data_options": {"tracklets": "one_per_camera"}}
    try:
        config = _Toy.make_config("paper", data="synthetic", from_scratch=True)
        assert (config.data, config.data_options, config.root) == ("synthetic", {}, None)
        own = _Toy.make_config("paper", data="synthetic", data_options={"num_cameras": 2})
        assert own.data_options == {"num_cameras": 2}
        on_disk = _Toy.make_config("paper", data="prid2011", root="/x")
        assert (on_disk.data, on_disk.data_options) == ("prid2011", {"tracklets": "one_per_camera"})
        assert _Toy.make_config("paper").data == "mars"
    finally:
        del _Toy.PRESETS["paper"]
