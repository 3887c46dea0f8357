"""Identical vectors get identical distances on every backend, and their ties go to the
smaller index, wherever the copies sit in a tile.

A float32 GEMM's result for a pair can depend on the pair's position in the output
(vectorised body or edge handling of the BLAS kernel, thread splits), so two copies of one
vector may get distances a few ulps apart and the later copy can win. The problems here
put copies of one vector at the first and last rows and columns and at random positions
among random vectors, with odd feature dimensions, row counts that are not multiples of
8 or 16 and small tiles (``fastassoc.tile_limit``) so that copies fall on both sides of
tile boundaries. The oracle is the index order itself: among copies, the smaller index
ranks first, and every copy of a pair has the same bits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastassoc
from conftest import require_backend

DIMS = (37, 129, 1000)
METRICS = ("sqeuclidean", "euclidean", "cosine")
SEEDS = range(12)


def _problem(seed: int, min_rows: int = 21, max_rows: int = 75):
    """(x [n, D] float32 random rows with copies of one vector, sorted copy positions,
    the copied vector, a near-copy of it, a tile limit that cuts x into small tiles)."""
    rng = np.random.default_rng(seed)
    dim = DIMS[seed % len(DIMS)]
    n = int(rng.integers(min_rows, max_rows))
    if n % 8 == 0:
        n += 1
    x = rng.standard_normal((n, dim)).astype(np.float32)
    vector = rng.standard_normal(dim).astype(np.float32)
    extra = rng.choice(np.arange(1, n - 1), size=int(rng.integers(2, 5)), replace=False)
    positions = np.unique(np.concatenate([[0, n - 1], extra]))
    x[positions] = vector
    near = (vector + 1e-3 * rng.standard_normal(dim)).astype(np.float32)
    # Row counts per tile that leave copies at the first, last and a middle row of tiles.
    limit = int(n * rng.choice([3, 5, 7, 13, n]))
    return torch.from_numpy(x), positions, torch.from_numpy(vector), torch.from_numpy(near), limit


def _assert_copies_first(distances: torch.Tensor, indices: torch.Tensor, copies, what: str) -> None:
    """The leading entries of one result row are ``copies`` in ascending order, equal bits."""
    count = min(len(copies), indices.shape[0])
    got = indices[:count].tolist()
    assert got == list(copies[:count]), f"{what}: indices {got}, expected the copies {list(copies[:count])} in order"
    head = distances[:count]
    assert torch.equal(head, head[:1].expand(count)), f"{what}: copies got different distances {head.tolist()}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_anchors_copies_among_anchors(backend_device, seed, k):
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    anchors, copies, _, near, limit = _problem(seed)
    metric = METRICS[seed % len(METRICS)]
    rng = np.random.default_rng(seed + 1000)
    queries = torch.from_numpy(rng.standard_normal((5, anchors.shape[1])).astype(np.float32))
    queries[2] = near
    with fastassoc.tile_limit(limit):
        distances, indices = fastassoc.topk_anchors(queries.to(device), anchors.to(device), k, metric=metric,
                                                    backend=backend)
    _assert_copies_first(distances[2].cpu(), indices[2].cpu(), copies,
                         f"{backend} seed={seed} {metric} D={anchors.shape[1]} N={anchors.shape[0]} k={k}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 4])
def test_topk_anchors_copies_among_queries(backend_device, seed, k):
    """Copies as queries get bit-identical rows; in a self-join (each row excluding itself)
    a copy's nearest are the other copies in index order."""
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    x, copies, _, _, limit = _problem(seed)
    metric = METRICS[seed % len(METRICS)]
    rng = np.random.default_rng(seed + 2000)
    anchors = torch.from_numpy(rng.standard_normal((int(rng.integers(9, 60)), x.shape[1])).astype(np.float32))
    xd = x.to(device)
    what = f"{backend} seed={seed} {metric} D={x.shape[1]} N={x.shape[0]} k={k}"
    with fastassoc.tile_limit(limit):
        distances, indices = fastassoc.topk_anchors(xd, anchors.to(device), k, metric=metric, backend=backend)
        self_distances, self_indices = fastassoc.topk_anchors(
            xd, xd, k, metric=metric, exclude=torch.arange(x.shape[0], device=device), backend=backend)
    distances, indices = distances.cpu(), indices.cpu()
    for row in copies[1:]:
        assert torch.equal(indices[row], indices[copies[0]]), f"{what}: copy {row} got other anchors"
        assert torch.equal(distances[row], distances[copies[0]]), f"{what}: copy {row} got other distances"
    for row in copies:
        others = [c for c in copies if c != row]
        _assert_copies_first(self_distances[row].cpu(), self_indices[row].cpu(), others, f"{what} self-join row {row}")


@pytest.mark.parametrize("seed", SEEDS)
def test_mutual_knn_pairs_the_first_copy(backend_device, seed):
    backend, device = backend_device
    require_backend("mutual_knn", backend)
    a, copies_a, _, _, limit = _problem(seed)
    b, copies_b, _, _, _ = _problem(seed + 500, min_rows=11)
    dim = a.shape[1]
    if b.shape[1] != dim:
        # A stream of its own: rows drawn from a's stream could repeat a's copied vector exactly.
        b = torch.from_numpy(np.random.default_rng(seed + 9000).standard_normal((b.shape[0], dim)).astype(np.float32))
        b[torch.from_numpy(copies_b)] = b[int(copies_b[0])].clone()
    rng = np.random.default_rng(seed + 3000)
    # One row of each side is a near-copy of the other side's copied vector.
    a_near = int(rng.choice([r for r in range(a.shape[0]) if r not in copies_a]))
    b_near = int(rng.choice([r for r in range(b.shape[0]) if r not in copies_b]))
    a[a_near] = b[int(copies_b[0])] + 1e-3 * torch.from_numpy(rng.standard_normal(dim).astype(np.float32))
    b[b_near] = a[int(copies_a[0])] + 1e-3 * torch.from_numpy(rng.standard_normal(dim).astype(np.float32))
    metric = METRICS[seed % len(METRICS)]
    with fastassoc.tile_limit(limit):
        ia, ib, distances = fastassoc.mutual_knn(a.to(device), b.to(device), 1, metric=metric, backend=backend)
    pairs = set(zip(ia.cpu().tolist(), ib.cpu().tolist()))
    what = f"{backend} seed={seed} {metric} D={dim} Na={a.shape[0]} Nb={b.shape[0]}"
    with_a_copies = {p for p in pairs if p[0] in set(copies_a.tolist())}
    assert with_a_copies == {(int(copies_a[0]), b_near)}, f"{what}: pairs of a's copies {with_a_copies}"
    with_b_copies = {p for p in pairs if p[1] in set(copies_b.tolist())}
    assert with_b_copies == {(a_near, int(copies_b[0]))}, f"{what}: pairs of b's copies {with_b_copies}"


def _csr_rows(graph) -> dict[int, list[int]]:
    graph = graph.to_sparse_csr() if not graph.layout == torch.sparse_csr else graph
    crow, col = graph.crow_indices().cpu().tolist(), graph.col_indices().cpu().tolist()
    return {row: col[crow[row]:crow[row + 1]] for row in range(len(crow) - 1)}


@pytest.mark.parametrize("seed", SEEDS)
def test_knn_soft_labels_list_the_first_copies(backend_device, seed):
    """Inside one camera a copy's nearest other tracklets are the other copies, smallest first."""
    backend, device = backend_device
    require_backend("knn_soft_labels", backend)
    x, copies, _, _, limit = _problem(seed)
    rng = np.random.default_rng(seed + 4000)
    cameras = torch.from_numpy(rng.integers(0, 2, x.shape[0])).to(torch.int64)
    cameras[torch.from_numpy(copies)] = 1
    k = len(copies) - 2  # every copy's k nearest are copies: all but the last other one
    with fastassoc.tile_limit(limit):
        labels = fastassoc.knn_soft_labels(x.to(device), cameras.to(device), k, num_cameras=2, backend=backend)
    rows = _csr_rows(labels)
    what = f"{backend} seed={seed} D={x.shape[1]} N={x.shape[0]} k={k}"
    for row in copies:
        expected = sorted([row] + [c for c in copies if c != row][:k])
        assert rows[int(row)] == expected, f"{what}: row {row} lists {rows[int(row)]}, expected {expected}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["pairwise", "pooled"])
def test_cross_camera_graph_links_the_first_copy(backend_device, seed, mode):
    backend, device = backend_device
    require_backend("cross_camera_graph", backend)
    x, copies, _, near, limit = _problem(seed)
    rng = np.random.default_rng(seed + 5000)
    cameras = torch.from_numpy(rng.integers(0, 3, x.shape[0])).to(torch.int64)
    cameras[torch.from_numpy(copies)] = 1
    others = [r for r in range(x.shape[0]) if r not in copies]
    near_row = int(rng.choice(others))
    x[near_row] = near
    cameras[near_row] = 0
    with fastassoc.tile_limit(limit):
        graph = fastassoc.cross_camera_graph(x.to(device), cameras.to(device), 1, self_loops=False, mode=mode,
                                             num_cameras=3, backend=backend)
    rows = _csr_rows(graph)
    what = f"{backend} seed={seed} D={x.shape[1]} N={x.shape[0]} {mode}"
    linked = [c for c in rows[near_row] if c in set(copies.tolist())]
    assert linked == [int(copies[0])], f"{what}: near-copy row links copies {linked}, expected [{copies[0]}]"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("linkage", ["centroid", "tssl", "buc"])
def test_agglomerative_merge_joins_the_first_copies(backend_device, seed, linkage):
    """From singletons, the closest pair is two copies; ties by (i, j) pick the first two."""
    backend, device = backend_device
    require_backend("agglomerative_merge", backend)
    x, copies, _, _, limit = _problem(seed)
    n = x.shape[0]
    with fastassoc.tile_limit(limit):
        labels = fastassoc.agglomerative_merge(x.to(device), torch.arange(n, device=device), 1, linkage=linkage,
                                               backend=backend).cpu()
    what = f"{backend} seed={seed} D={x.shape[1]} N={n} {linkage}"
    joined = [r for r in range(n) if (labels == labels[r]).sum() > 1]
    assert joined == [int(copies[0]), int(copies[1])], f"{what}: merged {joined}, expected {list(copies[:2])}"


@pytest.mark.parametrize("seed", SEEDS)
def test_evaluate_ranking_ties_by_gallery_index(backend_device, seed):
    """Copies of one gallery vector, some true matches and some negatives, rank in gallery
    index order: rank-1 and AP follow from the copies' pids alone."""
    backend, device = backend_device
    require_backend("evaluate_ranking", backend)
    gallery, copies, _, near, limit = _problem(seed)
    rng = np.random.default_rng(seed + 6000)
    num_gallery = gallery.shape[0]
    gallery_pids = torch.arange(2, num_gallery + 2)
    is_match = rng.integers(0, 2, len(copies)).astype(bool)
    is_match[rng.integers(0, len(copies))] = True
    is_match[rng.integers(0, len(copies))] ^= not (~is_match).any()
    gallery_pids[torch.from_numpy(copies)] = torch.from_numpy(np.where(is_match, 0, 1))
    query = near.unsqueeze(0)
    metric = METRICS[seed % len(METRICS)]
    with fastassoc.tile_limit(limit):
        result = fastassoc.evaluate_ranking(
            query.to(device), gallery.to(device), torch.zeros(1, dtype=torch.int64, device=device),
            gallery_pids.to(device), torch.zeros(1, dtype=torch.int64, device=device),
            torch.ones(num_gallery, dtype=torch.int64, device=device), metric=metric, max_rank=5, backend=backend)
    hits = np.cumsum(is_match)
    expected_ap = float(np.mean((hits / np.arange(1, len(copies) + 1))[is_match]))
    what = f"{backend} seed={seed} {metric} D={gallery.shape[1]} G={num_gallery} matches={is_match.tolist()}"
    assert float(result.cmc[0]) == float(is_match[0]), f"{what}: rank-1 {float(result.cmc[0])}"
    assert abs(result.mAP - expected_ap) < 1e-12, f"{what}: AP {result.mAP}, expected {expected_ap}"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_copies", [7, 30])
def test_topk_anchors_many_copies(backend_device, seed, num_copies):
    """More copies than the backends' candidate lists hold (the cpu backend's narrow and wide
    proposal lists are k + 4 and k + 16 entries): the first copies still win, in order."""
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    rng = np.random.default_rng(seed + 7000)
    dim = DIMS[seed % len(DIMS)]
    n = 97
    x = rng.standard_normal((n, dim)).astype(np.float32)
    copies = np.sort(rng.choice(n, size=num_copies, replace=False))
    x[copies] = rng.standard_normal(dim).astype(np.float32)
    x = torch.from_numpy(x)
    metric = METRICS[seed % len(METRICS)]
    near = x[int(copies[0])] + 1e-3 * torch.from_numpy(rng.standard_normal(dim).astype(np.float32))
    queries = torch.stack([near, x[int(copies[-1])]])
    what = f"{backend} seed={seed} {metric} D={dim} copies={num_copies}"
    for k in (1, 3):
        with fastassoc.tile_limit(n * 5):
            distances, indices = fastassoc.topk_anchors(queries.to(device), x.to(device), k, metric=metric,
                                                        backend=backend)
            self_distances, self_indices = fastassoc.topk_anchors(
                x.to(device), x.to(device), k, metric=metric, exclude=torch.arange(n, device=device), backend=backend)
        for row in range(2):
            _assert_copies_first(distances[row].cpu(), indices[row].cpu(), copies, f"{what} k={k} query {row}")
        for row in copies[[0, -1]]:
            others = [c for c in copies if c != row]
            _assert_copies_first(self_distances[row].cpu(), self_indices[row].cpu(), others,
                                 f"{what} k={k} self-join row {row}")
