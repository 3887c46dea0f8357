"""Tests of jaccard_distance, dbscan and cluster_centres against independent oracles.

jaccard_distance is compared with a float64 NumPy oracle written from the semantics
(plain loops over small N: k1-nearest lists with the row itself at distance 0 and ties to
the smaller index, reciprocal sets over k1 and round(k1/2) + 1 neighbours, the 2/3-overlap
expansion, softmax weights, query expansion over the k2 nearest, J = 1 - m / (2 - m)).
Exactness: "quantised" features are multiples of 1/4 in [-1/2, 1/2], so squared distances
and dot products are exact in float32 and ties (duplicated rows, equal distances) are real;
continuous re-id-like data (clusters of L2-normalised rows) is well separated. Values are
compared within 2e-6 (float32 sums of up to a few hundred weights against float64); the
sparsity pattern exactly, except that a pair whose float64 J lies within 1e-6 of 1 may go
either way (float32 rounds 1 - 5e-8 to 1).

dbscan is compared with scikit-learn's DBSCAN(metric="precomputed") on the same matrix,
labels equal including their numbering.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.cluster import DBSCAN

import fastassoc
from conftest import require_backend
from fastassoc.ops._sparse import CSRMatrix
from fastassoc.ops.rerank import cluster_centres, dbscan, jaccard_distance

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])
VALUE_TOLERANCE = 2e-6
BOUNDARY = 1e-6


# ----------------------------------------------------------------------------- oracles

def oracle_jaccard(x: np.ndarray, k1: int, k2: int, weighting: str = "spcl") -> np.ndarray:
    """Dense float64 Jaccard distances [N, N] by plain loops over the semantics.

    ``weighting="zhong"``: lists of k1 + 1 and weights exp(-D^2 / column max of D^2), D the
    squared Euclidean matrix, as torchreid's re_ranking applied to it.
    """
    x = np.asarray(x, np.float64)
    n = len(x)
    # Row by row: the [N, N, D] difference tensor would not fit at the D = 2048-4096 tests.
    squared = np.stack([((x - row) ** 2).sum(-1) for row in x]) if n else np.zeros((0, 0))
    np.fill_diagonal(squared, 0.0)
    width = min(k1 if weighting == "spcl" else k1 + 1, n)
    original = squared ** 2
    column_max = original.max(axis=0)
    scaled = np.where(column_max > 0, original / np.where(column_max > 0, column_max, 1.0), 0.0).T
    ranked = [list(np.lexsort((np.arange(n), squared[i]))[:width]) for i in range(n)]

    def reciprocal(i: int, size: int) -> set:
        return {int(j) for j in ranked[i][:size] if i in ranked[j][:size]}

    half = min(int(np.around(k1 / 2)) + 1, width)
    full_sets = [reciprocal(i, width) for i in range(n)]
    half_sets = [reciprocal(i, half) for i in range(n)]
    weights = np.zeros((n, n))
    for i in range(n):
        expanded = set(full_sets[i])
        for candidate in full_sets[i]:
            candidate_set = half_sets[candidate]
            if len(candidate_set & full_sets[i]) > 2 / 3 * len(candidate_set):
                expanded |= candidate_set
        members = sorted(expanded)
        if not members:              # more than k1 duplicates with smaller indices crowd i out of its own list
            continue
        if weighting == "spcl":
            logits = -(2.0 - 2.0 * (x[members] @ x[i]))
            exps = np.exp(logits - logits.max())
        else:
            exps = np.exp(-scaled[i, members])
        weights[i, members] = exps / exps.sum()
    if k2 != 1:
        weights = np.stack([weights[ranked[i][:k2]].mean(0) for i in range(n)])
    shared = np.zeros((n, n))
    for i in range(n):
        shared[i] = np.minimum(weights[i][None, :], weights).sum(axis=1)
    distances = 1.0 - shared / (2.0 - shared)
    distances[distances < 0] = 0.0
    return distances


def oracle_centres(x: np.ndarray, labels: np.ndarray, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.zeros((num_clusters, x.shape[1]))
    counts = np.zeros(num_clusters, np.int64)
    for row, label in zip(np.asarray(x, np.float64), labels):
        if label >= 0:
            centres[label] += row
            counts[label] += 1
    for label in range(num_clusters):
        if counts[label]:
            centres[label] /= counts[label]
    return centres, counts


def sklearn_labels(matrix: scipy.sparse.csr_matrix, eps: float, min_samples: int) -> np.ndarray:
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(matrix)


# ----------------------------------------------------------------------------- asserts and data

def stored(matrix: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Check the CSR contract; return (dense values with 1 where absent, stored mask)."""
    assert matrix.layout == torch.sparse_csr, f"layout {matrix.layout}, expected sparse_csr"
    assert tuple(matrix.shape) == (size, size), f"shape {tuple(matrix.shape)}, expected {(size, size)}"
    assert matrix.dtype == torch.float32, f"dtype {matrix.dtype}, expected float32"
    crow = matrix.crow_indices().cpu().numpy()
    cols = matrix.col_indices().cpu().numpy()
    values = matrix.values().cpu().numpy()
    assert crow[0] == 0 and crow[-1] == len(cols) == len(values) and (np.diff(crow) >= 0).all(), f"bad crow {crow}"
    rows = np.repeat(np.arange(size), np.diff(crow))
    for row in range(size):
        row_cols = cols[crow[row]:crow[row + 1]]
        assert (np.diff(row_cols) > 0).all(), f"row {row}: column indices not strictly increasing: {row_cols}"
    dense = np.ones((size, size), np.float64)
    mask = np.zeros((size, size), bool)
    dense[rows, cols] = values
    mask[rows, cols] = True
    return dense, mask


def assert_matches_oracle(matrix: torch.Tensor, expected: np.ndarray, what: str) -> None:
    size = len(expected)
    got, mask = stored(matrix, size)
    diagonal = np.eye(size, dtype=bool)
    assert mask[diagonal].all() and (got[diagonal] == 0).all(), f"{what}: diagonal not stored as explicit zeros"
    assert (got == got.T).all() and (mask == mask.T).all(), f"{what}: not exactly symmetric"
    must = (expected < 1.0 - BOUNDARY) | diagonal
    may = (expected < 1.0) | diagonal
    missing = np.argwhere(must & ~mask)
    extra = np.argwhere(mask & ~may)
    assert not len(missing) and not len(extra), (
        f"{what}: sparsity pattern differs; first missing {missing[:1].tolist()} "
        f"(oracle {expected[tuple(missing[0])] if len(missing) else None}), first extra {extra[:1].tolist()} "
        f"(value {got[tuple(extra[0])] if len(extra) else None}); {len(missing)} missing, {len(extra)} extra")
    compared = np.where(mask, got, 1.0)
    off = np.abs(compared - np.where(mask, expected, 1.0))
    worst = np.unravel_index(np.argmax(off), off.shape)
    assert off[worst] <= VALUE_TOLERANCE, (
        f"{what}: first worst value mismatch at {tuple(map(int, worst))}: got {compared[worst]!r}, "
        f"expected {expected[worst]!r}")


def assert_same_labels(got: torch.Tensor, expected: np.ndarray, what: str) -> None:
    assert got.dtype == torch.int64, f"{what}: dtype {got.dtype}, expected int64"
    got = got.cpu().numpy()
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    differ = np.flatnonzero(got != expected)
    assert not len(differ), (f"{what}: labels differ at {len(differ)} points, first {differ[0]}: "
                             f"got {got[differ[0]]}, scikit-learn {expected[differ[0]]}")


def assert_names_argument(error: Exception, name: str) -> None:
    pattern = rf"(^|[\s,(]){re.escape(name)} (must|contains|has|is|values)\b"
    assert re.search(pattern, str(error)), f"error does not name {name!r}: {type(error).__name__}: {error}"


def reid_like(rng: np.random.Generator, count: int, dim: int = 16, identities: int = 12) -> np.ndarray:
    """L2-normalised rows scattered around a few identity centres."""
    centres = rng.standard_normal((identities, dim))
    rows = centres[rng.integers(0, identities, count)] + 0.6 * rng.standard_normal((count, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def quantised(rng: np.random.Generator, count: int, dim: int = 6, duplicates: int = 20) -> np.ndarray:
    """Multiples of 1/4 in [-1/2, 1/2] (exact float32 arithmetic) with duplicated rows."""
    rows = rng.integers(-2, 3, (count - duplicates, dim)) / 4.0
    copies = rows[rng.integers(0, len(rows), duplicates)]
    mixed = np.concatenate([rows, copies])
    return mixed[rng.permutation(count)].astype(np.float32)


def to_scipy(matrix: torch.Tensor) -> scipy.sparse.csr_matrix:
    size = matrix.shape[0]
    return scipy.sparse.csr_matrix((matrix.values().cpu().numpy(), matrix.col_indices().cpu().numpy(),
                                    matrix.crow_indices().cpu().numpy()), shape=(size, size))


def random_symmetric(rng: np.random.Generator, size: int, density: float, diagonal: str) -> scipy.sparse.csr_matrix:
    """Symmetric sparse distances, multiples of 1/16 in [0, 1) (explicit zeros included).

    ``diagonal``: "absent", "zero" or "mixed" (some stored zeros, some positive, some absent).
    """
    upper = np.triu(rng.random((size, size)) < density, 1)
    values = rng.integers(0, 16, (size, size)) / 16.0
    dense = np.where(upper, values, 0.0)
    dense = dense + dense.T
    mask = upper | upper.T
    if diagonal != "absent":
        on_diagonal = np.ones(size, bool) if diagonal == "zero" else rng.random(size) < 0.6
        mask[np.arange(size), np.arange(size)] = on_diagonal
        if diagonal == "mixed":
            dense[np.arange(size), np.arange(size)] = np.where(rng.random(size) < 0.5, 0.0,
                                                               rng.integers(1, 16, size) / 16.0)
    rows, cols = np.nonzero(mask)
    return scipy.sparse.csr_matrix((dense[rows, cols].astype(np.float32), (rows, cols)), shape=(size, size))


def torch_csr(matrix: scipy.sparse.csr_matrix, device: str = "cpu") -> torch.Tensor:
    matrix = matrix.copy()
    matrix.sort_indices()
    return torch.sparse_csr_tensor(torch.from_numpy(matrix.indptr.astype(np.int64)),
                                   torch.from_numpy(matrix.indices.astype(np.int64)),
                                   torch.from_numpy(matrix.data), size=matrix.shape,
                                   check_invariants=True).to(device)


# ----------------------------------------------------------------------------- jaccard_distance

@pytest.mark.parametrize("size, k1, k2", [(120, 20, 6), (97, 7, 3), (60, 5, 1), (40, 1, 1), (30, 50, 6),
                                          (61, 8, 8), (50, 4, 2)])
def test_jaccard_matches_oracle_on_reid_like_rows(backend_device, size, k1, k2):
    backend, device = backend_device
    require_backend("jaccard_distance", backend)
    x = reid_like(np.random.default_rng(size * 100 + k1), size)
    got = jaccard_distance(torch.from_numpy(x).to(device), k1, k2, backend=backend)
    assert got.device.type == device
    assert_matches_oracle(got.cpu(), oracle_jaccard(x, k1, k2), f"reid-like N={size} k1={k1} k2={k2}")


@pytest.mark.parametrize("size, k1, k2, seed", [(80, 10, 4, 0), (64, 6, 1, 1), (90, 13, 5, 2), (45, 3, 2, 3)])
def test_jaccard_exact_ties_and_duplicates(backend_device, size, k1, k2, seed):
    backend, device = backend_device
    require_backend("jaccard_distance", backend)
    x = quantised(np.random.default_rng(seed), size)
    got = jaccard_distance(torch.from_numpy(x).to(device), k1, k2, backend=backend)
    assert_matches_oracle(got.cpu(), oracle_jaccard(x, k1, k2), f"quantised N={size} k1={k1} k2={k2}")


def ring(rng: np.random.Generator, members: int = 24, copies: int = 3, others: int = 40, dim: int = 512
         ) -> np.ndarray:
    """A centre row (and ``copies`` copies of it) with ``members`` cyclic shifts of one offset
    around it, all at one distance from it, among ``others`` random rows; values are multiples
    of 2^-12, so float64 sums of their products are exact and the ties are exact, while float32
    sums in different orders (a GEMM's, over the shifted rows) round differently."""
    step = 2.0 ** -12
    centre = np.full(dim, np.round(0.3 / step) * step)
    offset = rng.integers(-2048, 2049, dim) * step
    rows = [centre] * (1 + copies) + [centre + np.roll(offset, 7 * s) for s in range(1, members + 1)]
    rows += list(rng.integers(-4096, 4097, (others, dim)) * step)
    return np.asarray(rows, np.float32)[rng.permutation(len(rows))]


@pytest.mark.parametrize("weighting", ["spcl", "zhong"])
@pytest.mark.parametrize("seed", [1, 2])
def test_jaccard_exact_ties_that_float32_sums_would_break(backend_device, weighting, seed):
    # The centre's 24 neighbours tie exactly (and its copies at distance 0): k1 = 10 keeps the
    # copies and the members of smaller index. Lists ranked by float32 GEMM values keep the
    # members the GEMM's rounding favours, and their J differs from the oracle's by ~0.1.
    backend, device = backend_device
    require_backend("jaccard_distance", backend)
    x = ring(np.random.default_rng(seed))
    got = jaccard_distance(torch.from_numpy(x).to(device), 10, 4, weighting=weighting, backend=backend)
    assert_matches_oracle(got.cpu(), oracle_jaccard(x, 10, 4, weighting), f"ring {weighting} seed {seed}")


def test_jaccard_one_identity_and_isolated_points(backend_device):
    backend, device = backend_device
    require_backend("jaccard_distance", backend)
    same = np.tile(np.array([[0.5, -0.25, 0.25, 0.0]], np.float32), (12, 1))
    far = np.array([[8.0, 8.0, 0.0, 0.0], [-8.0, 0.0, 8.0, 0.0]], np.float32)
    for x, k1, k2 in ((same, 5, 2), (same, 20, 6), (np.concatenate([same, far]), 4, 2)):
        got = jaccard_distance(torch.from_numpy(x).to(device), k1, k2, backend=backend)
        assert_matches_oracle(got.cpu(), oracle_jaccard(x, k1, k2), f"N={len(x)} k1={k1} k2={k2}")


@pytest.mark.parametrize("size, k1, k2, kind", [(110, 20, 6, "reid"), (70, 9, 1, "reid"), (25, 30, 6, "reid"),
                                                (80, 10, 4, "quantised"), (12, 4, 2, "identical")])
def test_jaccard_zhong_weighting_matches_oracle(backend_device, size, k1, k2, kind):
    backend, device = backend_device
    require_backend("jaccard_distance", backend)
    rng = np.random.default_rng(size + k1)
    x = {"reid": lambda: reid_like(rng, size), "quantised": lambda: quantised(rng, size),
         "identical": lambda: np.full((size, 4), 0.25, np.float32)}[kind]()
    got = jaccard_distance(torch.from_numpy(x).to(device), k1, k2, weighting="zhong", backend=backend)
    assert_matches_oracle(got.cpu(), oracle_jaccard(x, k1, k2, "zhong"), f"zhong {kind} N={size} k1={k1} k2={k2}")


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_jaccard_metrics(metric):
    x = reid_like(np.random.default_rng(5), 70)
    scaled = x * np.random.default_rng(6).uniform(0.5, 2.0, (70, 1)).astype(np.float32)
    # Euclidean ranks as squared Euclidean; cosine ranks and weighs the L2-normalised rows.
    source, oracle_rows = (x, x) if metric == "euclidean" else (scaled, x)
    got = jaccard_distance(torch.from_numpy(source), 9, 3, metric=metric, backend="reference")
    assert_matches_oracle(got, oracle_jaccard(oracle_rows, 9, 3), metric)


def test_jaccard_max_distance_keeps_a_subset_with_equal_values():
    x = torch.from_numpy(reid_like(np.random.default_rng(7), 90))
    full, full_mask = stored(jaccard_distance(x, 12, 4, backend="reference"), 90)
    limit = float(np.median(full[full_mask & (full > 0)]))
    limited, limited_mask = stored(jaccard_distance(x, 12, 4, max_distance=limit, backend="reference"), 90)
    assert (limited_mask == (full_mask & (full <= limit))).all()
    assert (limited[limited_mask] == full[limited_mask]).all()
    exact = float(np.float32(full[full_mask & (full > 0)][0]))
    at_boundary, at_mask = stored(jaccard_distance(x, 12, 4, max_distance=exact, backend="reference"), 90)
    assert (at_mask == (full_mask & (full <= exact))).all() and (full[at_mask] == exact).any()


def test_jaccard_as_tuple_float64_empty_and_grad_inputs():
    x = torch.from_numpy(reid_like(np.random.default_rng(8), 40))
    matrix = jaccard_distance(x, 6, 2, backend="reference")
    parts = jaccard_distance(x.requires_grad_(), 6, 2, as_tuple=True, backend="reference")
    assert isinstance(parts, CSRMatrix) and parts.size == (40, 40)
    assert torch.equal(parts.to_sparse_csr().to_dense(), matrix.to_dense())
    doubled = jaccard_distance(x.detach().double(), 6, 2, backend="reference")
    assert_matches_oracle(doubled, oracle_jaccard(x.detach().numpy(), 6, 2), "float64")
    empty = jaccard_distance(torch.zeros(0, 5), backend="reference")
    assert tuple(empty.shape) == (0, 0) and empty.values().numel() == 0


@pytest.mark.parametrize("tile", [7, 64, 1000])
def test_jaccard_does_not_depend_on_the_tile_size(tile):
    x = torch.from_numpy(reid_like(np.random.default_rng(9), 50))
    expected = jaccard_distance(x, 8, 3, backend="reference")
    with fastassoc.tile_limit(tile):
        tiled = jaccard_distance(x, 8, 3, backend="reference")
    assert torch.equal(tiled.crow_indices(), expected.crow_indices())
    assert torch.equal(tiled.col_indices(), expected.col_indices())
    assert torch.equal(tiled.values(), expected.values())


# ----------------------------------------------------------------------------- dbscan

@given(size=st.integers(1, 40), density=st.floats(0.0, 0.5), diagonal=st.sampled_from(["absent", "zero", "mixed"]),
       min_samples=st.integers(1, 6), eps_index=st.integers(0, 17), seed=st.integers(0, 2**32 - 1))
@PROPERTY_SETTINGS
def test_dbscan_equals_sklearn_on_random_sparse_graphs(backend_device, size, density, diagonal, min_samples,
                                                        eps_index, seed):
    backend, device = backend_device
    require_backend("dbscan", backend)
    matrix = random_symmetric(np.random.default_rng(seed), size, density, diagonal)
    # Multiples of 1/16 put eps exactly on stored values (the <= boundary); 1/32 steps fall between.
    eps = (eps_index + 1) / 16.0 if eps_index < 16 else (0.5 + 1 / 32 if eps_index == 16 else 1e-3)
    got = dbscan(torch_csr(matrix, device), eps, min_samples, backend=backend)
    assert got.device.type == device
    assert_same_labels(got, sklearn_labels(matrix, eps, min_samples),
                       f"N={size} density={density:.2f} diagonal={diagonal} eps={eps} min_samples={min_samples}")


def test_dbscan_equals_sklearn_on_the_dense_form():
    rng = np.random.default_rng(11)
    matrix = random_symmetric(rng, 60, 0.15, "absent")
    stored_mask = np.zeros((60, 60), bool)
    stored_mask[np.repeat(np.arange(60), np.diff(matrix.indptr)), matrix.indices] = True
    dense = np.where(stored_mask, matrix.toarray(), 1.0).astype(np.float32)
    np.fill_diagonal(dense, 0.0)
    for eps, min_samples in ((0.25, 3), (0.5, 2), (0.75, 5)):
        assert_same_labels(dbscan(torch_csr(matrix), eps, min_samples, backend="reference"),
                           sklearn_labels(dense, eps, min_samples), f"dense eps={eps} min_samples={min_samples}")


def test_dbscan_border_points_join_the_first_cluster():
    # Cores: cliques {0, 1, 2, 3} and {5, 6, 7, 8} (4 neighbours each with itself). 4 borders
    # both (3 neighbours) and joins cluster 0; 9 borders only the second; 10 is noise.
    edges = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (3, 4), (4, 5),
             (5, 6), (5, 7), (5, 8), (6, 7), (6, 8), (7, 8), (8, 9)]
    dense = np.zeros((11, 11), np.float32)
    for i, j in edges:
        dense[i, j] = dense[j, i] = 0.25
    rows, cols = np.nonzero(dense)
    matrix = scipy.sparse.csr_matrix((dense[rows, cols], (rows, cols)), shape=(11, 11))
    expected = sklearn_labels(matrix, 0.25, 4)
    assert expected.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1]
    assert_same_labels(dbscan(torch_csr(matrix), 0.25, 4, backend="reference"), expected, "border")
    # Numbering follows the smallest core index, and a border the first cluster that reaches it.
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(11)
        permuted = matrix[perm][:, perm].tocsr()
        assert_same_labels(dbscan(torch_csr(permuted), 0.25, 4, backend="reference"),
                           sklearn_labels(permuted, 0.25, 4), f"permutation {perm.tolist()}")


def test_dbscan_compares_eps_in_the_values_dtype():
    value = np.float32(0.3)
    matrix = scipy.sparse.csr_matrix((np.array([value, value], np.float32), (np.array([0, 1]), np.array([1, 0]))),
                                     shape=(2, 2))
    just_below = float(value) - 1e-9      # rounds to ``value`` in float32, as scikit-learn compares
    for eps in (float(value), just_below, float(np.nextafter(value, np.float32(0)))):
        assert_same_labels(dbscan(torch_csr(matrix), eps, 2, backend="reference"), sklearn_labels(matrix, eps, 2),
                           f"eps={eps!r}")


def test_dbscan_on_jaccard_output_equals_sklearn(backend_device):
    backend, device = backend_device
    require_backend("dbscan", backend)
    x = torch.from_numpy(reid_like(np.random.default_rng(12), 150, identities=8))
    jaccard = jaccard_distance(x, 15, 5, backend="reference")
    for eps, min_samples in ((0.4, 4), (0.6, 4), (0.55, 2), (float(jaccard.values()[5]), 3)):
        got = dbscan(CSRMatrix.from_sparse_csr(jaccard.to(device)), eps, min_samples, backend=backend)
        assert_same_labels(got, sklearn_labels(to_scipy(jaccard), eps, min_samples), f"eps={eps} {min_samples}")


def test_dbscan_empty_and_single():
    empty = torch.sparse_csr_tensor(torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                                    torch.zeros(0), size=(0, 0), check_invariants=True)
    assert dbscan(empty, 0.5, 1, backend="reference").tolist() == []
    lone = torch.zeros(1, 1).to_sparse_csr()
    assert dbscan(lone, 0.5, 1, backend="reference").tolist() == [0]
    assert dbscan(lone, 0.5, 2, backend="reference").tolist() == [-1]


# ----------------------------------------------------------------------------- cluster_centres

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cluster_centres_match_a_loop(dtype):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((70, 9)).astype(np.float32)
    labels = rng.integers(-1, 6, 70)
    labels[labels == 3] = -1                                   # cluster 3 has no rows
    features = torch.from_numpy(x).to(dtype)
    centres, counts = cluster_centres(features, torch.from_numpy(labels), backend="reference")
    expected_centres, expected_counts = oracle_centres(features.double().numpy(), labels, 6)
    assert centres.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert counts.dtype == torch.int64 and counts.tolist() == expected_counts.tolist()
    np.testing.assert_allclose(centres.double().numpy(), expected_centres, rtol=1e-6, atol=1e-6)
    with fastassoc.tile_limit(10):
        tiled, _ = cluster_centres(features, torch.from_numpy(labels), backend="reference")
    assert torch.equal(tiled, centres)
    more, more_counts = cluster_centres(features, torch.from_numpy(labels), num_clusters=8, backend="reference")
    assert more.shape == (8, 9) and torch.equal(more[:6], centres) and more_counts[6:].tolist() == [0, 0]
    none, none_counts = cluster_centres(features, torch.full((70,), -1), backend="reference")
    assert none.shape == (0, 9) and none_counts.shape == (0,)


# ----------------------------------------------------------------------------- bad input

def test_bad_arguments_are_named():
    x = torch.from_numpy(reid_like(np.random.default_rng(14), 10))
    cases = [
        (lambda: jaccard_distance(x, 0), ValueError, "k1"),
        (lambda: jaccard_distance(x, 4, 0), ValueError, "k2"),
        (lambda: jaccard_distance(x, 4, 5), ValueError, "k2"),
        (lambda: jaccard_distance(x, 4.0), TypeError, "k1"),
        (lambda: jaccard_distance(x, max_distance=-0.1), ValueError, "max_distance"),
        (lambda: jaccard_distance(x, metric="dot"), ValueError, "metric"),
        (lambda: jaccard_distance(x, weighting="mean"), ValueError, "weighting"),
        (lambda: jaccard_distance(x, as_tuple=1), TypeError, "as_tuple"),
        (lambda: jaccard_distance(torch.full((3, 2), float("nan"))), ValueError, "features"),
        (lambda: jaccard_distance(x[0]), ValueError, "features"),
        (lambda: cluster_centres(x, torch.full((10,), -2)), ValueError, "labels"),
        (lambda: cluster_centres(x, torch.zeros(9, dtype=torch.int64)), ValueError, "labels"),
        (lambda: cluster_centres(x, torch.full((10,), 4), num_clusters=3), ValueError, "labels"),
    ]
    distances = jaccard_distance(x, 4, 2, backend="reference")
    asymmetric = torch.tensor([[0.0, 0.1], [0.2, 0.0]]).to_sparse_csr()
    one_sided = torch.tensor([[0.0, 0.1], [0.0, 0.0]]).to_sparse_csr()
    cases += [
        (lambda: dbscan(distances, -0.1, 3), ValueError, "eps"),
        (lambda: dbscan(distances, float("nan"), 3), ValueError, "eps"),
        (lambda: dbscan(distances, 0.5, 0), ValueError, "min_samples"),
        (lambda: dbscan(asymmetric, 0.5, 1), ValueError, "distances"),
        (lambda: dbscan(one_sided, 0.5, 1), ValueError, "distances"),
        (lambda: dbscan(torch.zeros(2, 3).to_sparse_csr(), 0.5, 1), ValueError, "distances"),
        (lambda: dbscan(torch.zeros(2, 2), 0.5, 1), TypeError, "distances"),
        (lambda: dbscan(torch.sparse_csr_tensor(torch.tensor([0, 2, 4]), torch.tensor([1, 1, 0, 0]),
                                                torch.full((4,), 0.1), size=(2, 2), check_invariants=False),
                        0.5, 1), ValueError, "distances"),
        (lambda: dbscan(torch.tensor([[0.0, -1.0], [-1.0, 0.0]]).to_sparse_csr(), 0.5, 1), ValueError, "distances"),
        (lambda: dbscan(torch.tensor([[0.0, float("nan")], [float("nan"), 0.0]]).to_sparse_csr(), 0.5, 1),
         ValueError, "distances"),
    ]
    for call, kind, name in cases:
        with pytest.raises(kind) as caught:
            call()
        assert_names_argument(caught.value, name)


