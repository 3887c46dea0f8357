"""Tests of cross_camera_graph and knn_soft_labels on every backend against NumPy brute-force oracles.

Exactness: cross_camera_graph ranks by cosine, so its exact-tie data are power-of-two
multiples of "exact directions" (zero, +-e_i, (+-1/2, +-1/2, +-1/2, +-1/2)) whose
normalisation and dot products are exact in float32: ties and ``cos == min_similarity``
are real. knn_soft_labels ranks by squared Euclidean distance, exact on small integers.
Continuous random data is compared with a tolerance on weights and exactly on the
sparsity pattern (it is well separated).
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastassoc
from conftest import require_backend

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])

# Unit directions in R^4 whose normalisation and pairwise dot products are exact in float32.
EXACT_DIRECTIONS = np.array(
    [[0.0] * 4]
    + [list(sign * row) for row in np.eye(4) for sign in (1.0, -1.0)]
    + [list(0.5 * np.array(signs)) for signs in itertools.product((1.0, -1.0), repeat=4)])
EXACT_SCALES = (0.5, 1.0, 2.0, 4.0)


# ----------------------------------------------------------------------------- oracles

def oracle_cross_camera_graph(x, cameras, k, min_similarity, self_loops, mode) -> dict:
    """Brute force: {(row, col): weight} of the mutual cross-camera kNN cosine graph."""
    x = np.asarray(x, np.float64)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    distance = 1.0 - similarity
    listed = set()
    for i in range(len(x)):
        if mode == "pairwise":
            groups = [np.flatnonzero(cameras == m) for m in np.unique(cameras) if m != cameras[i]]
        else:
            groups = [np.flatnonzero(cameras != cameras[i])]
        for group in groups:
            chosen = group[np.lexsort((group, distance[i, group]))[:k]]
            listed.update((i, int(j)) for j in chosen)
    edges = {(i, j): similarity[i, j] for i, j in listed
             if (j, i) in listed and (min_similarity is None or similarity[i, j] > min_similarity)}
    if self_loops:
        edges.update({(i, i): 1.0 for i in range(len(x))})
    return edges


def oracle_soft_labels(x, cameras, k) -> dict:
    """Brute force UTAL Eqs. 4-6: {(row, col): weight}, rows L1-normalised."""
    x = np.asarray(x, np.float64)
    squared = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    entries = {}
    for camera in np.unique(cameras):
        members = np.flatnonzero(cameras == camera)
        width = min(k, len(members) - 1)
        neighbours = {}
        for i in members:
            others = members[members != i]
            neighbours[i] = others[np.lexsort((others, squared[i, others]))[:width]]
        listed = np.concatenate([squared[i, neighbours[i]] for i in members])
        sigma_sq = listed.mean() if listed.size else 0.0
        for i in members:
            d2 = squared[i, neighbours[i]]
            weights = np.exp(-d2 / sigma_sq) if sigma_sq > 0 else np.ones_like(d2)
            total = 1.0 + weights.sum()
            entries[(int(i), int(i))] = 1.0 / total
            entries.update({(int(i), int(j)): w / total for j, w in zip(neighbours[i], weights)})
    return entries


# ----------------------------------------------------------------------------- asserts

def csr_entries(matrix: torch.Tensor, size: int, device: str) -> dict:
    """Check the CSR invariants of the contract and return {(row, col): value}."""
    assert matrix.layout == torch.sparse_csr, f"layout {matrix.layout}, expected sparse_csr"
    assert tuple(matrix.shape) == (size, size), f"shape {tuple(matrix.shape)}, expected {(size, size)}"
    assert matrix.dtype == torch.float32, f"dtype {matrix.dtype}, expected float32"
    assert matrix.device.type == device, f"device {matrix.device}, expected {device}"
    crow = matrix.crow_indices().cpu().numpy()
    cols = matrix.col_indices().cpu().numpy()
    values = matrix.values().cpu().numpy()
    assert crow.shape == (size + 1,) and crow[0] == 0 and crow[-1] == len(cols) == len(values), \
        f"bad crow_indices {crow} for {len(cols)} entries"
    assert (np.diff(crow) >= 0).all(), f"crow_indices decrease: {crow}"
    for row in range(size):
        row_cols = cols[crow[row]:crow[row + 1]]
        assert (np.diff(row_cols) > 0).all(), f"row {row}: column indices not strictly increasing: {row_cols}"
    rows = np.repeat(np.arange(size), np.diff(crow))
    return {(int(r), int(c)): float(v) for r, c, v in zip(rows, cols, values)}


def assert_same_entries(got: dict, expected: dict, what: str, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing and not extra, (
        f"{what}: sparsity pattern differs; first missing {missing[:1]} "
        f"(expected value {expected[missing[0]] if missing else None}), first extra {extra[:1]} "
        f"(value {got[extra[0]] if extra else None}); {len(missing)} missing, {len(extra)} extra")
    for key in sorted(expected):
        assert np.isclose(got[key], expected[key], rtol=rtol, atol=atol), \
            f"{what}: first value mismatch at {key}: got {got[key]!r}, expected {expected[key]!r}"


def assert_symmetric(entries: dict, what: str) -> None:
    for (row, col), value in sorted(entries.items()):
        assert entries.get((col, row)) == value, \
            f"{what}: not symmetric at {(row, col)}: {value!r} vs {entries.get((col, row))!r}"


def assert_names_argument(error: Exception, name: str) -> None:
    """The message must speak of ``name`` as the subject ("k must ...", "cameras values ...")."""
    pattern = rf"(^|[\s,(]){re.escape(name)} (must|contains|has|is|values)\b"
    assert re.search(pattern, str(error)), f"error does not name {name!r}: {type(error).__name__}: {error}"


# ----------------------------------------------------------------------------- data

def exact_cosine_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    directions = EXACT_DIRECTIONS[rng.integers(0, len(EXACT_DIRECTIONS), size=count)]
    scales = np.array(EXACT_SCALES)[rng.integers(0, len(EXACT_SCALES), size=count)]
    return (directions * scales[:, None]).reshape(count, 4)


@st.composite
def exact_cosine_features(draw, count: int) -> np.ndarray:
    choices = draw(hnp.arrays(np.int64, (count,), elements=st.integers(0, len(EXACT_DIRECTIONS) - 1)))
    scales = draw(hnp.arrays(np.int64, (count,), elements=st.integers(0, len(EXACT_SCALES) - 1)))
    return (EXACT_DIRECTIONS[choices] * np.array(EXACT_SCALES)[scales][:, None]).reshape(count, 4)


@st.composite
def camera_layouts(draw, min_rows: int = 0, max_rows: int = 12):
    """Camera ids in any order (not contiguous), and num_cameras None or above the largest id."""
    count = draw(st.integers(min_rows, max_rows))
    cameras = draw(hnp.arrays(np.int64, (count,), elements=st.integers(0, 3)))
    extra = draw(st.one_of(st.none(), st.integers(0, 2)))
    num_cameras = None if extra is None else (int(cameras.max()) + 1 if count else 1) + extra
    return cameras, num_cameras


def tensor(array, device, dtype=torch.float32):
    return torch.as_tensor(np.asarray(array), device=device).to(dtype)


def camera_tensor(cameras, device):
    return torch.as_tensor(np.asarray(cameras, np.int64), device=device)


def separated_cameras(seed: int, count: int = 40, dim: int = 6):
    """Continuous random features with four cameras interleaved in random order."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, dim)), rng.integers(0, 4, size=count)


# ----------------------------------------------------------------------------- cross_camera_graph

@PROPERTY_SETTINGS
@given(layout=camera_layouts(), data=st.data(), k=st.integers(0, 4), mode=st.sampled_from(["pairwise", "pooled"]),
       self_loops=st.booleans(), min_similarity=st.sampled_from([None, -0.5, 0.0, 0.25, 0.5]))
def test_cross_camera_graph_matches_oracle_with_exact_ties(backend_device, layout, data, k, mode, self_loops,
                                                           min_similarity):
    backend, device = backend_device
    require_backend("cross_camera_graph", backend)
    cameras, num_cameras = layout
    x = data.draw(exact_cosine_features(len(cameras)))
    graph = fastassoc.cross_camera_graph(tensor(x, device), camera_tensor(cameras, device), k,
                                         min_similarity=min_similarity, self_loops=self_loops, mode=mode,
                                         num_cameras=num_cameras, backend=backend)
    what = f"{backend} {mode} k={k} min_similarity={min_similarity} self_loops={self_loops}"
    entries = csr_entries(graph, len(x), device)
    assert_same_entries(entries, oracle_cross_camera_graph(x, cameras, k, min_similarity, self_loops, mode), what)
    assert_symmetric(entries, what)


@pytest.mark.parametrize("mode", ["pairwise", "pooled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_camera_graph_matches_oracle_on_separated_data(backend_device, mode, dtype):
    backend, device = backend_device
    require_backend("cross_camera_graph", backend)
    x, cameras = separated_cameras(21)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-6
    for k, min_similarity in [(3, None), (3, 0.1), (6, -0.2)]:
        graph = fastassoc.cross_camera_graph(tensor(x, device, dtype), camera_tensor(cameras, device), k,
                                             min_similarity=min_similarity, mode=mode, backend=backend)
        what = f"{backend} {mode} {dtype} k={k} min_similarity={min_similarity}"
        entries = csr_entries(graph, len(x), device)
        assert_same_entries(entries, oracle_cross_camera_graph(x, cameras, k, min_similarity, True, mode), what,
                            rtol=tolerance, atol=tolerance)
        assert_symmetric(entries, what)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["pairwise", "pooled"])
def test_cross_camera_graph_dtypes_give_float32(backend_device, dtype, mode):
    backend, device = backend_device
    require_backend("cross_camera_graph", backend)
    rng = np.random.default_rng(23)
    x, cameras = exact_cosine_rows(rng, 14), rng.integers(0, 3, size=14)
    graph = fastassoc.cross_camera_graph(tensor(x, device, dtype), camera_tensor(cameras, device), 2, mode=mode,
                                         backend=backend)
    assert_same_entries(csr_entries(graph, 14, device), oracle_cross_camera_graph(x, cameras, 2, None, True, mode),
                        f"{backend} {mode} {dtype}")


def test_cross_camera_graph_threshold_is_strict(backend_device):
    backend, device = backend_device
    require_backend("cross_camera_graph", backend)
    # One tracklet per camera; cos(x0, x1) = 0.5 exactly, so the pair is mutual for any k >= 1.
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], device=device)
    cameras = torch.tensor([0, 1], device=device)
    for min_similarity, expect_edge in [(None, True), (0.49, True), (0.5, False), (0.51, False)]:
        graph = fastassoc.cross_camera_graph(x, cameras, 1, min_similarity=min_similarity, self_loops=False,
                                             backend=backend)
        entries = csr_entries(graph, 2, device)
        expected = {(0, 1): 0.5, (1, 0): 0.5} if expect_edge else {}
        assert_same_entries(entries, expected, f"{backend} min_similarity={min_similarity}", rtol=0, atol=0)


def test_cross_camera_graph_degenerate_layouts(backend_device):
    backend, device = backend_device
    require_backend("cross_camera_graph", backend)
    rng = np.random.default_rng(29)
    x = tensor(rng.standard_normal((7, 5)), device)
    # One camera: nothing to pair; only the diagonal when self_loops.
    for self_loops in (True, False):
        for mode in ("pairwise", "pooled"):
            graph = fastassoc.cross_camera_graph(x, torch.full((7,), 2, device=device), 3, self_loops=self_loops,
                                                 mode=mode, backend=backend)
            expected = {(i, i): 1.0 for i in range(7)} if self_loops else {}
            assert_same_entries(csr_entries(graph, 7, device), expected, f"{backend} one camera {mode} {self_loops}")
    # k = 0: no edges.
    graph = fastassoc.cross_camera_graph(x, camera_tensor([0, 1, 0, 1, 2, 2, 0], device), 0, backend=backend)
    assert_same_entries(csr_entries(graph, 7, device), {(i, i): 1.0 for i in range(7)}, f"{backend} k=0")
    # No rows at all.
    graph = fastassoc.cross_camera_graph(x[:0], camera_tensor([], device), 2, num_cameras=3, backend=backend)
    assert csr_entries(graph, 0, device) == {}, f"{backend}: empty input must give an empty graph"


@pytest.mark.parametrize("mode", ["pairwise", "pooled"])
def test_cross_camera_graph_does_not_depend_on_the_tile_size(backend_device, mode):
    backend, device = backend_device
    require_backend("cross_camera_graph", backend)
    rng = np.random.default_rng(31)
    for x, cameras in [(exact_cosine_rows(rng, 25), rng.integers(0, 4, size=25)), separated_cameras(33, 30)]:
        arguments = (tensor(x, device), camera_tensor(cameras, device), 3)
        default = csr_entries(fastassoc.cross_camera_graph(*arguments, mode=mode, backend=backend), len(x), device)
        with fastassoc.tile_limit(7):
            tiled = fastassoc.cross_camera_graph(*arguments, mode=mode, backend=backend)
        assert_same_entries(csr_entries(tiled, len(x), device), default, f"{backend} {mode} under tile_limit(7)")


def _graph_arguments(device):
    return dict(x=torch.zeros(5, 3, device=device), cameras=torch.tensor([0, 1, 0, 2, 1], device=device), k=2)


GRAPH_BAD_INPUTS = [
    ("x", lambda d: dict(x=torch.full((5, 3), float("nan"), device=d))),
    ("x", lambda d: dict(x=torch.zeros(5, device=d))),
    ("x", lambda d: dict(x=torch.zeros(5, 3, dtype=torch.int32, device=d))),
    ("cameras", lambda d: dict(cameras=torch.tensor([0, -1, 0, 2, 1], device=d))),
    ("cameras", lambda d: dict(cameras=torch.tensor([0, 1, 0, 2], device=d))),
    ("cameras", lambda d: dict(cameras=torch.tensor([0.0, 1.0, 0.0, 2.0, 1.0], device=d))),
    ("cameras", lambda d: dict(cameras=torch.tensor([[0, 1, 0, 2, 1]], device=d))),
    ("cameras", lambda d: dict(num_cameras=2)),
    ("num_cameras", lambda d: dict(num_cameras=0)),
    ("k", lambda d: dict(k=-1)),
    ("k", lambda d: dict(k=None)),
]
CROSS_ONLY_BAD_INPUTS = [
    ("mode", lambda d: dict(mode="global")),
    ("self_loops", lambda d: dict(self_loops=1)),
    ("min_similarity", lambda d: dict(min_similarity=float("inf"))),
    ("backend", lambda d: dict(backend="gpu")),
]


@pytest.mark.parametrize("name, change", GRAPH_BAD_INPUTS + CROSS_ONLY_BAD_INPUTS,
                         ids=[f"{i}-{name}" for i, (name, _) in enumerate(GRAPH_BAD_INPUTS + CROSS_ONLY_BAD_INPUTS)])
def test_cross_camera_graph_rejects_bad_input_naming_the_argument(backend_device, name, change):
    backend, device = backend_device
    require_backend("cross_camera_graph", backend)
    arguments = _graph_arguments(device)
    arguments["backend"] = backend
    arguments.update(change(device))
    with pytest.raises((ValueError, TypeError)) as error:
        fastassoc.cross_camera_graph(arguments.pop("x"), arguments.pop("cameras"), **arguments)
    assert_names_argument(error.value, name)


# ----------------------------------------------------------------------------- knn_soft_labels

def check_soft_labels(matrix, x, cameras, k, device, what, rtol=1e-5, atol=1e-6) -> dict:
    entries = csr_entries(matrix, len(x), device)
    assert_same_entries(entries, oracle_soft_labels(x, cameras, k), what, rtol=rtol, atol=atol)
    row_sums = np.zeros(len(x))
    for (row, col), value in entries.items():
        assert cameras[row] == cameras[col], f"{what}: entry {(row, col)} crosses cameras (not block diagonal)"
        row_sums[row] += value
    assert np.allclose(row_sums, 1.0, rtol=0, atol=1e-5), f"{what}: row sums {row_sums}"
    assert all((i, i) in entries for i in range(len(x))), f"{what}: a row misses its own tracklet"
    return entries


@PROPERTY_SETTINGS
@given(layout=camera_layouts(), data=st.data(), k=st.integers(0, 5))
def test_knn_soft_labels_matches_oracle_with_exact_ties(backend_device, layout, data, k):
    backend, device = backend_device
    require_backend("knn_soft_labels", backend)
    cameras, num_cameras = layout
    dim = data.draw(st.integers(1, 3))
    x = data.draw(hnp.arrays(np.float64, (len(cameras), dim), elements=st.integers(-2, 2).map(float)))
    matrix = fastassoc.knn_soft_labels(tensor(x, device), camera_tensor(cameras, device), k,
                                       num_cameras=num_cameras, backend=backend)
    check_soft_labels(matrix, x, cameras, k, device, f"{backend} k={k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_soft_labels_matches_oracle_on_separated_data(backend_device, dtype):
    backend, device = backend_device
    require_backend("knn_soft_labels", backend)
    x, cameras = separated_cameras(37)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-6
    matrix = fastassoc.knn_soft_labels(tensor(x, device, dtype), camera_tensor(cameras, device), 4, backend=backend)
    check_soft_labels(matrix, x, cameras, 4, device, f"{backend} {dtype}", rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_knn_soft_labels_dtypes_give_float32(backend_device, dtype):
    backend, device = backend_device
    require_backend("knn_soft_labels", backend)
    rng = np.random.default_rng(41)
    x, cameras = rng.integers(-3, 4, (15, 3)).astype(float), rng.integers(0, 3, size=15)
    matrix = fastassoc.knn_soft_labels(tensor(x, device, dtype), camera_tensor(cameras, device), 3, backend=backend)
    check_soft_labels(matrix, x, cameras, 3, device, f"{backend} {dtype}")


def test_knn_soft_labels_special_cases(backend_device):
    backend, device = backend_device
    require_backend("knn_soft_labels", backend)
    rng = np.random.default_rng(43)
    x = rng.integers(-3, 4, (9, 2)).astype(float)
    cameras = np.array([2, 0, 2, 1, 0, 2, 2, 0, 2])
    # k = 0: one-hot rows.
    entries = check_soft_labels(fastassoc.knn_soft_labels(tensor(x, device), camera_tensor(cameras, device), 0,
                                                          backend=backend), x, cameras, 0, device, f"{backend} k=0")
    assert entries == {(i, i): 1.0 for i in range(9)}, f"{backend}: k=0 must give one-hot rows, got {entries}"
    # Cameras with 1, 3 and 5 tracklets and k = 4: the smaller ones use every tracklet they have.
    entries = check_soft_labels(fastassoc.knn_soft_labels(tensor(x, device), camera_tensor(cameras, device), 4,
                                                          backend=backend), x, cameras, 4, device, f"{backend} k=4")
    row_lengths = np.bincount([row for row, _ in entries], minlength=9)
    expected_lengths = np.array([min(5, np.sum(cameras == c)) for c in cameras])
    assert (row_lengths == expected_lengths).all(), f"{backend}: row lengths {row_lengths}, expected {expected_lengths}"
    # sigma^2 = 0 (every tracklet of a camera at one point): weight 1 for each neighbour.
    same = np.repeat([[1.0, -2.0]], 9, axis=0)
    entries = check_soft_labels(fastassoc.knn_soft_labels(tensor(same, device), camera_tensor(cameras, device), 2,
                                                          backend=backend), same, cameras, 2, device,
                                f"{backend} sigma=0")
    for (row, col), value in entries.items():
        width = min(2, np.sum(cameras == cameras[row]) - 1)
        assert value == pytest.approx(1.0 / (width + 1)), f"{backend} sigma=0: entry {(row, col)} = {value}"
    # No rows at all.
    matrix = fastassoc.knn_soft_labels(tensor(x[:0], device), camera_tensor([], device), 4, num_cameras=2,
                                       backend=backend)
    assert csr_entries(matrix, 0, device) == {}, f"{backend}: empty input must give an empty matrix"


def test_knn_soft_labels_does_not_depend_on_the_tile_size(backend_device):
    backend, device = backend_device
    require_backend("knn_soft_labels", backend)
    rng = np.random.default_rng(47)
    for x, cameras in [(rng.integers(-2, 3, (27, 3)).astype(float), rng.integers(0, 3, size=27)),
                       separated_cameras(49, 30)]:
        arguments = (tensor(x, device), camera_tensor(cameras, device), 4)
        default = csr_entries(fastassoc.knn_soft_labels(*arguments, backend=backend), len(x), device)
        with fastassoc.tile_limit(7):
            tiled = fastassoc.knn_soft_labels(*arguments, backend=backend)
        assert_same_entries(csr_entries(tiled, len(x), device), default, f"{backend} under tile_limit(7)")


@pytest.mark.parametrize("name, change", GRAPH_BAD_INPUTS,
                         ids=[f"{i}-{name}" for i, (name, _) in enumerate(GRAPH_BAD_INPUTS)])
def test_knn_soft_labels_rejects_bad_input_naming_the_argument(backend_device, name, change):
    backend, device = backend_device
    require_backend("knn_soft_labels", backend)
    arguments = _graph_arguments(device)
    arguments["backend"] = backend
    arguments.update(change(device))
    with pytest.raises((ValueError, TypeError)) as error:
        fastassoc.knn_soft_labels(arguments.pop("x"), arguments.pop("cameras"), **arguments)
    assert_names_argument(error.value, name)
