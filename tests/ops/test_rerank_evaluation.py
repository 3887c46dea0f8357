"""Re-ranked evaluation (``evaluate_ranking(..., rerank=...)``) and the rerank family as custom ops.

The oracle is torchreid's ``re_ranking`` written here from its semantics as dense float64
NumPy over query and gallery together: the caller's distance matrices (torchreid's engine
passes the *squared* Euclidean distance for "euclidean", ``1 - cos`` for "cosine"), squared
again, divided by each column's maximum and transposed; k-reciprocal sets over ``k1 + 1``
neighbours (ties to the smaller index), the 2/3 expansion over ``round(k1 / 2) + 1``,
weights ``exp(-scaled)`` normalised per row, query expansion over the ``k2`` nearest, the
Jaccard distance from the shared weights over all rows, and ``J (1 - lambda) + lambda scaled``.
The scorer is the Market-1501 protocol written as plain per-query loops. Neither calls
fastassoc.

Exactness: "integer" problems have small-integer features, so every squared distance is an
exact float32 integer (the GEMM's summation order does not matter), duplicated rows get
identical distances and ties are real; only the Zhong weights and the Jaccard sums carry
float32 rounding, far below the gaps between distinct final distances of these problems.
Continuous problems (clustered Gaussian rows, no duplicates: the GEMM may round copies of
one row differently depending on their position) cover cosine and ``lambda_value = 0``,
where integer rows would tie only mathematically (J = 0 of duplicates from float32 sums).
(On these the oracle also agrees with torchreid's own float32 function to ~3e-7, same
CMC and mAP; checked by hand, not here: the tests carry no torchreid code.)
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fastassoc
from conftest import require_backend
from fastassoc.ops._sparse import CSRMatrix
from fastassoc.ops.rerank import cluster_centres, dbscan, jaccard_distance

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

MAP_TOLERANCE = 1e-6


# ----------------------------------------------------------------------------- oracles

def oracle_distances(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """torchreid's ``compute_distance_matrix``: squared Euclidean for "euclidean", 1 - cos for "cosine"."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if metric == "cosine":
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return 1.0 - a @ b.T
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def oracle_re_ranking(q: np.ndarray, g: np.ndarray, metric: str, k1: int, k2: int, lambda_value: float
                      ) -> np.ndarray:
    """Dense float64 final distance [Q, G] by loops over torchreid's semantics."""
    num_query = len(q)
    rows = np.concatenate([q, g])
    n = len(rows)
    distances = oracle_distances(rows, rows, metric)
    np.fill_diagonal(distances, 0.0)                  # a row's distance to itself
    squared = distances ** 2
    column_max = squared.max(axis=0)
    scaled = (squared / np.where(column_max > 0, column_max, 1.0)).T
    ranked = [np.lexsort((np.arange(n), distances[i])) for i in range(n)]

    def reciprocal(i: int, width: int) -> list[int]:
        return [int(j) for j in ranked[i][:width] if i in ranked[j][:width]]

    weights = np.zeros((n, n))
    for i in range(n):
        members = reciprocal(i, k1 + 1)
        expansion = list(members)
        for candidate in members:
            candidate_set = reciprocal(candidate, int(np.around(k1 / 2)) + 1)
            if len(set(candidate_set) & set(members)) > 2 / 3 * len(candidate_set):
                expansion += candidate_set
        expansion = sorted(set(expansion))
        exps = np.exp(-scaled[i, expansion])
        weights[i, expansion] = exps / exps.sum()
    if k2 != 1:
        weights = np.stack([weights[ranked[i][:k2]].mean(axis=0) for i in range(n)])
    jaccard = np.ones((num_query, n))
    for i in range(num_query):
        shared = np.minimum(weights[i][None, :], weights).sum(axis=1)
        jaccard[i] = 1.0 - shared / (2.0 - shared)
    final = jaccard * (1 - lambda_value) + scaled[:num_query] * lambda_value
    return final[:, num_query:]


def oracle_scores(final: np.ndarray, q_pids, g_pids, q_cams, g_cams, max_rank: int):
    """Market-1501 protocol: (first-match counts [max_rank] summed, mAP, mINP, valid queries)."""
    first_match_counts = np.zeros(max_rank, np.int64)
    precisions, penalties = [], []
    for row in range(len(final)):
        order = sorted(range(final.shape[1]), key=lambda column: (final[row, column], column))
        rank, hits, ap_terms, last_hit = 0, 0, [], 0
        for column in order:
            junk = g_pids[column] == -1 or (g_pids[column] == q_pids[row] and g_cams[column] == q_cams[row])
            if junk:
                continue
            rank += 1
            if g_pids[column] == q_pids[row]:
                hits += 1
                ap_terms.append(hits / rank)
                last_hit = rank
                if hits == 1 and rank <= max_rank:
                    first_match_counts[rank - 1] += 1
        if hits == 0:
            continue
        precisions.append(sum(ap_terms) / hits)
        penalties.append(hits / last_hit)
    return first_match_counts, float(np.mean(precisions)), float(np.mean(penalties)), len(precisions)


def assert_equals_oracle(result, final, q_pids, g_pids, q_cams, g_cams, max_rank, context):
    counts, mean_ap, mean_inp, valid = oracle_scores(final, q_pids, g_pids, q_cams, g_cams, max_rank)
    expected_cmc = np.cumsum(counts) / valid
    got_cmc = result.cmc.cpu().numpy()
    assert result.num_valid_queries == valid, context
    mismatch = np.nonzero(got_cmc != expected_cmc)[0]
    assert mismatch.size == 0, (f"{context}: CMC differs first at rank {mismatch[:1] + 1}: "
                                f"{got_cmc[mismatch[:1]]} vs {expected_cmc[mismatch[:1]]}")
    assert abs(result.mAP - mean_ap) <= MAP_TOLERANCE, f"{context}: mAP {result.mAP} vs {mean_ap}"
    assert abs(result.mINP - mean_inp) <= MAP_TOLERANCE, f"{context}: mINP {result.mINP} vs {mean_inp}"


# ----------------------------------------------------------------------------- problems

def integer_problem(seed: int, num_query: int = 30, num_gallery: int = 120, dim: int = 8, num_pids: int = 10):
    """Clustered small-integer rows with duplicated rows, junk and distractors."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(-4, 5, (num_pids, dim))
    q_pids = rng.integers(0, num_pids, num_query)
    g_pids = np.concatenate([np.arange(num_pids), rng.integers(-1, num_pids, num_gallery - num_pids)])
    q = centres[q_pids] + rng.integers(-1, 2, (num_query, dim))
    g = centres[np.maximum(g_pids, 0)] + rng.integers(-1, 2, (num_gallery, dim))
    if num_gallery >= 80:
        g[5:9] = g[40:44]                               # duplicated gallery rows
        g[60:63] = q[:3]                                # queries repeated in the gallery
        g[70] = g[71] = g[72]                           # three copies
    else:
        g[3], g[5] = g[2], q[0]
    q_cams = rng.integers(0, 3, num_query)
    g_cams = rng.integers(0, 3, num_gallery)
    return (q.astype(np.float32), g.astype(np.float32), q_pids, g_pids, q_cams, g_cams)


def continuous_problem(seed: int, num_query: int = 30, num_gallery: int = 120, dim: int = 16, num_pids: int = 10):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_pids, dim))
    q_pids = rng.integers(0, num_pids, num_query)
    g_pids = np.concatenate([np.arange(num_pids), rng.integers(-1, num_pids, num_gallery - num_pids)])
    q = centres[q_pids] + 1.1 * rng.standard_normal((num_query, dim))
    g = centres[np.maximum(g_pids, 0)] + 1.1 * rng.standard_normal((num_gallery, dim))
    return (q.astype(np.float32), g.astype(np.float32), q_pids, g_pids, rng.integers(0, 3, num_query),
            rng.integers(0, 3, num_gallery))


def evaluate(problem, metric, max_rank, rerank, backend="reference", dtype=torch.float32):
    q, g, q_pids, g_pids, q_cams, g_cams = problem
    return fastassoc.evaluate_ranking(torch.from_numpy(q).to(dtype), torch.from_numpy(g).to(dtype),
                                      torch.from_numpy(q_pids), torch.from_numpy(g_pids), torch.from_numpy(q_cams),
                                      torch.from_numpy(g_cams), metric=metric, max_rank=max_rank, rerank=rerank,
                                      backend=backend)


def same_result(a, b) -> bool:
    return (torch.equal(a.cmc, b.cmc) and a.mAP == b.mAP and a.mINP == b.mINP
            and a.num_valid_queries == b.num_valid_queries)


# ----------------------------------------------------------------------------- against the oracle

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("k1, k2, lambda_value", [(20, 6, 0.3), (7, 1, 0.5), (12, 12, 0.1), (5, 3, 0.9)])
def test_integer_problems_equal_the_oracle(seed, metric, k1, k2, lambda_value):
    problem = integer_problem(seed)
    q, g, q_pids, g_pids, q_cams, g_cams = problem
    # torchreid's "euclidean" distance matrix is the squared one, as is "sqeuclidean".
    final = oracle_re_ranking(q, g, "euclidean", k1, k2, lambda_value)
    result = evaluate(problem, metric, 50, dict(k1=k1, k2=k2, lambda_value=lambda_value))
    assert_equals_oracle(result, final, q_pids, g_pids, q_cams, g_cams, 50, f"{metric} {k1}/{k2}/{lambda_value}")


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k1, k2, lambda_value", [(20, 6, 0.3), (6, 2, 0.7), (12, 12, 0.0)])
def test_continuous_problems_equal_the_oracle(seed, metric, k1, k2, lambda_value):
    # lambda = 0 ranks by J alone: on integer rows duplicates tie there only mathematically
    # (J = 0 from sums that round differently, in torchreid as here), so it runs on these.
    problem = continuous_problem(seed)
    q, g, q_pids, g_pids, q_cams, g_cams = problem
    final = oracle_re_ranking(q, g, metric, k1, k2, lambda_value)
    result = evaluate(problem, metric, 20, dict(k1=k1, k2=k2, lambda_value=lambda_value))
    assert_equals_oracle(result, final, q_pids, g_pids, q_cams, g_cams, 20, f"{metric} {k1}/{k2}/{lambda_value}")


def test_defaults_are_torchreids_and_rerank_changes_the_ranking():
    problem = integer_problem(5)
    q, g, q_pids, g_pids, q_cams, g_cams = problem
    final = oracle_re_ranking(q, g, "euclidean", 20, 6, 0.3)
    result = evaluate(problem, "euclidean", 10, {})
    assert_equals_oracle(result, final, q_pids, g_pids, q_cams, g_cams, 10, "defaults")
    assert same_result(result, evaluate(problem, "euclidean", 10, dict(k1=20, k2=6, lambda_value=0.3)))
    # Guards the oracle comparison against a vacuous pass: the re-ranked order is not the plain one.
    assert not same_result(result, evaluate(problem, "euclidean", 10, None))


def test_small_sets_where_k1_exceeds_the_rows():
    problem = integer_problem(6, num_query=4, num_gallery=12, num_pids=3)
    q, g, q_pids, g_pids, q_cams, g_cams = problem
    final = oracle_re_ranking(q, g, "euclidean", 20, 6, 0.3)
    result = evaluate(problem, "euclidean", 5, {})
    assert_equals_oracle(result, final, q_pids, g_pids, q_cams, g_cams, 5, "N < k1")


def test_float64_inputs_equal_the_oracle():
    problem = integer_problem(7)
    q, g, q_pids, g_pids, q_cams, g_cams = problem
    final = oracle_re_ranking(q, g, "euclidean", 10, 4, 0.3)
    result = evaluate(problem, "euclidean", 50, dict(k1=10, k2=4, lambda_value=0.3), dtype=torch.float64)
    assert_equals_oracle(result, final, q_pids, g_pids, q_cams, g_cams, 50, "float64")


# ----------------------------------------------------------------------------- properties

@pytest.mark.parametrize("seed", [0, 8])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_lambda_one_equals_the_plain_evaluation(seed, metric):
    # final = d^2 / max_r d^2 per query: a positive scaling of the squared distance, so the
    # order is d's. On integer rows squaring and scaling keep distinct distances distinct
    # (squares <= 2^14, relative gaps >= 2^-14 >> float32's 2^-24), so the results are equal.
    problem = integer_problem(seed)
    plain = evaluate(problem, metric, 50, None)
    reranked = evaluate(problem, metric, 50, dict(k1=9, k2=3, lambda_value=1.0))
    assert same_result(plain, reranked), (plain, reranked)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_backend_gives_the_reference_result(backend):
    require_backend("evaluate_ranking", backend)
    problem = integer_problem(9)
    expected = evaluate(problem, "euclidean", 20, dict(k1=8, k2=3, lambda_value=0.3), backend="reference")
    got = evaluate(problem, "euclidean", 20, dict(k1=8, k2=3, lambda_value=0.3), backend=backend)
    assert same_result(expected, got)


@pytest.mark.parametrize("kind, metric, k1, k2, lambda_value", [
    ("integer", "euclidean", 20, 6, 0.3), ("integer", "sqeuclidean", 7, 1, 0.5),
    ("continuous", "cosine", 12, 12, 0.0), ("continuous", "euclidean", 6, 2, 0.7)])
def test_cpu_kernel_with_compiled_lists_equals_the_oracle(kind, metric, k1, k2, lambda_value):
    # The compiled steps 1-5 (knn self-join lists, C++ weights) under the reference's scoring,
    # called directly: evaluate_ranking dispatches the re-ranked path itself.
    require_backend("jaccard_distance", "cpu")
    from fastassoc.kernels.cpu.rerank import evaluate_reranked_cpu
    problem = (integer_problem if kind == "integer" else continuous_problem)(11)
    q, g, q_pids, g_pids, q_cams, g_cams = problem
    final = oracle_re_ranking(q, g, "euclidean" if metric == "sqeuclidean" else metric, k1, k2, lambda_value)
    ids = [torch.from_numpy(a) for a in (q_pids, g_pids, q_cams, g_cams)]
    result = evaluate_reranked_cpu(torch.from_numpy(q), torch.from_numpy(g), *ids, metric, 20, k1, k2, lambda_value)
    assert_equals_oracle(result, final, q_pids, g_pids, q_cams, g_cams, 20, f"cpu {kind} {metric} {k1}/{k2}")


@pytest.mark.parametrize("tile", [1, 37, 500])
def test_bounded_memory_gives_identical_results(tile):
    # tile=1: one query per chunk, every overlap piece a single weight's partner list.
    problem = integer_problem(10)
    rerank = dict(k1=10, k2=4, lambda_value=0.3)
    expected = evaluate(problem, "euclidean", 50, rerank)
    with fastassoc.tile_limit(tile):
        tiled = evaluate(problem, "euclidean", 50, rerank)
    assert same_result(expected, tiled), (expected, tiled)


def test_inputs_that_require_grad_are_accepted():
    q, g, q_pids, g_pids, q_cams, g_cams = integer_problem(11)
    query = torch.from_numpy(q).requires_grad_()
    result = fastassoc.evaluate_ranking(query, torch.from_numpy(g), torch.from_numpy(q_pids),
                                        torch.from_numpy(g_pids), torch.from_numpy(q_cams),
                                        torch.from_numpy(g_cams), rerank={"k1": 6, "k2": 2})
    assert same_result(result, evaluate(integer_problem(11), "euclidean", 50, {"k1": 6, "k2": 2}))


@pytest.mark.parametrize("rerank, error, words", [
    ({"k3": 1}, ValueError, "rerank has unknown key(s) 'k3'"),
    ({"k1": 0}, ValueError, "rerank['k1'] must be >= 1"),
    ({"k1": 4, "k2": 5}, ValueError, "rerank['k2'] must be <= rerank['k1'] (4)"),
    ({"k1": 4}, ValueError, "rerank['k2'] must be <= rerank['k1'] (4)"),   # default k2 = 6
    ({"k2": 0}, ValueError, "rerank['k2'] must be >= 1"),
    ({"k1": 2.0}, TypeError, "rerank['k1'] must be an int"),
    ({"lambda_value": 1.5}, ValueError, "rerank['lambda_value'] must be <= 1.0"),
    ({"lambda_value": -0.1}, ValueError, "rerank['lambda_value'] must be >= 0.0"),
    ({"lambda_value": float("nan")}, ValueError, "rerank['lambda_value'] must be finite"),
    ([20, 6, 0.3], TypeError, "rerank must be None or a dict"),
])
def test_bad_rerank_is_named(rerank, error, words):
    with pytest.raises(error) as caught:
        evaluate(integer_problem(12, num_query=3, num_gallery=12), "euclidean", 5, rerank)
    assert words in str(caught.value), str(caught.value)


def test_meta_tensors_raise_a_clear_error():
    with pytest.raises(ValueError, match="evaluate_ranking"):
        fastassoc.evaluate_ranking(torch.empty(3, 4, device="meta"), torch.empty(5, 4, device="meta"),
                                   torch.empty(3, dtype=torch.int64, device="meta"),
                                   torch.empty(5, dtype=torch.int64, device="meta"),
                                   torch.empty(3, dtype=torch.int64, device="meta"),
                                   torch.empty(5, dtype=torch.int64, device="meta"), rerank={})


# ----------------------------------------------------------------------------- custom ops

def _features(rows: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _symmetric_csr(seed: int, size: int = 9) -> CSRMatrix:
    rng = np.random.default_rng(seed)
    dense = np.triu(rng.uniform(0.0, 1.0, (size, size)) * (rng.uniform(size=(size, size)) < 0.4), 1)
    dense = dense + dense.T
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = torch.from_numpy(dense.astype(np.float32)).to_sparse_csr()
    return CSRMatrix.from_sparse_csr(matrix)


def _opcheck_cases():
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        x = _features(13, 5, 0, dtype)
        yield "jaccard_distance", f"spcl-{name}", (x, 4, 2, "spcl", None, "sqeuclidean", "reference")
        yield "jaccard_distance", f"zhong-{name}", (x, 5, 3, "zhong", 0.8, "cosine", "reference")
        labels = torch.tensor([0, 1, -1, 1, 0, 2, 2, -1, 0, 1, 1, 0, 2])
        yield "cluster_centres", f"inferred-{name}", (x, labels, None, "reference")
        yield "cluster_centres", f"given-{name}", (x, labels.to(torch.int32), 5, "reference")
    matrix = _symmetric_csr(1)
    yield "dbscan", "random", (matrix.crow_indices, matrix.col_indices, matrix.values, 9, 0.5, 2, "reference")
    yield "dbscan", "float64", (matrix.crow_indices, matrix.col_indices, matrix.values.double(), 9, 0.3, 1,
                                "reference")
    yield "jaccard_distance", "empty", (torch.zeros(0, 4), 3, 1, "spcl", None, "sqeuclidean", "reference")
    yield "cluster_centres", "all-noise", (_features(4, 3, 2), torch.full((4,), -1), None, "reference")
    q, g = _features(6, 4, 3), _features(15, 4, 4)
    yield "evaluate_ranking_reranked", "small", (
        q, g, torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(15) % 5 - 1, torch.zeros(6, dtype=torch.int64),
        torch.arange(15) % 2, "euclidean", 4, "highest", 5, 2, 0.3, "reference")


@pytest.mark.parametrize("op, arguments", [pytest.param(op, arguments, id=f"{op}-{case}")
                                           for op, case, arguments in _opcheck_cases()])
def test_opcheck(op, arguments):
    torch.library.opcheck(getattr(torch.ops.fastassoc, op).default, arguments)


def test_public_ops_go_through_the_custom_ops():
    x = _features(20, 6, 5)
    parts = jaccard_distance(x, 5, 2, as_tuple=True, backend="reference")
    crow, cols, values = torch.ops.fastassoc.jaccard_distance(x, 5, 2, "spcl", None, "sqeuclidean", "reference")
    assert isinstance(parts, CSRMatrix) and parts.size == (20, 20)
    assert torch.equal(parts.crow_indices, crow) and torch.equal(parts.col_indices, cols)
    assert torch.equal(parts.values, values)
    sparse = jaccard_distance(x, 5, 2, backend="reference")
    assert sparse.layout == torch.sparse_csr and torch.equal(sparse.to_dense(), parts.to_sparse_csr().to_dense())
    labels = dbscan(parts, 0.6, 2, backend="reference")
    assert torch.equal(labels, torch.ops.fastassoc.dbscan(crow, cols, values, 20, 0.6, 2, "reference"))
    centres, counts = cluster_centres(x, labels, backend="reference")
    op_centres, op_counts = torch.ops.fastassoc.cluster_centres(x, labels, None, "reference")
    assert torch.equal(centres, op_centres) and torch.equal(counts, op_counts)


def test_meta_tensors():
    # Shapes that follow from the inputs work on meta tensors; data-dependent ones name the op.
    matrix = _symmetric_csr(2)
    meta = [t.to("meta") for t in (matrix.crow_indices, matrix.col_indices, matrix.values)]
    labels = dbscan(CSRMatrix(*meta, matrix.size), 0.5, 2)
    assert labels.is_meta and labels.shape == (9,) and labels.dtype == torch.int64
    features = torch.empty(7, 3, device="meta")
    centres, counts = cluster_centres(features, torch.empty(7, dtype=torch.int64, device="meta"), num_clusters=4)
    assert centres.shape == (4, 3) and counts.shape == (4,) and centres.is_meta
    with pytest.raises(ValueError, match="cluster_centres"):
        cluster_centres(features, torch.empty(7, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="jaccard_distance"):
        jaccard_distance(features, 3, 1, as_tuple=True)


def test_compiled_clustering_step_equals_eager():
    # features -> Jaccard (as a CSRMatrix) -> DBSCAN -> centres in one fullgraph compile.
    def step(x):
        parts = jaccard_distance(x, 6, 2, as_tuple=True, backend="reference")
        labels = dbscan(parts, 0.6, 2, backend="reference")
        centres, counts = cluster_centres(x, labels, num_clusters=x.shape[0], backend="reference")
        return parts.crow_indices, parts.col_indices, parts.values, labels, centres, counts

    x = torch.nn.functional.normalize(_features(24, 6, 6), dim=1)
    eager = step(x)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    for want, got in zip(eager, compiled):
        assert torch.equal(want, got)


def test_identical_rows_give_finite_distances_and_the_oracle_ranking():
    # Every distance is 0: torchreid divides 0 by 0 there; here the scaled part is 0 and J ranks.
    rng = np.random.default_rng(13)
    q, g = np.ones((5, 4), np.float32), np.ones((25, 4), np.float32)
    q_pids, g_pids = rng.integers(0, 3, 5), rng.integers(-1, 3, 25)
    q_cams, g_cams = rng.integers(0, 2, 5), rng.integers(0, 2, 25)
    problem = (q, g, q_pids, g_pids, q_cams, g_cams)
    final = oracle_re_ranking(q, g, "euclidean", 6, 2, 0.3)
    assert np.isfinite(final).all()
    result = evaluate(problem, "euclidean", 10, dict(k1=6, k2=2, lambda_value=0.3))
    assert_equals_oracle(result, final, q_pids, g_pids, q_cams, g_cams, 10, "identical rows")


def test_empty_gallery_or_queries_raise_no_valid_query():
    problem = integer_problem(14, num_query=3, num_gallery=12)
    q, g, q_pids, g_pids, q_cams, g_cams = problem
    no_gallery = (q, g[:0], q_pids, g_pids[:0], q_cams, g_cams[:0])
    no_queries = (q[:0], g, q_pids[:0], g_pids, q_cams[:0], g_cams)
    for empty in (no_gallery, no_queries):
        with pytest.raises(ValueError, match="has a true match"):
            evaluate(empty, "euclidean", 5, {})
