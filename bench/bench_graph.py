"""Benchmarks of the graph family: cross_camera_graph (W-graph) and knn_soft_labels (W-soft).

Workloads: W-rank's 8,298 tracklets, cameras = its six segments, D = 1024;
W-graph: k = 1, min_similarity = 0.65, pairwise mode; W-soft: k = 4.

Providers
---------
* ``reference``  fastassoc, pure-torch reference backend
* ``cpu``        fastassoc, compiled C++/OpenMP backend
* ``faiss``      (W-graph) faiss-cpu IndexFlatIP on L2-normalised rows: one index per
  camera, searched by every tracklet of the other cameras; mutual pairs by a NumPy key
  intersection, threshold, then a symmetric scipy CSR with self loops
* ``sklearn``    (W-soft) scikit-learn ``NearestNeighbors(algorithm="brute")
  .kneighbors_graph`` per camera, Gaussian weights and ``sklearn.preprocessing.normalize``
  (L1) on the scipy CSR, ``scipy.sparse.block_diag`` over cameras

Every provider is checked against the reference before it is timed. GEMM floors:
W-graph, one [n_t, D] x [D, n_m] GEMM per unordered camera pair t < m (every cross-camera
similarity once: the least work any provider can do); W-soft, one [n_t, D] x [D, n_t] per
camera. Targets (issue 3): cpu <= 1.3x the floor; knn_soft_labels >= 5x faster than
scikit-learn + scipy. Run ``pytest bench/bench_graph.py --benchmark-only``
(``FASTASSOC_BENCH_SCALE=small`` for a smoke run).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse
import torch

import fastassoc
from conftest import fastassoc_provider

GRAPH_K, GRAPH_MIN_SIMILARITY = 1, 0.65
SOFT_K = 4


# ----------------------------------------------------------------------------- peers

def faiss_cross_camera_graph(xn: np.ndarray, cameras: np.ndarray, k: int, min_similarity: float):
    """Pairwise-mode mutual kNN cosine graph with one faiss flat IP index per camera."""
    import faiss
    num_rows = xn.shape[0]
    sources, targets, similarities = [], [], []
    for camera in np.unique(cameras):
        members = np.flatnonzero(cameras == camera)
        others = np.flatnonzero(cameras != camera)
        index = faiss.IndexFlatIP(xn.shape[1])
        index.add(xn[members])
        found_s, found_i = index.search(xn[others], min(k, members.size))
        sources.append(np.repeat(others, found_i.shape[1]))
        targets.append(members[found_i.reshape(-1)])
        similarities.append(found_s.reshape(-1))
    sources, targets, similarities = map(np.concatenate, (sources, targets, similarities))
    mutual = np.isin(targets * num_rows + sources, sources * num_rows + targets)
    strong = mutual & (similarities > min_similarity)
    rows = np.concatenate([sources[strong], np.arange(num_rows)])
    cols = np.concatenate([targets[strong], np.arange(num_rows)])
    values = np.concatenate([similarities[strong], np.ones(num_rows, dtype=np.float32)])
    return scipy.sparse.csr_matrix((values, (rows, cols)), shape=(num_rows, num_rows))


def sklearn_soft_labels(x: np.ndarray, sizes, k: int):
    """UTAL Eqs. 4-6 with scikit-learn kNN graphs per camera (cameras are contiguous blocks)."""
    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import normalize
    blocks, start = [], 0
    for size in sizes:
        block = x[start:start + size]
        start += size
        width = min(k, size - 1)
        if width <= 0:
            blocks.append(scipy.sparse.identity(size, dtype=np.float64, format="csr"))
            continue
        graph = NearestNeighbors(n_neighbors=width, algorithm="brute").fit(block).kneighbors_graph(mode="distance")
        squared = graph.data.astype(np.float64) ** 2
        sigma_sq = squared.mean()
        graph.data = np.exp(-squared / sigma_sq) if sigma_sq > 0 else np.ones_like(squared)
        blocks.append(normalize(graph + scipy.sparse.identity(size, format="csr"), norm="l1"))
    return scipy.sparse.block_diag(blocks, format="csr")


# ----------------------------------------------------------------------------- W-graph

def graph_runner(provider: str, w: dict):
    x, cameras = w["x"], w["cameras"]
    if provider == "faiss":
        pytest.importorskip("faiss")
        xn = torch.nn.functional.normalize(x, dim=1).numpy()
        cams = cameras.numpy()
        return lambda: faiss_cross_camera_graph(xn, cams, GRAPH_K, GRAPH_MIN_SIMILARITY)
    return functools.partial(fastassoc.cross_camera_graph, x, cameras, GRAPH_K, min_similarity=GRAPH_MIN_SIMILARITY,
                             mode="pairwise", backend=provider)


@functools.lru_cache(maxsize=None)
def _graph_expected(workload_fn):
    return graph_runner("reference", workload_fn("W-graph"))()


@pytest.mark.parametrize("provider", ["reference", "cpu", "faiss"])
def test_cross_camera_graph_w_graph(benchmark, workload, gemm_floor, report, timed, agree, provider):
    w = workload("W-graph")
    run = graph_runner(provider, w)
    expected = _graph_expected(workload)
    agree.csr(run(), expected, f"W-graph {provider} vs reference")
    sizes, dimension = w["sizes"], w["x"].shape[1]
    floor = gemm_floor([(sizes[t], sizes[m], dimension) for t in range(len(sizes)) for m in range(t + 1, len(sizes))])
    timed(benchmark, run)
    report(workload="W-graph", provider=provider, floor=floor, params={"k": GRAPH_K}, edges=int(expected._nnz()))


# ----------------------------------------------------------------------------- W-soft

def soft_runner(provider: str, w: dict):
    x, cameras = w["x"], w["cameras"]
    if provider == "sklearn":
        pytest.importorskip("sklearn")
        x_np = x.numpy()
        return lambda: sklearn_soft_labels(x_np, w["sizes"], SOFT_K)
    return fastassoc_provider(fastassoc.knn_soft_labels, x, cameras, SOFT_K, provider=provider)


@functools.lru_cache(maxsize=None)
def _soft_expected(workload_fn):
    return soft_runner("reference", workload_fn("W-soft"))()


@pytest.mark.parametrize("provider", ["reference", "cpu", "cpu-fp32", "sklearn"])
def test_knn_soft_labels_w_soft(benchmark, workload, gemm_floor, report, timed, agree, provider):
    w = workload("W-soft")
    run = soft_runner(provider, w)
    expected = _soft_expected(workload)
    agree.csr(run(), expected, f"W-soft {provider} vs reference")
    floor = gemm_floor([(n, n, w["x"].shape[1]) for n in w["sizes"]])
    timed(benchmark, run)
    report(workload="W-soft", provider=provider, floor=floor, params={"k": SOFT_K})
