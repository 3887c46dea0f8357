"""Tests of fastassoc.compat against the public semantics, written here as NumPy loops.

``oracle_spcl`` follows SpCL's ``compute_jaccard_distance`` (spcl/utils/faiss_rerank.py)
step by step in float64: exact nearest lists of k1 rows (the row itself at distance 0, ties
to the smaller index, as the compat docstring promises in place of faiss' unspecified
order), reciprocal sets over k1 and round(k1/2) + 1 neighbours, the 2/3-overlap expansion,
softmax(-(2 - 2 x.y)) weights, the k2 query expansion, the inverted-index min sums and
1 - m / (2 - m) clamped at 0. ``oracle_torchreid`` follows torchreid's ``re_ranking``
(torchreid/utils/rerank.py): O = transpose(D^2 / column max) in float32 (the values it ranks),
stable ranking, k1 + 1 lists, exp(-O) weights, query expansion, Jaccard of query rows
against the gallery, then (1 - lambda) J + lambda O, no clamp.

Data: L2-normalised clustered rows, and "quantised" rows (multiples of 1/4, exact float32
arithmetic) with duplicated rows so that ties are real. No row has k1 or more duplicates,
so every row's weights sum to one and the original's diagonal is 0 up to rounding.
"""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import scipy.sparse
import torch
from sklearn.cluster import DBSCAN

import fastassoc
from fastassoc import compat
from fastassoc.compat import compute_jaccard_distance, re_ranking

TOLERANCE = 1e-5


# ----------------------------------------------------------------------------- oracles

def stable_ranking(values: np.ndarray) -> np.ndarray:
    """Indices of ``values`` by (value, index)."""
    return np.lexsort((np.arange(len(values)), values))


def reciprocal(ranking: list[np.ndarray], i: int, size: int) -> list[int]:
    forward = ranking[i][:size]
    return [int(j) for j in forward if i in ranking[j][:size]]


def expanded(ranking: list[np.ndarray], i: int, k1_full: int, k1_half: int) -> list[int]:
    own = reciprocal(ranking, i, k1_full)
    members = set(own)
    for candidate in own:
        theirs = reciprocal(ranking, candidate, k1_half)
        if len(set(theirs) & set(own)) > 2 / 3 * len(theirs):
            members |= set(theirs)
    return sorted(members)


def jaccard_sums(weights: np.ndarray, rows) -> np.ndarray:
    """m[i, j] = sum_k min(V[i, k], V[j, k]) through the inverted index, for ``rows``."""
    n = weights.shape[1]
    holders = [np.flatnonzero(weights[:, k]) for k in range(n)]
    sums = np.zeros((len(rows), weights.shape[0]))
    for out, i in enumerate(rows):
        for k in np.flatnonzero(weights[i]):
            partners = holders[k]
            sums[out, partners] += np.minimum(weights[i, k], weights[partners, k])
    return sums


def oracle_spcl(x: np.ndarray, k1: int, k2: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    n = len(x)
    squared = np.array([[((x[i] - x[j]) ** 2).sum() for j in range(n)] for i in range(n)])
    np.fill_diagonal(squared, 0.0)
    ranking = [stable_ranking(squared[i])[:k1] for i in range(n)]
    half = int(np.around(k1 / 2)) + 1
    weights = np.zeros((n, n))
    for i in range(n):
        members = expanded(ranking, i, k1, half)
        logits = -(2.0 - 2.0 * (x[members] @ x[i]))
        exps = np.exp(logits - logits.max())
        weights[i, members] = exps / exps.sum()
    if k2 != 1:
        weights = np.array([weights[ranking[i][:k2]].mean(axis=0) for i in range(n)])
    sums = jaccard_sums(weights, range(n))
    distances = 1.0 - sums / (2.0 - sums)
    distances[distances < 0] = 0.0
    return distances


def oracle_torchreid(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, k1: int, k2: int,
                     lambda_value: float) -> np.ndarray:
    num_query = q_g.shape[0]
    joint = np.block([[q_q, q_g], [q_g.T, g_g]])
    squared = np.power(joint, 2).astype(np.float32)
    scaled = (squared / squared.max(axis=0)).T                    # float32, as torchreid ranks
    total = len(joint)
    ranking = [stable_ranking(scaled[i]) for i in range(total)]
    half = int(np.around(k1 / 2)) + 1
    weights = np.zeros((total, total))
    for i in range(total):
        members = expanded(ranking, i, k1 + 1, half)
        exps = np.exp(-scaled[i, members].astype(np.float64))
        weights[i, members] = exps / exps.sum()
    if k2 != 1:
        weights = np.array([weights[ranking[i][:k2]].mean(axis=0) for i in range(total)])
    sums = jaccard_sums(weights, range(num_query))
    jaccard = 1.0 - sums / (2.0 - sums)
    final = jaccard * (1 - lambda_value) + scaled[:num_query].astype(np.float64) * lambda_value
    return final[:, num_query:]


# ----------------------------------------------------------------------------- data

def reid_like(rng: np.random.Generator, count: int, dim: int = 12, identities: int = 10) -> np.ndarray:
    centres = rng.standard_normal((identities, dim))
    rows = centres[rng.integers(0, identities, count)] + 0.55 * rng.standard_normal((count, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def quantised(rng: np.random.Generator, count: int, dim: int = 5, duplicates: int = 25) -> np.ndarray:
    """Multiples of 1/4 in [-1/2, 1/2] with ``duplicates`` copies of random rows (at most 3 each)."""
    rows = rng.integers(-2, 3, (count - duplicates, dim)) / 4.0
    sources = rng.choice(len(rows), size=duplicates, replace=False)
    copies = rows[np.concatenate([sources[: duplicates // 2], sources[: duplicates - duplicates // 2]])]
    mixed = np.concatenate([rows, copies])
    return mixed[rng.permutation(count)].astype(np.float32)


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1).astype(np.float32)


def assert_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    off = np.abs(got.astype(np.float64) - expected)
    worst = np.unravel_index(np.argmax(off), off.shape)
    assert off[worst] <= TOLERANCE, (f"{what}: worst mismatch at {tuple(map(int, worst))}: got {got[worst]!r}, "
                                     f"expected {expected[worst]!r}")


def dbscan_labels(matrix, eps: float, min_samples: int = 4) -> np.ndarray:
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(matrix)


# ----------------------------------------------------------------------------- compute_jaccard_distance

CASES = [("reid", 120, 20, 6), ("reid", 97, 9, 3), ("reid", 150, 30, 6), ("quantised", 100, 10, 4),
         ("quantised", 85, 6, 1), ("quantised", 130, 20, 6)]


def case_features(kind: str, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return reid_like(rng, size) if kind == "reid" else quantised(rng, size)


@pytest.mark.parametrize("kind, size, k1, k2", CASES)
def test_dense_equals_spcl_semantics(kind, size, k1, k2):
    x = case_features(kind, size, size + k1)
    expected = oracle_spcl(x, k1, k2)
    got = compute_jaccard_distance(torch.from_numpy(x), k1=k1, k2=k2, print_flag=False)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32, f"got {type(got).__name__} {got.dtype}"
    assert_close(got, expected, f"{kind} N={size} k1={k1} k2={k2}")
    # Off the lists the original holds exactly 1 (no shared weight).
    off_list = expected == 1.0
    assert off_list.any() and (got[off_list] == 1.0).all(), "pairs without shared weight must read exactly 1"
    assert (np.diag(got) == 0).all(), "diagonal must be 0"
    # The NumPy path gives the same matrix as the torch one, and the row blocks do not matter.
    np.testing.assert_array_equal(compute_jaccard_distance(x, k1=k1, k2=k2, print_flag=False), got)
    with fastassoc.tile_limit(7 * size):
        np.testing.assert_array_equal(compute_jaccard_distance(x, k1=k1, k2=k2, print_flag=False), got)


@pytest.mark.parametrize("kind, size, k1, k2", CASES)
def test_sparse_form_clusters_like_the_dense_one(kind, size, k1, k2):
    x = torch.from_numpy(case_features(kind, size, size + k1))
    dense = compute_jaccard_distance(x, k1=k1, k2=k2, print_flag=False)
    matrix = compute_jaccard_distance(x, k1=k1, k2=k2, print_flag=False, sparse=True)
    assert isinstance(matrix, scipy.sparse.csr_matrix) and matrix.dtype == np.float32, type(matrix)
    assert matrix.has_sorted_indices, "column indices must be sorted"
    coo = matrix.tocoo()
    diagonal = coo.row == coo.col
    assert diagonal.sum() == size and (coo.data[diagonal] == 0).all(), "diagonal must be stored as explicit zeros"
    assert (abs(matrix - matrix.T)).nnz == 0, "sparse form must be symmetric"
    rebuilt = np.ones((size, size), np.float32)
    rebuilt[coo.row, coo.col] = coo.data
    np.testing.assert_array_equal(rebuilt, dense)
    clustered = 0
    for eps in (0.3, 0.5, 0.6, 0.7, 0.9):
        expected = dbscan_labels(dense, eps)
        clustered += int((expected >= 0).sum())
        got = dbscan_labels(matrix, eps)
        differ = np.flatnonzero(got != expected)
        assert not differ.size, (f"eps={eps}: {differ.size} labels differ from the dense matrix's, first at "
                                 f"{differ[0]}: {got[differ[0]]} vs {expected[differ[0]]}")
        torch_csr = torch.sparse_csr_tensor(torch.from_numpy(matrix.indptr.astype(np.int64)),
                                            torch.from_numpy(matrix.indices.astype(np.int64)),
                                            torch.from_numpy(matrix.data), size=matrix.shape,
                                            check_invariants=True)
        np.testing.assert_array_equal(fastassoc.dbscan(torch_csr, eps=eps, min_samples=4).numpy(), expected)
    assert clustered, "no eps clustered anything: the comparison would be empty"


def test_max_distance_drops_far_pairs_and_keeps_labels():
    x = torch.from_numpy(case_features("reid", 140, 3))
    dense = compute_jaccard_distance(x, k1=20, k2=6, print_flag=False)
    cut = compute_jaccard_distance(x, k1=20, k2=6, print_flag=False, max_distance=0.6)
    np.testing.assert_array_equal(cut, np.where(dense <= 0.6, dense, np.float32(1.0)))
    matrix = compute_jaccard_distance(x, k1=20, k2=6, print_flag=False, sparse=True, max_distance=0.6)
    assert matrix.data.max() <= 0.6
    for eps in (0.4, 0.6):
        np.testing.assert_array_equal(dbscan_labels(matrix, eps), dbscan_labels(dense, eps))


def test_float16_and_ignored_search_option():
    x = torch.from_numpy(case_features("reid", 90, 5))
    reference = compute_jaccard_distance(x, k1=12, k2=4, print_flag=False)
    half = compute_jaccard_distance(x, k1=12, k2=4, print_flag=False, use_float16=True)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, reference.astype(np.float16))
    assert compute_jaccard_distance(x, 12, 4, False, 3, True, sparse=True).dtype == np.float32
    for option in (1, 2, 3):
        np.testing.assert_array_equal(compute_jaccard_distance(x, 12, 4, False, option), reference)


def test_prints_like_the_original_only_when_asked(capsys):
    x = torch.from_numpy(case_features("reid", 40, 6))
    compute_jaccard_distance(x, k1=5, k2=2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == "Computing jaccard distance..." \
        and lines[1].startswith("Jaccard distance computing time cost: "), lines
    float(lines[1].rsplit(": ", 1)[1])
    compute_jaccard_distance(x, k1=5, k2=2, print_flag=False, sparse=True)
    assert capsys.readouterr().out == ""


def test_features_that_require_grad_and_float64():
    x = torch.from_numpy(case_features("reid", 60, 7))
    expected = compute_jaccard_distance(x, k1=8, k2=3, print_flag=False)
    got = compute_jaccard_distance(x.clone().requires_grad_(True), k1=8, k2=3, print_flag=False)
    np.testing.assert_array_equal(got, expected)
    assert_close(compute_jaccard_distance(x.double(), k1=8, k2=3, print_flag=False), oracle_spcl(x.numpy(), 8, 3),
                 "float64 input")


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(k1=0), ValueError, "k1 must be >= 1"),
    (dict(k1=5, k2=6), ValueError, "k2 must be <= k1"),
    (dict(search_option=4), ValueError, "search_option must be one of"),
    (dict(sparse=1), TypeError, "sparse must be a bool"),
    (dict(print_flag="yes"), TypeError, "print_flag must be a bool"),
    (dict(max_distance=-0.1), ValueError, "max_distance must be >= 0"),
])
def test_compute_jaccard_distance_bad_arguments(kwargs, error, words):
    x = torch.from_numpy(case_features("reid", 30, 8))
    with pytest.raises(error, match=words):
        compute_jaccard_distance(x, **{"print_flag": False, **kwargs})


def test_compute_jaccard_distance_bad_features():
    with pytest.raises(TypeError, match="target_features must be a torch.Tensor or a NumPy array"):
        compute_jaccard_distance([[0.0, 1.0]], print_flag=False)
    with pytest.raises(TypeError, match="target_features must hold floating-point values"):
        compute_jaccard_distance(np.ones((4, 2), np.int64), print_flag=False)
    bad = torch.from_numpy(case_features("reid", 30, 9))
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="features"):
        compute_jaccard_distance(bad, k1=5, k2=2, print_flag=False)


# ----------------------------------------------------------------------------- re_ranking

def rerank_inputs(kind: str, num_query: int, num_gallery: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = case_features("quantised" if kind == "quantised" else "reid", num_query + num_gallery, seed)
    query, gallery = rows[:num_query], rows[num_query:]
    if kind == "cosine":
        return 1 - query @ gallery.T, 1 - query @ query.T, 1 - gallery @ gallery.T
    q_g = squared_distances(query, gallery)
    q_q, g_g = squared_distances(query, query), squared_distances(gallery, gallery)
    if kind == "asymmetric":
        # torchreid reads the joint matrix through a transpose (column maxima, then .T): a
        # clearly asymmetric one tells the orientations apart (GEMM-made ones are slightly so).
        q_q = q_q + np.triu(rng.random(q_q.shape).astype(np.float32), 1)
        g_g = g_g + np.tril(rng.random(g_g.shape).astype(np.float32), -1)
    return q_g, q_q, g_g


@pytest.mark.parametrize("kind, num_query, num_gallery, k1, k2, lambda_value", [
    ("reid", 30, 90, 20, 6, 0.3), ("reid", 45, 70, 7, 3, 0.5), ("quantised", 40, 80, 10, 4, 0.3),
    ("quantised", 25, 60, 6, 1, 0.0), ("cosine", 35, 85, 20, 6, 0.3), ("asymmetric", 30, 75, 12, 8, 0.4),
    ("reid", 20, 40, 5, 2, 1.0), ("reid", 5, 8, 20, 6, 0.3),
])
def test_re_ranking_equals_torchreid_semantics(kind, num_query, num_gallery, k1, k2, lambda_value):
    q_g, q_q, g_g = rerank_inputs(kind, num_query, num_gallery, num_query * 7 + k1)
    expected = oracle_torchreid(q_g, q_q, g_g, k1, k2, lambda_value)
    got = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32, f"got {type(got).__name__} {got.dtype}"
    assert_close(got, expected, f"{kind} Q={num_query} G={num_gallery} k1={k1} k2={k2} lambda={lambda_value}")
    # Small tiles: many column blocks on both sides of the split, several query blocks.
    with fastassoc.tile_limit(3 * (num_query + num_gallery)):
        np.testing.assert_allclose(re_ranking(q_g, q_q, g_g, k1, k2, lambda_value), got, rtol=0, atol=1e-6)


def test_re_ranking_float64_and_tensor_inputs():
    q_g, q_q, g_g = rerank_inputs("reid", 20, 50, 11)
    expected = oracle_torchreid(q_g.astype(np.float64), q_q.astype(np.float64), g_g.astype(np.float64), 10, 4, 0.3)
    got = re_ranking(q_g.astype(np.float64), q_q.astype(np.float64), g_g.astype(np.float64), 10, 4, 0.3)
    assert got.dtype == np.float32
    assert_close(got, expected, "float64 inputs")
    np.testing.assert_array_equal(re_ranking(torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g),
                                             10, 4, 0.3), re_ranking(q_g, q_q, g_g, 10, 4, 0.3))


def test_re_ranking_bad_inputs():
    q_g, q_q, g_g = rerank_inputs("reid", 6, 9, 12)
    with pytest.raises(ValueError, match=r"q_q_dist must have shape \(6, 6\)"):
        re_ranking(q_g, g_g, g_g)
    with pytest.raises(ValueError, match=r"g_g_dist must have shape \(9, 9\)"):
        re_ranking(q_g, q_q, q_q)
    with pytest.raises(ValueError, match="q_g_dist must be 2-D"):
        re_ranking(q_g[0], q_q, g_g)
    bad = g_g.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="g_g_dist contains NaN or infinite values"):
        re_ranking(q_g, q_q, bad)
    with pytest.raises(TypeError, match="q_g_dist must hold floating-point distances"):
        re_ranking(q_g.astype(np.int64), q_q, g_g)
    with pytest.raises(ValueError, match="k1 must be >= 1"):
        re_ranking(q_g, q_q, g_g, k1=0)
    with pytest.raises(ValueError, match="lambda_value must be <= 1"):
        re_ranking(q_g, q_q, g_g, lambda_value=1.5)
    with pytest.raises(TypeError, match="q_g_dist must be a NumPy array"):
        re_ranking(q_g.tolist(), q_q, g_g)


def test_docstring_examples():
    result = doctest.testmod(compat, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 2 and result.failed == 0, result
