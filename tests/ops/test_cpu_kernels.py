"""CPU-backend properties of the knn and graph kernels (csrc/cpu/knn.cpp, csrc/cpu/graph.cpp).

The shared op tests (test_knn.py, test_graph.py) check every backend against NumPy
oracles; this file checks what only the compiled CPU kernels can get wrong:

* OpenMP thread count and tile shape never change a result (1 vs 2 threads, tiny
  tiles that split both rows and columns vs the default);
* moderate sizes (thousands of rows, segments, several tiles) equal the reference;
* the symmetric path (queries = anchors searching their own segment, and the soft
  labels: only the upper triangle of each Gram matrix is computed) against a NumPy
  oracle with exact ties, with tiny tiles;
* lists merge candidates in any arrival order (the pooled graph feeds a list from
  several blocks), including the heap path used for k > 32, against a NumPy oracle;
* int64 offsets and ids: the shared flat-offset helper and ids beyond 2**31 in the
  tile kernel, without allocating memory of that size.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import fastassoc
from conftest import require_backend
from fastassoc import _backend

from ._cpu import assert_equal_tensors, core  # noqa: F401  (core is a fixture)

pytestmark = pytest.mark.skipif(_backend.compiled_core() is None, reason="fastassoc._C is not built")

INT32_MAX = 2**31 - 1


def assert_close_tensors(got: torch.Tensor, expected: torch.Tensor, what: str, rtol=1e-5, atol=1e-5) -> None:
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: padding differs"
    close = torch.isclose(got[finite].double(), expected[finite].double(), rtol=rtol, atol=atol)
    if not bool(close.all()):
        position = int(torch.nonzero(~close)[0])
        raise AssertionError(f"{what}: first value mismatch at flat finite entry {position}: "
                             f"got {got[finite][position].item()!r}, expected {expected[finite][position].item()!r}")


def assert_same_csr(got: torch.Tensor, expected: torch.Tensor, what: str, exact_values: bool = True) -> None:
    assert got.layout == torch.sparse_csr and got.dtype == torch.float32, f"{what}: {got.layout} {got.dtype}"
    assert_equal_tensors(got.crow_indices(), expected.crow_indices(), f"{what} crow_indices")
    assert_equal_tensors(got.col_indices(), expected.col_indices(), f"{what} col_indices")
    if exact_values:
        assert_equal_tensors(got.values(), expected.values(), f"{what} values")
    else:
        assert_close_tensors(got.values(), expected.values(), f"{what} values")


def separated_world(seed: int, num_rows: int, dim: int, num_groups: int):
    """Rows scattered around well separated centres: distance gaps far above float32 noise."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_groups, dim, generator=generator) * 4
    labels = torch.randint(0, num_groups, (num_rows,), generator=generator)
    return centres[labels] + torch.randn(num_rows, dim, generator=generator)


def integer_world(seed: int, num_rows: int, dim: int):
    """Small-integer rows: float32 squared distances are exact, so ties are real."""
    return torch.randint(-2, 3, (num_rows, dim), generator=torch.Generator().manual_seed(seed)).float()


# Unit directions in R^4 whose normalisation and pairwise dot products are exact in float32.
EXACT_DIRECTIONS = torch.tensor(
    [[0.0] * 4] + [[sign * float(i == j) for j in range(4)] for i in range(4) for sign in (1.0, -1.0)]
    + [[0.5 * ((bits >> j) & 1 and -1 or 1) for j in range(4)] for bits in range(16)])


def exact_cosine_world(seed: int, num_rows: int):
    """Power-of-two multiples of exact directions: cosine values are exact, so ties are real."""
    generator = torch.Generator().manual_seed(seed)
    rows = EXACT_DIRECTIONS[torch.randint(0, len(EXACT_DIRECTIONS), (num_rows,), generator=generator)]
    return rows * 2.0 ** torch.randint(-1, 3, (num_rows, 1), generator=generator)


def segmented_problem(seed: int, num_queries: int, sizes: list[int], dim: int):
    anchors = separated_world(seed, sum(sizes), dim, 40)
    generator = torch.Generator().manual_seed(seed + 1)
    queries = separated_world(seed + 2, num_queries, dim, 40)
    offsets = torch.tensor([0] + sizes).cumsum(0)
    segments = torch.randint(0, len(sizes), (num_queries,), generator=generator)
    exclude = torch.randint(-1, sum(sizes), (num_queries,), generator=generator)
    return queries, anchors, offsets, segments, exclude


def run_all_ops(x: torch.Tensor, cameras: torch.Tensor, queries, anchors, offsets, segments, exclude, k: int,
                cosine_rows=None):
    """Every knn/graph op on the CPU backend; returns a dict name -> output tensors.

    ``cosine_rows`` (x, queries, anchors for cosine-ranked ops) default to the same data.
    """
    x_cos, queries_cos, anchors_cos = cosine_rows if cosine_rows is not None else (x, queries, anchors)
    out = {}
    for metric in ("sqeuclidean", "euclidean", "cosine"):
        q, a = (queries_cos, anchors_cos) if metric == "cosine" else (queries, anchors)
        out[f"topk {metric}"] = fastassoc.topk_anchors(q, a, k, metric=metric, anchor_offsets=offsets,
                                                       query_segments=segments, exclude=exclude, backend="cpu")
        out[f"mutual {metric}"] = fastassoc.mutual_knn(q, a, k, metric=metric, backend="cpu")
    for mode in ("pairwise", "pooled"):
        graph = fastassoc.cross_camera_graph(x_cos, cameras, k, mode=mode, min_similarity=0.1, backend="cpu")
        out[f"graph {mode}"] = (graph.crow_indices(), graph.col_indices(), graph.values())
    soft = fastassoc.knn_soft_labels(x, cameras, k, backend="cpu")
    out["soft labels"] = (soft.crow_indices(), soft.col_indices(), soft.values())
    return out


def assert_same_outputs(got: dict, expected: dict, what: str) -> None:
    for name in expected:
        for position, (g, e) in enumerate(zip(got[name], expected[name])):
            assert_equal_tensors(g, e, f"{what}: {name} output {position}")


@pytest.fixture(scope="module")
def ops_available():
    for op in ("topk_anchors", "mutual_knn", "cross_camera_graph", "knn_soft_labels"):
        require_backend(op, "cpu")


# ----------------------------------------------------------------------------- invariance

@pytest.mark.parametrize("k", [1, 5, 40])
def test_thread_count_does_not_change_results(core, ops_available, k):
    queries, anchors, offsets, segments, exclude = segmented_problem(3, 900, [300, 0, 450, 250], 24)
    x = separated_world(5, 1200, 24, 60)
    cameras = torch.randint(0, 5, (1200,), generator=torch.Generator().manual_seed(6))
    results = {}
    for threads in (1, 2):
        core.set_num_threads(threads)
        results[threads] = run_all_ops(x, cameras, queries, anchors, offsets, segments, exclude, k)
    assert_same_outputs(results[2], results[1], f"k={k}, 2 threads vs 1 thread")


@pytest.mark.parametrize("k", [3, 40])
@pytest.mark.parametrize("tile", [2, 37, 1000])
def test_tile_size_does_not_change_results_on_exact_data(ops_available, k, tile):
    # Exact data: every distance is exact, so tiles may not even change a rounding.
    x, x_cos = integer_world(7, 90, 6), exact_cosine_world(7, 90)
    cameras = torch.randint(0, 3, (90,), generator=torch.Generator().manual_seed(8))
    queries, queries_cos = integer_world(9, 50, 6), exact_cosine_world(9, 50)
    offsets = torch.tensor([0, 40, 40, 90])
    segments = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(10))
    exclude = torch.randint(-1, 90, (50,), generator=torch.Generator().manual_seed(11))
    cosine_rows = (x_cos, queries_cos, x_cos)
    default = run_all_ops(x, cameras, queries, x, offsets, segments, exclude, k, cosine_rows)
    with fastassoc.tile_limit(tile):
        tiled = run_all_ops(x, cameras, queries, x, offsets, segments, exclude, k, cosine_rows)
    assert_same_outputs(tiled, default, f"k={k}, tile_limit({tile}) vs default")


def test_tile_size_does_not_change_indices_on_separated_data(ops_available):
    queries, anchors, offsets, segments, exclude = segmented_problem(12, 400, [150, 250], 16)
    default = fastassoc.topk_anchors(queries, anchors, 7, anchor_offsets=offsets, query_segments=segments,
                                     exclude=exclude, backend="cpu")
    with fastassoc.tile_limit(100):   # 100 < 150 columns: rows and columns are both split
        tiled = fastassoc.topk_anchors(queries, anchors, 7, anchor_offsets=offsets, query_segments=segments,
                                       exclude=exclude, backend="cpu")
    assert_equal_tensors(tiled[1], default[1], "indices under tile_limit(100)")
    assert_close_tensors(tiled[0], default[0], "distances under tile_limit(100)")


def oracle_self_topk(x: np.ndarray, sizes, k: int, metric: str, exclude_self: bool):
    """Brute force: each row's k nearest rows of its own segment, lexsorted by (distance, index)."""
    x = np.asarray(x, np.float64)
    if metric == "cosine":
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        distances = 1.0 - unit @ unit.T
    else:
        distances = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        distances = np.sqrt(distances) if metric == "euclidean" else distances
    out_values = np.full((len(x), k), np.inf)
    out_indices = np.full((len(x), k), -1, dtype=np.int64)
    start = 0
    for size in sizes:
        members = np.arange(start, start + size)
        for row in members:
            candidates = members[members != row] if exclude_self else members
            chosen = candidates[np.lexsort((candidates, distances[row, candidates]))][:k]
            out_values[row, :len(chosen)] = distances[row, chosen]
            out_indices[row, :len(chosen)] = chosen
        start += size
    return out_values, out_indices


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 3, 40])
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("tile", [None, 5, 300])
def test_symmetric_path_matches_oracle_with_exact_ties(ops_available, metric, k, exclude_self, tile):
    # Queries = anchors, each searching its own segment: the CPU backend computes only the
    # upper triangle of each segment's Gram matrix (row panels; tiny tiles split the columns).
    sizes = [23, 0, 1, 300, 41]
    x = exact_cosine_world(31, sum(sizes)) if metric == "cosine" else integer_world(31, sum(sizes), 5)
    offsets = torch.tensor([0] + sizes).cumsum(0)
    segments = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    exclude = torch.arange(sum(sizes)) if exclude_self else torch.full((sum(sizes),), -1)
    limit = fastassoc.tile_limit(tile) if tile is not None else contextlib.nullcontext()
    with limit:
        values, indices = fastassoc.topk_anchors(x, x, k, metric=metric, anchor_offsets=offsets,
                                                 query_segments=segments, exclude=exclude, backend="cpu")
    expected_values, expected_indices = oracle_self_topk(x.numpy(), sizes, k, metric, exclude_self)
    assert_equal_tensors(indices, torch.from_numpy(expected_indices), f"{metric} k={k} indices")
    assert_close_tensors(values, torch.from_numpy(expected_values).float(), f"{metric} k={k} values",
                         rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- vs reference

@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 10, 33])
def test_topk_anchors_equals_reference_at_moderate_size(ops_available, metric, k):
    queries, anchors, offsets, segments, exclude = segmented_problem(21, 3000, [120, 0, 300, 280], 32)
    expected = fastassoc.topk_anchors(queries, anchors, k, metric=metric, anchor_offsets=offsets,
                                      query_segments=segments, exclude=exclude, backend="reference")
    got = fastassoc.topk_anchors(queries, anchors, k, metric=metric, anchor_offsets=offsets,
                                 query_segments=segments, exclude=exclude, backend="cpu")
    assert_equal_tensors(got[1], expected[1], f"{metric} k={k} indices")
    assert_close_tensors(got[0], expected[0], f"{metric} k={k} distances")


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 4])
def test_mutual_knn_equals_reference_at_moderate_size(ops_available, metric, k):
    a, b = separated_world(22, 3000, 32, 300), separated_world(23, 700, 32, 300)
    expected = fastassoc.mutual_knn(a, b, k, metric=metric, backend="reference")
    got = fastassoc.mutual_knn(a, b, k, metric=metric, backend="cpu")
    assert expected[0].numel() > 50, "the workload should have mutual pairs"
    assert_equal_tensors(got[0], expected[0], f"{metric} k={k} ia")
    assert_equal_tensors(got[1], expected[1], f"{metric} k={k} ib")
    assert_close_tensors(got[2], expected[2], f"{metric} k={k} distances")


@pytest.mark.parametrize("mode", ["pairwise", "pooled"])
def test_cross_camera_graph_equals_reference_at_moderate_size(ops_available, mode):
    x = separated_world(24, 3000, 32, 500)
    cameras = torch.randint(0, 6, (3000,), generator=torch.Generator().manual_seed(25))
    for k, min_similarity in ((1, None), (3, 0.5)):
        expected = fastassoc.cross_camera_graph(x, cameras, k, mode=mode, min_similarity=min_similarity,
                                                backend="reference")
        got = fastassoc.cross_camera_graph(x, cameras, k, mode=mode, min_similarity=min_similarity, backend="cpu")
        assert expected._nnz() > 3000, "the workload should have cross-camera edges"
        assert_same_csr(got, expected, f"{mode} k={k} min_similarity={min_similarity}", exact_values=False)


def test_knn_soft_labels_equals_reference_at_moderate_size(ops_available):
    x = separated_world(26, 3000, 32, 500)
    cameras = torch.randint(0, 6, (3000,), generator=torch.Generator().manual_seed(27))
    for k in (1, 4, 40):
        expected = fastassoc.knn_soft_labels(x, cameras, k, backend="reference")
        got = fastassoc.knn_soft_labels(x, cameras, k, backend="cpu")
        assert_same_csr(got, expected, f"k={k}", exact_values=False)


# ----------------------------------------------------------------------------- tile kernel

def oracle_lists(values: np.ndarray, k: int, exclude=None):
    """k smallest (value, column) pairs of each row of a dense matrix, lexicographic."""
    out_values = np.full((values.shape[0], k), np.inf)
    out_indices = np.full((values.shape[0], k), -1, dtype=np.int64)
    for row in range(values.shape[0]):
        columns = np.array([j for j in range(values.shape[1]) if exclude is None or j != exclude[row]])
        chosen = columns[np.lexsort((columns, values[row, columns]))][:k]
        out_values[row, :len(chosen)] = values[row, chosen]
        out_indices[row, :len(chosen)] = chosen
    return out_values, out_indices


def update(core, dots, k, *, row_base=0, col_base=0, row_lists=None, col_lists=None, exclude=None,
           col_ids=None, metric=1):
    """One knn_tile_update call on a float32 dot tile (metric 1: cosine distance 1 - dot)."""
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    row_values, row_indices = row_lists if row_lists is not None else (None, None)
    col_values, col_indices = col_lists if col_lists is not None else (None, None)
    core.knn_tile_update(ptr(dots), False, dots.shape[0], dots.shape[1], dots.shape[1], metric, 0, 0,
                         row_base, col_base, 0, ptr(col_ids), ptr(exclude), k, ptr(row_values),
                         ptr(row_indices), ptr(col_values), ptr(col_indices))


def empty_lists(num_lists, k):
    return torch.full((num_lists, k), float("inf")), torch.full((num_lists, k), -1, dtype=torch.int64)


@pytest.mark.parametrize("k", [1, 4, 32, 33, 70])
def test_lists_merge_tiles_in_any_order_with_exact_ties(core, k):
    # Dots from a small integer set: many exact ties. Column tiles are fed in a shuffled
    # order (as the pooled graph does), rows and columns lists both, k on both sides of
    # the sorted-list / heap switch.
    rng = np.random.default_rng(k)
    num_rows, num_cols = 57, 90
    dots = torch.tensor(rng.integers(-3, 4, (num_rows, num_cols)), dtype=torch.float32)
    exclude = torch.tensor(rng.integers(-1, num_cols, num_rows), dtype=torch.int64)
    row_lists, col_lists = empty_lists(num_rows, k), empty_lists(num_cols, k)
    bounds = [0, 13, 14, 40, 71, 90]
    for start, stop in reversed(list(zip(bounds[:-1], bounds[1:]))):
        block = dots[:, start:stop].contiguous()
        update(core, block, k, col_base=start, row_lists=row_lists, col_lists=(col_lists[0][start:stop],
                                                                                 col_lists[1][start:stop]),
               exclude=exclude)
    for lists in (row_lists, col_lists):
        core.knn_sort_lists(lists[0].data_ptr(), lists[1].data_ptr(), False, lists[0].shape[0], k)
    distances = 1.0 - dots.double().numpy()
    expected_values, expected_indices = oracle_lists(distances, k, exclude.numpy())
    assert_equal_tensors(row_lists[1], torch.from_numpy(expected_indices), f"k={k} row list indices")
    assert_equal_tensors(row_lists[0].double(), torch.from_numpy(expected_values), f"k={k} row list values")
    column_exclude = [[r for r in range(num_rows) if exclude[r] == j] for j in range(num_cols)]
    expected_values, expected_indices = oracle_lists(distances.T, k)
    for j in range(num_cols):   # a column skips the rows that exclude it
        keep = [r for r in np.lexsort((np.arange(num_rows), distances[:, j])) if r not in column_exclude[j]][:k]
        expected_indices[j] = -1
        expected_indices[j, :len(keep)] = keep
        expected_values[j] = np.inf
        expected_values[j, :len(keep)] = distances[keep, j]
    assert_equal_tensors(col_lists[1], torch.from_numpy(expected_indices), f"k={k} column list indices")
    assert_equal_tensors(col_lists[0].double(), torch.from_numpy(expected_values), f"k={k} column list values")


def test_flat_index_is_int64(core):
    # 70000 x 70000 tiles (a 19.6 GB float32 matrix) would overflow an int32 flat offset.
    assert core.knn_flat_index(69_999, 70_000, 69_999) == 69_999 * 70_000 + 69_999
    assert core.knn_flat_index(3, 2**40, 5) == 3 * 2**40 + 5
    assert core.knn_flat_index(69_999, 70_000, 69_999) > INT32_MAX


def test_ids_beyond_int32_survive_the_tile_kernel_and_mutual_pairs(core):
    # Global row/column bases past 2**31 (as in a 3e9-anchor index) without that memory.
    row_base, col_base = 5_000_000_000, 3_000_000_007
    dots = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]], dtype=torch.float32)
    row_lists, col_lists = empty_lists(2, 1), empty_lists(3, 1)
    update(core, dots, 1, row_base=row_base, col_base=col_base, row_lists=row_lists, col_lists=col_lists,
           exclude=torch.tensor([-1, col_base + 1]))
    assert row_lists[1].flatten().tolist() == [col_base + 0, col_base + 2], row_lists[1]
    assert col_lists[1].flatten().tolist() == [row_base + 0, row_base + 0, row_base + 1], col_lists[1]
    rows, cols, values = core.knn_mutual_pairs(row_lists[0].data_ptr(), row_lists[1].data_ptr(), 2,
                                               col_lists[1].data_ptr(), 3, 1, False, row_base, col_base, 0, 0.0)
    assert rows.tolist() == [row_base, row_base + 1] and cols.tolist() == [col_base, col_base + 2], (rows, cols)
    assert np.allclose(values, [1 - 0.9, 1 - 0.7]), values


def test_explicit_ids_rank_ties_by_id(core):
    # The pooled graph stores original indices: equal values must go to the smaller id,
    # whatever the position of the column in the tile.
    dots = torch.zeros(1, 4)
    ids = torch.tensor([9, 4, 7, 2])
    row_lists = empty_lists(1, 2)
    update(core, dots, 2, row_lists=row_lists, col_ids=ids)
    assert row_lists[1].flatten().tolist() == [2, 4], row_lists[1]


def test_csr_from_edges_sorts_columns_and_symmetrizes(core):
    sources = torch.tensor([3, 0, 2], dtype=torch.int64)
    targets = torch.tensor([1, 3, 0], dtype=torch.int64)
    weights = torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)
    crow, col, values = core.graph_csr_from_edges(4, sources.data_ptr(), targets.data_ptr(), weights.data_ptr(),
                                                  3, True, True, 1.0)
    dense = np.zeros((4, 4))
    for s, t, w in zip(sources.tolist(), targets.tolist(), weights.tolist()):
        dense[s, t] = dense[t, s] = w
    np.fill_diagonal(dense, 1.0)
    assert crow.tolist() == [0] + np.cumsum((dense != 0).sum(1)).tolist(), crow
    for row in range(4):
        expected_cols = np.flatnonzero(dense[row])
        assert col[crow[row]:crow[row + 1]].tolist() == expected_cols.tolist(), f"row {row}: {col}"
        assert np.array_equal(values[crow[row]:crow[row + 1]], dense[row, expected_cols].astype(np.float32))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k", [1, 4, 33])
def test_block_tile_update_equals_a_numpy_oracle_per_block(core, threads, k):
    # knn_tile_update_blocks: column blocks of one wide tile (cross_camera_graph's camera
    # pairs), each with its own row and column lists, in one call. Dots from a small
    # integer set (exact ties); an empty block; list widths differ per block.
    core.set_num_threads(threads)
    rng = np.random.default_rng(100 + k)
    num_rows, width = 300, 260
    dots = torch.tensor(rng.integers(-3, 4, (num_rows, width)), dtype=torch.float32)
    blocks = [(0, 120, 1000, k), (120, 0, 5000, k), (120, 100, 2000, k + 2), (220, 40, 3000, max(1, k - 1))]
    lists = [(empty_lists(num_rows, kb), empty_lists(count, kb)) for _, count, _, kb in blocks]
    layout = torch.tensor([[offset, count, base, kb] for offset, count, base, kb in blocks], dtype=torch.int64)
    layout = layout.T.contiguous()
    pointers = torch.tensor([[rows[0].data_ptr(), rows[1].data_ptr(), cols[0].data_ptr(), cols[1].data_ptr()]
                             for rows, cols in lists], dtype=torch.int64).T.contiguous()
    core.knn_tile_update_blocks(dots.data_ptr(), False, num_rows, width, 1, 7000,
                                *(row.data_ptr() for row in layout), *(row.data_ptr() for row in pointers),
                                len(blocks))
    for (offset, count, base, kb), (row_lists, col_lists) in zip(blocks, lists):
        for side in (row_lists, col_lists):
            core.knn_sort_lists(side[0].data_ptr(), side[1].data_ptr(), False, side[0].shape[0], kb)
        distances = 1.0 - dots[:, offset:offset + count].double().numpy()
        what = f"block at {offset} (k={kb}, {threads} threads)"
        if count == 0:
            assert bool((row_lists[1] == -1).all()), f"{what}: an empty block changed its row lists"
            continue
        values, indices = oracle_lists(distances, kb)
        assert_equal_tensors(row_lists[1], torch.from_numpy(np.where(indices >= 0, indices + base, -1)),
                             f"{what} row list indices")
        assert_equal_tensors(row_lists[0].double(), torch.from_numpy(values), f"{what} row list values")
        values, indices = oracle_lists(distances.T, kb)
        assert_equal_tensors(col_lists[1], torch.from_numpy(np.where(indices >= 0, indices + 7000, -1)),
                             f"{what} column list indices")
        assert_equal_tensors(col_lists[0].double(), torch.from_numpy(values), f"{what} column list values")


def test_block_tile_update_rejects_a_block_outside_the_tile(core):
    dots = torch.zeros(4, 10)
    row_lists, col_lists = empty_lists(4, 2), empty_lists(6, 2)
    layout = torch.tensor([[5], [6], [0], [2]], dtype=torch.int64)   # columns 5..10 of a 10-wide tile
    pointers = torch.tensor([[row_lists[0].data_ptr()], [row_lists[1].data_ptr()], [col_lists[0].data_ptr()],
                             [col_lists[1].data_ptr()]], dtype=torch.int64)
    with pytest.raises(ValueError, match="block 0 is out of the tile"):
        core.knn_tile_update_blocks(dots.data_ptr(), False, 4, 10, 1, 0, *(row.data_ptr() for row in layout),
                                    *(row.data_ptr() for row in pointers), 1)
