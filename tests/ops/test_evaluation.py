"""Tests of evaluate_ranking on every backend against a per-query NumPy oracle.

The oracle follows torchreid's ``eval_func`` (Market-1501 protocol, extended with mINP as in
Ye et al.'s AGW code): a full stable argsort per query, a junk mask (same identity and
camera, or gallery identity -1), cumulative sums over the kept entries. It never calls
fastassoc.

Exactness: small-integer features make squared distances exact in float32 and Euclidean
distances correctly rounded, so distance ties are real and must be ranked by gallery
index. Cosine ties use axis-aligned features (scaled +-e_i), whose normalisation and
``1 - cos`` are exact. Continuous random data is well separated.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastassoc
from conftest import require_backend

OP = "evaluate_ranking"
METRICS = ("sqeuclidean", "euclidean", "cosine")
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------- oracle

def oracle_distances(q: np.ndarray, g: np.ndarray, metric: str) -> np.ndarray:
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return 1.0 - qn @ gn.T
    squared = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    return np.sqrt(squared) if metric == "euclidean" else squared


def oracle_evaluate(q, g, q_pids, g_pids, q_cams, g_cams, metric="euclidean", max_rank=50):
    """torchreid-style eval_func; returns (cmc [max_rank], mAP, mINP, num_valid) or None if no valid query."""
    distances = oracle_distances(q, g, metric)
    all_cmc, all_ap, all_inp = [], [], []
    for row in range(len(q)):
        order = np.argsort(distances[row], kind="stable")
        matches = g_pids[order] == q_pids[row]
        remove = ((g_pids[order] == q_pids[row]) & (g_cams[order] == q_cams[row])) | (g_pids[order] == -1)
        raw_cmc = matches[~remove].astype(np.float64)
        if not raw_cmc.any():
            continue
        cmc = raw_cmc.cumsum()
        last_match = np.nonzero(raw_cmc)[0].max()
        all_inp.append(cmc[last_match] / (last_match + 1.0))
        cmc[cmc > 1] = 1
        padded = np.full(max_rank, cmc[-1])
        padded[:min(max_rank, cmc.size)] = cmc[:max_rank]
        all_cmc.append(padded)
        num_rel = raw_cmc.sum()
        precision = raw_cmc.cumsum() / (np.arange(raw_cmc.size) + 1.0)
        all_ap.append((precision * raw_cmc).sum() / num_rel)
    if not all_cmc:
        return None
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap)), float(np.mean(all_inp)), len(all_cmc)


def assert_matches_oracle(result, expected, context: str = "") -> None:
    cmc, mean_ap, mean_inp, num_valid = expected
    assert isinstance(result, fastassoc.RankingResult)
    assert result.num_valid_queries == num_valid, \
        f"num_valid_queries {result.num_valid_queries} != {num_valid} {context}"
    actual_cmc = result.cmc.cpu()
    assert actual_cmc.dtype == torch.float64 and actual_cmc.shape == (cmc.size,), \
        f"cmc {actual_cmc.dtype} {tuple(actual_cmc.shape)}, expected float64 ({cmc.size},) {context}"
    mismatch = np.nonzero(~np.isclose(actual_cmc.numpy(), cmc, rtol=1e-12, atol=1e-12))[0]
    if mismatch.size:
        first = int(mismatch[0])
        raise AssertionError(f"cmc differs first at rank {first + 1}: {float(actual_cmc[first])} != {cmc[first]} "
                             f"{context}\n got      {actual_cmc.tolist()}\n expected {cmc.tolist()}")
    assert result.mAP == pytest.approx(mean_ap, rel=1e-12, abs=1e-12), f"mAP {result.mAP} != {mean_ap} {context}"
    assert result.mINP == pytest.approx(mean_inp, rel=1e-12, abs=1e-12), \
        f"mINP {result.mINP} != {mean_inp} {context}"


def run(q, g, q_pids, g_pids, q_cams, g_cams, backend, device, dtype=torch.float32, **kwargs):
    def tensor(a, d=None):
        return torch.as_tensor(np.asarray(a), dtype=d, device=device)
    return fastassoc.evaluate_ranking(tensor(q, dtype), tensor(g, dtype), tensor(q_pids), tensor(g_pids),
                                      tensor(q_cams), tensor(g_cams), backend=backend, **kwargs)


# ----------------------------------------------------------------------------- data

@st.composite
def integer_problems(draw, max_query=8, max_gallery=14):
    """Small-integer features (many exact distance ties), few identities, gallery -1 junk."""
    num_query = draw(st.integers(1, max_query))
    num_gallery = draw(st.integers(1, max_gallery))
    dim = draw(st.integers(1, 3))
    values = st.integers(-2, 2)
    q = np.array(draw(st.lists(values, min_size=num_query * dim, max_size=num_query * dim)),
                 dtype=np.float32).reshape(num_query, dim)
    g = np.array(draw(st.lists(values, min_size=num_gallery * dim, max_size=num_gallery * dim)),
                 dtype=np.float32).reshape(num_gallery, dim)
    q_pids = np.array(draw(st.lists(st.integers(0, 3), min_size=num_query, max_size=num_query)), np.int64)
    g_pids = np.array(draw(st.lists(st.integers(-1, 3), min_size=num_gallery, max_size=num_gallery)), np.int64)
    q_cams = np.array(draw(st.lists(st.integers(0, 2), min_size=num_query, max_size=num_query)), np.int64)
    g_cams = np.array(draw(st.lists(st.integers(0, 2), min_size=num_gallery, max_size=num_gallery)), np.int64)
    return q, g, q_pids, g_pids, q_cams, g_cams


def random_problem(seed, num_query=37, num_gallery=211, dim=16, num_pids=12):
    generator = np.random.default_rng(seed)
    q = generator.standard_normal((num_query, dim)).astype(np.float32)
    g = generator.standard_normal((num_gallery, dim)).astype(np.float32)
    q_pids = generator.integers(0, num_pids + 3, num_query)  # some identities absent from the gallery
    g_pids = generator.integers(-1, num_pids, num_gallery)
    q_cams = generator.integers(0, 4, num_query)
    g_cams = generator.integers(0, 4, num_gallery)
    return q, g, q_pids, g_pids, q_cams, g_cams


# ----------------------------------------------------------------------------- property tests

@PROPERTY_SETTINGS
@given(problem=integer_problems(), metric=st.sampled_from(("sqeuclidean", "euclidean")),
       max_rank=st.integers(1, 20))
def test_matches_oracle_with_exact_ties(backend_device, problem, metric, max_rank):
    backend, device = backend_device
    require_backend(OP, backend)
    expected = oracle_evaluate(*problem, metric=metric, max_rank=max_rank)
    if expected is None:
        with pytest.raises(ValueError, match="true match"):
            run(*problem, backend, device, metric=metric, max_rank=max_rank)
        return
    result = run(*problem, backend, device, metric=metric, max_rank=max_rank)
    assert_matches_oracle(result, expected, f"({metric}, max_rank={max_rank})")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), max_rank=st.integers(1, 12))
def test_cosine_ties_on_axis_aligned_features(backend_device, data, max_rank):
    """Features c * (+-e_d): cosine distances are exactly 0, 1 or 2, so ties abound."""
    backend, device = backend_device
    require_backend(OP, backend)
    num_query, num_gallery, dim = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 12)), 3

    def axis_features(count):
        axes = data.draw(st.lists(st.integers(0, dim - 1), min_size=count, max_size=count))
        scales = data.draw(st.lists(st.sampled_from((-4.0, -1.0, 0.5, 1.0, 2.0)), min_size=count, max_size=count))
        features = np.zeros((count, dim), np.float32)
        features[np.arange(count), axes] = scales
        return features

    q, g = axis_features(num_query), axis_features(num_gallery)
    pids = st.integers(0, 2)
    q_pids = np.array(data.draw(st.lists(pids, min_size=num_query, max_size=num_query)))
    g_pids = np.array(data.draw(st.lists(pids, min_size=num_gallery, max_size=num_gallery)))
    q_cams = np.array(data.draw(st.lists(st.integers(0, 1), min_size=num_query, max_size=num_query)))
    g_cams = np.array(data.draw(st.lists(st.integers(0, 1), min_size=num_gallery, max_size=num_gallery)))
    problem = (q, g, q_pids, g_pids, q_cams, g_cams)
    expected = oracle_evaluate(*problem, metric="cosine", max_rank=max_rank)
    if expected is None:
        with pytest.raises(ValueError):
            run(*problem, backend, device, metric="cosine", max_rank=max_rank)
        return
    assert_matches_oracle(run(*problem, backend, device, metric="cosine", max_rank=max_rank), expected, "(cosine)")


# ----------------------------------------------------------------------------- examples

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_random_continuous_data(backend_device, metric, dtype):
    backend, device = backend_device
    require_backend(OP, backend)
    problem = random_problem(1)
    # The oracle sees the features exactly as the op does after the cast to ``dtype``.
    rounded = tuple(torch.as_tensor(a).to(dtype).double().numpy() for a in problem[:2]) + problem[2:]
    expected = oracle_evaluate(*rounded, metric=metric, max_rank=30)
    assert_matches_oracle(run(*problem, backend, device, dtype=dtype, metric=metric, max_rank=30), expected,
                          f"({metric}, {dtype})")


@pytest.mark.parametrize("tile", [1, 5, 211, 10**6])
def test_tile_independence(backend_device, tile):
    backend, device = backend_device
    require_backend(OP, backend)
    problem = random_problem(2)
    expected = run(*problem, backend, device, max_rank=25)
    with fastassoc.tile_limit(tile):
        tiled = run(*problem, backend, device, max_rank=25)
    assert torch.equal(tiled.cmc.cpu(), expected.cmc.cpu()), f"cmc differs with tile_limit({tile})"
    assert (tiled.mAP, tiled.mINP, tiled.num_valid_queries) == (expected.mAP, expected.mINP,
                                                                expected.num_valid_queries)


def test_hand_computed_protocol():
    """1-D features; query 0 (pid 1, cam 0) against gallery at distances 1..6:
    ranked pids/cams: (2,1) (1,0)=junk (1,1) (-1,1)=junk (2,0) (1,2).
    Kept ranking: 2, 1, 2, 1 -> matches at kept ranks 2 and 4.
    AP = (1/2 + 2/4) / 2 = 0.5, INP = 2/4, first match at rank 2.
    Query 1 (pid 5) has no match and is skipped."""
    q = np.array([[0.0], [0.0]])
    g = np.array([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    q_pids, q_cams = np.array([1, 5]), np.array([0, 0])
    g_pids, g_cams = np.array([2, 1, 1, -1, 2, 1]), np.array([1, 0, 1, 1, 0, 2])
    result = run(q, g, q_pids, g_pids, q_cams, g_cams, "reference", "cpu", max_rank=6)
    assert result.num_valid_queries == 1
    assert result.cmc.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert result.mAP == pytest.approx(0.5) and result.mINP == pytest.approx(0.5)
    assert result.rank1 == 0.0


def test_ties_are_ranked_by_gallery_index():
    """Three gallery entries at the same distance: the true match is at index 2, so it is
    ranked third (AP 1/3); moved to index 0 it is ranked first."""
    q = np.zeros((1, 2))
    g = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    cams = np.array([1, 1, 1])
    late = run(q, g, np.array([7]), np.array([3, 4, 7]), np.array([0]), cams, "reference", "cpu", max_rank=3)
    early = run(q, g, np.array([7]), np.array([7, 4, 3]), np.array([0]), cams, "reference", "cpu", max_rank=3)
    assert late.cmc.tolist() == [0.0, 0.0, 1.0] and late.mAP == pytest.approx(1 / 3)
    assert early.cmc.tolist() == [1.0, 1.0, 1.0] and early.mAP == pytest.approx(1.0)


def test_max_rank_beyond_gallery_repeats_last_value(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    q, g, _, _, _, _ = random_problem(4, num_query=9, num_gallery=7)
    # Cross-camera identities 0..2 on both sides: most queries have a true match.
    problem = (q, g, np.arange(9) % 3, np.array([0, 1, 2, 0, -1, 1, 2]), np.zeros(9, np.int64), np.ones(7, np.int64))
    expected = oracle_evaluate(*problem, max_rank=40)
    result = run(*problem, backend, device, max_rank=40)
    assert_matches_oracle(result, expected, "(max_rank 40 > gallery 7)")
    assert torch.all(result.cmc[7:] == result.cmc[6])


def test_queries_without_matches_and_junk_only_matches_are_skipped(backend_device):
    """Query 0 matches only in its own camera (all junk); query 1 has an unknown pid;
    query 2 has pid -1 (only junk -1 entries could match); query 3 is valid."""
    backend, device = backend_device
    require_backend(OP, backend)
    generator = np.random.default_rng(5)
    q = generator.standard_normal((4, 4))
    g = generator.standard_normal((6, 4))
    q_pids, q_cams = np.array([0, 9, -1, 1]), np.array([0, 0, 0, 0])
    g_pids, g_cams = np.array([0, 0, -1, 1, 2, -1]), np.array([0, 0, 1, 1, 1, 0])
    result = run(q, g, q_pids, g_pids, q_cams, g_cams, backend, device, max_rank=6)
    assert result.num_valid_queries == 1
    expected = oracle_evaluate(q, g, q_pids, g_pids, q_cams, g_cams, max_rank=6)
    assert_matches_oracle(result, expected)


def test_no_valid_query_raises(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    q, g = np.zeros((2, 3)), np.ones((4, 3))
    with pytest.raises(ValueError, match="true match"):
        run(q, g, np.array([1, 2]), np.array([3, 3, 1, -1]), np.array([0, 1]), np.array([0, 0, 0, 1]),
            backend, device)
    with pytest.raises(ValueError, match="true match"):  # empty gallery
        run(q, np.zeros((0, 3)), np.array([1, 2]), np.zeros(0, np.int64), np.array([0, 1]),
            np.zeros(0, np.int64), backend, device)
    with pytest.raises(ValueError, match="true match"):  # no queries
        run(np.zeros((0, 3)), g, np.zeros(0, np.int64), np.array([3, 3, 1, -1]), np.zeros(0, np.int64),
            np.array([0, 0, 0, 1]), backend, device)


# ----------------------------------------------------------------------------- bad inputs

def _good_arguments():
    return dict(query=torch.zeros(3, 4), gallery=torch.ones(5, 4), query_pids=torch.arange(3),
                gallery_pids=torch.arange(5), query_cameras=torch.zeros(3, dtype=torch.int64),
                gallery_cameras=torch.ones(5, dtype=torch.int64))


@pytest.mark.parametrize("changes, error, name", [
    (dict(query=torch.zeros(3)), ValueError, "query"),
    (dict(query=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "query"),
    (dict(gallery=torch.ones(5, 3)), ValueError, "feature dimensions"),
    (dict(gallery=torch.ones(5, 4, dtype=torch.float64)), TypeError, "feature tensors"),
    (dict(gallery=torch.full((5, 4), float("inf"))), ValueError, "gallery"),
    (dict(query_pids=torch.arange(4)), ValueError, "query_pids"),
    (dict(query_pids=torch.zeros(3)), TypeError, "query_pids"),
    (dict(gallery_pids=torch.tensor([0, 1, -2, 3, 4])), ValueError, "gallery_pids"),
    (dict(query_cameras=torch.tensor([0, -1, 0])), ValueError, "query_cameras"),
    (dict(gallery_cameras=torch.ones(5, 1, dtype=torch.int64)), ValueError, "gallery_cameras"),
    (dict(metric="manhattan"), ValueError, "metric"),
    (dict(max_rank=0), ValueError, "max_rank"),
    (dict(max_rank=2.5), TypeError, "max_rank"),
    (dict(precision="low"), ValueError, "precision"),
])
def test_bad_inputs_name_the_argument(changes, error, name):
    arguments = _good_arguments()
    arguments.update(changes)
    positional = [arguments.pop(key) for key in ("query", "gallery", "query_pids", "gallery_pids",
                                                 "query_cameras", "gallery_cameras")]
    with pytest.raises(error, match=rf"^{name}\b"):
        fastassoc.evaluate_ranking(*positional, **arguments)
