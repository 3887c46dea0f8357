"""CPU launcher of ``agglomerative_merge``.

Linkages are those of the reference: exact pair distances (a fixed-order inner product, so
a pair's distance depends on its two points only; see
:mod:`fastassoc.kernels.reference._tiles`), square roots and the exponentials of tssl and
tssl_typeset by torch.

One point per cluster (centroid, tssl and tssl_typeset always; buc and buc_l2 from singletons),
:func:`_merge_screened`: exact neighbour lists from the self-join of
:func:`fastassoc.kernels.cpu.knn.topk_self_join` (bf16-screened where the CPU has bf16
dot products, float32 GEMM proposals otherwise, exact rescoring either way), a proven head
of the pair order, the reference's union-find walk. When the proof does not give enough
merges, and for buc with clusters of several samples, the reference's exact two-phase
walk runs (:func:`fastassoc.kernels.reference.cluster.exact_merged_roots`: a float32 GEMM
walk bounds the last linkage, then every pair whose GEMM lower bound is below it is
rescored). buc ranks squared distances, buc_l2 their square roots. The compiled driver
(csrc/cpu/cluster.cpp) is not used: it ranks float32 GEMM linkages, whose bits depend on a
pair's position in its tile, so copies of one vector could tie-break by position.

Must equal :func:`fastassoc.kernels.reference.cluster.agglomerative_merge_reference`:
identical labels (pairs ordered by ``(linkage, i, j)``).

Memory: ``O(C * depth)`` neighbour lists; the fallback holds the reference's tiles.
"""
from __future__ import annotations

import torch

from ..reference.cluster import (BUC_LINKAGES, TSSL_LINKAGES, _lexsort, exact_merged_roots,
                                 renumber_by_first_appearance, tssl_typeset_linkage, union_find_roots,
                                 union_pair_keys)
from . import knn
from ._core import compute_dtype


def _points(x: torch.Tensor, cluster_of_sample: torch.Tensor, num_clusters: int, linkage: str):
    """(points [P, D], cluster_start [C+1] int64, sizes [C]) in the compute dtype."""
    x = x.to(compute_dtype(x))
    counts = torch.bincount(cluster_of_sample, minlength=num_clusters)
    sizes = counts.to(x.dtype)
    cluster_start = torch.zeros(num_clusters + 1, dtype=torch.int64)
    if linkage in BUC_LINKAGES:
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
    linkage : {"tssl", "tssl_typeset", "centroid", "buc", "buc_l2"}
    neighbours : int >= 1
    size_penalty : float >= 0
    precision : {"highest", "tf32"} (CPU GEMMs are always full precision)

    Returns
    -------
    Tensor [N], int64, labels renumbered 0..C'-1 by first appearance.
    """
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64)
    _, cluster_of_sample = torch.unique(labels, sorted=True, return_inverse=True)
    cluster_of_sample = cluster_of_sample.contiguous()
    num_clusters = int(cluster_of_sample.max()) + 1
    if num_merges == 0 or num_clusters == 1:
        return renumber_by_first_appearance(cluster_of_sample)
    points, _, sizes = _points(x, cluster_of_sample, num_clusters, linkage)
    if points.shape[0] == num_clusters > 2:
        sq_norms = (points * points).sum(1).contiguous()
        screened = _merge_screened(points, sq_norms, sizes, linkage, neighbours, size_penalty, num_merges)
        if screened is not None:
            return renumber_by_first_appearance(screened[cluster_of_sample])
    roots = exact_merged_roots(x, cluster_of_sample, num_clusters, num_merges, linkage, neighbours, size_penalty)
    return renumber_by_first_appearance(roots[cluster_of_sample])


# The nearest-list depth of the compiled driver's tssl pass (csrc/cpu/cluster.cpp), which
# this launcher no longer calls; kept while tests/ops/test_cpu_agg_kernels.py sets it.
_TSSL_DEPTH = 32

# Neighbour lists the screened path collects per cluster (at least `neighbours`): their
# pairs are the candidates; deeper lists prove more of the pair order.
_SCREEN_DEPTH = 16


def _merge_screened(points: torch.Tensor, sq_norms: torch.Tensor, sizes: torch.Tensor, linkage: str, neighbours: int,
                    size_penalty: float, num_merges: int) -> torch.Tensor | None:
    """The merging step from exact neighbour lists found by a screened (bf16) self-join.

    For one point per cluster (centroid, tssl and tssl_typeset always; buc from singletons),
    every linkage is increasing in the pair distance D (and, for the tssl linkages,
    decreasing in a_j), so a
    pair in neither cluster's list of its ``depth`` nearest has linkage at least
    ``lb_i = link(thr_i, a_i, max a)`` for both its clusters (``thr_i``: the last distance of
    i's list), hence at least the second smallest ``lb``; for the tssl linkages also at least
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
    values, indices = knn.new_lists(num_clusters, depth, points.dtype)
    knn.topk_self_join(points, "sqeuclidean", depth, (values, indices), norms=sq_norms, exclude_self=True)
    # buc ranks squared distances (as BUC's code); the others torch's sqrt, as the reference's tiles.
    distances = values if linkage == "buc" else values.sqrt()
    density = None
    if linkage in TSSL_LINKAGES:
        k = min(neighbours, num_clusters - 1)
        total = distances[:, 0].clone()
        for column in range(1, k):   # ascending order, as the reference sums
            total += distances[:, column]
        density = total / k

    def link(d: torch.Tensor, i: torch.Tensor, j_density: torch.Tensor | None, j_size: torch.Tensor) -> torch.Tensor:
        if linkage == "tssl_typeset":
            return tssl_typeset_linkage(d, density[i] + j_density)
        if linkage == "tssl":
            exponent = density[i] + j_density
            return exponent.sub_(d, alpha=2.0).neg_().exp_().add_(d)
        if linkage in BUC_LINKAGES:
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
