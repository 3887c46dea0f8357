"""Tests of topk_anchors and mutual_knn on every backend against NumPy brute-force oracles.

Exactness: small-integer features make squared and plain Euclidean distances exact
(or correctly rounded) in float32, so ties are real and indices must match the oracle
exactly. For cosine, features are power-of-two multiples of "exact directions" (zero,
+-e_i, and (+-1/2, +-1/2, +-1/2, +-1/2)): their L2 normalisation, dot products and
``1 - cos`` are exact in float32, so cosine ties are real too. Continuous random data is
compared with a tolerance on values and exactly on indices (it is well separated).
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastassoc
from conftest import require_backend

METRICS = ("sqeuclidean", "euclidean", "cosine")
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])

# Unit directions in R^4 whose normalisation and pairwise dot products are exact in float32.
EXACT_DIRECTIONS = np.array(
    [[0.0] * 4]
    + [list(sign * row) for row in np.eye(4) for sign in (1.0, -1.0)]
    + [list(0.5 * np.array(signs)) for signs in itertools.product((1.0, -1.0), repeat=4)])
EXACT_SCALES = (0.5, 1.0, 2.0, 4.0)


# ----------------------------------------------------------------------------- oracles

def oracle_distances(q: np.ndarray, a: np.ndarray, metric: str) -> np.ndarray:
    """Full float64 distance matrix [B, N] by direct differences / normalised dots."""
    q, a = np.asarray(q, np.float64), np.asarray(a, np.float64)
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        return 1.0 - qn @ an.T
    squared = ((q[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    return np.sqrt(squared) if metric == "euclidean" else squared


def oracle_topk(q, a, k, metric, offsets, segments, exclude):
    """Brute-force topk_anchors: lexsort each query's candidates by (distance, index)."""
    distances = oracle_distances(q, a, metric)
    num_queries = len(q)
    out_distances = np.full((num_queries, k), np.inf)
    out_indices = np.full((num_queries, k), -1, dtype=np.int64)
    for row in range(num_queries):
        low, high = offsets[segments[row]], offsets[segments[row] + 1]
        candidates = np.array([j for j in range(low, high) if j != exclude[row]], dtype=np.int64)
        if candidates.size == 0 or k == 0:
            continue
        chosen = candidates[np.lexsort((candidates, distances[row, candidates]))[:k]]
        out_distances[row, :chosen.size] = distances[row, chosen]
        out_indices[row, :chosen.size] = chosen
    return out_distances, out_indices


def oracle_neighbours(distances: np.ndarray, k: int) -> list[set[int]]:
    """Per row, the set of the k smallest columns by (distance, column)."""
    columns = np.arange(distances.shape[1])
    return [set(np.lexsort((columns, row))[:k].tolist()) for row in distances]


def oracle_mutual(a, b, k, metric, max_distance):
    """Brute-force mutual kNN pairs, sorted by (ia, ib), with their float64 distances."""
    distances = oracle_distances(a, b, metric)
    a_to_b = oracle_neighbours(distances, k)
    b_to_a = oracle_neighbours(distances.T, k)
    pairs = sorted((i, j) for i in range(len(a)) for j in a_to_b[i]
                   if i in b_to_a[j] and (max_distance is None or distances[i, j] <= max_distance))
    ia = np.array([p[0] for p in pairs], dtype=np.int64)
    ib = np.array([p[1] for p in pairs], dtype=np.int64)
    return ia, ib, distances[ia, ib] if pairs else np.zeros(0)


# ----------------------------------------------------------------------------- asserts

def assert_equal_array(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    got = actual.detach().cpu().numpy()
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    bad = np.argwhere(got != expected)
    assert bad.size == 0, (f"{what}: first mismatch at {tuple(bad[0])}: got {got[tuple(bad[0])]}, "
                           f"expected {expected[tuple(bad[0])]} ({len(bad)} mismatches)\n"
                           f"got row {got[bad[0][0]] if got.ndim > 1 else got}\n"
                           f"expected row {expected[bad[0][0]] if expected.ndim > 1 else expected}")


def assert_close_array(actual: torch.Tensor, expected: np.ndarray, what: str, rtol: float, atol: float) -> None:
    got = actual.detach().cpu().to(torch.float64).numpy()
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    same_inf = np.isinf(got) == np.isinf(expected)
    close = np.isclose(got, expected, rtol=rtol, atol=atol) | (np.isinf(got) & np.isinf(expected))
    bad = np.argwhere(~(same_inf & close))
    assert bad.size == 0, (f"{what}: first mismatch at {tuple(bad[0])}: got {got[tuple(bad[0])]!r}, "
                           f"expected {expected[tuple(bad[0])]!r} ({len(bad)} mismatches)")


def assert_names_argument(error: Exception, name: str) -> None:
    """The message must speak of ``name`` as the subject ("k must ...", "b has 2", "exclude values ...")."""
    pattern = rf"(^|[\s,(]){re.escape(name)} (must|contains|has|is|values)\b"
    assert re.search(pattern, str(error)), f"error does not name {name!r}: {type(error).__name__}: {error}"


def check_topk_output(distances, indices, num_queries, k, device):
    assert distances.dtype == torch.float32, f"distances dtype {distances.dtype}, expected float32"
    assert indices.dtype == torch.int64, f"indices dtype {indices.dtype}, expected int64"
    assert distances.device.type == device and indices.device.type == device, (distances.device, indices.device)
    assert tuple(distances.shape) == (num_queries, k), f"distances shape {tuple(distances.shape)}"
    assert tuple(indices.shape) == (num_queries, k), f"indices shape {tuple(indices.shape)}"


# ----------------------------------------------------------------------------- data

def exact_cosine_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` rows of exact-direction data [count, 4] (see module docstring)."""
    directions = EXACT_DIRECTIONS[rng.integers(0, len(EXACT_DIRECTIONS), size=count)]
    scales = np.array(EXACT_SCALES)[rng.integers(0, len(EXACT_SCALES), size=count)]
    return (directions * scales[:, None]).reshape(count, 4)


@st.composite
def feature_rows(draw, count: int, dim: int, metric: str) -> np.ndarray:
    if metric == "cosine":
        choices = draw(hnp.arrays(np.int64, (count,), elements=st.integers(0, len(EXACT_DIRECTIONS) - 1)))
        scales = draw(hnp.arrays(np.int64, (count,), elements=st.integers(0, len(EXACT_SCALES) - 1)))
        return (EXACT_DIRECTIONS[choices] * np.array(EXACT_SCALES)[scales][:, None]).reshape(count, 4)
    return draw(hnp.arrays(np.float64, (count, dim), elements=st.integers(-3, 3).map(float)))


@st.composite
def topk_problems(draw):
    metric = draw(st.sampled_from(METRICS))
    dim = 4 if metric == "cosine" else draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    num_anchors, num_segments = int(offsets[-1]), len(sizes)
    num_queries = draw(st.integers(0, 6))
    anchors = draw(feature_rows(num_anchors, dim, metric))
    queries = draw(feature_rows(num_queries, dim, metric))
    segments = draw(st.lists(st.integers(0, num_segments - 1), min_size=num_queries, max_size=num_queries))
    exclude = []
    for segment in segments:
        # Half the time exclude an anchor of the query's own segment (its own tracklet), else anything.
        low, high = int(offsets[segment]), int(offsets[segment + 1])
        own = st.integers(low, high - 1) if high > low else st.just(-1)
        exclude.append(draw(st.one_of(own, st.integers(-1, num_anchors - 1))))
    k = draw(st.integers(0, 7))
    return queries, anchors, k, metric, offsets, np.array(segments, np.int64), np.array(exclude, np.int64)


def run_topk(backend, device, queries, anchors, k, metric, offsets, segments, exclude, dtype=torch.float32):
    return fastassoc.topk_anchors(
        torch.as_tensor(queries, dtype=dtype, device=device), torch.as_tensor(anchors, dtype=dtype, device=device),
        k, metric=metric, anchor_offsets=torch.as_tensor(offsets, device=device),
        query_segments=torch.as_tensor(segments, device=device), exclude=torch.as_tensor(exclude, device=device),
        backend=backend)


def separated_problem(seed: int = 0, metric: str = "sqeuclidean"):
    """Continuous random data: 3 segments (one empty), excludes inside and outside segments."""
    rng = np.random.default_rng(seed)
    offsets = np.array([0, 11, 11, 29], np.int64)
    anchors = rng.standard_normal((29, 8))
    queries = rng.standard_normal((17, 8))
    segments = rng.integers(0, 3, size=17)
    exclude = np.where(rng.random(17) < 0.5, rng.integers(0, 29, size=17), -1)
    return queries, anchors, 5, metric, offsets, segments, exclude


# ----------------------------------------------------------------------------- topk_anchors

@PROPERTY_SETTINGS
@given(problem=topk_problems())
def test_topk_anchors_matches_oracle_with_exact_ties(backend_device, problem):
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    queries, anchors, k, metric, offsets, segments, exclude = problem
    distances, indices = run_topk(backend, device, *problem)
    check_topk_output(distances, indices, len(queries), k, device)
    expected_distances, expected_indices = oracle_topk(*problem)
    assert_equal_array(indices, expected_indices, f"{backend} {metric} indices")
    assert_close_array(distances, expected_distances, f"{backend} {metric} distances", rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_anchors_matches_oracle_on_separated_data(backend_device, metric, dtype):
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    problem = separated_problem(1, metric)
    distances, indices = run_topk(backend, device, *problem, dtype=dtype)
    check_topk_output(distances, indices, len(problem[0]), problem[2], device)
    expected_distances, expected_indices = oracle_topk(*problem)
    assert_equal_array(indices, expected_indices, f"{backend} {metric} {dtype} indices")
    tolerance = 1e-4 if dtype == torch.float32 else 1e-6   # float64 is only rounded once, to float32
    assert_close_array(distances, expected_distances, f"{backend} {metric} {dtype} distances",
                       rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("metric", METRICS)
def test_topk_anchors_low_and_high_precision_inputs_give_float32(backend_device, dtype, metric):
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    rng = np.random.default_rng(3)
    # Small integers and exact directions are exactly representable in every float dtype.
    anchors = exact_cosine_rows(rng, 13) if metric == "cosine" else rng.integers(-3, 4, (13, 4)).astype(float)
    queries = exact_cosine_rows(rng, 6) if metric == "cosine" else rng.integers(-3, 4, (6, 4)).astype(float)
    problem = (queries, anchors, 4, metric, np.array([0, 5, 13]), np.array([0, 1, 1, 0, 1, 0]),
               np.array([2, -1, 7, -1, 12, 9]))
    distances, indices = run_topk(backend, device, *problem, dtype=dtype)
    check_topk_output(distances, indices, 6, 4, device)
    expected_distances, expected_indices = oracle_topk(*problem)
    assert_equal_array(indices, expected_indices, f"{backend} {dtype} indices")
    assert_close_array(distances, expected_distances, f"{backend} {dtype} distances", rtol=1e-6, atol=1e-6)


def test_topk_anchors_ties_go_to_the_smaller_index(backend_device):
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    # Every anchor of segment 1 (indices 3..9) is the same point, so all distances tie.
    anchors = torch.tensor([[5.0, 5.0]] * 3 + [[1.0, 2.0]] * 7, device=device)
    queries = torch.tensor([[0.0, 0.0], [3.0, -1.0]], device=device)
    distances, indices = fastassoc.topk_anchors(
        queries, anchors, 4, anchor_offsets=torch.tensor([0, 3, 10], device=device),
        query_segments=torch.tensor([1, 1], device=device), exclude=torch.tensor([4, -1], device=device),
        backend=backend)
    assert indices.tolist() == [[3, 5, 6, 7], [3, 4, 5, 6]], f"tied anchors not in index order: {indices.tolist()}"
    assert distances.tolist() == [[5.0] * 4, [13.0] * 4], distances.tolist()


def test_topk_anchors_edge_cases(backend_device):
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    rng = np.random.default_rng(5)
    anchors = rng.integers(-3, 4, (6, 3)).astype(float)
    queries = rng.integers(-3, 4, (4, 3)).astype(float)
    cases = {
        "no queries": (queries[:0], anchors, 3, "sqeuclidean", np.array([0, 6]), np.zeros(0, np.int64),
                       np.zeros(0, np.int64)),
        "no anchors": (queries, anchors[:0], 3, "euclidean", np.array([0, 0]), np.zeros(4, np.int64),
                       np.full(4, -1)),
        "k zero": (queries, anchors, 0, "sqeuclidean", np.array([0, 6]), np.zeros(4, np.int64), np.full(4, -1)),
        "empty segment": (queries, anchors, 2, "sqeuclidean", np.array([0, 0, 6]), np.array([0, 1, 0, 1]),
                          np.array([-1, 0, -1, 5])),
        "k above segment": (queries, anchors, 9, "euclidean", np.array([0, 2, 6]), np.array([0, 1, 0, 1]),
                            np.array([1, 3, -1, 0])),
        "only anchor excluded": (queries, anchors, 2, "sqeuclidean", np.array([0, 1, 6]),
                                 np.array([0, 0, 1, 1]), np.array([0, 0, -1, 2])),
        "zero feature dimension": (np.zeros((4, 0)), np.zeros((6, 0)), 3, "cosine", np.array([0, 6]),
                                   np.zeros(4, np.int64), np.array([2, -1, 0, 5])),
        "duplicate anchors": (queries, np.concatenate([anchors, anchors]), 5, "sqeuclidean", np.array([0, 12]),
                              np.zeros(4, np.int64), np.array([6, -1, 0, 11])),
    }
    for name, problem in cases.items():
        distances, indices = run_topk(backend, device, *problem)
        check_topk_output(distances, indices, len(problem[0]), problem[2], device)
        expected_distances, expected_indices = oracle_topk(*problem)
        assert_equal_array(indices, expected_indices, f"{backend} {name}: indices")
        assert_close_array(distances, expected_distances, f"{backend} {name}: distances", rtol=1e-6, atol=1e-6)


def test_topk_anchors_defaults_search_one_segment(backend_device):
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    rng = np.random.default_rng(7)
    anchors, queries = rng.integers(-3, 4, (9, 2)).astype(float), rng.integers(-3, 4, (5, 2)).astype(float)
    distances, indices = fastassoc.topk_anchors(torch.tensor(queries, dtype=torch.float32, device=device),
                                                torch.tensor(anchors, dtype=torch.float32, device=device), 3,
                                                backend=backend)
    expected_distances, expected_indices = oracle_topk(queries, anchors, 3, "sqeuclidean", [0, 9], [0] * 5, [-1] * 5)
    assert_equal_array(indices, expected_indices, f"{backend} default segments: indices")
    assert_close_array(distances, expected_distances, f"{backend} default segments", rtol=0, atol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_topk_anchors_does_not_depend_on_the_tile_size(backend_device, metric):
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    rng = np.random.default_rng(11)
    anchors = exact_cosine_rows(rng, 23) if metric == "cosine" else rng.integers(-3, 4, (23, 4)).astype(float)
    queries = exact_cosine_rows(rng, 19) if metric == "cosine" else rng.integers(-3, 4, (19, 4)).astype(float)
    problem = (queries, anchors, 6, metric, np.array([0, 4, 4, 16, 23]), rng.integers(0, 4, 19),
               rng.integers(-1, 23, 19))
    default = run_topk(backend, device, *problem)
    with fastassoc.tile_limit(7):
        tiled = run_topk(backend, device, *problem)
    assert_equal_array(tiled[1], default[1].cpu().numpy(), f"{backend} {metric} indices under tile_limit(7)")
    assert_equal_array(tiled[0], default[0].cpu().numpy(), f"{backend} {metric} distances under tile_limit(7)")
    separated = separated_problem(2, metric)
    default = run_topk(backend, device, *separated)
    with fastassoc.tile_limit(7):
        tiled = run_topk(backend, device, *separated)
    assert_equal_array(tiled[1], default[1].cpu().numpy(), f"{backend} {metric} separated indices, tile_limit(7)")
    assert_close_array(tiled[0], default[0].cpu().double().numpy(), f"{backend} {metric} separated distances",
                       rtol=1e-5, atol=1e-5)


def _topk_arguments(device):
    return dict(queries=torch.zeros(4, 3, device=device), anchors=torch.ones(6, 3, device=device), k=2,
                metric="sqeuclidean", anchor_offsets=torch.tensor([0, 2, 6], device=device),
                query_segments=torch.tensor([0, 1, 1, 0], device=device),
                exclude=torch.tensor([-1, 3, -1, 0], device=device))


def _nan_at(shape, position, device, value=float("nan")):
    t = torch.zeros(*shape, device=device)
    t[position] = value
    return t


TOPK_BAD_INPUTS = [
    ("queries", lambda d: dict(queries=_nan_at((4, 3), (1, 2), d))),
    ("anchors", lambda d: dict(anchors=_nan_at((6, 3), (5, 0), d, float("inf")))),
    ("queries", lambda d: dict(queries=torch.zeros(12, device=d))),
    ("anchors", lambda d: dict(anchors=torch.zeros(6, 3, 1, device=d))),
    ("queries", lambda d: dict(queries=torch.zeros(4, 3, dtype=torch.int64, device=d))),
    ("anchors", lambda d: dict(anchors=torch.zeros(6, 4, device=d))),
    ("anchors", lambda d: dict(anchors=torch.zeros(6, 3, dtype=torch.float64, device=d))),
    ("anchors", lambda d: dict(anchors=[[0.0] * 3] * 6)),
    ("anchor_offsets", lambda d: dict(anchor_offsets=torch.tensor([1, 2, 6], device=d))),
    ("anchor_offsets", lambda d: dict(anchor_offsets=torch.tensor([0, 4, 3, 6], device=d),
                                      query_segments=torch.tensor([0, 1, 2, 0], device=d))),
    ("anchor_offsets", lambda d: dict(anchor_offsets=torch.tensor([0, 2, 5], device=d))),
    ("anchor_offsets", lambda d: dict(anchor_offsets=torch.tensor([0.0, 2.0, 6.0], device=d))),
    ("anchor_offsets", lambda d: dict(anchor_offsets=torch.tensor([6], device=d))),
    ("query_segments", lambda d: dict(query_segments=torch.tensor([0, 2, 1, 0], device=d))),
    ("query_segments", lambda d: dict(query_segments=torch.tensor([0, -1, 1, 0], device=d))),
    ("query_segments", lambda d: dict(query_segments=torch.tensor([0, 1, 1], device=d))),
    ("query_segments", lambda d: dict(query_segments=None)),
    ("exclude", lambda d: dict(exclude=torch.tensor([-1, 6, -1, 0], device=d))),
    ("exclude", lambda d: dict(exclude=torch.tensor([-2, 3, -1, 0], device=d))),
    ("exclude", lambda d: dict(exclude=torch.tensor([-1.0, 3.0, -1.0, 0.0], device=d))),
    ("k", lambda d: dict(k=-1)),
    ("k", lambda d: dict(k=1.5)),
    ("metric", lambda d: dict(metric="manhattan")),
    ("backend", lambda d: dict(backend="fortran")),
]


@pytest.mark.parametrize("name, change", TOPK_BAD_INPUTS,
                         ids=[f"{i}-{name}" for i, (name, _) in enumerate(TOPK_BAD_INPUTS)])
def test_topk_anchors_rejects_bad_input_naming_the_argument(backend_device, name, change):
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    arguments = _topk_arguments(device)
    arguments["backend"] = backend
    arguments.update(change(device))
    with pytest.raises((ValueError, TypeError)) as error:
        fastassoc.topk_anchors(arguments.pop("queries"), arguments.pop("anchors"), **arguments)
    assert_names_argument(error.value, name)


# ----------------------------------------------------------------------------- mutual_knn

@st.composite
def mutual_problems(draw):
    metric = draw(st.sampled_from(METRICS))
    dim = 4 if metric == "cosine" else draw(st.integers(1, 3))
    a = draw(feature_rows(draw(st.integers(0, 7)), dim, metric))
    b = draw(feature_rows(draw(st.integers(0, 7)), dim, metric))
    k = draw(st.integers(0, 8))
    max_distance = draw(st.one_of(st.none(), st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0])))
    return a, b, k, metric, max_distance


def run_mutual(backend, device, a, b, k, metric, max_distance, dtype=torch.float32):
    return fastassoc.mutual_knn(torch.as_tensor(a, dtype=dtype, device=device),
                                torch.as_tensor(b, dtype=dtype, device=device), k, metric=metric,
                                max_distance=max_distance, backend=backend)


def check_mutual(result, expected, what, device, rtol=1e-6, atol=1e-6):
    ia, ib, distances = result
    assert ia.dtype == ib.dtype == torch.int64, f"{what}: index dtypes {ia.dtype}, {ib.dtype}"
    assert distances.dtype == torch.float32, f"{what}: distance dtype {distances.dtype}"
    assert {ia.device.type, ib.device.type, distances.device.type} == {device}, what
    got_pairs = list(zip(ia.tolist(), ib.tolist()))
    assert got_pairs == sorted(got_pairs), f"{what}: pairs not sorted by (ia, ib): {got_pairs}"
    assert_equal_array(ia, expected[0], f"{what}: ia (pairs {got_pairs})")
    assert_equal_array(ib, expected[1], f"{what}: ib (pairs {got_pairs})")
    assert_close_array(distances, expected[2], f"{what}: distances", rtol=rtol, atol=atol)


@PROPERTY_SETTINGS
@given(problem=mutual_problems())
def test_mutual_knn_matches_oracle_with_exact_ties(backend_device, problem):
    backend, device = backend_device
    require_backend("mutual_knn", backend)
    check_mutual(run_mutual(backend, device, *problem), oracle_mutual(*problem),
                 f"{backend} {problem[3]} k={problem[2]} max_distance={problem[4]}", device)


@pytest.mark.parametrize("metric", METRICS)
def test_mutual_knn_matches_oracle_on_separated_data(backend_device, metric):
    backend, device = backend_device
    require_backend("mutual_knn", backend)
    rng = np.random.default_rng(13)
    a, b = rng.standard_normal((31, 6)), rng.standard_normal((24, 6))
    expected = oracle_mutual(a, b, 4, metric, None)
    check_mutual(run_mutual(backend, device, a, b, 4, metric, None), expected, f"{backend} {metric}", device,
                 rtol=1e-4, atol=1e-4)
    # Halfway between two distinct pair distances, so float32 rounding cannot flip a pair.
    distinct = np.unique(expected[2])
    threshold = float(distinct[len(distinct) // 2] + distinct[len(distinct) // 2 + 1]) / 2
    check_mutual(run_mutual(backend, device, a, b, 4, metric, threshold), oracle_mutual(a, b, 4, metric, threshold),
                 f"{backend} {metric} max_distance={threshold}", device, rtol=1e-4, atol=1e-4)
    with fastassoc.tile_limit(7):
        tiled = run_mutual(backend, device, a, b, 4, metric, None)
    check_mutual(tiled, expected, f"{backend} {metric} under tile_limit(7)", device, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_mutual_knn_dtypes(backend_device, dtype):
    backend, device = backend_device
    require_backend("mutual_knn", backend)
    rng = np.random.default_rng(17)
    a, b = rng.integers(-3, 4, (9, 3)).astype(float), rng.integers(-3, 4, (8, 3)).astype(float)
    check_mutual(run_mutual(backend, device, a, b, 3, "euclidean", 3.0, dtype=dtype),
                 oracle_mutual(a, b, 3, "euclidean", 3.0), f"{backend} {dtype}", device)


def test_mutual_knn_edge_cases(backend_device):
    backend, device = backend_device
    require_backend("mutual_knn", backend)
    rng = np.random.default_rng(19)
    a, b = rng.integers(-3, 4, (5, 2)).astype(float), rng.integers(-3, 4, (4, 2)).astype(float)
    for name, problem in {"empty a": (a[:0], b, 2, "sqeuclidean", None),
                          "empty b": (a, b[:0], 2, "sqeuclidean", None),
                          "k zero": (a, b, 0, "sqeuclidean", None),
                          "k above both sizes": (a, b, 9, "sqeuclidean", None),
                          "max_distance zero": (np.concatenate([a, b]), b, 1, "sqeuclidean", 0.0)}.items():
        check_mutual(run_mutual(backend, device, *problem), oracle_mutual(*problem), f"{backend} {name}", device)
    ia, ib, _ = run_mutual(backend, device, a, b, 9, "sqeuclidean", None)
    assert ia.numel() == 5 * 4, f"{backend}: k above both sizes must pair everything, got {ia.numel()} pairs"


MUTUAL_BAD_INPUTS = [
    ("a", lambda d: dict(a=_nan_at((4, 3), (0, 0), d))),
    ("b", lambda d: dict(b=_nan_at((5, 3), (4, 2), d, float("-inf")))),
    ("a", lambda d: dict(a=torch.zeros(3, device=d))),
    ("b", lambda d: dict(b=torch.zeros(5, 2, device=d))),
    ("b", lambda d: dict(b=torch.zeros(5, 3, dtype=torch.float16, device=d))),
    ("k", lambda d: dict(k=-3)),
    ("metric", lambda d: dict(metric="cos")),
    ("max_distance", lambda d: dict(max_distance=float("nan"))),
    ("max_distance", lambda d: dict(max_distance="1")),
]


@pytest.mark.parametrize("name, change", MUTUAL_BAD_INPUTS,
                         ids=[f"{i}-{name}" for i, (name, _) in enumerate(MUTUAL_BAD_INPUTS)])
def test_mutual_knn_rejects_bad_input_naming_the_argument(backend_device, name, change):
    backend, device = backend_device
    require_backend("mutual_knn", backend)
    arguments = dict(a=torch.zeros(4, 3, device=device), b=torch.ones(5, 3, device=device), k=2,
                     backend=backend)
    arguments.update(change(device))
    with pytest.raises((ValueError, TypeError)) as error:
        fastassoc.mutual_knn(arguments.pop("a"), arguments.pop("b"), **arguments)
    assert_names_argument(error.value, name)
