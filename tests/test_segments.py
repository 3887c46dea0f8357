"""fastassoc.segments: segments from labels, the op wirings they enable, CSR helpers.

Oracles are written here independently of the code under test: plain Python sorting and
loops over rows, dense matrices for CSR results, a float64 per-segment softmax for the loss.
"""
from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

import fastassoc
from fastassoc import _backend, segments
from fastassoc.ops._sparse import CSRMatrix
from fastassoc.segments import (MAX_DENSE_SEGMENTS, CameraLayout, csr_rows, one_hot_csr, renumber_csr_columns,
                                segments_from_labels)

BACKENDS = ("reference", "cpu", "triton")


def _require(op: str, backend: str) -> None:
    report = _backend.available_backends(op)[op][backend]
    if report is not True:
        pytest.skip(f"{backend} backend unavailable for {op}: {report}")


def test_docstring_examples_run():
    result = doctest.testmod(segments, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10 and result.failed == 0


# -- segments_from_labels ---------------------------------------------------------------------------

def _oracle_grouping(labels: list[int]):
    """Stable grouping by label: rows sorted by (label, index), and each distinct label's run."""
    order = sorted(range(len(labels)), key=lambda i: (labels[i], i))
    distinct = sorted(set(labels))
    counts = [labels.count(value) for value in distinct]
    return order, distinct, counts


@pytest.mark.parametrize("labels", [
    [3, 1, 3, 0, 1, 3],
    [7],
    [],
    [2, 2, 2],
    [2 ** 40, 5, 2 ** 40, 0, 2 ** 62],
    list(np.random.default_rng(0).integers(0, 9, 40)),
])
def test_compacted_segments_match_a_stable_sort(labels):
    labels = [int(v) for v in labels]
    seg = segments_from_labels(torch.tensor(labels, dtype=torch.int64))
    order, distinct, counts = _oracle_grouping(labels)
    n = len(labels)
    assert seg.compact
    assert seg.order.tolist() == order
    assert seg.inverse.tolist() == [order.index(i) for i in range(n)]
    # One segment per distinct label in increasing order, then one empty segment.
    assert seg.offsets.tolist() == [0] + [int(c) for c in np.cumsum(counts)] + [n]
    assert seg.num_segments == len(distinct) + 1
    assert seg.segment_labels.tolist() == distinct + [-1]
    assert seg.sorted_labels.tolist() == sorted(labels)
    for dtype in (torch.int32, torch.int16):
        if max(labels, default=0) < 2 ** 15:
            assert torch.equal(segments_from_labels(torch.tensor(labels, dtype=dtype)).order, seg.order)


def test_dense_segments_number_labels_directly():
    labels = [2, 0, 2, 4, 0]
    seg = segments_from_labels(torch.tensor(labels), num_segments=6)
    assert not seg.compact
    assert seg.order.tolist() == [1, 4, 0, 2, 3]
    assert seg.offsets.tolist() == [0, 2, 2, 4, 4, 5, 5]
    assert seg.segment_labels.tolist() == list(range(6))
    assert seg.segment_of(torch.tensor([4, 1, 5])).tolist() == [4, 1, 5]


def test_segment_of_maps_labels_and_sends_absent_ones_to_an_empty_segment():
    labels = [2 ** 40, 9, 2 ** 40, 3]
    seg = segments_from_labels(torch.tensor(labels))
    queries = [9, 2 ** 40, 3, 4, 0, 2 ** 41, 2 ** 40]
    got = seg.segment_of(torch.tensor(queries)).tolist()
    for label, segment in zip(queries, got):
        rows = seg.order[seg.offsets[segment]:seg.offsets[segment + 1]].tolist()
        assert sorted(rows) == [i for i, value in enumerate(labels) if value == label], (label, segment)
    assert seg.offsets[-2] == seg.offsets[-1]                          # the absent labels' segment is empty
    empty = segments_from_labels(torch.zeros(0, dtype=torch.int64))
    assert empty.segment_of(torch.tensor([0, 5])).tolist() == [0, 0]
    assert empty.offsets.tolist() == [0, 0]


def test_index_maps_round_trip_and_keep_out_of_range_values():
    seg = segments_from_labels(torch.tensor([4, 1, 4, 0, 1]))
    everything = torch.arange(5)
    assert torch.equal(seg.to_original(seg.to_sorted(everything)), everything)
    assert torch.equal(seg.order[seg.inverse], everything)
    # -1 padding stays -1; other out-of-range values pass through for the op's own check to report.
    assert seg.to_sorted(torch.tensor([-1, 5, -3, 3])).tolist() == [-1, 5, -3, 0]
    assert seg.to_original(torch.tensor([[0, -1], [4, 2]])).tolist() == [[3, -1], [2, 4]]


def test_huge_label_ids_allocate_nothing_per_id():
    # A per-id array for 2**62 would be 32 EiB; a compacted layout only depends on N.
    labels = torch.tensor([2 ** 62, 1, 2 ** 62 - 1, 1])
    seg = segments_from_labels(labels)
    assert seg.offsets.tolist() == [0, 2, 3, 4, 4]
    assert seg.segment_labels.tolist() == [1, 2 ** 62 - 1, 2 ** 62, -1]


@pytest.mark.parametrize("labels, kwargs, error, match", [
    (torch.tensor([0.0, 1.0]), {}, TypeError, "labels must have an integer dtype"),
    (torch.tensor([True]), {}, TypeError, "labels must have an integer dtype"),
    ([0, 1], {}, TypeError, "labels must be a 1-D torch.Tensor"),
    (torch.zeros(2, 2, dtype=torch.int64), {}, ValueError, "labels must be 1-D"),
    (torch.tensor([0, -1, 2]), {}, ValueError, "labels values must be >= 0, found -1"),
    (torch.tensor([0, 3]), {"num_segments": 3}, ValueError, "labels values must be < 3, found 3"),
    (torch.tensor([0]), {"num_segments": MAX_DENSE_SEGMENTS + 1}, ValueError, "num_segments = .* exceeds"),
    (torch.tensor([0]), {"num_segments": 2 ** 40}, ValueError, "num_segments = .* exceeds"),
    (torch.tensor([0]), {"num_segments": -1}, ValueError, "num_segments must be >= 0"),
    (torch.tensor([0]), {"num_segments": True}, TypeError, "num_segments must be an int"),
    (torch.tensor([0]), {"num_segments": 2.0}, TypeError, "num_segments must be an int"),
    (torch.tensor([0, 1]), {"length": 3, "name": "anchor_segments"}, ValueError,
     "anchor_segments must have length 3"),
    (torch.tensor([0, 1]), {"device": "meta"}, ValueError, "labels is on cpu but must be on meta"),
])
def test_bad_labels_get_clear_errors(labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        segments_from_labels(labels, **kwargs)


def test_bad_query_labels_and_indices_get_clear_errors():
    seg = segments_from_labels(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="query_segments values must be >= 0, found -2"):
        seg.segment_of(torch.tensor([0, -2]), name="query_segments")
    with pytest.raises(TypeError, match="exclude must be an integer torch.Tensor"):
        seg.to_sorted(torch.tensor([0.5]), name="exclude")
    dense = segments_from_labels(torch.tensor([1, 0]), num_segments=2)
    with pytest.raises(ValueError, match="query_segments values must be < 2, found 2"):
        dense.segment_of(torch.tensor([2]), name="query_segments")


def test_meta_labels_give_shapes_and_value_dependent_helpers_refuse_them():
    labels = torch.zeros(5, dtype=torch.int64, device="meta")
    seg = segments_from_labels(labels)
    assert seg.offsets.shape == (7,) and seg.order.shape == (5,) and seg.order.is_meta
    assert seg.segment_of(torch.zeros(3, dtype=torch.int64, device="meta")).shape == (3,)
    assert seg.to_original(torch.zeros(3, 2, dtype=torch.int64, device="meta")).shape == (3, 2)
    assert segments_from_labels(labels, num_segments=3).offsets.shape == (4,)
    targets = one_hot_csr(torch.zeros(4, dtype=torch.int64, device="meta"), 5, as_tuple=True)
    assert renumber_csr_columns(targets, torch.zeros(5, dtype=torch.int64, device="meta")).col_indices.shape == (4,)
    with pytest.raises(ValueError, match="csr_rows needs the values"):
        csr_rows(targets, torch.zeros(2, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="cameras is a meta tensor"):
        CameraLayout.from_cameras(labels)


def test_segments_trace_without_graph_breaks():
    def step(labels, query_labels, exclude, picked):
        seg = segments_from_labels(labels)
        targets = renumber_csr_columns(one_hot_csr(picked, labels.shape[0], as_tuple=True), seg.inverse)
        return (seg.order, seg.inverse, seg.to_sorted(exclude), seg.to_original(picked), targets.col_indices,
                targets.crow_indices, seg.offsets, seg.segment_of(query_labels))

    args = (torch.tensor([5, 2, 5, 2 ** 40, 2]), torch.tensor([2, 7, 2 ** 40]), torch.tensor([-1, 3, 0]),
            torch.tensor([4, 0, 3, 2, 1]))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    eager = step(*args)
    for got, expected in zip(compiled[:6], eager[:6]):
        assert torch.equal(got, expected)
    # Traced: N + 1 segments (the count of labels is unknown); eager: the 3 used ones and one
    # empty. Each query still gets the rows of its label (none for the absent label 7).
    assert compiled[6].tolist() == [0, 2, 4, 5, 5, 5, 5] and eager[6].tolist() == [0, 2, 4, 5, 5]
    for offsets, segment in ((compiled[6], compiled[7]), (eager[6], eager[7])):
        spans = [(int(offsets[s]), int(offsets[s + 1])) for s in segment.tolist()]
        assert [eager[0][a:b].tolist() for a, b in spans] == [[1, 4], [], [3]]


# -- the topk_anchors wiring: anchors labelled in any order -----------------------------------------

def topk_by_labels(queries, anchors, k, anchor_segments, query_segments, exclude, backend):
    """``topk_anchors`` with a label per anchor, in the caller's anchor order."""
    return fastassoc.topk_anchors(queries, anchors, k, anchor_segments=anchor_segments,
                                  query_segments=query_segments, exclude=exclude, backend=backend)


def _oracle_topk(queries, anchors, k, anchor_labels, query_labels, exclude):
    """Per query: anchors with the query's label, its excluded one skipped, by (distance, index)."""
    q = queries.double().tolist()
    a = anchors.double().tolist()
    distances = torch.full((len(q), k), math.inf, dtype=torch.float64)
    indices = torch.full((len(q), k), -1, dtype=torch.int64)
    for b, query in enumerate(q):
        candidates = [(sum((x - y) ** 2 for x, y in zip(query, anchor)), j) for j, anchor in enumerate(a)
                      if anchor_labels[j] == query_labels[b] and j != exclude[b]]
        for rank, (distance, j) in enumerate(sorted(candidates)[:k]):
            distances[b, rank], indices[b, rank] = distance, j
    return distances, indices


@pytest.fixture(params=["eager", "traced-layout"])
def layout_mode(request, monkeypatch):
    """``traced-layout``: the helpers behave as under torch.compile (no value checks, N + 1 segments)."""
    if request.param == "traced-layout":
        monkeypatch.setattr(segments, "_checking", lambda: False)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_topk_with_unsorted_labels_matches_brute_force(backend, seed, layout_mode):
    _require("topk_anchors", backend)
    rng = np.random.default_rng(seed)
    num_anchors, num_queries, dim, k = 23, 9, 5, 4
    # Small integers: every distance is exact in float32, so ties are real ties.
    anchors = torch.from_numpy(rng.integers(-2, 3, (num_anchors, dim))).float()
    anchors[[4, 11, 17]] = anchors[2].clone()                               # duplicates: tie by smaller index
    # Camera ids unsorted, one of them huge; label 6 on no anchor (an empty camera).
    pool = np.array([3, 0, 2 ** 40, 9])
    anchor_labels = pool[rng.integers(0, 4, num_anchors)]
    anchor_labels[[2, 4, 11, 17]] = 3
    query_labels = pool[rng.integers(0, 4, num_queries)]
    query_labels[0], query_labels[1] = 6, 3
    queries = torch.from_numpy(rng.integers(-2, 3, (num_queries, dim))).float()
    queries[1] = anchors[2].clone()
    exclude = rng.integers(-1, num_anchors, num_queries)
    exclude[1] = 4
    labels_a, labels_q = torch.from_numpy(anchor_labels), torch.from_numpy(query_labels)
    expected_segments = num_anchors + 1 if layout_mode == "traced-layout" else len(set(anchor_labels.tolist())) + 1
    assert segments_from_labels(labels_a).num_segments == expected_segments
    got_d, got_i = topk_by_labels(queries, anchors, k, labels_a, labels_q, torch.from_numpy(exclude), backend)
    want_d, want_i = _oracle_topk(queries, anchors, k, anchor_labels.tolist(), query_labels.tolist(),
                                  exclude.tolist())
    mismatch = (got_i != want_i).nonzero()
    assert mismatch.numel() == 0, f"first mismatch at {mismatch[0].tolist()}: {got_i.tolist()} vs {want_i.tolist()}"
    assert got_i[0].tolist() == [-1] * k and torch.isinf(got_d[0]).all()   # empty camera: padding only
    assert got_i[1, :2].tolist() == [2, 11]                            # ties by index, 4 excluded
    torch.testing.assert_close(got_d.double(), want_d, rtol=0, atol=1e-5)


def test_topk_with_labels_equals_the_presorted_layout():
    rng = np.random.default_rng(5)
    anchors, queries = torch.randn(30, 6), torch.randn(7, 6)
    labels = torch.from_numpy(rng.integers(0, 4, 30))
    query_labels = torch.from_numpy(rng.integers(0, 4, 7))
    order = torch.tensor(sorted(range(30), key=lambda i: (int(labels[i]), i)))
    offsets = torch.tensor([0] + [int((labels <= c).sum()) for c in range(4)])
    want_d, want_i = fastassoc.topk_anchors(queries, anchors[order], 5, anchor_offsets=offsets,
                                            query_segments=query_labels, backend="reference")
    got_d, got_i = topk_by_labels(queries, anchors, 5, labels, query_labels, None, "reference")
    assert torch.equal(got_i, torch.where(want_i >= 0, order[want_i.clamp(min=0)], -1))
    assert torch.equal(got_d, want_d)


# -- the segmented_cross_entropy wiring: classes labelled in any order ------------------------------

def loss_by_labels(features, weight, targets, class_segments, scale, backend):
    """``segmented_cross_entropy`` with a label per class, in the caller's class order."""
    return fastassoc.segmented_cross_entropy(features, weight, targets, class_segments=class_segments,
                                             scale=scale, backend=backend)


def _oracle_loss(features, weight, dense_targets, class_labels, scale):
    """Float64 soft-target cross-entropy, one softmax over the classes sharing a label."""
    logits = scale * features.double() @ weight.double().T
    loss = torch.zeros((), dtype=torch.float64)
    for label in set(class_labels):
        columns = [j for j, value in enumerate(class_labels) if value == label]
        log_softmax = logits[:, columns] - torch.logsumexp(logits[:, columns], dim=1, keepdim=True)
        loss = loss - (dense_targets.double()[:, columns] * log_softmax).sum()
    return loss / features.shape[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tuple", [False, True])
def test_loss_with_class_labels_matches_oracle_and_sorted_layout(backend, as_tuple, layout_mode):
    _require("segmented_cross_entropy", backend)
    rng = np.random.default_rng(3)
    num_rows, num_classes, dim = 6, 11, 4
    class_labels = [int(v) for v in rng.choice([1, 2 ** 40, 0], num_classes)]
    dense = np.where(rng.random((num_rows, num_classes)) < 0.35, rng.random((num_rows, num_classes)), 0.0)
    dense[0] = 0.0
    dense[0, 5] = 1.0
    dense_targets = torch.from_numpy(dense).float()
    targets = dense_targets.to_sparse_csr()
    if as_tuple:
        targets = CSRMatrix.from_sparse_csr(targets)
    features = torch.randn(num_rows, dim, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(num_classes, dim).requires_grad_()
    loss = loss_by_labels(features, weight, targets, torch.tensor(class_labels), 2.0, backend)
    loss.backward()
    f64, w64 = features.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = _oracle_loss(f64, w64, dense_targets, class_labels, 2.0)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features.grad.double(), f64.grad, rtol=1e-4, atol=1e-5)
    # The same classes laid out by hand (sorted by label, stable) give the same loss.
    order = sorted(range(num_classes), key=lambda j: (class_labels[j], j))
    distinct = sorted(set(class_labels))
    offsets = torch.tensor([0] + list(np.cumsum([class_labels.count(v) for v in distinct])))
    sorted_loss = fastassoc.segmented_cross_entropy(features.detach(), weight.detach()[order],
                                                    dense_targets[:, order].to_sparse_csr(),
                                                    class_offsets=offsets, scale=2.0, backend=backend)
    torch.testing.assert_close(loss.detach(), sorted_loss, rtol=1e-6, atol=1e-6)


# -- CSR helpers ------------------------------------------------------------------------------------

def _random_dense(rng, rows, cols, density=0.4):
    return np.where(rng.random((rows, cols)) < density, rng.random((rows, cols)) + 0.1, 0.0).astype(np.float32)


def _dense_of(matrix) -> torch.Tensor:
    if isinstance(matrix, CSRMatrix):
        matrix = matrix.to_sparse_csr()
    return matrix.to_dense()


def _assert_rows_sorted(matrix):
    crow, col = (matrix.crow_indices, matrix.col_indices) if isinstance(matrix, CSRMatrix) else \
        (matrix.crow_indices(), matrix.col_indices())
    for r in range(len(crow) - 1):
        seg = col[crow[r]:crow[r + 1]]
        assert torch.all(seg[1:] > seg[:-1]), f"row {r} columns not sorted: {seg.tolist()}"


@pytest.mark.parametrize("as_tuple", [False, True])
def test_csr_rows_and_renumbering_match_dense(as_tuple):
    rng = np.random.default_rng(2)
    dense = _random_dense(rng, 7, 6)
    dense[3] = 0.0                                                     # an empty row
    matrix = torch.from_numpy(dense).to_sparse_csr()
    if as_tuple:
        matrix = CSRMatrix.from_sparse_csr(matrix)
    rows = torch.tensor([4, 0, 3, 4, 6])
    picked = csr_rows(matrix, rows)
    assert isinstance(picked, CSRMatrix) == as_tuple
    assert torch.equal(_dense_of(picked), torch.from_numpy(dense[[4, 0, 3, 4, 6]]))
    perm = rng.permutation(6)
    renumbered = csr_rows(matrix, rows, columns=torch.from_numpy(perm), num_columns=8)
    expected = np.zeros((5, 8), np.float32)
    expected[:, perm] = dense[[4, 0, 3, 4, 6]]
    assert torch.equal(_dense_of(renumbered), torch.from_numpy(expected))
    _assert_rows_sorted(renumbered)
    whole = renumber_csr_columns(matrix, torch.from_numpy(perm))
    expected = np.zeros_like(dense)
    expected[:, perm] = dense
    assert torch.equal(_dense_of(whole), torch.from_numpy(expected))
    _assert_rows_sorted(whole)
    assert csr_rows(matrix, torch.zeros(0, dtype=torch.int64)).shape == (0, 6)


@pytest.mark.parametrize("as_tuple", [False, True])
def test_one_hot_csr_matches_dense(as_tuple):
    columns = torch.tensor([3, 0, 3, 1])
    values = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float64)
    got = one_hot_csr(columns, 5, values, as_tuple=as_tuple)
    assert isinstance(got, CSRMatrix) == as_tuple
    expected = torch.zeros(4, 5)
    expected[torch.arange(4), columns] = values.float()
    assert torch.equal(_dense_of(got), expected)
    assert torch.equal(_dense_of(one_hot_csr(columns, 5, as_tuple=as_tuple)), (expected > 0).float())


def _broken(crow, col, values, size):
    return CSRMatrix(torch.tensor(crow), torch.tensor(col), torch.tensor(values), size)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: csr_rows(torch.eye(3), torch.tensor([0])), TypeError, "matrix must be a torch sparse CSR tensor"),
    (lambda m: csr_rows(m, torch.tensor([0, 3])), ValueError, "rows values must be < 3, found 3"),
    (lambda m: csr_rows(m, torch.tensor([-1])), ValueError, "rows values must be >= 0, found -1"),
    (lambda m: csr_rows(m, torch.tensor([0.0])), TypeError, "rows must have an integer dtype"),
    (lambda m: csr_rows(m, torch.tensor([0]), columns=torch.tensor([0, 1])), ValueError, "columns must have length 3"),
    (lambda m: csr_rows(m, torch.tensor([0]), columns=torch.tensor([0, 1, 5]), num_columns=4), ValueError,
     "columns values must be < 4, found 5"),
    (lambda m: csr_rows(m, torch.tensor([0]), num_columns=4), ValueError, "no columns map is given"),
    (lambda m: csr_rows(_broken([0, 1, 2, 10 ** 8], [0, 1, 2], [1.0, 1.0, 1.0], (3, 3)), torch.tensor([2])),
     ValueError, "matrix crow_indices must start at 0 and end at nnz"),
    (lambda m: csr_rows(_broken([0, 2, 1, 3], [0, 1, 2], [1.0, 1.0, 1.0], (3, 3)), torch.tensor([1])),
     ValueError, "matrix crow_indices must be non-decreasing"),
    (lambda m: csr_rows(_broken([0, 1, 2, 3], [0, 7, 2], [1.0, 1.0, 1.0], (3, 3)), torch.tensor([1])),
     ValueError, "matrix col_indices values must be < 3, found 7"),
    (lambda m: csr_rows(_broken([0, 1, 3], [0, 1, 2], [1.0, 1.0, 1.0], (3, 3)), torch.tensor([1])),
     ValueError, "matrix crow_indices must have length 4"),
    (lambda m: renumber_csr_columns(m, torch.tensor([0, 1]), name="targets"), ValueError,
     r"one entry per column of targets \(3\)"),
    (lambda m: one_hot_csr(torch.tensor([0, 5]), 5), ValueError, "columns values must be < 5, found 5"),
    (lambda m: one_hot_csr(torch.tensor([0]), 2, torch.ones(2)), ValueError, "values must be a 1-D tensor"),
    (lambda m: one_hot_csr(torch.tensor([0]), -1), ValueError, "num_columns must be >= 0"),
])
def test_bad_csr_arguments_get_clear_errors(call, error, match):
    matrix = torch.eye(3).to_sparse_csr()
    with pytest.raises(error, match=match):
        call(matrix)


# -- CameraLayout ------------------------------------------------------------------------------------

def test_camera_layout_sorts_rows_by_camera_stably():
    cameras = [2, 0, 2, 1, 0, 2]
    layout = CameraLayout.from_cameras(torch.tensor(cameras), num_cameras=4)
    assert layout.order.tolist() == sorted(range(6), key=lambda i: (cameras[i], i))
    assert layout.offsets.tolist() == [0, 2, 3, 6, 6]
    assert torch.equal(layout.position[layout.order], torch.arange(6))
    assert layout.sorted_cameras.tolist() == sorted(cameras)
    assert layout.num_cameras == 4
    assert CameraLayout.from_cameras(cameras).num_cameras == 3          # lists work too
    assert CameraLayout.from_cameras(torch.zeros(0, dtype=torch.int64)).offsets.tolist() == [0]


@pytest.mark.parametrize("cameras, num_cameras, error, match", [
    (torch.tensor([0, 2 ** 40]), None, ValueError, "cameras holds the id 1099511627776"),
    (torch.tensor([0, 1]), 2 ** 40, ValueError, "num_cameras = 1099511627776 exceeds"),
    (torch.tensor([0, 3]), 3, ValueError, r"cameras values must be < num_cameras \(3\), found 3"),
    (torch.tensor([0, -1]), None, ValueError, "cameras values must be >= 0, found -1"),
    (torch.tensor([0.0, 1.0]), None, TypeError, "cameras must have an integer dtype"),
    ("abc", None, TypeError, "cameras must be a 1-D tensor of integers"),
])
def test_camera_layout_rejects_bad_cameras(cameras, num_cameras, error, match):
    with pytest.raises(error, match=match):
        CameraLayout.from_cameras(cameras, num_cameras)


def test_methods_base_reexports_the_public_helpers():
    from fastassoc.methods import base

    assert base.CameraLayout is CameraLayout and base.csr_rows is csr_rows and base.one_hot_csr is one_hot_csr


def test_ops_refuse_offsets_and_labels_together():
    x = torch.randn(6, 3)
    labels = torch.tensor([2, 0, 2, 1, 0, 1])
    offsets = torch.tensor([0, 2, 4, 6])
    with pytest.raises(ValueError, match="anchor_offsets .* or anchor_segments"):
        fastassoc.topk_anchors(x, x, 1, anchor_offsets=offsets, anchor_segments=labels, query_segments=labels)
    with pytest.raises(ValueError, match="query_segments .* is required with anchor_segments"):
        fastassoc.topk_anchors(x, x, 1, anchor_segments=labels)
    targets = fastassoc.one_hot_csr(torch.arange(6), 6)
    with pytest.raises(ValueError, match="class_offsets .* or class_segments"):
        fastassoc.segmented_cross_entropy(x, x, targets, class_offsets=offsets, class_segments=labels)
