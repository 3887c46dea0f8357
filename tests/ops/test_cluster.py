"""Tests of agglomerative_merge on every backend against a NumPy brute force of the whole step.

The oracle builds the dense C x C linkage matrix, sorts all pairs ``i < j`` by
``(linkage, i, j)`` and walks them with its own component relabelling, then renumbers
by first appearance. It never calls fastassoc.

Exactness: features are small integers and cluster sizes are 1, 2 or 4, so cluster means,
squared distances and their sums are exact in float32; ``sqrt`` and the remaining steps are
correctly rounded, and the oracle mirrors the spec's float32 operation order (``a_i`` summed
in ascending order, ``a_i + a_j`` rounded before ``2 D - (.)``, and for ``tssl_typeset``
``(D + exp(2 D)) - (a_i + a_j)`` in that order). Ties between pairs are
therefore real and must be broken by ``(i, j)`` exactly as the oracle does. Continuous random
data (any cluster sizes) is compared in float64 by the oracle; it is well separated.
A single-linkage cross-check against scipy covers ``buc`` with ``size_penalty=0``, where the
frozen-distance greedy walk is Kruskal's algorithm. ``buc`` (squared distances) is also checked
against a sample-pair walk written as the public BUC code ranks pairs (squared distance plus
``ratio_n (|C_i| + |C_j|)`` for every sample pair, same-cluster pairs excluded).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastassoc
from conftest import require_backend

OP = "agglomerative_merge"
LINKAGES = ("tssl", "tssl_typeset", "centroid", "buc", "buc_l2")
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------- oracle

def oracle_linkage(x: np.ndarray, cluster: np.ndarray, num_clusters: int, linkage: str, neighbours: int,
                   size_penalty: float, dtype) -> np.ndarray:
    """Dense [C, C] linkage matrix in ``dtype`` (float32 mirrors the spec's float32 path)."""
    x = x.astype(dtype)
    sizes = np.bincount(cluster, minlength=num_clusters)
    if linkage in ("buc", "buc_l2"):
        squared = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1, dtype=dtype)
        minimum = np.full((num_clusters, num_clusters), np.inf, dtype=dtype)
        for s in range(len(x)):
            for t in range(len(x)):
                a, b = cluster[s], cluster[t]
                minimum[a, b] = min(minimum[a, b], squared[s, t])
        penalty = dtype(size_penalty) * (sizes[:, None] + sizes[None, :]).astype(dtype)
        distance = minimum if linkage == "buc" else np.sqrt(minimum)   # buc: squared, as BUC's code
        return (distance + penalty).astype(dtype)
    means = np.zeros((num_clusters, x.shape[1]), dtype=dtype)
    np.add.at(means, cluster, x)
    means /= sizes[:, None].astype(dtype)
    distances = np.sqrt(((means[:, None, :] - means[None, :, :]) ** 2).sum(-1, dtype=dtype)).astype(dtype)
    if linkage == "centroid":
        return distances
    k = min(neighbours, num_clusters - 1)
    density = np.zeros(num_clusters, dtype=dtype)
    for i in range(num_clusters):
        others = np.sort(np.delete(distances[i], i))[:k]
        total = dtype(0)
        for value in others:
            total = dtype(total + value)
        density[i] = dtype(total / dtype(k))
    density_sum = density[:, None] + density[None, :]
    with np.errstate(over="ignore"):  # far-apart clusters overflow to inf, as in the spec
        if linkage == "tssl_typeset":   # Eq. 8 as typeset: D + exp(2D) - (a_i + a_j)
            return ((distances + np.exp(dtype(2) * distances)) - density_sum).astype(dtype)
        return (distances + np.exp(dtype(2) * distances - density_sum)).astype(dtype)


def oracle_merge(x, labels, num_merges, linkage="tssl", neighbours=4, size_penalty=0.0, dtype=np.float32):
    """Brute-force merging step; returns labels renumbered by first appearance (int64 [N])."""
    x, labels = np.asarray(x), np.asarray(labels)
    values = sorted(set(labels.tolist()))
    cluster = np.array([values.index(v) for v in labels.tolist()], dtype=np.int64)
    num_clusters = len(values)
    component = list(range(num_clusters))
    if num_merges > 0:
        matrix = oracle_linkage(x, cluster, num_clusters, linkage, neighbours, size_penalty, dtype)
        pairs = sorted((float(matrix[i, j]), i, j) for i in range(num_clusters) for j in range(i + 1, num_clusters))
        merges = 0
        for _, i, j in pairs:
            if merges == num_merges:
                break
            if component[i] != component[j]:
                old, new = component[j], component[i]
                component = [new if c == old else c for c in component]
                merges += 1
    first_seen: dict[int, int] = {}
    out = [first_seen.setdefault(component[c], len(first_seen)) for c in cluster.tolist()]
    return np.array(out, dtype=np.int64)


def assert_same_labels(actual: torch.Tensor, expected: np.ndarray, context: str = "") -> None:
    assert actual.dtype == torch.int64, f"labels dtype {actual.dtype}, expected int64 {context}"
    actual = actual.cpu().numpy()
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} {context}"
    mismatch = np.nonzero(actual != expected)[0]
    if mismatch.size:
        first = int(mismatch[0])
        raise AssertionError(f"{mismatch.size} labels differ, first at sample {first}: got {actual[first]}, "
                             f"expected {expected[first]} {context}\n got      {actual.tolist()}\n"
                             f" expected {expected.tolist()}")


# ----------------------------------------------------------------------------- data

@st.composite
def exact_problems(draw):
    """Integer features, cluster sizes in {1, 2, 4}, shuffled samples, non-contiguous labels."""
    num_clusters = draw(st.integers(1, 9))
    sizes = draw(st.lists(st.sampled_from((1, 1, 2, 4)), min_size=num_clusters, max_size=num_clusters))
    dim = draw(st.integers(1, 3))
    label_values = draw(st.lists(st.integers(0, 2**40), min_size=num_clusters, max_size=num_clusters,
                                 unique=True))
    labels = np.repeat(np.array(label_values, dtype=np.int64), sizes)
    num_samples = labels.size
    x = np.array(draw(st.lists(st.integers(-2, 2), min_size=num_samples * dim, max_size=num_samples * dim)),
                 dtype=np.float32).reshape(num_samples, dim)
    permutation = np.array(draw(st.permutations(range(num_samples))), dtype=np.int64)
    return x[permutation], labels[permutation]


def run(x, labels, num_merges, backend, device, **kwargs):
    return fastassoc.agglomerative_merge(torch.as_tensor(x, device=device), torch.as_tensor(labels, device=device),
                                         num_merges, backend=backend, **kwargs)


# ----------------------------------------------------------------------------- property tests

@PROPERTY_SETTINGS
@given(problem=exact_problems(), data=st.data(), linkage=st.sampled_from(LINKAGES),
       neighbours=st.integers(1, 5), size_penalty=st.sampled_from((0.0, 0.25, 0.5, 1.0)))
def test_matches_oracle_with_exact_ties(backend_device, problem, data, linkage, neighbours, size_penalty):
    backend, device = backend_device
    require_backend(OP, backend)
    x, labels = problem
    num_clusters = len(set(labels.tolist()))
    num_merges = data.draw(st.integers(0, num_clusters - 1), label="num_merges")
    expected = oracle_merge(x, labels, num_merges, linkage, neighbours, size_penalty)
    actual = run(x, labels, num_merges, backend, device, linkage=linkage, neighbours=neighbours,
                 size_penalty=size_penalty)
    assert_same_labels(actual, expected, f"({linkage}, num_merges={num_merges}, neighbours={neighbours}, "
                                         f"size_penalty={size_penalty})")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=exact_problems(), data=st.data(), linkage=st.sampled_from(LINKAGES),
       tile=st.integers(1, 12))
def test_tiny_tiles_and_pair_buffer_give_the_same_result(backend_device, problem, data, linkage, tile):
    """A tile of a few elements forces pair buffers of a few pairs: many replays of the stream."""
    backend, device = backend_device
    require_backend(OP, backend)
    x, labels = problem
    num_clusters = len(set(labels.tolist()))
    num_merges = data.draw(st.integers(0, num_clusters - 1), label="num_merges")
    expected = oracle_merge(x, labels, num_merges, linkage, 2, 0.5)
    with fastassoc.tile_limit(tile):
        actual = run(x, labels, num_merges, backend, device, linkage=linkage, neighbours=2, size_penalty=0.5)
    assert_same_labels(actual, expected, f"({linkage}, num_merges={num_merges}, tile_limit={tile})")


@settings(max_examples=20, deadline=None)
@given(problem=exact_problems(), data=st.data(), linkage=st.sampled_from(LINKAGES))
def test_float64_features(problem, data, linkage):
    """float64 inputs are computed in float64: the oracle runs in float64 too."""
    x, labels = problem
    num_clusters = len(set(labels.tolist()))
    num_merges = data.draw(st.integers(0, num_clusters - 1), label="num_merges")
    expected = oracle_merge(x, labels, num_merges, linkage, 3, 0.25, dtype=np.float64)
    actual = run(x.astype(np.float64), labels, num_merges, "reference", "cpu", linkage=linkage, neighbours=3,
                 size_penalty=0.25)
    assert_same_labels(actual, expected, f"({linkage}, float64)")


# ----------------------------------------------------------------------------- examples

@pytest.mark.parametrize("linkage", LINKAGES)
def test_continuous_data_any_cluster_sizes(backend_device, linkage):
    backend, device = backend_device
    require_backend(OP, backend)
    generator = np.random.default_rng(7)
    num_samples = 61
    x = generator.standard_normal((num_samples, 5)).astype(np.float32)
    labels = generator.integers(0, 40, num_samples) * 5 + 3  # sizes 0..5, gaps between values
    num_clusters = len(set(labels.tolist()))
    for num_merges in (0, 1, num_clusters // 3, num_clusters - 1):
        expected = oracle_merge(x, labels, num_merges, linkage, 4, 0.05, dtype=np.float64)
        actual = run(x, labels, num_merges, backend, device, linkage=linkage, size_penalty=0.05)
        assert_same_labels(actual, expected, f"({linkage}, num_merges={num_merges})")


@pytest.mark.parametrize("linkage", LINKAGES)
def test_first_pair_buffer_exhausted_by_redundant_pairs(backend_device, linkage):
    """Four far-apart groups of 50 points: ~4900 within-group pairs come before any
    between-group pair, more than the first pair buffer holds; the merge that joins two
    groups needs the stream replayed past the buffer."""
    backend, device = backend_device
    require_backend(OP, backend)
    generator = np.random.default_rng(3)
    groups, per_group = 4, 50
    offsets = generator.integers(-3, 4, (groups * per_group, 3))
    centres = np.repeat(np.arange(groups) * 1000, per_group)
    x = offsets.astype(np.float32)
    x[:, 0] += centres
    labels = np.arange(groups * per_group) * 2
    num_merges = groups * (per_group - 1) + 1
    expected = oracle_merge(x, labels, num_merges, linkage, 4, 0.0)
    assert len(set(expected.tolist())) == groups - 1
    actual = run(x, labels, num_merges, backend, device, linkage=linkage)
    assert_same_labels(actual, expected, f"({linkage})")


@pytest.mark.parametrize("linkage", LINKAGES)
def test_tile_independence_from_partial_clustering(backend_device, linkage):
    backend, device = backend_device
    require_backend(OP, backend)
    generator = np.random.default_rng(11)
    x = generator.integers(-3, 4, (48, 4)).astype(np.float32)
    labels = generator.integers(0, 30, 48)
    num_clusters = len(set(labels.tolist()))
    reference = run(x, labels, num_clusters // 2, backend, device, linkage=linkage, size_penalty=0.5)
    for tile in (1, 3, 50, 1000):
        with fastassoc.tile_limit(tile):
            tiled = run(x, labels, num_clusters // 2, backend, device, linkage=linkage, size_penalty=0.5)
        assert_same_labels(tiled, reference.cpu().numpy(), f"({linkage}, tile_limit={tile})")


def test_buc_without_penalty_is_single_linkage():
    """Frozen minimum distances walked greedily = Kruskal = scipy's single linkage cut."""
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    generator = np.random.default_rng(5)
    x = generator.standard_normal((70, 6))
    tree = hierarchy.linkage(x, method="single")
    for num_merges in (0, 1, 17, 40, 69):
        cut = hierarchy.cut_tree(tree, n_clusters=70 - num_merges).ravel()
        first_seen: dict[int, int] = {}
        expected = np.array([first_seen.setdefault(c, len(first_seen)) for c in cut.tolist()], dtype=np.int64)
        actual = fastassoc.agglomerative_merge(torch.as_tensor(x), torch.arange(70), num_merges, linkage="buc",
                                               backend="reference")
        assert_same_labels(actual, expected, f"(scipy single linkage, num_merges={num_merges})")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("linkage", LINKAGES)
def test_dtypes(backend_device, dtype, linkage):
    backend, device = backend_device
    require_backend(OP, backend)
    generator = np.random.default_rng(2)
    x = generator.integers(-2, 3, (20, 3)).astype(np.float32)  # exact in every dtype
    labels = np.arange(20)
    expected = oracle_merge(x, labels, 9, linkage, 4, 0.0,
                            dtype=np.float64 if dtype == torch.float64 else np.float32)
    actual = fastassoc.agglomerative_merge(torch.as_tensor(x, dtype=dtype, device=device),
                                           torch.as_tensor(labels, device=device), 9, linkage=linkage,
                                           backend=backend)
    assert actual.device.type == torch.device(device).type
    assert_same_labels(actual, expected, f"({linkage}, {dtype})")


@pytest.mark.parametrize("linkage", LINKAGES)
def test_edge_cases(backend_device, linkage):
    backend, device = backend_device
    require_backend(OP, backend)
    empty = fastassoc.agglomerative_merge(torch.zeros(0, 3, device=device),
                                          torch.zeros(0, dtype=torch.int64, device=device), 0,
                                          linkage=linkage, backend=backend)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    # One cluster: nothing to merge, everything label 0.
    one = run(np.ones((5, 2), np.float32), np.full(5, 7), 0, backend, device, linkage=linkage)
    assert_same_labels(one, np.zeros(5, np.int64), "(one cluster)")
    # num_merges=0 only renumbers by first appearance.
    labels = np.array([9, 4, 9, 100, 4, 2**40, 0])
    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    assert_same_labels(run(x, labels, 0, backend, device, linkage=linkage),
                       np.array([0, 1, 0, 2, 1, 3, 4]), "(num_merges=0)")
    # num_merges=C-1: everything joins.
    assert_same_labels(run(x, labels, 4, backend, device, linkage=linkage), np.zeros(7, np.int64),
                       "(num_merges=C-1)")
    # Identical points: all distances 0, so ties resolve purely by (i, j).
    same = np.zeros((6, 2), np.float32)
    labels = np.array([5, 3, 1, 0, 2, 4])
    # Clusters 0, 1, 2 (labels 0, 1, 2: samples 3, 2, 4) join: pairs (0, 1), (0, 2) come first.
    expected = oracle_merge(same, labels, 2, linkage)
    assert_same_labels(run(same, labels, 2, backend, device, linkage=linkage), expected, "(identical points)")
    assert sorted(np.nonzero(expected == expected[3])[0].tolist()) == [2, 3, 4]


def test_hand_computed_tssl_step():
    """Points on a line at 0, 1, 3, 7 (singletons), neighbours=1: a = (1, 1, 2, 4);
    L01 = 1 + e^0 = 2, L12 = 2 + e^(4-3) = 4.72, L02 = 3 + e^(6-3) = 23.1,
    L23 = 4 + e^(8-6) = 11.4, L13 = 6 + e^(12-5), L03 = 7 + e^(14-5).
    Two merges: (0,1), then (1,2)."""
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    result = fastassoc.agglomerative_merge(x, torch.arange(4), 2, linkage="tssl", neighbours=1,
                                           backend="reference")
    assert result.tolist() == [0, 0, 0, 1]
    # Centroid linkage merges (0, 1) first as well.
    result = fastassoc.agglomerative_merge(x, torch.arange(4), 1, linkage="centroid", backend="reference")
    assert result.tolist() == [0, 0, 1, 2]


def test_tssl_and_tssl_typeset_merge_differently(backend_device):
    """Eq. 8's two readings on a line, neighbours=2: a dense run 0, 1, 2 (a = 1.5, 1, 1.5) and a
    sparse pair 20, 21.25 with a point at 24 (a = 2.625, 2.0, 3.375).
    tssl, D + exp(2D - (a_i + a_j)): (0, 1) and (1, 2) 1 + e^(2 - 2.5) = 1.607; (3, 4)
    1.25 + e^(2.5 - 4.625) = 1.369, the smallest: the sparse pair merges.
    tssl_typeset, D + exp(2D) - (a_i + a_j): (0, 1) and (1, 2) 1 + e^2 - 2.5 = 5.889 (tie, (0, 1)
    first); (3, 4) 1.25 + e^2.5 - 4.625 = 8.807: the dense pair merges."""
    backend, device = backend_device
    require_backend(OP, backend)
    x = np.array([[0.0], [1.0], [2.0], [20.0], [21.25], [24.0]], dtype=np.float32)
    labels = np.arange(6)
    text = run(x, labels, 1, backend, device, linkage="tssl", neighbours=2)
    typeset = run(x, labels, 1, backend, device, linkage="tssl_typeset", neighbours=2)
    assert_same_labels(text, np.array([0, 1, 2, 3, 3, 4]), "(tssl)")
    assert_same_labels(typeset, np.array([0, 0, 1, 2, 3, 4]), "(tssl_typeset)")
    for linkage, got in (("tssl", text), ("tssl_typeset", typeset)):
        assert_same_labels(got, oracle_merge(x, labels, 1, linkage, 2), f"({linkage} oracle)")
    # Two merges: tssl then joins (0, 1); tssl_typeset joins (1, 2), the sparse pair still waits.
    assert_same_labels(run(x, labels, 2, backend, device, linkage="tssl", neighbours=2),
                       np.array([0, 0, 1, 2, 2, 3]), "(tssl, 2 merges)")
    assert_same_labels(run(x, labels, 2, backend, device, linkage="tssl_typeset", neighbours=2),
                       np.array([0, 0, 0, 1, 2, 3]), "(tssl_typeset, 2 merges)")


@pytest.mark.parametrize("linkage", ["tssl", "tssl_typeset", "centroid"])
def test_triton_rows_rescanned_past_one_pair_lists(monkeypatch, linkage):
    """The Triton launcher's first lists hold a row's next pair only (``_MIN_FIRST = 1``): every
    merge past the first needs the rows whose unseen pairs may rank below the walk's stop
    rescanned (for tssl_typeset the floor test, since its rows stream distances, not linkages)."""
    require_backend(OP, "triton")
    from fastassoc.kernels.triton import cluster as triton_cluster
    monkeypatch.setattr(triton_cluster, "_MIN_FIRST", 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in range(3):
        generator = np.random.default_rng(seed)
        x = generator.standard_normal((40, 4)).astype(np.float32)
        labels = np.arange(40)
        for num_merges in (1, 3, 10):
            expected = oracle_merge(x, labels, num_merges, linkage, 4, 0.0, dtype=np.float64)
            actual = run(x, labels, num_merges, "triton", device, linkage=linkage)
            assert_same_labels(actual, expected, f"({linkage}, seed {seed}, {num_merges} merges)")


def test_buc_size_penalty_prefers_small_clusters():
    """Cluster {0, 1} (size 2) at distance 1 from {2}; {3} at distance 1.5 from {2}.
    Without penalty (2) joins the pair; with penalty 1 the singleton pair wins under buc_l2
    (1.5 + 2 < 1 + 3) but not under buc's squared distances (2.25 + 2 > 1 + 3)."""
    x = torch.tensor([[-1.0], [0.0], [1.0], [2.5]])
    labels = torch.tensor([0, 0, 1, 2])
    for linkage in ("buc", "buc_l2"):
        plain = fastassoc.agglomerative_merge(x, labels, 1, linkage=linkage, backend="reference")
        assert plain.tolist() == [0, 0, 0, 1], linkage
    penalised = fastassoc.agglomerative_merge(x, labels, 1, linkage="buc_l2", size_penalty=1.0, backend="reference")
    assert penalised.tolist() == [0, 0, 1, 1]
    penalised = fastassoc.agglomerative_merge(x, labels, 1, linkage="buc", size_penalty=1.0, backend="reference")
    assert penalised.tolist() == [0, 0, 0, 1]


def buc_public_walk(x: np.ndarray, labels: np.ndarray, num_merges: int, ratio_n: float) -> np.ndarray:
    """The merge walk of the public BUC code, from its semantics: every sample pair s < t ranked by
    squared Euclidean distance + ratio_n * (|C(s)| + |C(t)|) with sizes frozen before the step,
    same-cluster pairs left out; pairs walked in that order, merging their current clusters.
    Returns labels renumbered by first appearance."""
    x = np.asarray(x, dtype=np.float64)
    values = sorted(set(labels.tolist()))
    cluster = np.array([values.index(v) for v in labels.tolist()])
    sizes = np.bincount(cluster)
    squared = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    ranked = squared + ratio_n * (sizes[cluster][:, None] + sizes[cluster][None, :])
    s, t = np.triu_indices(len(x), 1)
    different = cluster[s] != cluster[t]
    s, t = s[different], t[different]
    order = np.argsort(ranked[s, t], kind="stable")
    current = list(range(len(values)))
    merges = 0
    for p in order:
        if merges == num_merges:
            break
        a, b = current[cluster[s[p]]], current[cluster[t[p]]]
        if a != b:
            current = [min(a, b) if c in (a, b) else c for c in current]
            merges += 1
    first_seen: dict[int, int] = {}
    return np.array([first_seen.setdefault(current[c], len(first_seen)) for c in cluster.tolist()], dtype=np.int64)


def test_buc_issue_case_squared_merges_the_two_large_clusters(backend_device):
    """Issue 14 item 12: A = [0], B = [2], two 5-point clusters at 10.0 and 11.5, lambda = 0.1,
    one merge. Squared (BUC's code): A-B 4 + 0.2 = 4.2 > C-D 2.25 + 1.0 = 3.25, so C and D merge;
    plain L2: A-B 2 + 0.2 = 2.2 < C-D 1.5 + 1.0 = 2.5, so A and B merge."""
    backend, device = backend_device
    require_backend(OP, backend)
    x = np.array([[0.0], [2.0]] + [[10.0]] * 5 + [[11.5]] * 5, dtype=np.float32)
    labels = np.array([0, 1] + [2] * 5 + [3] * 5)
    squared = run(x, labels, 1, backend, device, linkage="buc", size_penalty=0.1)
    expected = buc_public_walk(x, labels, 1, 0.1)
    assert expected.tolist() == [0, 1] + [2] * 10
    assert_same_labels(squared, expected, "(buc, issue case)")
    assert_same_labels(squared, oracle_merge(x, labels, 1, "buc", size_penalty=0.1), "(buc oracle, issue case)")
    plain = run(x, labels, 1, backend, device, linkage="buc_l2", size_penalty=0.1)
    assert_same_labels(plain, np.array([0, 0] + [1] * 5 + [2] * 5), "(buc_l2, issue case)")


# Derandomised: the oracle ranks float64 distances, the op float32 ones, so a drawn seed could
# (rarely) hold two sample pairs within float32 rounding of each other; fixed draws cannot flake.
@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), num_samples=st.integers(2, 40), num_clusters=st.integers(2, 12),
       ratio_n=st.sampled_from((0.0, 0.01, 0.05, 0.3)), merge_fraction=st.floats(0.0, 1.0))
def test_buc_equals_the_public_sample_pair_walk(seed, num_samples, num_clusters, ratio_n, merge_fraction):
    """Continuous data (no ties): ranking cluster pairs by their minimum sample-pair value walks the
    same merges as ranking every sample pair as BUC's code does."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_samples, 3)).astype(np.float32)
    labels = rng.integers(0, min(num_clusters, num_samples), num_samples) * 7
    present = len(set(labels.tolist()))
    num_merges = int(round(merge_fraction * (present - 1)))
    got = fastassoc.agglomerative_merge(torch.from_numpy(x), torch.from_numpy(labels), num_merges, linkage="buc",
                                        size_penalty=ratio_n, backend="reference")
    assert_same_labels(got, buc_public_walk(x, labels, num_merges, ratio_n),
                       f"(seed={seed}, ratio_n={ratio_n}, {num_merges} merges)")


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kwargs, error, name", [
    (dict(num_merges=5), ValueError, "num_merges"),
    (dict(num_merges=-1), ValueError, "num_merges"),
    (dict(num_merges=1.0), TypeError, "num_merges"),
    (dict(labels=torch.tensor([0, -1, 2, 3, 4])), ValueError, "labels"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])), TypeError, "labels"),
    (dict(labels=torch.arange(4)), ValueError, "labels"),
    (dict(linkage="single"), ValueError, "linkage"),
    (dict(neighbours=0), ValueError, "neighbours"),
    (dict(size_penalty=-0.5), ValueError, "size_penalty"),
    (dict(x=torch.zeros(5)), ValueError, "x"),
    (dict(x=torch.zeros(5, 2, dtype=torch.int32)), TypeError, "x"),
    (dict(x=torch.full((5, 2), float("nan"))), ValueError, "x"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_inputs_name_the_argument(kwargs, error, name):
    arguments = dict(x=torch.zeros(5, 2), labels=torch.arange(5), num_merges=1)
    arguments.update(kwargs)
    x, labels, num_merges = arguments.pop("x"), arguments.pop("labels"), arguments.pop("num_merges")
    with pytest.raises(error, match=rf"^{name}\b"):
        fastassoc.agglomerative_merge(x, labels, num_merges, **arguments)
