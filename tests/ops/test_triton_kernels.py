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
