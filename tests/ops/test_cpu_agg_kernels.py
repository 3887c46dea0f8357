"""CPU-backend properties of the loss, cluster, memory and evaluation kernels
(csrc/cpu/{loss,cluster,memory,evaluation}.cpp).

The shared op tests (test_loss.py, test_cluster.py, test_memory.py, test_evaluation.py)
check every backend against NumPy oracles on small inputs; this file checks what only the
compiled CPU kernels can get wrong:

* OpenMP thread count and tile shape never change a result (1 vs 2 threads; tiny tiles
  that split rows, classes and clusters vs the default);
* moderate random sizes (several tiles, thousands of pairs) equal the reference;
* agglomerative merging when the selection buffer must be refilled (several GEMM passes),
  when buc clusters are larger than a tile (row pieces), and on every path of tssl's
  single-pass shortcut (nearest lists shorter than the clusters, forced through the
  launcher's list depth);
* evaluation never holds a tile of a quarter of the Q x G matrix;
* the EMA kernel groups duplicates the same way for small and huge banks, and addresses
  bank rows beyond 2**31 elements (on a lazily allocated bank that touches only a few pages).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastassoc
from conftest import require_backend
from fastassoc import _backend

from ._cpu import assert_equal_tensors, core  # noqa: F401  (core is a fixture)

pytestmark = pytest.mark.skipif(_backend.compiled_core() is None, reason="fastassoc._C is not built")


def assert_close_tensors(got: torch.Tensor, expected: torch.Tensor, what: str, rtol=1e-5, atol=1e-6) -> None:
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    close = torch.isclose(got.double(), expected.double(), rtol=rtol, atol=atol)
    if not bool(close.all()):
        first = tuple(torch.nonzero(~close)[0].tolist())
        raise AssertionError(f"{what}: first mismatch at {first}: got {got[first].item()!r}, "
                             f"expected {expected[first].item()!r} ({int((~close).sum())} mismatches)")


def assert_same_ranking(got, expected, what: str) -> None:
    assert got.num_valid_queries == expected.num_valid_queries, \
        f"{what}: {got.num_valid_queries} valid queries, expected {expected.num_valid_queries}"
    assert_equal_tensors(got.cmc, expected.cmc, f"{what} cmc")
    assert got.mAP == pytest.approx(expected.mAP, rel=1e-12, abs=1e-15), f"{what}: mAP {got.mAP} vs {expected.mAP}"
    assert got.mINP == pytest.approx(expected.mINP, rel=1e-12, abs=1e-15), \
        f"{what}: mINP {got.mINP} vs {expected.mINP}"


def identity_world(seed: int, num_rows: int, dim: int, num_identities: int, noise: float = 0.5):
    """Re-id-like rows: a unit identity centre plus noise (distance gaps far above float32 noise)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_identities, dim, generator=generator), dim=1)
    identities = torch.randint(0, num_identities, (num_rows,), generator=generator)
    rows = centres[identities] + torch.randn(num_rows, dim, generator=generator) * (noise / dim) ** 0.5
    return rows, identities


def integer_world(seed: int, num_rows: int, dim: int, low: int = -2, high: int = 3):
    """Small-integer rows: float32 squared distances are exact, so ties are real."""
    return torch.randint(low, high, (num_rows, dim), generator=torch.Generator().manual_seed(seed)).float()


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                self.largest = max(self.largest, tensor.numel())
        return out


# ============================================================================== cluster

LINKAGES = ("tssl", "tssl_typeset", "centroid", "buc", "buc_l2")


@pytest.fixture(scope="module")
def merge_available():
    require_backend("agglomerative_merge", "cpu")


@pytest.fixture
def tssl_depth(monkeypatch):
    """Set the launcher's tssl nearest-list depth (how many candidates the first pass keeps)."""
    from fastassoc.kernels.cpu import cluster

    def set_depth(depth: int) -> None:
        monkeypatch.setattr(cluster, "_TSSL_DEPTH", depth)
    return set_depth


def merge(x, labels, num_merges, linkage, backend, **options):
    return fastassoc.agglomerative_merge(x, labels, num_merges, linkage=linkage, backend=backend, **options)


@pytest.mark.parametrize("linkage", LINKAGES)
def test_merge_equals_reference_at_moderate_size(merge_available, linkage):
    x, _ = identity_world(1, 900, 48, 90)
    labels = torch.arange(900)
    options = dict(neighbours=4, size_penalty=0.01)
    expected = merge(x, labels, 200, linkage, "reference", **options)
    got = merge(x, labels, 200, linkage, "cpu", **options)
    assert_equal_tensors(got, expected, f"{linkage}: 900 singletons, 200 merges")


@pytest.mark.parametrize("linkage", LINKAGES)
def test_merge_from_partial_clustering_equals_reference(merge_available, linkage):
    x, identities = identity_world(2, 700, 24, 40)
    # Clusters of uneven size with non-contiguous label values.
    labels = (identities * 7 + torch.randint(0, 3, (700,), generator=torch.Generator().manual_seed(3))) * 5
    num_clusters = int(torch.unique(labels).numel())
    expected = merge(x, labels, num_clusters // 3, linkage, "reference", size_penalty=0.002)
    got = merge(x, labels, num_clusters // 3, linkage, "cpu", size_penalty=0.002)
    assert_equal_tensors(got, expected, f"{linkage}: {num_clusters} clusters")


@pytest.mark.parametrize("linkage", LINKAGES)
def test_merge_threads_do_not_change_labels(core, merge_available, linkage):
    x, identities = identity_world(4, 800, 32, 60)
    labels = identities * 3 + torch.randint(0, 3, (800,), generator=torch.Generator().manual_seed(5))
    results = {}
    for threads in (1, 2):
        core.set_num_threads(threads)
        results[threads] = merge(x, labels, 40, linkage, "cpu")
    assert_equal_tensors(results[2], results[1], f"{linkage}: 2 threads vs 1")


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("tile", [3, 11, 150])
def test_merge_tiles_do_not_change_labels_on_exact_data(merge_available, linkage, tile):
    # Integer data with many exact ties; singletons and a few multi-sample clusters.
    x = integer_world(6, 120, 3)
    labels = torch.cat([torch.arange(100), torch.randint(100, 104, (20,), generator=torch.Generator().manual_seed(7))])
    expected = merge(x, labels, 60, linkage, "reference", size_penalty=0.5)
    default = merge(x, labels, 60, linkage, "cpu", size_penalty=0.5)
    with fastassoc.tile_limit(tile):
        tiled = merge(x, labels, 60, linkage, "cpu", size_penalty=0.5)
    assert_equal_tensors(default, expected, f"{linkage}: default tiles vs reference")
    assert_equal_tensors(tiled, expected, f"{linkage}: tile_limit({tile}) vs reference")


@pytest.mark.parametrize("linkage", LINKAGES)
def test_merge_refills_the_selection_buffer(merge_available, linkage):
    # tile_limit(16) caps the pair buffer at 16 pairs: 90 merges need several GEMM passes,
    # each selecting the next pairs strictly after the last one walked.
    x, _ = identity_world(8, 160, 16, 20)
    labels = torch.arange(160)
    expected = merge(x, labels, 90, linkage, "reference")
    with fastassoc.tile_limit(16):
        got = merge(x, labels, 90, linkage, "cpu")
    assert_equal_tensors(got, expected, f"{linkage}: 90 merges through a 16-pair buffer")


def test_merge_refill_skips_pairs_inside_joined_clusters(merge_available):
    # Tight triples: most of the smallest pairs join clusters that are already one, so
    # the first buffers are exhausted by redundant pairs.
    generator = torch.Generator().manual_seed(9)
    centres = torch.randn(30, 8, generator=generator) * 10
    x = centres.repeat_interleave(3, 0) + 0.01 * torch.randn(90, 8, generator=generator)
    labels = torch.arange(90)
    for linkage in LINKAGES:
        expected = merge(x, labels, 65, linkage, "reference")
        with fastassoc.tile_limit(4):
            got = merge(x, labels, 65, linkage, "cpu")
        assert_equal_tensors(got, expected, f"{linkage}: redundant pairs through a 4-pair buffer")


@pytest.mark.parametrize("tile", [5, 40, 400])
def test_buc_clusters_larger_than_a_tile(merge_available, tile):
    # Clusters of up to 60 samples against ~300 columns: with small tiles a cluster's rows
    # are split into pieces whose cluster-pair minimum carries across tiles.
    x, identities = identity_world(10, 400, 12, 8, noise=2.0)
    labels = identities.clone()
    labels[:40] = 100 + torch.arange(40)          # a few singletons among big clusters
    expected = merge(x, labels, 20, "buc", "reference", size_penalty=0.001)
    with fastassoc.tile_limit(tile):
        got = merge(x, labels, 20, "buc", "cpu", size_penalty=0.001)
    assert_equal_tensors(got, expected, f"buc with big clusters, tile_limit({tile})")


@pytest.mark.parametrize("depth", [1, 2, 6, 64])
@pytest.mark.parametrize("num_merges", [1, 30, 199])
def test_tssl_first_pass_shortcut_on_every_path(merge_available, tssl_depth, depth, num_merges):
    # Shallow lists: the candidates proven in order rarely give every merge, so the
    # launcher falls back to a streaming pass after the last pair walked; deep lists: one pass.
    tssl_depth(depth)
    x, _ = identity_world(11, 200, 16, 25)
    labels = torch.arange(200)
    expected = merge(x, labels, num_merges, "tssl", "reference", neighbours=3)
    got = merge(x, labels, num_merges, "tssl", "cpu", neighbours=3)
    assert_equal_tensors(got, expected, f"tssl depth={depth}, {num_merges} merges")


@pytest.mark.parametrize("linkage", ["tssl", "tssl_typeset"])
@pytest.mark.parametrize("depth", [1, 3])
def test_tssl_shortcut_with_exact_ties(merge_available, tssl_depth, depth, linkage):
    tssl_depth(depth)
    for seed in range(6):
        x = integer_world(20 + seed, 60, 2, -1, 2)
        labels = torch.arange(60)
        for num_merges in (5, 30, 59):
            expected = merge(x, labels, num_merges, linkage, "reference", neighbours=2)
            got = merge(x, labels, num_merges, linkage, "cpu", neighbours=2)
            assert_equal_tensors(got, expected, f"seed {seed}, depth {depth}, {num_merges} merges")


def test_merge_float64_and_half_inputs(merge_available):
    x, _ = identity_world(12, 160, 16, 20)
    labels = torch.arange(160)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        for linkage in LINKAGES:
            expected = merge(x.to(dtype), labels, 50, linkage, "reference")
            got = merge(x.to(dtype), labels, 50, linkage, "cpu")
            assert_equal_tensors(got, expected, f"{linkage} {dtype}")


def compiled_driver_merge(core, x: torch.Tensor, labels: torch.Tensor, num_merges: int, linkage_code: int,
                          size_penalty: float, tile_elements: int, neighbours: int = 1, depth: int = 4,
                          stats: dict | None = None) -> torch.Tensor:
    """One step of csrc/cpu/cluster.cpp's driver (``agglomerative_merge_f32``), which the cpu
    launcher does not call, with torch callbacks for the GEMM, sqrt and exp. ``stats``, when
    given, receives the driver's GEMM passes (``"passes"``) and the tiles it asked for (``"tiles"``)."""
    import ctypes

    _, cluster = torch.unique(labels, sorted=True, return_inverse=True)
    num_clusters = int(cluster.max()) + 1
    points = x[torch.argsort(cluster, stable=True)].float().contiguous()
    counts = torch.bincount(cluster, minlength=num_clusters)
    cluster_start = torch.zeros(num_clusters + 1, dtype=torch.int64)
    cluster_start[1:] = counts.cumsum(0)
    sq_norms = (points * points).sum(1).contiguous()
    sizes = counts.float().contiguous()
    cluster = cluster.contiguous()
    labels_out = torch.empty(x.shape[0], dtype=torch.int64)
    held = []

    tiles = []

    def dots(r0, r1, c0):
        held[:] = [(points[r0:r1] @ points[c0:].T).contiguous()]
        tiles.append(1)
        return held[0].data_ptr()

    def in_place(function):
        def apply(address, count):
            array = (ctypes.c_float * count).from_address(address)
            function(torch.frombuffer(array, dtype=torch.float32))
        return apply

    passes = core.agglomerative_merge_f32(points.shape[0], num_clusters, cluster_start.data_ptr(), sq_norms.data_ptr(),
                                 sizes.data_ptr(), linkage_code, neighbours, size_penalty, num_merges, 16, depth,
                                 tile_elements,
                                 cluster.data_ptr(), x.shape[0], labels_out.data_ptr(), dots,
                                 in_place(torch.Tensor.sqrt_), in_place(torch.Tensor.exp_))
    if stats is not None:
        stats.update(passes=passes, tiles=len(tiles))
    return labels_out


def _greedy_roots(linkage: np.ndarray, num_merges: int) -> list[int]:
    """Kruskal over the upper triangle of ``linkage`` in (value, i, j) order, ``num_merges``
    merges; every cluster's root is the smallest cluster index of its component."""
    count = len(linkage)
    pairs = sorted((linkage[i, j], i, j) for i in range(count) for j in range(i + 1, count))
    root = list(range(count))
    merges = 0
    for _, i, j in pairs:
        if merges == num_merges:
            break
        if root[i] != root[j]:
            old, new = max(root[i], root[j]), min(root[i], root[j])
            root = [new if r == old else r for r in root]
            merges += 1
    return root


def buc_oracle(x: np.ndarray, labels: np.ndarray, num_merges: int, size_penalty: float, squared: bool) -> np.ndarray:
    """Dense NumPy cluster-pair linkages (minimum sample distance, squared or not, + penalty), walked by
    (linkage, i, j), renumbered by first appearance."""
    values = sorted(set(labels.tolist()))
    cluster = np.array([values.index(v) for v in labels.tolist()])
    count = len(values)
    sizes = np.bincount(cluster)
    x = x.astype(np.float64)
    squared_distances = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    minimum = np.full((count, count), np.inf)
    np.minimum.at(minimum, (cluster[:, None].repeat(len(x), 1), cluster[None, :].repeat(len(x), 0)),
                  squared_distances)
    linkage = (minimum if squared else np.sqrt(minimum)) + size_penalty * (sizes[:, None] + sizes[None, :])
    root = _greedy_roots(linkage, num_merges)
    first_seen: dict[int, int] = {}
    return np.array([first_seen.setdefault(root[c], len(first_seen)) for c in cluster.tolist()])


@pytest.mark.parametrize("tile_elements", [7, 1 << 20])
def test_compiled_driver_buc_is_squared_and_buc_l2_plain(core, tile_elements):
    """Codes 2 (buc: squared minimum, BUC's code) and 3 (buc_l2) of the compiled driver: the issue 14
    four-cluster case (A = [0], B = [2], 5 points at 10.0, 5 at 11.5, penalty 0.1: squared merges
    the big pair, plain merges A and B), then random clusters against the NumPy oracle."""
    x = torch.tensor([[0.0], [2.0]] + [[10.0]] * 5 + [[11.5]] * 5)
    labels = torch.tensor([0, 1] + [2] * 5 + [3] * 5)
    squared = compiled_driver_merge(core, x, labels, 1, 2, 0.1, tile_elements)
    assert squared.tolist() == [0, 1] + [2] * 10
    plain = compiled_driver_merge(core, x, labels, 1, 3, 0.1, tile_elements)
    assert plain.tolist() == [0, 0] + [1] * 5 + [2] * 5
    generator = np.random.default_rng(3)
    for trial in range(6):
        x = generator.normal(size=(50, 4)).astype(np.float32)
        labels = generator.integers(0, 20, 50)
        num_merges = len(set(labels.tolist())) // 2
        for code, is_squared in ((2, True), (3, False)):
            got = compiled_driver_merge(core, torch.from_numpy(x), torch.from_numpy(labels), num_merges, code, 0.05,
                                        tile_elements)
            expected = buc_oracle(x, labels, num_merges, 0.05, is_squared)
            assert np.array_equal(got.numpy(), expected), f"trial {trial}, code {code}: {got.tolist()} vs {expected}"


def tssl_oracle(x: np.ndarray, num_merges: int, neighbours: int, typeset: bool) -> np.ndarray:
    """Singletons: dense float64 NumPy TSSL Eq. 8 linkages (``D + exp(2D - (a_i + a_j))``, or as typeset
    ``D + exp(2D) - (a_i + a_j)``; ``a_i`` the mean distance to the ``neighbours`` nearest others),
    walked by (linkage, i, j), renumbered by first appearance."""
    x = x.astype(np.float64)
    count = len(x)
    distances = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    density = np.array([np.sort(np.delete(distances[i], i))[:neighbours].mean() for i in range(count)])
    density_sum = density[:, None] + density[None, :]
    linkage = (distances + np.exp(2 * distances) - density_sum if typeset
               else distances + np.exp(2 * distances - density_sum))
    root = _greedy_roots(linkage, num_merges)
    first_seen: dict[int, int] = {}
    return np.array([first_seen.setdefault(r, len(first_seen)) for r in root])


@pytest.mark.parametrize("depth", [1, 4, 40])
@pytest.mark.parametrize("tile_elements", [7, 1 << 20])
def test_compiled_driver_tssl_and_tssl_typeset(core, tile_elements, depth):
    """Codes 1 (tssl) and 4 (tssl_typeset, Eq. 8 as typeset) of the compiled driver: the line case
    where the readings merge differently (0, 1, 2 dense, 20 and 21.25 sparse with 24 beside them,
    neighbours 2: tssl joins the sparse pair, tssl_typeset the dense one), then random singletons
    against the NumPy oracle; shallow nearest lists force the streaming pass after the first."""
    x = torch.tensor([[0.0], [1.0], [2.0], [20.0], [21.25], [24.0]])
    labels = torch.arange(6)
    assert compiled_driver_merge(core, x, labels, 1, 1, 0.0, tile_elements, 2, depth).tolist() == [0, 1, 2, 3, 3, 4]
    assert compiled_driver_merge(core, x, labels, 1, 4, 0.0, tile_elements, 2, depth).tolist() == [0, 0, 1, 2, 3, 4]
    generator = np.random.default_rng(4)
    for trial in range(4):
        x = generator.normal(size=(40, 3)).astype(np.float32)
        for num_merges in (1, 12, 39):
            for code, typeset in ((1, False), (4, True)):
                got = compiled_driver_merge(core, torch.from_numpy(x), torch.arange(40), num_merges, code, 0.0,
                                            tile_elements, 3, depth)
                expected = tssl_oracle(x, num_merges, 3, typeset)
                assert np.array_equal(got.numpy(), expected), \
                    f"trial {trial}, code {code}, {num_merges} merges: {got.tolist()} vs {expected.tolist()}"


# ============================================================================== evaluation

@pytest.fixture(scope="module")
def ranking_available():
    require_backend("evaluate_ranking", "cpu")


def ranking_problem(seed: int, num_query: int, num_gallery: int, dim: int, num_identities: int,
                    integer: bool = False):
    generator = torch.Generator().manual_seed(seed)
    query_pids = torch.randint(0, num_identities, (num_query,), generator=generator)
    gallery_pids = torch.randint(0, num_identities, (num_gallery,), generator=generator)
    gallery_pids[torch.rand(num_gallery, generator=generator) < 0.1] = -1
    query_cameras = torch.randint(0, 4, (num_query,), generator=generator)
    gallery_cameras = torch.randint(0, 4, (num_gallery,), generator=generator)
    if integer:
        query, gallery = integer_world(seed + 1, num_query, dim), integer_world(seed + 2, num_gallery, dim)
    else:
        centres = torch.nn.functional.normalize(
            torch.randn(num_identities, dim, generator=torch.Generator().manual_seed(seed + 3)), dim=1)
        noise = torch.Generator().manual_seed(seed + 4)
        query = centres[query_pids] + torch.randn(num_query, dim, generator=noise) * 0.15
        gallery = centres[gallery_pids.clamp_min(0)] + torch.randn(num_gallery, dim, generator=noise) * 0.15
    return query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("integer", [False, True])
def test_ranking_equals_reference_at_moderate_size(ranking_available, metric, integer):
    problem = ranking_problem(30, 700, 2500, 6 if integer else 32, 120, integer=integer)
    expected = fastassoc.evaluate_ranking(*problem, metric=metric, max_rank=100, backend="reference")
    got = fastassoc.evaluate_ranking(*problem, metric=metric, max_rank=100, backend="cpu")
    assert_same_ranking(got, expected, f"{metric}, integer={integer}")


def test_ranking_threads_and_tiles_do_not_change_results(core, ranking_available):
    problem = ranking_problem(31, 300, 900, 5, 40, integer=True)
    results = []
    for threads in (1, 2):
        core.set_num_threads(threads)
        for tile in (1, 899, 100_000):
            with fastassoc.tile_limit(tile):
                results.append((threads, tile, fastassoc.evaluate_ranking(*problem, max_rank=30, backend="cpu")))
    for threads, tile, result in results[1:]:
        assert_same_ranking(result, results[0][2], f"{threads} threads, tile_limit({tile}) vs 1 thread, tile 1")
        assert result.mAP == results[0][2].mAP, f"{threads} threads, tile {tile}: mAP not bit-identical"


def test_ranking_float64_and_half_inputs(ranking_available):
    problem = ranking_problem(32, 200, 700, 16, 30)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        cast = (problem[0].to(dtype), problem[1].to(dtype)) + problem[2:]
        expected = fastassoc.evaluate_ranking(*cast, backend="reference")
        got = fastassoc.evaluate_ranking(*cast, backend="cpu")
        assert_same_ranking(got, expected, f"{dtype}")


def test_ranking_peak_memory_below_a_quarter_of_the_matrix(ranking_available):
    # W-eval's proportions (Q x G = 3.2 default tiles) at Q x G = 2.4M: the largest tensor
    # created must stay below Q x G / 4 elements.
    problem = ranking_problem(33, 600, 4000, 8, 200)
    from fastassoc.kernels.cpu import _core
    _core.release_scratch()   # a cached tile buffer would hide the allocation
    with fastassoc.tile_limit(750_000), LargestTensor() as recorder:
        fastassoc.evaluate_ranking(*problem, backend="cpu")
    quarter = 600 * 4000 // 4
    assert recorder.largest < quarter, f"largest tensor {recorder.largest} elements >= Q*G/4 = {quarter}"


# ============================================================================== loss

@pytest.fixture(scope="module")
def loss_available():
    require_backend("segmented_cross_entropy", "cpu")


def loss_problem(seed: int, num_rows: int, segment_sizes: list[int], dim: int, per_row: int,
                 dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    num_classes = sum(segment_sizes)
    features = torch.randn(num_rows, dim, generator=generator).to(dtype)
    weight = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=generator), dim=1).to(dtype)
    dense = torch.zeros(num_rows, num_classes, dtype=torch.float64)
    columns = torch.randint(0, num_classes, (num_rows, per_row), generator=generator)
    dense.scatter_(1, columns, torch.rand(num_rows, per_row, generator=generator, dtype=torch.float64))
    dense[::7] = 0                                   # some rows without targets
    offsets = torch.tensor([0] + segment_sizes).cumsum(0)
    return features, weight, dense.to(dtype).to_sparse_csr(), offsets


def loss_and_grads(features, weight, targets, offsets, scale, backend):
    features = features.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = fastassoc.segmented_cross_entropy(features, weight, targets, class_offsets=offsets, scale=scale,
                                             backend=backend)
    loss.backward()
    return loss.detach(), features.grad, weight.grad


@pytest.mark.parametrize("tile", [None, 13, 700])
def test_loss_equals_reference(loss_available, tile):
    # tile 13 splits every row into many class tiles (the online logsumexp merges them
    # across tiles and segment boundaries); tile 700 holds a few whole rows.
    if tile == 13:
        problem = loss_problem(40, 30, [40, 0, 51, 7, 30], 40, 5)
    else:
        problem = loss_problem(40, 150, [300, 0, 411, 97, 250], 40, 5)
    expected = loss_and_grads(*problem, 8.0, "reference")
    if tile is None:
        got = loss_and_grads(*problem, 8.0, "cpu")
    else:
        with fastassoc.tile_limit(tile):
            got = loss_and_grads(*problem, 8.0, "cpu")
    for name, g, e in zip(("loss", "grad features", "grad weight"), got, expected):
        assert_close_tensors(g, e, f"{name}, tile_limit({tile})", rtol=1e-4, atol=1e-6)


def test_loss_threads_do_not_change_results(core, loss_available):
    problem = loss_problem(41, 120, [500, 300], 24, 3)
    results = {}
    for threads in (1, 2):
        core.set_num_threads(threads)
        results[threads] = loss_and_grads(*problem, 4.0, "cpu")
    for name, g, e in zip(("loss", "grad features", "grad weight"), results[2], results[1]):
        assert_close_tensors(g, e, f"{name}: 2 threads vs 1", rtol=1e-6, atol=1e-7)


def test_loss_gradcheck_float64_with_split_tiles(loss_available):
    features, weight, targets, offsets = loss_problem(42, 6, [4, 0, 5, 3], 5, 3, dtype=torch.float64)
    features.requires_grad_(True)
    weight.requires_grad_(True)

    def loss(f, w):
        return fastassoc.segmented_cross_entropy(f, w, targets, class_offsets=offsets, scale=2.5, backend="cpu")
    with fastassoc.tile_limit(5):
        assert torch.autograd.gradcheck(loss, (features, weight))


def test_loss_never_holds_the_full_logits(loss_available):
    # The public op is one custom-op call to a dispatch mode (its inside is opaque), so the
    # mode watches the cpu backend's forward and backward functions themselves.
    from fastassoc.kernels.cpu.loss import segmented_cross_entropy_backward_cpu, segmented_cross_entropy_forward_cpu

    features, weight, targets, offsets = loss_problem(43, 64, [400, 300], 16, 4)
    crow, col, values = targets.crow_indices(), targets.col_indices(), targets.values()

    def forward_and_backward():
        _, lse, mass = segmented_cross_entropy_forward_cpu(features, weight, crow, col, values, offsets, 1.0)
        return segmented_cross_entropy_backward_cpu(torch.ones(()), features, weight, crow, col, values, offsets,
                                                    lse, mass, 1.0, True, True)

    with fastassoc.tile_limit(1000), LargestTensor() as recorder:
        forward_and_backward()
    # Inputs and gradients ([C, D] = 11,200) are the largest; logit tiles hold <= 1000.
    assert recorder.largest < 64 * 700, f"largest tensor {recorder.largest} elements >= B*C = {64 * 700}"
    # Positive control: one default tile holds all B x C logits, and the mode sees it.
    with LargestTensor() as untiled:
        forward_and_backward()
    assert untiled.largest >= 64 * 700, untiled.largest


def test_loss_half_precision_within_twice_the_reference_error(loss_available):
    for dtype in (torch.float16, torch.bfloat16):
        features, weight, targets, offsets = loss_problem(44, 50, [60, 40], 16, 3, dtype=dtype)
        exact = loss_and_grads(features.double(), weight.double(), targets.to(torch.float64), offsets, 3.0,
                               "reference")
        reference = loss_and_grads(features, weight, targets, offsets, 3.0, "reference")
        got = loss_and_grads(features, weight, targets, offsets, 3.0, "cpu")
        for name, g, r, e in zip(("loss", "grad features", "grad weight"), got, reference, exact):
            error = (g.double() - e).abs().max().item()
            reference_error = (r.double() - e).abs().max().item()
            assert error <= 2 * reference_error + 1e-3, f"{dtype} {name}: error {error} vs reference {reference_error}"


# ============================================================================== memory

@pytest.fixture(scope="module")
def ema_available():
    require_backend("ema_update_", "cpu")


@pytest.mark.parametrize("reduce", ["mean", "sum", "sequential"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("num_rows", [300, 1_000_000])
def test_ema_equals_reference_small_and_huge_banks(ema_available, reduce, normalize, num_rows):
    # 300 rows: grouped by a counting sort; 1M rows for a 500-value batch: by a stable sort.
    generator = torch.Generator().manual_seed(50)
    bank = torch.randn(num_rows, 16, generator=generator)
    index = torch.randint(0, 120, (500,), generator=generator) * (num_rows // 120)
    values = torch.randn(500, 16, generator=generator)
    expected, got = bank.clone(), bank.clone()
    fastassoc.ema_update_(expected, index, values, 0.7, normalize=normalize, reduce=reduce, backend="reference")
    fastassoc.ema_update_(got, index, values, 0.7, normalize=normalize, reduce=reduce, backend="cpu")
    touched = torch.unique(index)
    assert_close_tensors(got[touched], expected[touched], f"{reduce} normalize={normalize} M={num_rows}")
    untouched = torch.ones(num_rows, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(got[untouched], bank[untouched]), "rows outside index changed"


def test_ema_threads_do_not_change_results(core, ema_available):
    generator = torch.Generator().manual_seed(51)
    bank = torch.randn(200, 64, generator=generator)
    index = torch.randint(0, 50, (4000,), generator=generator)
    values = torch.randn(4000, 64, generator=generator)
    for reduce in ("mean", "sum", "sequential"):
        results = {}
        for threads in (1, 2):
            core.set_num_threads(threads)
            results[threads] = bank.clone()
            fastassoc.ema_update_(results[threads], index, values, 0.9, reduce=reduce, backend="cpu")
        assert_equal_tensors(results[2], results[1], f"{reduce}: 2 threads vs 1")


def test_ema_rows_beyond_int32_offsets(ema_available):
    # bank[M, D] with M*D > 2**31: the last rows start past any int32 element offset. The
    # bank is allocated lazily (untouched pages of a fresh mapping cost no memory) and the
    # backend is called directly, because the public op's finiteness check reads the bank.
    from fastassoc.kernels.cpu.memory import ema_update_cpu
    num_rows, dim = 2**21 + 3, 1024
    try:
        bank = torch.empty(num_rows, dim)
    except RuntimeError:
        pytest.skip("cannot reserve 8 GiB of address space")
    index = torch.tensor([num_rows - 1, 5, num_rows - 1, num_rows - 2])
    generator = torch.Generator().manual_seed(52)
    start = torch.randn(3, dim, generator=generator)
    values = torch.randn(4, dim, generator=generator)
    bank[num_rows - 2], bank[num_rows - 1], bank[5] = start[0], start[1], start[2]
    ema_update_cpu(bank, index, values, 0.5, False, "mean")
    assert (num_rows - 1) * dim > 2**31
    assert_close_tensors(bank[num_rows - 1], 0.5 * start[1] + 0.25 * (values[0] + values[2]), "last row")
    assert_close_tensors(bank[num_rows - 2], 0.5 * start[0] + 0.5 * values[3], "second to last row")
    assert_close_tensors(bank[5], 0.5 * start[2] + 0.5 * values[1], "row 5")
    del bank


def test_ema_half_bank_updates_only_touched_rows(ema_available):
    generator = torch.Generator().manual_seed(53)
    bank = torch.randn(100, 32, generator=generator).to(torch.bfloat16)
    index = torch.tensor([3, 7, 3, 99])
    values = torch.randn(4, 32, generator=generator).to(torch.bfloat16)
    expected, got = bank.clone(), bank.clone()
    fastassoc.ema_update_(expected, index, values, 0.8, reduce="sequential", backend="reference")
    fastassoc.ema_update_(got, index, values, 0.8, reduce="sequential", backend="cpu")
    assert_close_tensors(got.float(), expected.float(), "bfloat16 bank", rtol=1e-2, atol=1e-2)
    others = torch.ones(100, dtype=torch.bool)
    others[index] = False
    assert torch.equal(got[others], bank[others]), "rows outside index changed"
