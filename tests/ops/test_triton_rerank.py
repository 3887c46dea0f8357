"""The Triton backend of jaccard_distance, dbscan and cluster_centres.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so sizes stay small.
Jaccard matrices must equal the reference's (identical CSR structure, values within float32
rounding); the nearest lists equal a NumPy (distance, index) sort; DBSCAN labels equal
scikit-learn's; centres equal a NumPy loop. GPU cases (marked ``gpu``) skip without CUDA.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.cluster import DBSCAN

from conftest import HAS_GPU
from fastassoc import _backend
from fastassoc.kernels.triton import rerank as triton_rerank
from fastassoc.ops.rerank import cluster_centres, dbscan, jaccard_distance

DEVICE = "cuda" if HAS_GPU else "cpu"
# On the CPU every step after the nearest lists is the reference's own code: identical values.
# On a GPU the sums go through atomic index_add_ (any order): float32 rounding; J lies in [0, 1].
ATOL = 1e-6 if HAS_GPU else 0.0
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def reid_like(rng: np.random.Generator, size: int, dim: int = 12, identities: int = 6) -> np.ndarray:
    centres = rng.normal(size=(identities, dim))
    x = centres[rng.integers(0, identities, size)] + 0.4 * rng.normal(size=(size, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def quantised(rng: np.random.Generator, size: int, dim: int = 4) -> np.ndarray:
    """Small integers: exact distances, many exact ties, duplicated rows."""
    x = rng.integers(-2, 3, size=(size, dim)).astype(np.float32)
    x[rng.integers(0, size, size // 4)] = x[rng.integers(0, size, size // 4)]
    return x


def assert_same_matrix(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.layout == torch.sparse_csr and got.dtype == torch.float32, what
    assert got.device.type == DEVICE, f"{what}: result on {got.device}, features were on {DEVICE}"
    got_crow, exp_crow = got.crow_indices().cpu(), expected.crow_indices().cpu()
    mismatch = (got_crow != exp_crow).nonzero()
    assert mismatch.numel() == 0, f"{what}: row offsets differ first at {int(mismatch[0, 0])}"
    got_cols, exp_cols = got.col_indices().cpu(), expected.col_indices().cpu()
    mismatch = (got_cols != exp_cols).nonzero()
    assert mismatch.numel() == 0, f"{what}: column indices differ first at entry {int(mismatch[0, 0])}"
    difference = (got.values().cpu() - expected.values().cpu()).abs()
    worst = int(difference.argmax()) if difference.numel() else 0
    assert difference.numel() == 0 or float(difference[worst]) <= ATOL, \
        f"{what}: value {worst} differs by {float(difference[worst])}"


def both(x: np.ndarray, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.from_numpy(x)
    expected = jaccard_distance(features, *args, backend="reference", **kwargs)
    got = jaccard_distance(features.to(DEVICE), *args, backend="triton", **kwargs)
    return got, expected


# ----------------------------------------------------------------------------- nearest lists

@pytest.mark.parametrize("size, width, seed", [(37, 9, 0), (50, 13, 1), (20, 20, 2), (33, 1, 3), (40, 2, 4)])
def test_nearest_lists_equal_a_numpy_sort_with_exact_ties(size, width, seed):
    x = quantised(np.random.default_rng(seed), size)
    distances = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, 0.0)
    indices = np.broadcast_to(np.arange(size), (size, size))
    expected = np.lexsort((indices, distances), axis=1)[:, :width]      # by distance, then index
    features = torch.from_numpy(x).to(DEVICE)
    norms = (features * features).sum(1)      # exact for small integers
    for extra in (8, 0):   # 0: no proposal proves its row, every row takes the exact fallback
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(triton_rerank, "_EXTRA_CANDIDATES", extra)
            got = triton_rerank._nearest_lists(features, width, "sqeuclidean", norms).cpu().numpy()
        rows = np.nonzero((got != expected).any(1))[0]
        assert rows.size == 0, f"extra={extra} row {rows[:1]}: got {got[rows[:1]]}, expected {expected[rows[:1]]}"


def test_nearest_lists_past_the_fused_kernel_k_and_with_near_ties():
    # 70 + 8 proposals > K_MAX = 64: bounded distance tiles and a sort instead of the fused kernel.
    x = reid_like(np.random.default_rng(12), 90)
    got, expected = both(x, 70, 6)
    assert_same_matrix(got, expected, "k1 = 70")
    # 25 rows about 1e-4 apart: squared distances near float32 rounding, so the proposals' bound
    # cannot order them and those rows take the exact fallback.
    rng = np.random.default_rng(13)
    near = reid_like(rng, 1)[0] + np.float32(1e-4) * rng.normal(size=(25, 12)).astype(np.float32)
    got, expected = both(np.concatenate([reid_like(rng, 35), near]), 12, 4)
    assert_same_matrix(got, expected, "near ties")


# ----------------------------------------------------------------------------- jaccard_distance

@pytest.mark.parametrize("size, k1, k2, weighting", [(70, 10, 4, "spcl"), (55, 7, 1, "spcl"), (30, 40, 6, "spcl"),
                                                     (25, 1, 1, "spcl"), (60, 8, 3, "zhong"), (20, 30, 2, "zhong")])
def test_jaccard_equals_the_reference_on_reid_like_rows(size, k1, k2, weighting):
    x = reid_like(np.random.default_rng(size + k1), size)
    got, expected = both(x, k1, k2, weighting=weighting)
    assert_same_matrix(got, expected, f"N={size} k1={k1} k2={k2} {weighting}")


@pytest.mark.parametrize("seed, weighting", [(0, "spcl"), (1, "spcl"), (2, "zhong")])
def test_jaccard_exact_ties_and_duplicates(seed, weighting):
    x = quantised(np.random.default_rng(seed), 48)
    got, expected = both(x, 9, 3, weighting=weighting)
    assert_same_matrix(got, expected, f"quantised seed={seed} {weighting}")


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
def test_jaccard_metrics_and_max_distance(metric):
    x = reid_like(np.random.default_rng(5), 45) * 3.0     # not unit rows: metrics differ
    got, expected = both(x, 8, 3, metric=metric, max_distance=0.7)
    assert_same_matrix(got, expected, metric)
    assert float(got.values().max()) <= 0.7


def test_jaccard_one_identity_isolated_point_and_tiny_inputs():
    rng = np.random.default_rng(7)
    x = np.concatenate([0.01 * rng.normal(size=(12, 6)) + 1.0, [[-50.0] * 6]]).astype(np.float32)
    got, expected = both(x, 5, 2)
    assert_same_matrix(got, expected, "one identity + isolated")
    for size in (0, 1, 2):
        got, expected = both(x[:size], 5, 2)
        assert_same_matrix(got, expected, f"N={size}")


def test_jaccard_float64_and_tiny_tiles():
    x = reid_like(np.random.default_rng(8), 40).astype(np.float64)
    expected = jaccard_distance(torch.from_numpy(x), 6, 3, weighting="zhong", backend="reference")
    # Tiles of 64 elements: many distance tiles, sparse pieces and Jaccard row blocks.
    with _backend.tile_limit(64):
        got = jaccard_distance(torch.from_numpy(x).to(DEVICE), 6, 3, weighting="zhong", backend="triton")
    assert_same_matrix(got, expected, "float64, tile_limit(64)")


# ----------------------------------------------------------------------------- dbscan

def random_symmetric(rng: np.random.Generator, size: int, density: float, diagonal: str) -> scipy.sparse.csr_matrix:
    """Symmetric sparse distances, multiples of 1/16 (exact float32, ties at eps)."""
    upper = np.triu(rng.random((size, size)) < density, 1)
    values = np.triu(rng.integers(0, 17, (size, size)) / 16.0, 1)
    mask = upper | upper.T
    dense = values + values.T
    if diagonal != "absent":
        mask[np.arange(size), np.arange(size)] = True
        dense[np.arange(size), np.arange(size)] = 0.0
        if diagonal == "mixed":   # stored diagonal entries above eps exclude the point itself
            dense[np.arange(size), np.arange(size)] = np.where(rng.random(size) < 0.5, 0.0, 1.0)
    rows, cols = np.nonzero(mask)
    return scipy.sparse.csr_matrix((dense[rows, cols].astype(np.float32), (rows, cols)), shape=(size, size))


def to_torch(matrix: scipy.sparse.csr_matrix) -> torch.Tensor:
    matrix = matrix.copy()
    matrix.sort_indices()
    return torch.sparse_csr_tensor(torch.from_numpy(matrix.indptr.astype(np.int64)),
                                   torch.from_numpy(matrix.indices.astype(np.int64)),
                                   torch.from_numpy(matrix.data), size=matrix.shape,
                                   check_invariants=True).to(DEVICE)


def assert_sklearn_labels(matrix: scipy.sparse.csr_matrix, eps: float, min_samples: int, what: str) -> None:
    expected = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(matrix)
    got = dbscan(to_torch(matrix), eps, min_samples, backend="triton")
    assert got.device.type == DEVICE and got.dtype == torch.int64, what
    got = got.cpu().numpy()
    wrong = np.nonzero(got != expected)[0]
    assert wrong.size == 0, f"{what}: point {wrong[0]} labelled {got[wrong[0]]}, scikit-learn {expected[wrong[0]]}"


@given(size=st.integers(1, 40), density=st.floats(0.0, 0.5), diagonal=st.sampled_from(["absent", "zero", "mixed"]),
       min_samples=st.integers(1, 6), eps_32nds=st.integers(1, 33), seed=st.integers(0, 2**32 - 1))
@SETTINGS
def test_dbscan_equals_sklearn_on_random_sparse_graphs(size, density, diagonal, min_samples, eps_32nds, seed):
    matrix = random_symmetric(np.random.default_rng(seed), size, density, diagonal)
    # Even 32nds sit exactly on stored values (the <= boundary), odd ones between them.
    assert_sklearn_labels(matrix, eps_32nds / 32.0, min_samples,
                          f"N={size} density={density:.2f} {diagonal} eps={eps_32nds}/32 min={min_samples}")


@given(num_clusters=st.integers(2, 5), cluster_size=st.integers(3, 6), num_border=st.integers(1, 6),
       seed=st.integers(0, 2**32 - 1))
@SETTINGS
def test_dbscan_shared_border_points_take_the_smallest_cluster(num_clusters, cluster_size, num_border, seed):
    """Cliques (all core) with border points that touch several of them, indices shuffled."""
    rng = np.random.default_rng(seed)
    size = num_clusters * cluster_size + num_border
    permutation = rng.permutation(size)
    rows, cols = [], []
    for c in range(num_clusters):
        members = permutation[c * cluster_size:(c + 1) * cluster_size]
        rows += [a for a in members for b in members if a != b]
        cols += [b for a in members for b in members if a != b]
    for b in permutation[num_clusters * cluster_size:]:
        # One core neighbour in each of 1-3 clusters: degree <= 4 < min_samples = cluster_size + 2.
        for c in rng.choice(num_clusters, size=rng.integers(1, min(3, num_clusters) + 1), replace=False):
            a = permutation[c * cluster_size + rng.integers(cluster_size)]
            rows += [a, b]
            cols += [b, a]
    values = np.full(len(rows), 0.5, dtype=np.float32)
    matrix = scipy.sparse.csr_matrix((values, (rows, cols)), shape=(size, size))
    matrix.sum_duplicates()
    matrix.data[:] = 0.5
    # min_samples = cluster_size: a clique member has cluster_size - 1 others + itself (+ borders).
    assert_sklearn_labels(matrix, 0.5, cluster_size, f"{num_clusters} cliques of {cluster_size}, {num_border} borders")


def test_dbscan_long_chain_and_empty():
    # A path is the worst case for label propagation; numbered from its smallest index.
    size = 257
    order = np.random.default_rng(3).permutation(size)
    rows = np.concatenate([order[:-1], order[1:]])
    cols = np.concatenate([order[1:], order[:-1]])
    matrix = scipy.sparse.csr_matrix((np.full(rows.size, 0.25, np.float32), (rows, cols)), shape=(size, size))
    assert_sklearn_labels(matrix, 0.25, 2, "chain")
    assert_sklearn_labels(matrix, 0.25, 3, "chain, ends are border points")
    empty = dbscan(to_torch(scipy.sparse.csr_matrix((0, 0), dtype=np.float32)), 0.5, 2, backend="triton")
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_dbscan_on_triton_jaccard_equals_sklearn():
    x = reid_like(np.random.default_rng(9), 60)
    matrix = jaccard_distance(torch.from_numpy(x).to(DEVICE), 8, 3, backend="triton").cpu()
    scipy_matrix = scipy.sparse.csr_matrix((matrix.values().numpy(), matrix.col_indices().numpy(),
                                            matrix.crow_indices().numpy()), shape=(60, 60))
    for eps, min_samples in ((0.6, 4), (0.4, 2)):
        assert_sklearn_labels(scipy_matrix, eps, min_samples, f"jaccard eps={eps}")


# ----------------------------------------------------------------------------- cluster_centres

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cluster_centres_equal_a_numpy_loop(dtype):
    rng = np.random.default_rng(4)
    size, dim, num_clusters = 57, 150, 6    # dim > one 128-wide feature block; cluster 5 stays empty
    x = rng.normal(size=(size, dim)).astype(np.float32)
    labels = rng.integers(-1, num_clusters - 1, size)
    features = torch.from_numpy(x).to(dtype)
    wide = features.to(torch.float64).numpy()
    centres, counts = cluster_centres(features.to(DEVICE), torch.from_numpy(labels).to(DEVICE),
                                      num_clusters=num_clusters, backend="triton")
    assert centres.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert centres.device.type == DEVICE
    for c in range(num_clusters):
        members = wide[labels == c]
        assert int(counts[c]) == len(members), f"cluster {c} count"
        expected = members.mean(0) if len(members) else np.zeros(dim)
        np.testing.assert_allclose(centres[c].cpu().double().numpy(), expected, rtol=0, atol=1e-5,
                                   err_msg=f"cluster {c} ({dtype})")


def test_cluster_centres_bits_equal_the_reference_and_all_noise():
    rng = np.random.default_rng(6)
    features = torch.from_numpy(rng.normal(size=(40, 9)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(-1, 4, 40))
    expected = cluster_centres(features, labels, backend="reference")
    got = cluster_centres(features.to(DEVICE), labels.to(DEVICE), backend="triton")
    if not HAS_GPU:   # same summation order (rows in index order) on the CPU
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0].cpu(), expected[0], rtol=0, atol=1e-6)
    centres, counts = cluster_centres(features.to(DEVICE), torch.full((40,), -1).to(DEVICE), num_clusters=2,
                                      backend="triton")
    assert counts.tolist() == [0, 0] and not centres.any()


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_jaccard_at_a_few_thousand_rows_equals_the_reference():
    x = reid_like(np.random.default_rng(10), 3000, dim=64, identities=150)
    got, expected = both(x, 20, 6)
    assert_same_matrix(got, expected, "N=3000 on the GPU")
    labels = dbscan(got, 0.6, 4, backend="triton")
    assert torch.equal(labels.cpu(), dbscan(expected, 0.6, 4, backend="reference"))
