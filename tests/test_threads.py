"""Thread control of the compiled CPU core (issue 11, "a shared CPU").

The core's OpenMP regions use torch's thread count for the calling thread
(``torch.get_num_threads()``) unless ``fastassoc._C.set_num_threads(n)`` overrides it;
the override never changes torch's own count, and ``set_num_threads(None)`` returns to
following torch. ``parallel_region_threads()`` opens a region the way the kernels do and
reports how many threads actually ran it, so these tests observe the team, not a setting.
Results must not depend on the thread count. No timing here: bench/bench_shared_cpu.py
measures the shared-CPU behaviour.

A shared CPU (issue 11): every parallel region waits for its slowest thread, so with
another busy process on the box each region can cost a descheduled thread's time slice.
The ops therefore open few regions per call. ``parallel_regions()`` counts the regions
the core's kernels fork; torch's own regions (one or two per elementwise op or reduction
above its grain size) are bounded by counting the torch calls an op makes with a
``TorchDispatchMode``, and the chunked row passes are checked bit for bit against the
one-shot torch expressions they replace.
"""
from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastassoc
from fastassoc import _backend
from fastassoc.kernels.cpu import _core, graph, knn

_CORE = _backend.compiled_core()
pytestmark = [pytest.mark.skipif(_CORE is None, reason="the compiled core is not built"),
              pytest.mark.skipif(_CORE is not None and not _CORE.has_openmp(),
                                 reason="the compiled core was built without OpenMP (one thread)")]


@pytest.fixture
def core():
    """The compiled core; torch's thread count and the core's override restored afterwards."""
    module = _backend.compiled_core()
    torch_threads = torch.get_num_threads()
    override = module.num_threads_override()
    yield module
    torch.set_num_threads(torch_threads)
    module.set_num_threads(override)


def small_topk():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    return fastassoc.topk_anchors(x, x, k=3, backend="cpu")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_core_follows_torch_thread_count(core, threads):
    core.set_num_threads(None)
    torch.set_num_threads(threads)
    small_topk()      # a launcher call reports torch's count to the core
    assert core.num_threads_override() is None
    assert core.get_num_threads() == threads
    assert core.parallel_region_threads() == threads


def test_core_follows_torch_in_another_python_thread(core):
    core.set_num_threads(None)
    torch.set_num_threads(1)
    seen = {}

    def worker():
        small_topk()
        seen["torch"] = torch.get_num_threads()
        seen["core"] = core.get_num_threads()
        seen["region"] = core.parallel_region_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["core"] == seen["torch"], seen
    assert seen["region"] == seen["torch"], seen


def test_override_wins_and_leaves_torch_alone(core):
    torch.set_num_threads(2)
    core.set_num_threads(1)
    small_topk()
    assert core.num_threads_override() == 1
    assert core.get_num_threads() == 1
    assert core.parallel_region_threads() == 1
    assert torch.get_num_threads() == 2, "the core's override changed torch's thread count"

    torch.set_num_threads(1)
    core.set_num_threads(2)
    small_topk()
    assert core.parallel_region_threads() == 2
    assert torch.get_num_threads() == 1

    core.set_num_threads(None)
    small_topk()
    assert core.num_threads_override() is None
    assert core.parallel_region_threads() == 1, "set_num_threads(None) did not return to torch's count"


def test_override_applies_to_every_python_thread(core):
    torch.set_num_threads(2)
    core.set_num_threads(1)
    seen = {}

    def worker():
        small_topk()
        seen["region"] = core.parallel_region_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["region"] == 1


@pytest.mark.parametrize("bad", [0, -1, 1 << 17, 1.5, True, "2"])
def test_set_num_threads_rejects_bad_counts(core, bad):
    with pytest.raises((ValueError, TypeError), match="num_threads"):
        core.set_num_threads(bad)
    assert core.num_threads_override() is None or core.num_threads_override() >= 1


def test_launcher_hook_reports_torch_count(core):
    core.set_num_threads(None)
    torch.set_num_threads(1)
    _core.core()
    assert core.get_num_threads() == 1
    torch.set_num_threads(2)
    _core.core()
    assert core.get_num_threads() == 2


# ------------------------------------------------------------------ results do not depend on threads

def tied_features(n: int, dim: int, seed: int) -> torch.Tensor:
    """Small integers: many exactly equal distances, so tie-breaking is exercised."""
    return torch.randint(-2, 3, (n, dim), generator=torch.Generator().manual_seed(seed)).float()


def run_ops():
    """Every compiled distance op at sizes above the kernels' parallel thresholds."""
    x = tied_features(700, 12, 1)
    y = tied_features(500, 12, 2)
    cameras = torch.randint(0, 4, (4200,), generator=torch.Generator().manual_seed(3))
    graph_x = tied_features(4200, 6, 4)
    labels = torch.arange(800)
    pids_q = torch.randint(0, 30, (300,), generator=torch.Generator().manual_seed(5))
    pids_g = torch.randint(0, 30, (700,), generator=torch.Generator().manual_seed(6))
    cams_q = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(7))
    cams_g = torch.randint(0, 4, (700,), generator=torch.Generator().manual_seed(8))
    q = tied_features(300, 12, 9)
    g = tied_features(700, 12, 10)
    rerank_x = torch.randn(1200, 16, generator=torch.Generator().manual_seed(12))
    jaccard = fastassoc.jaccard_distance(rerank_x, 20, 6, backend="cpu")
    loss_features, loss_weight, loss_targets, loss_offsets = loss_problem()
    results = {
        "topk_anchors": fastassoc.topk_anchors(y, x, k=5, backend="cpu"),
        "topk_anchors self": fastassoc.topk_anchors(x, x, k=5, exclude=torch.arange(700), backend="cpu"),
        "mutual_knn": fastassoc.mutual_knn(x, y, k=4, backend="cpu"),
        "cross_camera_graph": tuple(fastassoc.cross_camera_graph(graph_x, cameras, k=2, backend="cpu",
                                                                 as_tuple=True)),
        "knn_soft_labels": tuple(fastassoc.knn_soft_labels(graph_x, cameras, k=3, backend="cpu", as_tuple=True)),
        "agglomerative_merge": fastassoc.agglomerative_merge(tied_features(800, 12, 11), labels, 60,
                                                             linkage="centroid", backend="cpu"),
        "evaluate_ranking": fastassoc.evaluate_ranking(q, g, pids_q, pids_g, cams_q, cams_g, max_rank=10,
                                                       backend="cpu"),
        "jaccard_distance": (jaccard.crow_indices(), jaccard.col_indices(), jaccard.values()),
        "jaccard_distance bounded": fastassoc.jaccard_distance(rerank_x, 20, 6, max_distance=0.8,
                                                               backend="cpu").values(),
        "dbscan": fastassoc.dbscan(jaccard, 0.6, 4, backend="cpu"),
        # The loss total: summed over rows in row order whatever the team (an OpenMP
        # reduction's order followed the team before).
        "segmented_cross_entropy": fastassoc.segmented_cross_entropy(
            loss_features, loss_weight, loss_targets, class_offsets=loss_offsets, scale=10.0, backend="cpu"),
    }
    return results


def loss_problem():
    """512 rows, 2,048 classes in 64 segments, 3 targets a row: above the loss kernels' parallel
    sizes. float64, so that the double total's last bits reach the result."""
    generator = torch.Generator().manual_seed(13)
    features = torch.nn.functional.normalize(torch.randn(512, 16, generator=generator, dtype=torch.float64), dim=1)
    weight = torch.nn.functional.normalize(torch.randn(2048, 16, generator=generator, dtype=torch.float64), dim=1)
    columns = torch.randint(0, 2048, (512, 3), generator=generator).sort(1).values
    crow = torch.arange(0, 512 * 3 + 1, 3)
    values = torch.rand(512 * 3, generator=generator, dtype=torch.float64)
    targets = fastassoc.CSRMatrix(crow, columns.flatten(), values, (512, 2048))
    return features, weight, targets, torch.arange(0, 2049, 32)


def flatten(value):
    if isinstance(value, torch.Tensor):
        if value.layout == torch.sparse_csr:
            return [value.crow_indices(), value.col_indices(), value.values()]
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flatten(item)]
    if dataclasses.is_dataclass(value):
        return [t for field in dataclasses.fields(value) for t in flatten(getattr(value, field.name))]
    return [torch.as_tensor(value)]


@pytest.mark.parametrize("how", ["override", "torch"])
def test_results_identical_with_one_and_two_threads(core, how):
    outputs = {}
    for threads in (1, 2):
        if how == "override":
            core.set_num_threads(threads)
        else:
            core.set_num_threads(None)
            torch.set_num_threads(threads)
        outputs[threads] = run_ops()
        assert core.parallel_region_threads() == threads
    for name, one in outputs[1].items():
        two = outputs[2][name]
        for position, (a, b) in enumerate(zip(flatten(one), flatten(two), strict=True)):
            assert a.shape == b.shape and a.dtype == b.dtype, f"{name}[{position}]: {a.shape} vs {b.shape}"
            same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
            if not bool(same.all()):
                first = tuple(torch.nonzero(~same)[0].tolist())
                raise AssertionError(f"{name}[{position}] differs with 2 threads at {first}: "
                                     f"{a[first].item()!r} (1 thread) vs {b[first].item()!r}")


# ------------------------------------------------------------------ few parallel regions per call

class TorchCalls(TorchDispatchMode):
    """Counts the aten operators (by name) that run inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def regions_of(core, function):
    """Parallel regions with more than one thread the core's kernels opened during ``function()``."""
    before = core.parallel_regions()
    function()
    return core.parallel_regions() - before


def test_region_counter_counts_forked_regions_only(core):
    core.set_num_threads(2)
    assert regions_of(core, core.parallel_region_threads) == 1
    core.set_num_threads(1)
    assert regions_of(core, core.parallel_region_threads) == 0, "a one-thread region was counted as forked"


def test_tile_update_is_one_region_for_both_list_sides(core):
    core.set_num_threads(2)
    generator = torch.Generator().manual_seed(20)
    rows, cols = torch.randn(300, 16, generator=generator), torch.randn(400, 16, generator=generator)
    row_lists, col_lists = knn.new_lists(300, 5, torch.float32), knn.new_lists(400, 5, torch.float32)
    tiles = _core.DotTiles.for_blocks([(300, 400)], torch.float32)
    count = regions_of(core, lambda: knn.block_topk(
        tiles, rows, cols, "sqeuclidean", 5, row_norms=(rows * rows).sum(1), col_norms=(cols * cols).sum(1),
        row_lists=row_lists, col_lists=col_lists))
    assert count == 1, f"one 300 x 400 tile opened {count} regions (row and column passes share one)"
    # Both sides were filled: each list's head is its nearest (random data, no ties).
    distances = ((rows * rows).sum(1)[:, None] + (cols * cols).sum(1)[None, :] - 2 * rows @ cols.T).clamp_min(0)
    assert torch.equal(row_lists[1][:, 0], distances.argmin(1))
    assert torch.equal(col_lists[1][:, 0], distances.argmin(0))


def test_small_tiles_run_on_the_calling_thread(core):
    core.set_num_threads(2)
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(21))
    count = regions_of(core, lambda: fastassoc.topk_anchors(x, x, k=3, backend="cpu"))
    assert count == 0, f"a 20 x 20 search forked {count} regions"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (37, 3), (1000, 24), (129, 1025)])
@pytest.mark.parametrize("chunk", [1, 50, 1 << 22])
def test_chunked_row_passes_equal_torch_bit_for_bit(monkeypatch, dtype, shape, chunk):
    monkeypatch.setattr(_core, "ROW_CHUNK_ELEMENTS", chunk)
    generator = torch.Generator().manual_seed(22)
    x = (torch.randn(shape, generator=generator, dtype=dtype)
         * torch.rand(shape[0], 1, generator=generator, dtype=dtype) * 100)
    stats = _core.RowStats(x)
    assert torch.equal(stats.sq, (x * x).sum(1))
    assert torch.equal(stats.length, x.norm(dim=1))
    assert torch.equal(_core.squared_norms(x, "sqeuclidean"), (x * x).sum(1))
    half = shape[0] // 2
    # A slice of the op-wide statistics is what a block computes for itself.
    assert torch.equal(stats[half:].sq, (x[half:] * x[half:]).sum(1))
    assert torch.equal(stats[:half].length, x[:half].norm(dim=1))


@pytest.mark.parametrize("chunk", [4, 1 << 22])
def test_pair_dots_equal_torch_bit_for_bit(monkeypatch, chunk):
    monkeypatch.setattr(_core, "ROW_CHUNK_ELEMENTS", chunk)
    generator = torch.Generator().manual_seed(23)
    xn = torch.nn.functional.normalize(torch.randn(300, 33, generator=generator), dim=1)
    low = torch.randint(0, 300, (1001,), generator=generator)
    high = torch.randint(0, 300, (1001,), generator=generator)
    assert torch.equal(graph._pair_dots(xn, low, high), (xn[low] * xn[high]).sum(1))


@pytest.mark.parametrize(("rows", "dim", "most"), [(8298, 1024, 5), (2048, 256, 1)])
def test_squared_norms_are_a_few_torch_passes(rows, dim, most):
    # Two torch regions per chunk. 1,024-row chunks made 9 passes over the anchors
    # (8,298 x 1,024) and 2 over a 2,048 x 256 block.
    x = torch.full((rows, dim), 0.5)
    with TorchCalls() as calls:
        norms = _core.squared_norms(x, "sqeuclidean")
    assert calls.counts["sum"] <= most and calls.counts["mul"] <= most, dict(calls.counts)
    assert bool((norms == dim / 4).all())


def test_cross_camera_graph_work_is_gathered_per_camera(core, monkeypatch):
    # Ten cameras, 45 camera pairs. The error bounds' row norms and squared norms are computed
    # once per call (not per pair and side: 180 reductions before), camera t meets all later
    # cameras in one GEMM (not one per pair) and the candidates of all of t's pairs are
    # rescored in one exact-distance call (not two per pair).
    generator = torch.Generator().manual_seed(24)
    x = torch.randn(1500, 16, generator=generator)
    cameras = torch.randint(0, 10, (1500,), generator=generator)
    rescorings = []
    exact_distances = graph._screen.exact_distances
    monkeypatch.setattr(graph._screen, "exact_distances",
                        lambda *args, **kwargs: rescorings.append(1) or exact_distances(*args, **kwargs))
    core.set_num_threads(2)
    before = core.parallel_regions()
    with TorchCalls() as calls:
        result = graph.cross_camera_graph_cpu(x, cameras, 10, 3, None, False, "pairwise", "full")
    # Per camera: one tile-update region for all its pairs, one rescoring region.
    assert core.parallel_regions() - before <= 2 * 9, "the core forked more than two regions per camera"
    assert calls.counts["linalg_vector_norm"] <= 2, dict(calls.counts)
    assert calls.counts["sum"] <= 4, dict(calls.counts)
    assert calls.counts["mm"] <= 9, dict(calls.counts)
    assert len(rescorings) <= 9, f"{len(rescorings)} exact-distance calls for 10 cameras"
    expected = fastassoc.cross_camera_graph(x, cameras, k=3, self_loops=False, mode="pairwise",
                                            backend="reference")
    assert torch.equal(result.crow_indices(), expected.crow_indices())
    assert torch.equal(result.col_indices(), expected.col_indices())
    assert torch.equal(result.values(), expected.values())


# ------------------------------------------------------------------ region budgets of the other families

def test_agglomerative_merge_regions_do_not_grow_with_merges(core):
    # The cpu launcher's regions are those of the exact self-join that lists every cluster's
    # nearest (csrc/cpu/knn.cpp, screen.cpp; the merge walk itself is torch and Python), so a
    # call opens the same few whatever the number of merges or the linkage.
    core.set_num_threads(2)
    x = torch.randn(800, 12, generator=torch.Generator().manual_seed(30))
    labels = torch.arange(800)
    counts = {}
    for linkage in ("centroid", "tssl"):
        for merges in (5, 300):
            result = []
            counts[linkage, merges] = regions_of(core, lambda: result.append(fastassoc.agglomerative_merge(
                x, labels, merges, linkage=linkage, backend="cpu")))
            assert len(torch.unique(result[0])) == 800 - merges, (linkage, merges)
    assert max(counts.values()) <= 8, counts      # 6 on this tree
    assert len(set(counts.values())) == 1, f"regions per call depend on merges or linkage: {counts}"


class KernelRegions:
    """Regions forked inside each compiled kernel that fastassoc.kernels.cpu calls through ``_core.kernel``."""

    def __init__(self, core, monkeypatch):
        self.counts = collections.Counter()
        self.calls = collections.Counter()
        original = _core.kernel

        def kernel(name):
            function = original(name)

            def counted(*args, **kwargs):
                before = core.parallel_regions()
                try:
                    return function(*args, **kwargs)
                finally:
                    self.counts[name] += core.parallel_regions() - before
                    self.calls[name] += 1
            return counted
        monkeypatch.setattr(_core, "kernel", kernel)


@pytest.mark.parametrize("max_distance", [None, 0.8])
def test_jaccard_and_dbscan_kernels_open_few_counted_regions(core, monkeypatch, max_distance):
    # The encoding (reciprocal sets, weights, query expansion) is one region, the Jaccard
    # passes (counting, writing) one, DBSCAN one, the centres one; every one of them counted
    # (before: 4 + 2 + 2 + 1 regions, none counted).
    core.set_num_threads(2)
    x = torch.randn(1200, 32, generator=torch.Generator().manual_seed(31))
    kernels = KernelRegions(core, monkeypatch)
    total = regions_of(core, lambda: fastassoc.jaccard_distance(x, 20, 6, max_distance=max_distance, backend="cpu"))
    assert kernels.counts["rerank_encode"] == 1, dict(kernels.counts)
    assert kernels.counts["rerank_jaccard"] == 1, dict(kernels.counts)
    # Everything else is the nearest lists' exact self-join (csrc/cpu/knn.cpp, screen.cpp: tile
    # updates, list sorts, rescoring; 11 or so here), whose budget is the knn family's.
    search = sum(count for name, count in kernels.counts.items() if name.startswith(("knn_", "screen_")))
    assert total - search == 2, f"jaccard_distance opened {total} regions ({dict(kernels.counts)})"
    jaccard = fastassoc.jaccard_distance(x, 20, 6, backend="cpu")
    assert jaccard.values().numel() >= 1 << 15, "below rerank_dbscan's parallel size"
    labels = []
    assert regions_of(core, lambda: labels.append(fastassoc.dbscan(jaccard, 0.6, 4, backend="cpu"))) == 1
    assert kernels.counts["rerank_dbscan"] == 1
    assert torch.equal(labels[0], torch.from_numpy(dbscan_oracle(jaccard, 0.6, 4)))
    centres = []
    count = regions_of(core, lambda: centres.append(fastassoc.cluster_centres(x, labels[0], backend="cpu")))
    assert count == 1 and kernels.counts["rerank_cluster_centres"] == 1, dict(kernels.counts)
    clustered = labels[0] >= 0
    sums = torch.zeros(centres[0][0].shape, dtype=torch.float64).index_add_(0, labels[0][clustered],
                                                                           x[clustered].double())
    expected = (sums / torch.bincount(labels[0][clustered]).clamp_min(1)[:, None]).float()
    assert torch.allclose(centres[0][0], expected, rtol=1e-5, atol=1e-6)


def dbscan_oracle(matrix: torch.Tensor, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN labels from the definition (scipy components of the core-core graph): stored
    entries <= eps are neighbours, core points have >= min_samples of them (the stored zero
    diagonal included), clusters numbered by their smallest core point, a border point takes
    the smallest number among its core neighbours, -1 for noise."""
    count = matrix.shape[0]
    crow, cols = matrix.crow_indices().numpy(), matrix.col_indices().numpy()
    rows = np.repeat(np.arange(count), np.diff(crow))
    keep = matrix.values().numpy() <= eps
    near = scipy.sparse.csr_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(count, count))
    is_core = np.asarray(near.sum(1)).ravel() >= min_samples
    core_only = scipy.sparse.diags(is_core.astype(float))
    _, component = scipy.sparse.csgraph.connected_components(core_only @ near @ core_only, directed=False)
    number, labels = {}, np.full(count, -1)
    for point in np.flatnonzero(is_core):
        labels[point] = number.setdefault(component[point], len(number))
    near = near.tolil()
    for point in np.flatnonzero(~is_core):
        found = [labels[j] for j in near.rows[point] if is_core[j]]
        labels[point] = min(found) if found else -1
    return labels


def driver_merge(core, x: torch.Tensor, labels: torch.Tensor, num_merges: int, linkage_code: int,
                 tile_elements: int, depth: int):
    """csrc/cpu/cluster.cpp's driver (the cpu launcher does not call it) through
    tests/ops/test_cpu_agg_kernels.py's harness. Returns (labels, GEMM passes, tiles requested)."""
    from ops.test_cpu_agg_kernels import compiled_driver_merge
    stats = {}
    merged = compiled_driver_merge(core, x, labels, num_merges, linkage_code, 0.01, tile_elements, 3, depth,
                                   stats=stats)
    return merged, stats["passes"], stats["tiles"]


@pytest.mark.parametrize("tile_elements", [1 << 16, 1 << 22])
def test_merge_driver_regions_per_tile(core, tile_elements):
    # Each tile of a GEMM pass opens at most two regions (squared distances; then, after
    # torch's sqrt, linkages, pair offers and both nearest-list passes together); tssl's pair
    # passes one more for the exponents before torch's exp. Before: tssl 4 per pair-pass tile
    # and 3 per nearest-pass tile, none of them counted. Labels do not depend on the team.
    x = torch.randn(600, 16, generator=torch.Generator().manual_seed(32))
    x[5] = x[9]
    for code in range(5):        # centroid, tssl, buc, buc_l2, tssl_typeset
        labels = torch.arange(600) // (2 if code in (2, 3) else 1)
        results = {}
        for threads in (1, 2):
            core.set_num_threads(threads)
            before = core.parallel_regions()
            results[threads] = driver_merge(core, x, labels, 100, code, tile_elements, depth=8)
            count = core.parallel_regions() - before
            if threads == 1:
                assert count == 0
        merged, passes, tiles = results[2]
        assert torch.equal(merged, results[1][0]), f"linkage code {code}: labels differ with 2 threads"
        assert len(torch.unique(merged)) == int(labels.max()) + 1 - 100
        tssl = code in (1, 4)
        # tssl's first pass collects nearest lists (two regions a tile), its later passes offer pairs.
        per_tile = 3 if tssl else 2
        nearest_tiles = tiles // passes if tssl else 0
        assert 1 <= count <= 2 * nearest_tiles + per_tile * (tiles - nearest_tiles), \
            f"linkage code {code}: {count} regions for {tiles} tiles in {passes} passes"


def test_validation_reads_each_tensor_once():
    # Every pass over a large CPU tensor is one of torch's parallel regions. The loss op's
    # checks read features and weight once each (the scale check is handed the max|x| that
    # features_with_peak read: 4 aminmax before), and the camera count comes from the range
    # check's aminmax (a separate max pass before).
    from fastassoc.ops import _checks
    generator = torch.Generator().manual_seed(33)
    features, weight = torch.randn(512, 64, generator=generator), torch.randn(2048, 64, generator=generator)
    with TorchCalls() as calls:
        checked_features, features_peak = _checks.features_with_peak("features", features)
        checked_weight, weight_peak = _checks.features_with_peak("weight", weight)
        peaks = (features_peak, weight_peak)
        assert _checks.logit_scale(30.0, checked_features, checked_weight, peaks=peaks) == 30.0
    assert calls.counts["aminmax"] == 2, dict(calls.counts)
    with pytest.raises(ValueError, match="scale=1e\\+37 makes the logits"):
        _checks.logit_scale(1e37, checked_features, checked_weight, peaks=peaks)
    # Without the peaks the scale check reads both tensors itself, and sees a changed one.
    checked_weight[7, 3] = 1e37
    with TorchCalls() as calls, pytest.raises(ValueError, match="makes the logits"):
        _checks.logit_scale(30.0, checked_features, checked_weight)
    assert calls.counts["aminmax"] == 2, dict(calls.counts)
    cameras = torch.randint(0, 6, (5000,), generator=generator)
    cameras[17] = 9
    with TorchCalls() as calls:
        ids, count = _checks.camera_ids("cameras", cameras, num_rows=5000)
    assert count == 10 and torch.equal(ids, cameras)
    assert calls.counts["aminmax"] == 1 and calls.counts["max"] == 0, dict(calls.counts)


# ----------------------------------------------------------------------------- waiting
# The wait policy (csrc/cpu/core.cpp, "Waiting"): while a holder thread keeps an extra,
# sleeping OpenMP pool, the process has more OpenMP threads than CPUs and libgomp throttles
# every worker's spinning (its documented GOMP_SPINCOUNT rule). Observed here through the CPU
# time torch's worker burns after its regions while the calling thread sleeps.

def _worker_cpu_seconds() -> float:
    """CPU time of this process's threads other than the main one."""
    import os
    main, ticks = os.getpid(), 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == main:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:        # the thread ended meanwhile
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _burn_after_regions(rounds: int = 30) -> float:
    """Worker CPU seconds over ``rounds`` parallel torch GEMMs, each followed by a 20 ms sleep."""
    import time
    a = torch.randn(384, 384, generator=torch.Generator().manual_seed(3))
    a @ a
    time.sleep(0.05)
    before = _worker_cpu_seconds()
    for _ in range(rounds):
        a @ a
        time.sleep(0.02)
    return _worker_cpu_seconds() - before


def _wait_until(predicate, seconds: float = 10.0, poke=None) -> bool:
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if poke is not None:
            poke()
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def policy(core):
    """The core with its wait policy restored (and the throttle released) afterwards."""
    previous = core.wait_policy()
    yield core
    core.set_wait_policy("active")
    _wait_until(lambda: not core.spin_throttled())
    core.set_wait_policy(previous)


needs_two_cpus = pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2,
                                    reason="spinning workers need a second CPU")


def test_wait_policy_rejects_unknown_names(policy, monkeypatch):
    with pytest.raises(ValueError, match="policy must be 'auto', 'active' or 'passive', got 'lazy'"):
        policy.set_wait_policy("lazy")
    assert policy.wait_policy() in _backend.WAIT_POLICIES
    monkeypatch.setenv("FASTASSOC_WAIT_POLICY", "sometimes")
    with pytest.raises(ValueError, match="FASTASSOC_WAIT_POLICY must be one of .*'sometimes'"):
        _backend._with_wait_policy(policy)
    monkeypatch.setenv("FASTASSOC_WAIT_POLICY", " Passive ")
    _backend._with_wait_policy(policy)
    assert policy.wait_policy() == "passive"


@needs_two_cpus
def test_passive_policy_stops_workers_spinning_and_active_restores_it(policy):
    torch.set_num_threads(2)
    policy.set_wait_policy("active")
    assert _wait_until(lambda: not policy.spin_throttled())
    spinning = _burn_after_regions()
    policy.set_wait_policy("passive")
    small_topk()                     # engaged on a kernel entry
    assert _wait_until(lambda: policy.spin_throttled() and policy.throttle_pool_threads() >= 2)
    throttled = _burn_after_regions()
    # Unthrottled, the worker spins ~5 ms (GOMP_SPINCOUNT) after each of the 30 GEMMs.
    assert spinning >= 0.05, spinning
    assert throttled <= 0.5 * spinning, (throttled, spinning)
    policy.set_wait_policy("active")
    assert _wait_until(lambda: not policy.spin_throttled())
    assert _burn_after_regions() >= 0.05


@needs_two_cpus
def test_auto_policy_engages_while_another_process_competes_then_releases(policy):
    import subprocess
    import sys
    torch.set_num_threads(2)
    policy.set_wait_policy("auto")
    engagements = policy.throttle_engagements()
    competitors = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                   for _ in range(max(1, len(__import__("os").sched_getaffinity(0)) - 1))]
    try:
        assert _wait_until(policy.cpus_contended, 20.0), "the probe does not see the competitors"
        assert _wait_until(policy.spin_throttled, 20.0, poke=small_topk), "not engaged under contention"
    finally:
        for competitor in competitors:
            competitor.kill()
            competitor.wait()
    assert policy.throttle_engagements() > engagements
    if not _wait_until(lambda: not policy.spin_throttled(), 20.0):
        # Released only after 0.1 s without contention: on a box that other work keeps busy
        # (the probe says so) that moment does not come, and there is nothing to check.
        if policy.cpus_contended():
            pytest.skip("other processes keep this machine's CPUs contended")
        raise AssertionError("still throttled after the competitor ended on a quiet CPU")


def test_results_do_not_depend_on_the_wait_policy(policy):
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(300, 24, generator=generator)
    cameras = torch.randint(0, 3, (300,), generator=generator)
    results = []
    for name in ("active", "passive"):
        policy.set_wait_policy(name)
        values, indices = fastassoc.topk_anchors(x[:50], x, k=5, backend="cpu")
        labels = fastassoc.knn_soft_labels(x, cameras, 4, backend="cpu")
        results.append((values, indices, labels))
    assert policy.spin_throttled()
    (v1, i1, l1), (v2, i2, l2) = results
    assert torch.equal(v1, v2) and torch.equal(i1, i2)
    assert all(torch.equal(a, b) for a, b in zip(flatten(l1), flatten(l2), strict=True))


def _child_topk(queue):
    # As torch's DataLoader workers do: libgomp's pool does not survive fork(), and a region of
    # more than one thread in the child waits for the parent's workers forever (torch's own
    # GEMMs included), so forked workers run one thread.
    torch.set_num_threads(1)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(4))
    values, indices = fastassoc.topk_anchors(x, x, k=3, backend="cpu")
    queue.put(indices[:, 0].tolist())


def test_forked_child_of_a_throttled_process_runs_kernels(policy):
    # Data-loader workers fork from training processes; the holder thread does not survive
    # fork(), and the child's kernels must neither wait for it nor for its pool.
    import multiprocessing
    policy.set_wait_policy("passive")
    small_topk()
    assert _wait_until(policy.spin_throttled)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_topk, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0, child.exitcode
    assert queue.get(timeout=5) == list(range(200))
