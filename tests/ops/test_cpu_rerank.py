"""Compiled CPU backend of jaccard_distance, dbscan and cluster_centres: what the shared
backend-parametrised tests in test_rerank.py do not reach.

Metrics, float64, max_distance, empty and single inputs against the float64 NumPy oracle of
test_rerank.py; lists and sums that must not depend on the thread count or the tile limit
(bit-equal outputs); the reference's exact lists (same pattern as the reference on
continuous data, values within rounding); DBSCAN on values of every float
dtype against scikit-learn; cluster centres bit-equal to the reference's row-order sums.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch

import fastassoc
from conftest import require_backend
from fastassoc.ops.rerank import cluster_centres, dbscan, jaccard_distance

from ._cpu import core  # noqa: F401  (core is a fixture)
from .test_rerank import (assert_matches_oracle, assert_same_labels, oracle_centres, oracle_jaccard, quantised,
                          random_symmetric, reid_like, sklearn_labels, stored, torch_csr)


@pytest.fixture(autouse=True)
def _cpu_backend():
    for op in ("jaccard_distance", "dbscan", "cluster_centres"):
        require_backend(op, "cpu")


def assert_same_matrix(got: torch.Tensor, expected: torch.Tensor, what: str, *, bits: bool = True) -> None:
    assert torch.equal(got.crow_indices(), expected.crow_indices()), f"{what}: row offsets differ"
    assert torch.equal(got.col_indices(), expected.col_indices()), f"{what}: column indices differ"
    if bits:
        differ = (got.values() != expected.values()).nonzero().flatten()
        assert not len(differ), (f"{what}: {len(differ)} values differ, first at entry {int(differ[0])}: "
                                 f"{float(got.values()[differ[0]])!r} vs {float(expected.values()[differ[0]])!r}")
    else:
        off = (got.values().double() - expected.values().double()).abs()
        assert not off.numel() or float(off.max()) <= 1e-6, f"{what}: values differ by {float(off.max())}"


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "sqeuclidean"])
@pytest.mark.parametrize("weighting", ["spcl", "zhong"])
def test_metrics_and_weightings_match_the_oracle(metric, weighting):
    x = reid_like(np.random.default_rng(5), 70)
    scaled = x * np.random.default_rng(6).uniform(0.5, 2.0, (70, 1)).astype(np.float32)
    # Cosine ranks and weighs the L2-normalised rows; the oracle's Zhong weights are squared-Euclidean ones.
    source = scaled if metric == "cosine" else x
    got = jaccard_distance(torch.from_numpy(source), 9, 3, metric=metric, weighting=weighting, backend="cpu")
    reference = jaccard_distance(torch.from_numpy(source), 9, 3, metric=metric, weighting=weighting,
                                 backend="reference")
    assert_same_matrix(got, reference, f"{metric} {weighting} vs reference", bits=False)
    if metric == "euclidean" and weighting == "zhong":
        return   # Zhong weights of Euclidean distances are not the oracle's (squared-Euclidean) ones
    assert_matches_oracle(got, oracle_jaccard(x, 9, 3, weighting), f"{metric} {weighting}")


def test_float64_max_distance_empty_and_single_rows():
    x = reid_like(np.random.default_rng(8), 40)
    doubled = jaccard_distance(torch.from_numpy(x).double(), 6, 2, backend="cpu")
    assert_matches_oracle(doubled, oracle_jaccard(x, 6, 2), "float64")
    full = jaccard_distance(torch.from_numpy(x), 6, 2, backend="cpu")
    values, mask = stored(full, 40)
    limit = float(np.median(values[mask & (values > 0)]))
    limited, limited_mask = stored(jaccard_distance(torch.from_numpy(x), 6, 2, max_distance=limit, backend="cpu"), 40)
    assert (limited_mask == (mask & (values <= limit))).all() and (limited[limited_mask] == values[limited_mask]).all()
    empty = jaccard_distance(torch.zeros(0, 5), backend="cpu")
    assert tuple(empty.shape) == (0, 0) and empty.values().numel() == 0 and empty.crow_indices().tolist() == [0]
    single = jaccard_distance(torch.ones(1, 3), 4, 2, backend="cpu")
    assert single.to_dense().tolist() == [[0.0]] and single.values().numel() == 1


@pytest.mark.parametrize("weighting", ["spcl", "zhong"])
def test_results_do_not_depend_on_the_thread_count(core, weighting):
    # Large enough that every pass runs in parallel (each has a minimum size for that).
    x = torch.from_numpy(reid_like(np.random.default_rng(11), 700, dim=24, identities=40))
    results = []
    for threads in (1, 2, 3):
        core.set_num_threads(threads)
        results.append(jaccard_distance(x, 20, 6, weighting=weighting, backend="cpu"))
    for threads, result in zip((2, 3), results[1:]):
        assert_same_matrix(result, results[0], f"{threads} threads vs 1")


@pytest.mark.parametrize("weighting", ["spcl", "zhong"])
def test_rows_past_the_cache_blocks_give_the_oracles_matrix(core, weighting):
    # D = 4096: the weights' dot products (rerank_encode) and the list rescoring
    # (screen_rescore) are computed in buckets of 256 member rows (4 MiB), so 600 rows take
    # the bucketed paths; each value must still be its pair's, at any thread count.
    x = reid_like(np.random.default_rng(16), 600, dim=4096, identities=40)
    got = jaccard_distance(torch.from_numpy(x), 20, 6, weighting=weighting, backend="cpu")
    assert_matches_oracle(got, oracle_jaccard(x, 20, 6, weighting), f"{weighting}, 600 x 4096")
    core.set_num_threads(1)
    assert_same_matrix(jaccard_distance(torch.from_numpy(x), 20, 6, weighting=weighting, backend="cpu"), got,
                       "1 thread vs default")


@pytest.mark.parametrize("tile", [7, 64, 5000])
def test_results_do_not_depend_on_the_tile_limit(tile):
    x = torch.from_numpy(quantised(np.random.default_rng(9), 60))
    expected = jaccard_distance(x, 8, 3, backend="cpu")
    with fastassoc.tile_limit(tile):
        tiled = jaccard_distance(x, 8, 3, backend="cpu")
        reference = jaccard_distance(x, 8, 3, backend="reference")
    assert_same_matrix(tiled, expected, f"tile {tile}")
    assert_same_matrix(tiled, reference, f"tile {tile} vs reference", bits=False)


def test_lists_equal_the_references_on_continuous_data():
    # Wider lists than the unit tests' (heap path above 64 entries) and many rows per chunk.
    x = torch.from_numpy(reid_like(np.random.default_rng(12), 300, dim=32, identities=6))
    for k1, k2 in ((70, 6), (20, 1)):
        got = jaccard_distance(x, k1, k2, backend="cpu")
        assert_same_matrix(got, jaccard_distance(x, k1, k2, backend="reference"), f"k1={k1}", bits=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
def test_dbscan_values_of_every_dtype_equal_sklearn(dtype, seed):
    rng = np.random.default_rng(seed)
    matrix = random_symmetric(rng, 60, 0.15, ["absent", "zero", "mixed"][seed % 3])
    eps, min_samples = float(rng.integers(1, 12)) / 16.0, int(rng.integers(1, 6))
    distances = torch_csr(matrix)
    distances = torch.sparse_csr_tensor(distances.crow_indices(), distances.col_indices(),
                                        distances.values().to(dtype), size=distances.shape, check_invariants=True)
    got = dbscan(distances, eps, min_samples, backend="cpu")
    # Multiples of 1/16 are exact in every dtype, so scikit-learn's float64 comparison agrees.
    assert_same_labels(got, sklearn_labels(matrix, eps, min_samples), f"{dtype} seed {seed}")
    assert torch.equal(got, dbscan(distances, eps, min_samples, backend="reference"))


def test_dbscan_on_a_large_jaccard_matrix_equals_sklearn(core):
    x = torch.from_numpy(reid_like(np.random.default_rng(13), 500, dim=24, identities=30))
    matrix = jaccard_distance(x, 20, 6, backend="cpu")
    dense = scipy.sparse.csr_matrix((matrix.values().numpy(), matrix.col_indices().numpy(),
                                     matrix.crow_indices().numpy()), shape=matrix.shape)
    expected = sklearn_labels(dense, 0.6, 4)
    assert len(set(expected.tolist())) > 3
    for threads in (1, 2):
        core.set_num_threads(threads)
        assert_same_labels(dbscan(matrix, 0.6, 4, backend="cpu"), expected, f"{threads} threads")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_cluster_centres_equal_the_reference_bit_for_bit(dtype):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((300, 17))).to(dtype)
    labels = torch.from_numpy(rng.integers(-1, 9, 300))
    labels[labels == 4] = 5          # cluster 4 has no rows: all zeros, count 0
    centres, counts = cluster_centres(x, labels, num_clusters=10, backend="cpu")
    ref_centres, ref_counts = cluster_centres(x, labels, num_clusters=10, backend="reference")
    assert centres.dtype == ref_centres.dtype and torch.equal(centres, ref_centres)
    assert torch.equal(counts, ref_counts)
    expected, expected_counts = oracle_centres(x.double().numpy(), labels.numpy(), 10)
    assert (counts.numpy() == expected_counts).all()
    assert np.allclose(centres.double().numpy(), expected, atol=1e-6)
    none, none_counts = cluster_centres(x, torch.full((300,), -1), num_clusters=0, backend="cpu")
    assert none.shape == (0, 17) and none_counts.shape == (0,)


@pytest.mark.parametrize("weighting, max_distance", [("spcl", None), ("spcl", 0.7), ("zhong", None)])
def test_kept_pairs_and_recomputed_rows_write_the_same_matrix(monkeypatch, weighting, max_distance):
    from fastassoc.kernels.cpu import rerank as kernels
    x = torch.from_numpy(reid_like(np.random.default_rng(14), 400, dim=24, identities=30))
    monkeypatch.setattr(kernels, "KEPT_PAIRS_BUDGET", kernels.KEEP_ALL)
    kept = jaccard_distance(x, 20, 6, weighting=weighting, max_distance=max_distance, backend="cpu")
    # The default (kept or not by max_distance), none kept, a budget that runs out part-way.
    for budget in (None, 0, 1000):
        monkeypatch.setattr(kernels, "KEPT_PAIRS_BUDGET", budget)
        recomputed = jaccard_distance(x, 20, 6, weighting=weighting, max_distance=max_distance, backend="cpu")
        assert_same_matrix(recomputed, kept, f"budget {budget}")
    assert_same_matrix(kept, jaccard_distance(x, 20, 6, weighting=weighting, max_distance=max_distance,
                                              backend="reference"), "vs reference", bits=False)


def test_bounded_and_unbounded_matrices_agree_whichever_lists_propose():
    # Without max_distance the lists may be proposed by the bf16 screen (forced here), with it
    # by float32 GEMM tiles: the exact lists, hence the stored values, must not change.
    from fastassoc.kernels.cpu import _screen
    x = torch.from_numpy(reid_like(np.random.default_rng(15), 400, dim=64, identities=25))
    with _screen.forced("always"):
        full = jaccard_distance(x, 20, 6, backend="cpu")
    values, mask = stored(full, 400)
    limit = float(np.quantile(values[mask & (values > 0)], 0.3))
    limited, limited_mask = stored(jaccard_distance(x, 20, 6, max_distance=limit, backend="cpu"), 400)
    assert (limited_mask == (mask & (values <= limit))).all()
    assert (limited[limited_mask] == values[limited_mask]).all()
