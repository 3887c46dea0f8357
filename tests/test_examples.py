"""The runnable examples under examples/ run, at a small size, and what they print holds."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cluster_contrast_step_runs_small(capsys):
    example = load("cluster_contrast_step")
    result = example.main(["--ids", "12", "--cameras", "3", "--dim", "48", "--k1", "12", "--k2", "4"])
    out = capsys.readouterr().out
    labels, identities = result["labels"], result["identities"]
    assert result["num_clusters"] >= 1 and labels.max() + 1 == result["num_clusters"], out
    # The drop-in path (scipy CSR + scikit-learn DBSCAN) gave the same labels as fastassoc.dbscan.
    assert result["same_as_sklearn"], out
    assert "same labels: True" in out
    # Centres: the L2-normalised means of each cluster's rows, recomputed here from the labels.
    np.testing.assert_array_equal(result["counts"].numpy(), np.bincount(labels[labels >= 0]))
    assert result["centres"].shape[0] == result["num_clusters"]
    features = result["features"].double()
    means = torch.stack([features[torch.from_numpy(labels == c)].mean(0) for c in range(result["num_clusters"])])
    torch.testing.assert_close(result["centres"].double(), torch.nn.functional.normalize(means, dim=1),
                               rtol=0, atol=1e-5)
    assert f"{result['num_clusters']} clusters" in out
    assert f"noise fraction {float((labels < 0).mean()):.3f}" in out
    # Purity as printed: the majority identity's share of the clustered rows.
    hits = sum(np.bincount(identities[labels == c]).max() for c in range(result["num_clusters"]))
    assert abs(result["purity"] - hits / (labels >= 0).sum()) < 1e-12
    assert 0 < result["purity"] <= 1
