"""Compiled CPU launcher of ``agglomerative_merge`` (csrc/cpu/cluster.cpp).

Algorithm: Python prepares the "points" of the step exactly as the reference does
(cluster means from ``index_add_`` / sizes for ``centroid`` and ``tssl``; the samples
sorted by cluster for ``buc``) with their squared norms; the C++ driver walks the
upper triangle of point pairs in tiles whose inner products it requests from a
callback running torch's GEMM into one reused buffer, turns each tile into cluster-pair
linkages (cluster minimum for ``buc``; square roots and tssl's exponentials through
callbacks running torch's ``sqrt`` / ``exp``, whose bits the reference's ties depend on), streams the smallest pairs through bounded
per-thread buffers, walks them with a union-find and renumbers the clusters by first
appearance. See the C++ file for the selection, the re-scans and tssl's single-pass
shortcut (one GEMM pass for every linkage in the common case: tssl's first pass both
computes ``a_i`` and proves its nearest-list candidates to be the head of the order).

Screened path (:func:`_merge_screened`, float32 points on CPUs with bf16 dot products,
one point per cluster): exact neighbour lists from the bf16-screened self-join, a proven
head of the pair order, the reference's union-find walk; the driver above runs when the
proof does not give enough merges. Its distances are exactly rounded inner products, so
its linkages can differ from the float32 GEMM's in the last bits (near-ties only).

Must equal :func:`fastassoc.kernels.reference.cluster.agglomerative_merge_reference`:
identical labels (pairs ordered by ``(linkage, i, j)``). Linkages carry the reference's
bits: the same centroid arithmetic (torch), GEMM tiles with the reference's row counts,
the shared distance expression, and torch's ``sqrt`` and ``exp`` (callbacks).

Memory: one dot tile of at most ``max(tile_elements(), P)`` elements, pair buffers of
``O(capacity)`` per thread (``capacity <= tile_elements()`` but at least 1024 pairs), and
for tssl ``O(C * depth)`` nearest lists per thread (depth = max(neighbours, 32)).
"""
from __future__ import annotations

import ctypes

import torch

from ... import _backend
from ..reference.cluster import _lexsort, renumber_by_first_appearance, union_find_roots, union_pair_keys
from . import _screen, knn
from ._core import compute_dtype, core, ptr, scratch_buffer

_LINKAGE_CODES = {"centroid": 0, "tssl": 1, "buc": 2}

# First buffer size, as in the reference: redundant pairs inside already-joined
# clusters are common, so keep a few pairs per merge.
_MIN_PAIR_BUFFER = 1024
_PAIRS_PER_MERGE = 4
# tssl's first pass collects each cluster's _TSSL_DEPTH nearest clusters (at least
# `neighbours`); deeper lists make it more likely that the pairs they prove to be in
# order already give every merge, so that no second GEMM pass is needed.
_TSSL_DEPTH = 32


def _points(x: torch.Tensor, cluster_of_sample: torch.Tensor, num_clusters: int, linkage: str):
    """(points [P, D], cluster_start [C+1] int64, sizes [C]) in the compute dtype."""
    x = x.to(compute_dtype(x))
    counts = torch.bincount(cluster_of_sample, minlength=num_clusters)
    sizes = counts.to(x.dtype)
    cluster_start = torch.zeros(num_clusters + 1, dtype=torch.int64)
    if linkage == "buc":
        cluster_start[1:] = counts.cumsum(0)
        points = x[torch.argsort(cluster_of_sample, stable=True)]
    else:
        cluster_start[1:] = torch.arange(1, num_clusters + 1)
        points = torch.zeros(num_clusters, x.shape[1], dtype=x.dtype)
        points.index_add_(0, cluster_of_sample, x)
        points /= sizes.unsqueeze(1)
    return points.contiguous(), cluster_start, sizes.contiguous()


def agglomerative_merge_cpu(x: torch.Tensor, labels: torch.Tensor, num_merges: int, linkage: str,
                            neighbours: int, size_penalty: float, precision: str) -> torch.Tensor:
    """One greedy merging step; see the module docstring.

    Parameters
    ----------
    x : Tensor [N, D], float, CPU
    labels : Tensor [N], int64 >= 0
    num_merges : int, 0 <= num_merges <= C - 1
    linkage : {"tssl", "centroid", "buc"}
    neighbours : int >= 1
    size_penalty : float >= 0
    precision : {"highest", "tf32"} (CPU GEMMs are always full precision)

    Returns
    -------
    Tensor [N], int64, labels renumbered 0..C'-1 by first appearance.
    """
    num_samples = x.shape[0]
    labels_out = torch.empty(num_samples, dtype=torch.int64)
    if num_samples == 0:
        return labels_out
    _, cluster_of_sample = torch.unique(labels, sorted=True, return_inverse=True)
    cluster_of_sample = cluster_of_sample.contiguous()
    num_clusters = int(cluster_of_sample.max()) + 1
    if num_merges > 0 and num_clusters > 1:
        points, cluster_start, sizes = _points(x, cluster_of_sample, num_clusters, linkage)
    else:  # nothing to merge: only the renumbering runs
        points = torch.zeros(num_clusters, 1, dtype=compute_dtype(x))
        cluster_start = torch.arange(num_clusters + 1, dtype=torch.int64)
        sizes = torch.ones(num_clusters, dtype=points.dtype)
    sq_norms = (points * points).sum(1).contiguous()
    num_points = points.shape[0]
    if num_merges > 0 and num_points == num_clusters > 2:
        screened = _merge_screened(points, sq_norms, sizes, linkage, neighbours, size_penalty, num_merges)
        if screened is not None:
            return renumber_by_first_appearance(screened[cluster_of_sample])
    tile_elements = _backend.tile_elements()
    buffer = torch.empty(0, dtype=points.dtype)

    def dots(row_start: int, row_stop: int, column_start: int) -> int:
        nonlocal buffer
        shape = (row_stop - row_start, num_points - column_start)
        if buffer.numel() < shape[0] * shape[1]:
            # The thread's reused tile buffer (no page faults on every call).
            buffer = scratch_buffer(max(shape[0] * shape[1], min(tile_elements, num_points * num_points)),
                                    points.dtype)
        out = buffer[: shape[0] * shape[1]].view(shape)
        torch.mm(points[row_start:row_stop], points[column_start:].T, out=out)
        return out.data_ptr()

    element = ctypes.c_double if points.dtype == torch.float64 else ctypes.c_float

    # torch's sqrt and exp, as the reference: they are not always correctly rounded, and
    # linkages must have the reference's bits for ties and order to come out the same.
    def sqrt_(address: int, count: int) -> None:
        torch.frombuffer((element * count).from_address(address), dtype=points.dtype).sqrt_()

    def exp_(address: int, count: int) -> None:
        torch.frombuffer((element * count).from_address(address), dtype=points.dtype).exp_()

    capacity = min(max(_PAIRS_PER_MERGE * num_merges, _MIN_PAIR_BUFFER), tile_elements)
    kernel = core().agglomerative_merge_f64 if points.dtype == torch.float64 else core().agglomerative_merge_f32
    kernel(num_points, num_clusters, ptr(cluster_start), ptr(sq_norms), ptr(sizes), _LINKAGE_CODES[linkage],
           neighbours, float(size_penalty), num_merges, capacity, max(neighbours, _TSSL_DEPTH), tile_elements,
           ptr(cluster_of_sample), num_samples, ptr(labels_out), dots, sqrt_, exp_)
    return labels_out


# Neighbour lists the screened path collects per cluster (at least `neighbours`): their
# pairs are the candidates; deeper lists prove more of the pair order.
_SCREEN_DEPTH = 16


def _merge_screened(points: torch.Tensor, sq_norms: torch.Tensor, sizes: torch.Tensor, linkage: str, neighbours: int,
                    size_penalty: float, num_merges: int) -> torch.Tensor | None:
    """The merging step from exact neighbour lists found by a screened (bf16) self-join.

    For one point per cluster (centroid and tssl always; buc from singletons), every
    linkage is increasing in the pair distance D (and, for tssl, decreasing in a_j), so a
    pair in neither cluster's list of its ``depth`` nearest has linkage at least
    ``lb_i = link(thr_i, a_i, max a)`` for both its clusters (``thr_i``: the last distance of
    i's list), hence at least the second smallest ``lb``; for tssl also at least
    ``min_i link(thr_i, a_i, max of a_j over clusters j not after i in thr order)``. The
    listed pairs below the larger bound
    are exactly the head of the global (linkage, i, j) order; they are walked with the
    reference's union-find. Distances are the exact ones of the rescoring, square roots,
    a_i and linkages use the reference's torch expressions. Returns a root per cluster, or
    None (not screened, or the proven head gave too few merges: the caller runs the
    float32 driver).
    """
    num_clusters = points.shape[0]
    depth = min(num_clusters - 1, max(neighbours, _SCREEN_DEPTH))
    if not _screen.worthwhile(points, num_clusters, depth + _screen.SLACK, "bf16"):
        return None
    values, indices = knn.new_lists(num_clusters, depth, torch.float32)
    knn.topk_self_join(points, "sqeuclidean", depth, (values, indices), norms=sq_norms, exclude_self=True)
    distances = values.sqrt()   # torch's sqrt, as the reference's distance tiles
    density = None
    if linkage == "tssl":
        k = min(neighbours, num_clusters - 1)
        total = distances[:, 0].clone()
        for column in range(1, k):   # ascending order, as the reference sums
            total += distances[:, column]
        density = total / k

    def link(d: torch.Tensor, i: torch.Tensor, j_density: torch.Tensor | None, j_size: torch.Tensor) -> torch.Tensor:
        if linkage == "tssl":
            exponent = density[i] + j_density
            return exponent.sub_(d, alpha=2.0).neg_().exp_().add_(d)
        if linkage == "buc":
            return d + size_penalty * (sizes[i] + j_size)
        return d.clone()

    rows = torch.arange(num_clusters).unsqueeze(1).expand_as(indices)
    low, high = torch.minimum(rows, indices).flatten(), torch.maximum(rows, indices).flatten()
    keys, first = torch.unique(low * num_clusters + high, return_inverse=True)
    position = torch.full((keys.numel(),), low.numel(), dtype=torch.int64).scatter_reduce_(
        0, first, torch.arange(low.numel()), "amin")
    pair_distance = distances.flatten()[position]
    i, j = keys // num_clusters, keys % num_clusters
    linkages = link(pair_distance, i, density[j] if density is not None else None, sizes[j])
    everyone = torch.arange(num_clusters)
    last = distances[:, -1].clone()
    smallest_size = sizes.min().expand(num_clusters)
    # Two lower bounds on every unlisted pair's linkage; the larger holds too.
    # (1) Both clusters' own bounds with the largest a_j: the pair is above the second smallest.
    own = link(last.clone(), everyone, density.max().expand(num_clusters) if density is not None else None,
               smallest_size)
    bound = torch.kthvalue(own, 2).values
    if density is not None:
        # (2) Name i the cluster of the pair later in (thr, index) order: D_ij >= thr_i and a_j is
        # at most the largest a among the clusters up to i in that order.
        order = torch.argsort(last, stable=True)
        reach = torch.empty_like(density)
        reach[order] = torch.cummax(density[order], 0).values
        bound = torch.maximum(bound, link(last.clone(), everyone, reach, smallest_size).min())
    proven = linkages < bound
    ordered_linkages, ordered_keys = _lexsort(linkages[proven], keys[proven])
    parent = list(range(num_clusters))
    merges, _ = union_pair_keys(parent, ordered_keys.tolist(), num_clusters, num_merges)
    if merges < num_merges:
        return None
    return union_find_roots(parent, points.device)
