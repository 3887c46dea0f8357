"""Triton-specific tests of the distance-family kernels (fastassoc/kernels/triton/).

The shared op tests run the Triton backend on tiny inputs with the default blocks.
These tests shrink the blocks (16 x 16 x 16) and the chunk size so that tiny inputs
still cross many row blocks, column tiles, feature slices and anchor chunks: the
running top-k merge, the chunk (two-stage) merge, the column-candidate path of
mutual_knn, the rescans of agglomerative_merge and the large-k (> 64) path are all
exercised. They run on CPU tensors under TRITON_INTERPRET=1 (set by conftest when no
GPU is present) and on CUDA tensors when a GPU is present.

Oracles are NumPy brute force (lexsort by (distance, index)) or, for the composite
ops, the pure-torch reference backend. Exact-tie data are small integers (exact in
every float dtype); index equality on continuous data uses well-separated data.
Low precision follows flash-attention's rule: the kernel's error is at most twice the
error of the reference fed the same low-precision inputs, plus a small atol.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastassoc
from fastassoc import _backend
from fastassoc.kernels.triton import _common

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
DISTANCE_OPS = ("topk_anchors", "mutual_knn", "cross_camera_graph", "knn_soft_labels", "agglomerative_merge",
                "evaluate_ranking")

pytestmark = pytest.mark.skipif(
    _backend.available_backends("topk_anchors")["topk_anchors"]["triton"] is not True
    or not (HAS_GPU or _backend.triton_interpret()),
    reason="the triton backend needs a GPU or TRITON_INTERPRET=1")


@pytest.fixture
def small_blocks(monkeypatch):
    """16 x 16 x 16 blocks and 16-column chunks: many tiles, blocks and chunks on tiny inputs."""
    monkeypatch.setattr(_common, "INTERPRET_BLOCKS", (16, 16, 16))
    monkeypatch.setattr(_common, "MIN_CHUNK_COLUMNS", 16)
    monkeypatch.setattr(_common, "INTERPRET_TARGET_PROGRAMS", 64)
    monkeypatch.setattr(_common, "TARGET_WAVES", 64)


# ----------------------------------------------------------------------------- oracles

def oracle_distances(q: np.ndarray, a: np.ndarray, metric: str) -> np.ndarray:
    q, a = np.asarray(q, np.float64), np.asarray(a, np.float64)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        return 1.0 - q @ a.T
    squared = ((q[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    return np.sqrt(squared) if metric == "euclidean" else squared


def oracle_topk(q, a, k, metric, offsets, segments, exclude):
    """Per query: candidates of its segment minus the excluded one, lexsorted by (distance, index)."""
    distances = oracle_distances(q, a, metric)
    out_d = np.full((len(q), k), np.inf)
    out_i = np.full((len(q), k), -1, dtype=np.int64)
    for row in range(len(q)):
        low, high = offsets[segments[row]], offsets[segments[row] + 1]
        candidates = np.array([j for j in range(low, high) if j != exclude[row]], dtype=np.int64)
        if candidates.size == 0 or k == 0:
            continue
        chosen = candidates[np.lexsort((candidates, distances[row, candidates]))[:k]]
        out_d[row, :chosen.size] = distances[row, chosen]
        out_i[row, :chosen.size] = chosen
    return out_d, out_i


def oracle_mutual(a, b, k, metric):
    distances = oracle_distances(a, b, metric)
    rows = [set(np.lexsort((np.arange(len(b)), d))[:k].tolist()) for d in distances]
    cols = [set(np.lexsort((np.arange(len(a)), d))[:k].tolist()) for d in distances.T]
    pairs = sorted((i, j) for i in range(len(a)) for j in rows[i] if i in cols[j])
    return pairs, np.array([distances[i, j] for i, j in pairs])


def assert_same(actual, expected, what: str) -> None:
    actual = np.asarray(actual.detach().cpu() if isinstance(actual, torch.Tensor) else actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    bad = np.argwhere(actual != expected)
    assert bad.size == 0, (f"{what}: first mismatch at {tuple(bad[0])}: got {actual[tuple(bad[0])]}, expected "
                           f"{expected[tuple(bad[0])]} ({len(bad)} mismatches)")


def assert_close(actual, expected, what: str, tolerance: float) -> None:
    actual = actual.detach().cpu().double().numpy()
    same = (np.isinf(actual) & np.isinf(expected)) | np.isclose(actual, expected, rtol=tolerance, atol=tolerance)
    bad = np.argwhere(~same)
    assert bad.size == 0, (f"{what}: first mismatch at {tuple(bad[0])}: got {actual[tuple(bad[0])]!r}, expected "
                           f"{expected[tuple(bad[0])]!r} ({len(bad)} mismatches)")


def tensor(array, dtype=torch.float32):
    return torch.as_tensor(np.asarray(array), dtype=dtype, device=DEVICE)


def index(array):
    return torch.as_tensor(np.asarray(array), dtype=torch.int64, device=DEVICE)


def run_topk(q, a, k, metric, offsets, segments, exclude, dtype=torch.float32, precision="highest"):
    return fastassoc.topk_anchors(tensor(q, dtype), tensor(a, dtype), k, metric=metric,
                                  anchor_offsets=index(offsets), query_segments=index(segments),
                                  exclude=index(exclude), precision=precision, backend="triton")


def separated_problem(seed: int, num_queries: int = 37, num_anchors: int = 101, dim: int = 20):
    """Continuous data; segments of 0, 9, 27 and 65 anchors (one empty, one below k)."""
    rng = np.random.default_rng(seed)
    offsets = np.array([0, 0, 9, 36, num_anchors])
    segments = rng.integers(0, 4, num_queries)
    exclude = np.where(rng.random(num_queries) < 0.6, rng.integers(0, num_anchors, num_queries), -1)
    return rng.standard_normal((num_queries, dim)), rng.standard_normal((num_anchors, dim)), offsets, segments, exclude


# ----------------------------------------------------------------------------- topk_anchors

def test_every_distance_op_is_implemented():
    report = _backend.available_backends()
    missing = [op for op in DISTANCE_OPS if report[op]["triton"] is not True]
    assert not missing, f"triton backend lacks {missing}: {[report[op]['triton'] for op in missing]}"


@pytest.mark.parametrize("k", [1, 5, 16, 33, 64])
def test_topk_up_to_64_across_tiles_blocks_and_chunks(small_blocks, k):
    q, a, offsets, segments, exclude = separated_problem(k)
    metric = ("sqeuclidean", "euclidean", "cosine")[k % 3]
    distances, indices = run_topk(q, a, k, metric, offsets, segments, exclude)
    expected_d, expected_i = oracle_topk(q, a, k, metric, offsets, segments, exclude)
    assert distances.dtype == torch.float32 and indices.dtype == torch.int64
    assert_same(indices, expected_i, f"k={k} {metric} indices")
    assert_close(distances, expected_d, f"k={k} {metric} distances", 1e-4)


@pytest.mark.parametrize("k", [65, 100])
def test_topk_large_k_two_stage_path(small_blocks, k):
    q, a, offsets, segments, exclude = separated_problem(k, num_queries=9, num_anchors=130)
    offsets = np.array([0, 0, 9, 40, 130])
    for metric in ("sqeuclidean", "cosine"):
        distances, indices = run_topk(q, a, k, metric, offsets, segments, exclude)
        expected_d, expected_i = oracle_topk(q, a, k, metric, offsets, segments, exclude)
        assert_same(indices, expected_i, f"k={k} {metric} indices")
        assert_close(distances, expected_d, f"k={k} {metric} distances", 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_exact_ties_across_tiles_and_chunks(small_blocks, dtype):
    """Small-integer features with many duplicates: ties span tiles and chunk boundaries."""
    rng = np.random.default_rng(4)
    anchors = rng.integers(-1, 2, (70, 3)).astype(float)      # 27 distinct points, many repeats
    queries = rng.integers(-1, 2, (21, 3)).astype(float)
    offsets = np.array([0, 50, 50, 70])
    segments = rng.integers(0, 3, 21)
    exclude = rng.integers(-1, 70, 21)
    for k in (3, 12, 40):
        for metric in ("sqeuclidean", "euclidean"):
            distances, indices = run_topk(queries, anchors, k, metric, offsets, segments, exclude, dtype)
            expected_d, expected_i = oracle_topk(queries, anchors, k, metric, offsets, segments, exclude)
            assert_same(indices, expected_i, f"{dtype} k={k} {metric} indices")
            assert_close(distances, expected_d, f"{dtype} k={k} {metric} distances", 1e-6)


def test_topk_all_equal_anchors_keep_index_order(small_blocks):
    anchors = np.ones((90, 4))
    queries = np.zeros((5, 4))
    exclude = np.array([0, 17, 33, -1, 89])
    distances, indices = run_topk(queries, anchors, 20, "sqeuclidean", [0, 90], np.zeros(5, np.int64), exclude)
    expected = [[j for j in range(90) if j != e][:20] for e in exclude]
    assert_same(indices, np.array(expected), "all-equal anchors")
    assert_same(distances, np.full((5, 20), 4.0, np.float32), "all-equal distances")


def test_topk_chunk_count_does_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(8)
    anchors = rng.integers(-2, 3, (75, 5)).astype(float)
    queries = rng.integers(-2, 3, (19, 5)).astype(float)
    problem = (queries, anchors, 9, "euclidean", [0, 30, 75], rng.integers(0, 2, 19), rng.integers(-1, 75, 19))
    monkeypatch.setattr(_common, "INTERPRET_BLOCKS", (16, 16, 16))
    one_chunk = run_topk(*problem)
    monkeypatch.setattr(_common, "MIN_CHUNK_COLUMNS", 16)
    monkeypatch.setattr(_common, "INTERPRET_TARGET_PROGRAMS", 1000)
    monkeypatch.setattr(_common, "TARGET_WAVES", 1000)
    many_chunks = run_topk(*problem)
    with fastassoc.tile_limit(5):
        many_passes = run_topk(*problem)
    for name, result in (("many chunks", many_chunks), ("many passes", many_passes)):
        assert_same(result[1], one_chunk[1].cpu().numpy(), f"{name} indices")
        assert_same(result[0], one_chunk[0].cpu().numpy(), f"{name} distances")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_half_inputs_exact_on_small_integers(small_blocks, dtype):
    rng = np.random.default_rng(6)
    anchors = rng.integers(-3, 4, (40, 18)).astype(float)
    queries = rng.integers(-3, 4, (17, 18)).astype(float)
    problem = (queries, anchors, 7, "sqeuclidean", [0, 13, 40], rng.integers(0, 2, 17), rng.integers(-1, 40, 17))
    for metric in ("sqeuclidean", "euclidean", "cosine"):
        distances, indices = run_topk(*problem[:3], metric, *problem[4:], dtype=dtype)
        expected_d, expected_i = oracle_topk(*problem[:3], metric, *problem[4:])
        if metric != "cosine":   # cosine of integer rows is not exact; its values are checked below
            assert_same(indices, expected_i, f"{dtype} {metric} indices")
        assert_close(distances, expected_d, f"{dtype} {metric} distances", 1e-5)


def _tf32_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to TF32 (10 explicit mantissa bits), nearest-even."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~np.uint64(0x1FFF)
    return bits.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("mode", ["tf32", "bfloat16", "float16"])
def test_low_precision_error_at_most_twice_the_reference_in_that_precision(small_blocks, mode):
    """flash-attention's rule, per rank of the sorted distance lists (robust to near-tie swaps)."""
    rng = np.random.default_rng(12)
    q = rng.standard_normal((23, 40)).astype(np.float32)
    a = rng.standard_normal((60, 40)).astype(np.float32)
    problem = ([0, 60], np.zeros(23, np.int64), np.full(23, -1))
    for metric in ("sqeuclidean", "cosine"):
        truth, _ = oracle_topk(q, a, 10, metric, *problem)
        if mode == "tf32":
            kernel, _ = run_topk(q, a, 10, metric, *problem, precision="tf32")
            lowp_inputs = (_tf32_round(q), _tf32_round(a), torch.float32)
        else:
            dtype = getattr(torch, mode)
            kernel, _ = run_topk(q, a, 10, metric, *problem, dtype=dtype)
            lowp_inputs = (torch.as_tensor(q).to(dtype).float().numpy(), torch.as_tensor(a).to(dtype).float().numpy(),
                           torch.float32)
        reference, _ = fastassoc.topk_anchors(
            tensor(lowp_inputs[0]), tensor(lowp_inputs[1]), 10, metric=metric, backend="reference")
        kernel_error = np.abs(kernel.cpu().double().numpy() - truth)
        reference_error = np.abs(reference.cpu().double().numpy() - truth)
        atol = 1e-5 * np.abs(truth).max()
        bad = np.argwhere(kernel_error > 2 * reference_error + atol)
        assert bad.size == 0, (f"{mode} {metric}: error {kernel_error[tuple(bad[0])]:.3g} at {tuple(bad[0])} above "
                               f"2 x reference error {reference_error[tuple(bad[0])]:.3g} + {atol:.3g}")


def test_cpu_tensors_run_in_the_interpreter():
    if HAS_GPU:
        pytest.skip("interpreter mode is only used without a GPU")
    q, a = torch.randn(5, 3), torch.randn(8, 3)
    distances, indices = fastassoc.topk_anchors(q, a, 2, backend="triton")
    assert distances.device.type == "cpu" and indices.device.type == "cpu"
    expected_d, expected_i = oracle_topk(q.numpy(), a.numpy(), 2, "sqeuclidean", [0, 8], [0] * 5, [-1] * 5)
    assert_same(indices, expected_i, "interpreter indices")


# ----------------------------------------------------------------------------- mutual_knn

@pytest.mark.parametrize("k", [1, 4, 64, 70])
def test_mutual_knn_one_pass_row_and_column_candidates(small_blocks, k):
    """Row blocks of 16 give each b column candidates from several blocks; tile_limit forces column passes."""
    rng = np.random.default_rng(20 + k)
    a, b = rng.standard_normal((45, 17)), rng.standard_normal((38, 17))
    metric = "euclidean" if k % 2 else "cosine"
    expected_pairs, expected_d = oracle_mutual(a, b, k, metric)
    for limit in (None, 40):
        if limit is None:
            ia, ib, distances = fastassoc.mutual_knn(tensor(a), tensor(b), k, metric=metric, backend="triton")
        else:
            with fastassoc.tile_limit(limit):
                ia, ib, distances = fastassoc.mutual_knn(tensor(a), tensor(b), k, metric=metric, backend="triton")
        pairs = list(zip(ia.tolist(), ib.tolist()))
        assert pairs == expected_pairs, f"k={k} tile_limit={limit}: {len(pairs)} pairs, expected {len(expected_pairs)}"
        assert_close(distances, expected_d, f"k={k} distances", 1e-4)


def test_mutual_knn_exact_ties_across_blocks(small_blocks):
    rng = np.random.default_rng(21)
    a = rng.integers(-1, 2, (40, 2)).astype(float)
    b = rng.integers(-1, 2, (35, 2)).astype(float)
    for k in (1, 3, 9):
        expected_pairs, _ = oracle_mutual(a, b, k, "sqeuclidean")
        ia, ib, _ = fastassoc.mutual_knn(tensor(a), tensor(b), k, backend="triton")
        assert list(zip(ia.tolist(), ib.tolist())) == expected_pairs, f"k={k} exact-tie pairs differ"


# ----------------------------------------------------------------------------- graphs

def _dense(sparse: torch.Tensor) -> np.ndarray:
    return sparse.to_dense().cpu().double().numpy()


@pytest.mark.parametrize("mode", ["pairwise", "pooled"])
@pytest.mark.parametrize("k", [2, 66])
def test_cross_camera_graph_matches_reference(small_blocks, mode, k):
    rng = np.random.default_rng(30 + k)
    x = tensor(rng.standard_normal((60, 12)))
    cameras = index(rng.integers(0, 4, 60))
    expected = _dense(fastassoc.cross_camera_graph(x, cameras, k, mode=mode, min_similarity=-0.2,
                                                   num_cameras=5, backend="reference"))
    actual = fastassoc.cross_camera_graph(x, cameras, k, mode=mode, min_similarity=-0.2, num_cameras=5,
                                          backend="triton")
    assert_same(_dense(actual) != 0, expected != 0, f"{mode} k={k} pattern")
    assert_close(actual.to_dense(), expected, f"{mode} k={k} weights", 1e-5)
    assert_same(actual.col_indices().cpu().numpy(), np.nonzero(expected)[1], f"{mode} k={k} sorted columns")


@pytest.mark.parametrize("k", [3, 65])
def test_knn_soft_labels_matches_reference(small_blocks, k):
    rng = np.random.default_rng(40 + k)
    x = tensor(rng.standard_normal((70, 9)))
    cameras = index(np.concatenate([rng.integers(0, 3, 67), [3, 4, 4]]))   # cameras of 1 and 2 tracklets
    expected = _dense(fastassoc.knn_soft_labels(x, cameras, k, backend="reference"))
    actual = fastassoc.knn_soft_labels(x, cameras, k, backend="triton")
    assert_same(_dense(actual) != 0, expected != 0, f"k={k} pattern")
    assert_close(actual.to_dense(), expected, f"k={k} weights", 1e-5)


# ----------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_ranking_matches_reference_in_small_tiles(small_blocks, metric):
    rng = np.random.default_rng(50)
    query, gallery = tensor(rng.standard_normal((29, 18))), tensor(rng.standard_normal((83, 18)))
    pids = (index(rng.integers(0, 8, 29)), index(rng.integers(-1, 8, 83)))
    cams = (index(rng.integers(0, 3, 29)), index(rng.integers(0, 3, 83)))
    expected = fastassoc.evaluate_ranking(query, gallery, pids[0], pids[1], cams[0], cams[1], metric=metric,
                                          max_rank=90, backend="reference")
    with fastassoc.tile_limit(700):
        actual = fastassoc.evaluate_ranking(query, gallery, pids[0], pids[1], cams[0], cams[1], metric=metric,
                                            max_rank=90, backend="triton")
    assert actual.num_valid_queries == expected.num_valid_queries
    assert_same(actual.cmc.cpu().numpy(), expected.cmc.cpu().numpy(), f"{metric} cmc")
    assert abs(actual.mAP - expected.mAP) < 1e-12 and abs(actual.mINP - expected.mINP) < 1e-12, \
        (actual.mAP, expected.mAP, actual.mINP, expected.mINP)


# ----------------------------------------------------------------------------- agglomerative_merge

@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # the interpreter's numpy exp
@pytest.mark.parametrize("linkage", ["tssl", "centroid", "buc"])
def test_agglomerative_merge_rescans_dense_rows(small_blocks, linkage):
    """Tight groups: every row's first list fills below the stop value, forcing rescans."""
    rng = np.random.default_rng(60)
    centres = np.repeat(rng.standard_normal((3, 6)) * 50, 30, axis=0)
    x = tensor(centres + rng.standard_normal((90, 6)))
    labels = index(rng.integers(0, 70, 90) * 3)
    num_clusters = int(torch.unique(labels).numel())
    for num_merges in (1, num_clusters - 3, num_clusters - 2):
        expected = fastassoc.agglomerative_merge(x, labels, num_merges, linkage=linkage, size_penalty=0.01,
                                                 backend="reference")
        actual = fastassoc.agglomerative_merge(x, labels, num_merges, linkage=linkage, size_penalty=0.01,
                                               backend="triton")
        assert_same(actual, expected.cpu().numpy(), f"{linkage} num_merges={num_merges}")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_agglomerative_merge_tssl_overflow_ties(small_blocks):
    """Far clusters overflow exp() to inf: those pairs tie and go in (i, j) order."""
    x = tensor(np.array([[0.0], [1.0], [500.0], [502.0], [1500.0], [1503.0]]))
    labels = index(np.arange(6))
    for num_merges in range(6):
        expected = fastassoc.agglomerative_merge(x, labels, num_merges, linkage="tssl", neighbours=1,
                                                 backend="reference")
        actual = fastassoc.agglomerative_merge(x, labels, num_merges, linkage="tssl", neighbours=1,
                                               backend="triton")
        assert_same(actual, expected.cpu().numpy(), f"num_merges={num_merges}")


def test_select_smallest_orders_by_value_then_index():
    values = torch.tensor([[3.0, 1.0, 1.0, float("inf"), 2.0, 1.0]])
    indices = torch.tensor([[7, 9, 4, 1, 0, _common.PAD_INDEX]])
    got_values, got_indices = _common.select_smallest(values, indices, 5)
    assert got_indices.tolist() == [[4, 9, _common.PAD_INDEX, 0, 7]], got_indices.tolist()
    assert got_values.tolist() == [[1.0, 1.0, 1.0, 2.0, 3.0]], got_values.tolist()
    one_value, one_index = _common.select_smallest(values, indices, 1)
    assert (one_value.item(), one_index.item()) == (1.0, 4)


# ----------------------------------------------------------------------------- identical vectors

# Positions of the copies of one vector among 70 rows: first row, last row of a 16-row
# tile, first row of the next, both sides of the 32/48 tile boundaries, the last row.
DUPLICATE_POSITIONS = (0, 15, 16, 31, 47, 48, 69)


def _with_copies(rng, rows: int, dim: int, vector: np.ndarray, positions=DUPLICATE_POSITIONS) -> np.ndarray:
    x = rng.standard_normal((rows, dim)) * 3.0
    x[list(positions)] = vector
    return x


@pytest.fixture(params=[(16, 16, 16), (32, 32, 32)], ids=["blocks16", "blocks32"])
def tile_blocks(request, monkeypatch):
    """Tiles of 16 and 32: the copies sit at different places of their tiles in each."""
    monkeypatch.setattr(_common, "INTERPRET_BLOCKS", request.param)
    monkeypatch.setattr(_common, "MIN_CHUNK_COLUMNS", 16)
    monkeypatch.setattr(_common, "INTERPRET_TARGET_PROGRAMS", 64)
    monkeypatch.setattr(_common, "TARGET_WAVES", 64)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
def test_identical_vectors_get_bit_identical_distances_in_every_tile_position(tile_blocks, metric):
    """Distance tiles (evaluate_ranking / large-k kernel): a pair's value depends only on its two vectors."""
    rng = np.random.default_rng(70)
    vector = rng.standard_normal(21) * 3.0
    x = tensor(_with_copies(rng, 70, 21, vector))
    operand = _common.prepare(x, metric)
    positions = list(DUPLICATE_POSITIONS)
    for start, stop, tile in _common.distance_tiles(operand, operand, torch.arange(70, device=DEVICE),
                                                    precision="highest"):
        tile = tile.cpu()
        copies = tile[:, positions]
        # Every row sees all copies at one value, bit for bit; copy rows are equal rows.
        assert_same(copies, copies[:, :1].expand_as(copies).numpy(), f"{metric}: columns of the copies")
        rows = tile[[p - start for p in positions if start <= p < stop]]
        assert_same(rows, rows[:1].expand_as(rows).numpy(), f"{metric}: rows of the copies")


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("k", [9, 70])
def test_topk_ties_between_copies_go_to_the_smaller_index(tile_blocks, metric, k):
    """Copies of one anchor are listed in index order with one distance, from any query row."""
    rng = np.random.default_rng(71)
    vector = rng.standard_normal(21) * 3.0
    anchors = _with_copies(rng, 70, 21, vector)
    queries = np.concatenate([_with_copies(rng, 70, 21, vector)[:40], vector + 0.01 * rng.standard_normal((3, 21))])
    distances, found = fastassoc.topk_anchors(tensor(queries), tensor(anchors), k, metric=metric, backend="triton")
    distances, found = distances.cpu().numpy(), found.cpu().numpy()
    _, expected = oracle_topk(queries, anchors, k, metric, [0, 70], np.zeros(len(queries), np.int64),
                              np.full(len(queries), -1))
    assert_same(found, expected, f"{metric} k={k} indices")
    for row in range(len(queries)):
        listed = [column for column in range(k) if found[row, column] in DUPLICATE_POSITIONS]
        values = distances[row, listed]
        assert (values == values[:1]).all(), f"row {row}: copies at {found[row, listed]} got {values.tolist()}"
    # Query rows that are copies get bit-identical lists.
    copy_rows = [p for p in DUPLICATE_POSITIONS if p < 40]
    assert_same(distances[copy_rows], np.repeat(distances[copy_rows[:1]], len(copy_rows), 0), "copy query rows")


@pytest.mark.parametrize("k", [2, 66])
def test_mutual_knn_copies_pair_by_smallest_indices(tile_blocks, k):
    """a holds copies of u, b copies of v (u's nearest): mutual pairs are the k first copies of each."""
    rng = np.random.default_rng(72)
    u = rng.standard_normal(13) * 3.0
    v = u + 0.01
    a, b = _with_copies(rng, 70, 13, u), _with_copies(rng, 70, 13, v)
    rows, cols, distances = fastassoc.mutual_knn(tensor(a), tensor(b), k, backend="triton")
    pairs = sorted(zip(rows.tolist(), cols.tolist()))
    expected_pairs, _ = oracle_mutual(a, b, k, "sqeuclidean")
    assert pairs == expected_pairs
    among = [(i, j) for i, j in pairs if i in DUPLICATE_POSITIONS and j in DUPLICATE_POSITIONS]
    first = DUPLICATE_POSITIONS[:k]
    assert among == [(i, j) for i in first for j in first], among
    values = {d for (i, j), d in zip(zip(rows.tolist(), cols.tolist()), distances.tolist())
              if (i, j) in among}
    assert len(values) == 1, values


def test_graphs_link_copies_by_smallest_indices(tile_blocks):
    """knn_soft_labels and cross_camera_graph: equal weights for copies, ties to the smaller index."""
    rng = np.random.default_rng(73)
    vector = rng.standard_normal(11) * 3.0
    x = _with_copies(rng, 70, 11, vector)
    cameras = np.zeros(70, np.int64)
    cameras[[16, 31, 48]] = 1          # copies in both cameras, interleaved with the others
    cameras[50:60] = 1
    soft = fastassoc.knn_soft_labels(tensor(x), index(cameras), 2, backend="triton").to_dense().cpu().numpy()
    for row in DUPLICATE_POSITIONS:
        same_camera = [p for p in DUPLICATE_POSITIONS if cameras[p] == cameras[row] and p != row]
        listed = [column for column in np.nonzero(soft[row])[0] if column != row]
        assert listed == same_camera[:2], (row, listed)
        assert soft[row, listed[0]] == soft[row, listed[1]], (row, soft[row, listed])
    graph = fastassoc.cross_camera_graph(tensor(x), index(cameras), 1, mode="pooled", self_loops=False,
                                         backend="triton").to_dense().cpu().numpy()
    # Camera 0 copies' nearest in camera 1 is copy 16, camera 1 copies' nearest in camera 0 is copy 0.
    linked = sorted((int(i), int(j)) for i, j in zip(*np.nonzero(graph))
                    if i in DUPLICATE_POSITIONS and j in DUPLICATE_POSITIONS)
    assert linked == [(0, 16), (16, 0)], linked


@pytest.mark.parametrize("linkage", ["centroid", "buc"])
def test_agglomerative_merge_joins_copies_in_index_order(tile_blocks, linkage):
    """Copies are the closest pairs, all at one value: merges take them in (i, j) order."""
    rng = np.random.default_rng(74)
    vector = rng.standard_normal(9) * 3.0
    x = tensor(_with_copies(rng, 70, 9, vector) * 10.0)
    labels = index(np.arange(70))
    merged = fastassoc.agglomerative_merge(x, labels, 2, linkage=linkage, backend="triton").cpu().numpy()
    # Pairs (0, 15) then (0, 16): {0, 15, 16} is one cluster, every other copy alone.
    groups = [{p for p in DUPLICATE_POSITIONS if merged[p] == merged[q]} for q in DUPLICATE_POSITIONS]
    assert groups[0] == {0, 15, 16}, groups
    assert all(len(group) == 1 for group in groups[3:]), groups


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_ranking_ranks_copies_by_gallery_index(tile_blocks, metric):
    """Gallery copies of the query tie; the first true match is found at its copy's index rank."""
    rng = np.random.default_rng(75)
    vector = rng.standard_normal(17) * 3.0
    gallery = _with_copies(rng, 70, 17, vector)
    query = np.stack([vector] * 3)
    gallery_pids = 100 + np.arange(70)
    gallery_pids[[0, 15, 16]] = [5, 6, 7]         # query q matches the copy at rank q + 1
    result = fastassoc.evaluate_ranking(tensor(query), tensor(gallery), index([5, 6, 7]), index(gallery_pids),
                                        index([0, 0, 0]), index(np.ones(70, np.int64)), metric=metric,
                                        max_rank=5, backend="triton")
    assert_same(result.cmc.cpu().numpy(), np.array([1, 2, 3, 3, 3], np.float64) / 3, f"{metric} cmc")
    assert result.mAP == pytest.approx((1 + 1 / 2 + 1 / 3) / 3, abs=1e-12)


# ----------------------------------------------------------------------------- compile failures

def _compile_errors():
    import ast

    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    return {
        "CompilationError": lambda: CompilationError("x = y", ast.parse("x = y").body[0], "unsupported construct"),
        "OutOfResources": lambda: OutOfResources(262144, 232448, "shared memory"),
        "PTXASError": lambda: PTXASError("ptxas fatal: Unresolved extern function"),
        "ptxas missing": lambda: RuntimeError("Cannot find ptxas"),
    }


@pytest.mark.skipif(HAS_GPU, reason="simulates a compile failure of the interpreted kernels")
@pytest.mark.parametrize("error", ["CompilationError", "OutOfResources", "PTXASError", "ptxas missing"])
@pytest.mark.parametrize("op", ["topk_anchors", "evaluate_ranking"])
def test_compile_failure_names_kernel_device_and_other_backends(monkeypatch, error, op):
    """No silent fallback: a kernel that cannot be built raises an error that says what to do."""
    kernel_type = type(_common._fused_topk_kernel)
    make_error = _compile_errors()[error]

    def fail(self, *args, **kwargs):
        raise make_error()

    monkeypatch.setattr(kernel_type, "run", fail)
    x = tensor(np.random.default_rng(80).standard_normal((6, 4)))
    ids = index(np.arange(6))
    with pytest.raises(_common.TritonKernelError) as caught:
        if op == "topk_anchors":
            fastassoc.topk_anchors(x, x, 2, backend="triton")
        else:
            fastassoc.evaluate_ranking(x, x, ids, ids, ids * 0, ids * 0 + 1, backend="triton")
    message = str(caught.value)
    kernel = "_fused_topk_kernel" if op == "topk_anchors" else "_distance_tile_kernel"
    assert message.startswith(f"{op}: the Triton kernel {kernel} failed to compile on "), message
    assert "TRITON_INTERPRET=1" in message and "backend='reference'" in message, message
    assert type(caught.value.__cause__).__name__ == type(make_error()).__name__


@pytest.mark.skipif(HAS_GPU, reason="simulates a failure of the interpreted kernels")
def test_errors_of_a_compiled_kernel_pass_through_unchanged(monkeypatch):
    def fail(self, *args, **kwargs):
        raise ValueError("a bug inside the kernel")

    monkeypatch.setattr(type(_common._fused_topk_kernel), "run", fail)
    x = tensor(np.ones((3, 2)))
    with pytest.raises(ValueError, match="a bug inside the kernel"):
        fastassoc.topk_anchors(x, x, 1, backend="triton")


def test_compile_failure_message_on_a_cuda_device_names_the_gpu(monkeypatch):
    """The message a GPU user sees: the device name from torch.cuda and the CUDA-side backends."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(_backend, "available_backends",
                        lambda op=None: {op: {"reference": True, "cpu": True, "triton": True, "cuda": True}})

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise OutOfResources(262144, 232448, "shared memory")
            return run

    def _fused_topk_kernel():
        pass

    kernel = Kernel()
    kernel.fn = _fused_topk_kernel
    with pytest.raises(_common.TritonKernelError) as caught:
        _common.launch(kernel, (1,), device=torch.device("cuda", 0), op="mutual_knn", BLOCK_M=64)
    message = str(caught.value)
    assert "mutual_knn: the Triton kernel _fused_topk_kernel failed to compile on NVIDIA H100 80GB HBM3 (cuda:0)" \
        in message, message
    assert "OutOfResources" in message and "backend='cuda' or backend='reference'" in message, message


# ----------------------------------------------------------------------------- sm_90 resources

@pytest.mark.skipif(HAS_GPU, reason="with a GPU the autotuned configs are compiled (and run) by the tests above")
def test_autotune_configs_compile_for_sm90_without_spills_at_small_k(tmp_path):
    """Every autotune config the GPU can pick at k <= 16 assembles for sm_90 with no spill (ptxas -v).

    Runs bench/triton_registers.py (ahead-of-time compile, Triton's bundled ptxas) in a
    process without TRITON_INTERPRET; bf16 rows check the tensor-core configs too
    (BLOCK_K >= 16).
    """
    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("this triton has no backend registry")
    if "nvidia" not in backends:
        pytest.skip("triton's NVIDIA backend is not installed")
    root = pathlib.Path(__file__).resolve().parents[2]
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "registers.json"
    result = subprocess.run([sys.executable, str(root / "bench" / "triton_registers.py"), "--quick",
                             "--parts", "fp32,tensor-core", "--json", str(out)],
                            env=environment, capture_output=True, text=True, timeout=900, cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert {row["inputs"] for row in rows} == {"fp32", "tf32", "bf16"}
    assert {row["K"] for row in rows} == {1, 16}
    spilling = [row for row in rows if row["spill_stores"] or row["spill_loads"] or row["stack"]]
    assert not spilling, f"configs that spill on sm_90: {spilling}"


def test_autotune_can_be_limited_to_one_config_for_gpu_test_runs(monkeypatch):
    configs = _common.gpu_configs(16, 64)
    assert len(configs) > 1 and all(c.kwargs["BLOCK_K"] >= 16 for c in _common.gpu_configs(16, 64, half=True))
    monkeypatch.setenv("FASTASSOC_TRITON_AUTOTUNE", "0")
    assert _common._candidates(configs) == configs[:1]
    monkeypatch.setenv("FASTASSOC_TRITON_AUTOTUNE", "1")
    assert _common._candidates(configs) == configs
