"""evaluate_ranking(distances=...): a precomputed Q x G matrix against a NumPy oracle.

The oracle below ranks each row of the given matrix with NumPy's stable argsort (ties by
gallery index), drops junk (same identity and camera, or gallery identity -1), skips queries
without a true match and averages CMC / AP / INP as torchreid's ``eval_func`` (plus mINP as
in Ye et al.). It never calls fastassoc. The features path must equal the distances path on
the matrix of its own ranking distance.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastassoc
from conftest import require_backend


def oracle(distances, q_pids, g_pids, q_cams, g_cams, max_rank):
    """(cmc [max_rank], mAP, mINP, num_valid) of ranking by ``distances``; None if no query is valid."""
    distances = np.asarray(distances, np.float64)
    cmcs, aps, inps = [], [], []
    for row in range(distances.shape[0]):
        order = np.argsort(distances[row], kind="stable")
        pids, cams = g_pids[order], g_cams[order]
        kept = ~(((pids == q_pids[row]) & (cams == q_cams[row])) | (pids == -1))
        hits = (pids[kept] == q_pids[row]).astype(np.float64)
        if not hits.any():
            continue
        ranks = np.nonzero(hits)[0] + 1.0
        curve = np.zeros(max_rank)
        curve[int(ranks[0]) - 1:] = 1.0 if ranks[0] <= max_rank else 0.0
        cmcs.append(curve)
        aps.append(np.mean(np.arange(1, ranks.size + 1) / ranks))
        inps.append(ranks.size / ranks[-1])
    if not cmcs:
        return None
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(cmcs)


def assert_equals_oracle(result, expected, context=""):
    cmc, mean_ap, mean_inp, num_valid = expected
    assert result.num_valid_queries == num_valid, f"num_valid {result.num_valid_queries} != {num_valid} {context}"
    got = np.asarray(result.cmc.cpu() if isinstance(result.cmc, torch.Tensor) else result.cmc)
    bad = np.nonzero(~np.isclose(got, cmc, rtol=1e-12, atol=1e-12))[0]
    assert not bad.size, f"cmc differs first at rank {bad[0] + 1}: {got[bad[0]]} != {cmc[bad[0]]} {context}"
    assert result.mAP == pytest.approx(mean_ap, rel=1e-12, abs=1e-12), f"mAP {result.mAP} != {mean_ap} {context}"
    assert result.mINP == pytest.approx(mean_inp, rel=1e-12, abs=1e-12), f"mINP {result.mINP} != {mean_inp} {context}"


def labels(seed, num_query, num_gallery, num_pids=6, num_cams=3):
    generator = np.random.default_rng(seed)
    return (generator.integers(0, num_pids + 2, num_query), generator.integers(-1, num_pids, num_gallery),
            generator.integers(0, num_cams, num_query), generator.integers(0, num_cams, num_gallery))


def evaluate(distances, q_pids, g_pids, q_cams, g_cams, **kwargs):
    return fastassoc.evaluate_ranking(query_pids=torch.as_tensor(q_pids), gallery_pids=torch.as_tensor(g_pids),
                                      query_cameras=torch.as_tensor(q_cams), gallery_cameras=torch.as_tensor(g_cams),
                                      distances=distances, **kwargs)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), max_rank=st.integers(1, 15),
       dtype=st.sampled_from((torch.float32, torch.float64, torch.float16, torch.bfloat16)))
def test_matches_oracle_with_ties(data, max_rank, dtype):
    """Small-integer distances (exact in every dtype): many ties, ranked by gallery index."""
    num_query, num_gallery = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 13))
    values = data.draw(st.lists(st.integers(-3, 3), min_size=num_query * num_gallery,
                                max_size=num_query * num_gallery))
    matrix = np.array(values, np.float64).reshape(num_query, num_gallery)
    problem = labels(data.draw(st.integers(0, 2**16)), num_query, num_gallery, num_pids=3, num_cams=2)
    expected = oracle(matrix, *problem, max_rank)
    distances = torch.tensor(matrix, dtype=dtype)
    if expected is None:
        with pytest.raises(ValueError, match="true match"):
            evaluate(distances, *problem, max_rank=max_rank)
        return
    assert_equals_oracle(evaluate(distances, *problem, max_rank=max_rank), expected, f"({dtype})")


def test_hand_computed_protocol():
    """Query pid 1 cam 0; ranked pids/cams (2,1) (1,0)=junk (1,1) (-1,1)=junk (2,0) (1,2):
    kept matches at ranks 2 and 4 -> AP (1/2 + 2/4) / 2, INP 2/4; query pid 5 is skipped.
    The gallery is given out of order: only the matrix decides the ranking."""
    order = np.array([3, 0, 5, 1, 4, 2])  # gallery index at each rank
    distances = np.empty((2, 6))
    distances[:, order] = np.arange(1.0, 7.0)
    g_pids = np.empty(6, np.int64)
    g_cams = np.empty(6, np.int64)
    g_pids[order], g_cams[order] = [2, 1, 1, -1, 2, 1], [1, 0, 1, 1, 0, 2]
    result = evaluate(torch.tensor(distances), [1, 5], g_pids, [0, 0], g_cams, max_rank=6)
    assert result.num_valid_queries == 1
    assert result.cmc.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert result.mAP == pytest.approx(0.5) and result.mINP == pytest.approx(0.5)


def test_infinite_distances_rank_last_and_first():
    q_pids, g_pids, q_cams, g_cams = [0], [0, 1, 0], [0], [1, 1, 2]
    distances = torch.tensor([[float("inf"), 1.0, float("-inf")]])
    result = evaluate(distances, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    # Ranked: g2 (match), g1, g0 (match) -> AP (1/1 + 2/3) / 2.
    assert result.cmc.tolist() == [1.0, 1.0, 1.0] and result.mAP == pytest.approx((1 + 2 / 3) / 2)


def _problem_features(seed, metric, num_query=23, num_gallery=61, dim=5):
    generator = np.random.default_rng(seed)
    if metric == "cosine":
        q = generator.standard_normal((num_query, dim))
        g = generator.standard_normal((num_gallery, dim))
    else:  # small integers: exact squared distances, real ties
        q = generator.integers(-2, 3, (num_query, dim)).astype(np.float64)
        g = generator.integers(-2, 3, (num_gallery, dim)).astype(np.float64)
    return q, g


def _oracle_distance(q, g, metric):
    if metric == "cosine":
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        gn = g / np.linalg.norm(g, axis=1, keepdims=True)
        return 1.0 - qn @ gn.T
    squared = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    return np.sqrt(squared) if metric == "euclidean" else squared


@pytest.mark.parametrize("metric", ("sqeuclidean", "euclidean", "cosine"))
def test_features_path_equals_distances_path(backend_device, metric):
    backend, device = backend_device
    require_backend("evaluate_ranking", backend)
    q, g = _problem_features(3, metric)
    problem = labels(4, q.shape[0], g.shape[0])
    tensors = [torch.as_tensor(a, device=device) for a in problem]
    by_features = fastassoc.evaluate_ranking(torch.tensor(q, device=device), torch.tensor(g, device=device),
                                             *tensors, metric=metric, max_rank=20, backend=backend)
    by_distances = fastassoc.evaluate_ranking(None, None, *tensors, max_rank=20, backend=backend,
                                              distances=torch.tensor(_oracle_distance(q, g, metric), device=device))
    assert torch.equal(by_features.cmc.cpu(), by_distances.cmc.cpu()), (by_features.cmc, by_distances.cmc)
    assert (by_features.mAP, by_features.mINP, by_features.num_valid_queries) == pytest.approx(
        (by_distances.mAP, by_distances.mINP, by_distances.num_valid_queries), rel=1e-12)
    assert_equals_oracle(by_distances, oracle(_oracle_distance(q, g, metric), *problem, 20), metric)


@pytest.mark.parametrize("tile", [1, 7, 61, 10**6])
def test_chunking_does_not_change_the_result(tile):
    generator = np.random.default_rng(6)
    distances = torch.tensor(generator.integers(0, 4, (19, 61)), dtype=torch.float32)
    problem = labels(7, 19, 61)
    expected = oracle(distances.numpy(), *problem, 30)
    with fastassoc.tile_limit(tile):
        assert_equals_oracle(evaluate(distances, *problem, max_rank=30), expected, f"(tile {tile})")


def test_numpy_and_noncontiguous_inputs():
    generator = np.random.default_rng(8)
    matrix = generator.standard_normal((31, 9))
    q_pids, g_pids, q_cams, g_cams = labels(9, 9, 31)
    expected = oracle(matrix.T, q_pids, g_pids, q_cams, g_cams, 10)
    result = fastassoc.evaluate_ranking(query_pids=q_pids, gallery_pids=g_pids, query_cameras=q_cams,
                                        gallery_cameras=g_cams, distances=matrix.T, max_rank=10)
    assert isinstance(result.cmc, np.ndarray)
    assert_equals_oracle(result, expected, "(NumPy, transposed view)")
    assert_equals_oracle(evaluate(torch.tensor(matrix).T, q_pids, g_pids, q_cams, g_cams, max_rank=10), expected,
                         "(torch, transposed view)")


def _good():
    return dict(query_pids=torch.arange(3), gallery_pids=torch.arange(5), query_cameras=torch.zeros(3, dtype=int),
                gallery_cameras=torch.ones(5, dtype=int), distances=torch.rand(3, 5))


@pytest.mark.parametrize("changes, error, pattern", [
    (dict(query=torch.zeros(3, 4)), ValueError, "not both"),
    (dict(rerank={}), ValueError, "rerank"),
    (dict(distances=None), TypeError, "distances="),
    (dict(gallery_pids=None), TypeError, "gallery_pids"),
    (dict(distances=torch.rand(3)), ValueError, "^distances must be a 2-D"),
    (dict(distances=torch.ones(3, 5, dtype=torch.int64)), TypeError, "^distances must be float"),
    (dict(distances=torch.tensor([[0.0] * 5, [0, 0, 0, float("nan"), 0], [0.0] * 5])), ValueError,
     r"^distances contains NaN \(first at index \(1, 3\)\)"),
    (dict(distances=torch.rand(4, 5)), ValueError, "^query_pids must have length 4"),
    (dict(distances=torch.rand(3, 6)), ValueError, "^gallery_pids must have length 6"),
    (dict(gallery_pids=torch.tensor([0, 1, -2, 3, 4])), ValueError, "^gallery_pids"),
    (dict(query_cameras=torch.tensor([0, -1, 0])), ValueError, "^query_cameras"),
    (dict(max_rank=0), ValueError, "^max_rank"),
    (dict(metric="manhattan"), ValueError, "^metric"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_inputs_name_the_argument(changes, error, pattern):
    arguments = {**_good(), **changes}
    with pytest.raises(error, match=pattern):
        fastassoc.evaluate_ranking(**arguments)


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="true match"):
        evaluate(torch.rand(2, 3), [7, 8], [0, 1, -1], [0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="true match"):  # empty gallery
        evaluate(torch.rand(2, 0), [7, 8], np.zeros(0, np.int64), [0, 0], np.zeros(0, np.int64))


def test_meta_tensors_are_refused_naming_the_op():
    meta = {name: value.to("meta") for name, value in _good().items()}
    with pytest.raises(ValueError, match="evaluate_ranking.*meta"):
        fastassoc.evaluate_ranking(**meta)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_custom_op_registration(backend):
    require_backend("evaluate_ranking", backend)
    arguments = (torch.rand(6, 9, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(9) % 4 - 1,
                 torch.zeros(6, dtype=torch.int64), torch.arange(9) % 2, 4, backend)
    torch.library.opcheck(torch.ops.fastassoc.evaluate_ranking_distances.default, arguments)
