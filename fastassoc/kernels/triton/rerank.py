"""Triton backend of the re-ranking family: ``jaccard_distance_triton``, ``dbscan_triton`` and
``cluster_centres_triton``.

Must equal :mod:`fastassoc.kernels.reference.rerank` (``jaccard_distance_reference``,
``dbscan_reference``, ``cluster_centres_reference``): CSR structure and labels exactly, values
within float32 summation-order rounding (see Limits).

Algorithm
---------
Nothing is copied to the host: every step runs on the features' device.

``jaccard_distance``:

1. *k1-nearest lists* from the fused distance + top-k kernel of the kNN family
   (:func:`fastassoc.kernels.triton.knn.topk_anchors_triton`) as a self-join that excludes
   each row's own column and asks for ``K`` neighbours (``K - 1`` would lose the ``K``-th
   copy of a row that has ``K`` earlier copies); the row itself is then inserted
   at distance exactly 0 behind the neighbours that are at distance 0 *and* have a smaller
   index, which is the reference's (distance, index) order with its zeroed diagonal. The
   distance tiles stay in registers; ``weighting="zhong"`` also needs every row's largest
   distance to all rows, taken as the row maximum of bounded distance tiles
   (``_common.distance_tiles``, at most ``tile_elements()`` entries, own column masked).
2. *Reciprocal sets, expansion, weights, query expansion and the Jaccard sums* are the
   reference's device-side steps (sort, ``searchsorted``, ``index_add_`` segment sums,
   ``scatter_reduce_`` segment maxima over sparse triples in pieces of ``tile_elements() / 16``,
   the overlaps of a row block in one dense ``[b, N]`` tile of at most ``tile_elements()``
   entries); they are imported from the reference module rather than restated, so the two
   backends cannot drift apart in the irregular part.

``dbscan``: ``values <= eps`` in the values' dtype gives the neighbour edges; degree = stored
neighbours plus the point itself when its diagonal entry is not stored (scikit-learn stores an
explicit 0 there); core = degree >= ``min_samples``. Connected components of the core points
by hooking and pointer jumping: every round each core-core edge hooks the parent of one end
onto the smaller parent of the other (``scatter_reduce_(amin)``, both directions, since the
matrix is symmetric), then ``ceil(log2 N) + 1`` unconditional jumps ``parent = parent[parent]``
flatten every tree into a star (no host sync per jump); one sync per round asks whether any
edge still joins two stars. Parents only decrease and stay inside the component, so every root
ends as its component's smallest index. Clusters are numbered by an exclusive running count of
the roots (the order of each component's smallest core index, scikit-learn's numbering, with
no ``unique``); a border point takes the smallest cluster number among its core neighbours
(``scatter_reduce_(amin)``): scikit-learn expands one cluster completely before it starts the
next, so the smallest-numbered adjacent cluster reaches a border point first. Noise is -1.

``cluster_centres``: member rows are stably sorted by label (so each cluster's rows are in
index order) and ``_segment_mean_kernel`` runs one program per (cluster, feature block) that
sums its segment's rows one after another in that order, in the compute dtype, and divides by
the count: the reference's ``index_add_`` order, deterministic on the GPU (no atomics).

Host syncs
----------
``jaccard_distance``: the launch planning of the kNN kernel, the sizes of the sparse pieces
(one per piece and per row block) and the number of stored pairs. ``dbscan``: one per
connected-components round (``O(log N)`` rounds on the usual graphs). ``cluster_centres``:
none beyond the launch.

Limits
------
The nearest lists come from the Triton kernel's own distances, which may differ from the
reference's torch GEMM in the last bits: neighbours at exactly equal distances (duplicated
rows, exactly representable data) are ordered as the reference orders them, but two rows whose
distances to a query differ only by rounding may swap places. The sums of step 2 on a GPU go
through atomic ``index_add_``, whose order is not fixed: values agree with the reference to
float32 rounding (tests use ``atol = 1e-6``), and a pair whose Jaccard distance lies within
rounding of ``max_distance`` or of 1 may be kept by one backend and dropped by the other.
Memory as the reference: the ``N x K`` lists, ``V``, one dense tile of ``tile_elements()``
entries and the stored pairs; never an ``N x N`` array.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference._tiles import compute_dtype, prepare
from ..reference.graph import to_csr
from ..reference.rerank import (_both_orders, _crow, _expanded_sets, _jaccard_pairs, _query_expansion, _weights,
                                _zhong_weights)
from . import _common
from .knn import topk_anchors_triton

# ----------------------------------------------------------------------------- jaccard_distance


def _nearest_lists(x: torch.Tensor, width: int, metric: str) -> torch.Tensor:
    """Every row's ``width`` nearest rows, itself at distance 0 ([N, width] int64, device of ``x``).

    Ties by the smaller index, the row itself counted at distance exactly 0.
    """
    num_rows, device = x.shape[0], x.device
    own = torch.arange(num_rows, device=device)
    # One neighbour more than the list keeps: when more than ``width - 1`` copies of a row
    # precede it (distance 0, smaller index) the row itself drops out of its own list.
    others = min(width, num_rows - 1)
    if others == 0:
        return own.unsqueeze(1)
    distances, neighbours = topk_anchors_triton(
        x, x, others, metric, torch.tensor([0, num_rows], device=device),
        torch.zeros(num_rows, dtype=torch.int64, device=device), own, "highest")
    # Lists are (distance, index) sorted and distances are >= 0, so the entries that precede
    # the row itself (distance 0, smaller index) form a prefix.
    before_self = ((distances == 0) & (neighbours < own.unsqueeze(1))).sum(1, keepdim=True)
    slots = torch.arange(others + 1, device=device).unsqueeze(0)
    source = torch.where(slots < before_self, slots, slots - 1).clamp_min_(0)
    merged = torch.where(slots == before_self, own.unsqueeze(1), torch.gather(neighbours, 1, source))
    return merged[:, :width]


def _farthest(x: torch.Tensor, metric: str) -> torch.Tensor:
    """[N] every row's largest distance to all rows (its own counted as 0), compute dtype."""
    num_rows, device = x.shape[0], x.device
    own = torch.arange(num_rows, device=device)
    operand = _common.prepare(x, metric)
    farthest = torch.empty(num_rows, dtype=compute_dtype(x), device=device)
    for start, stop, tile in _common.distance_tiles(operand, operand, own, precision="highest", exclude=own,
                                                    op="jaccard_distance"):
        # The own column comes back as +inf; distances are >= 0, so 0 stands in for it.
        farthest[start:stop] = tile.masked_fill_(torch.isinf(tile), 0.0).amax(1)
    return farthest


def jaccard_distance_triton(features: torch.Tensor, k1: int, k2: int, weighting: str,
                            max_distance: float | None, metric: str) -> torch.Tensor:
    """k-reciprocal Jaccard distance as a symmetric sparse matrix, on the features' device.

    Parameters and result as :func:`fastassoc.kernels.reference.rerank.jaccard_distance_reference`
    (see the module docstring for how it is computed and how closely it matches).

    Parameters
    ----------
    features : Tensor [N, D], float, finite (CUDA, or CPU under TRITON_INTERPRET=1)
    k1 : int >= 1
    k2 : int, 1 <= k2 <= k1
    weighting : {"spcl", "zhong"}
    max_distance : float >= 0 or None
    metric : {"sqeuclidean", "euclidean", "cosine"}

    Returns
    -------
    Tensor [N, N], sparse CSR, float32, symmetric, column indices sorted per row, explicit zeros
    on the diagonal.
    """
    num_rows, device = features.shape[0], features.device
    diagonal = torch.arange(num_rows, device=device)
    if num_rows == 0:
        return to_csr(diagonal, diagonal, torch.empty(0, dtype=torch.float32, device=device), 0)
    x = prepare(features, metric)
    width = min(k1 if weighting == "spcl" else k1 + 1, num_rows)
    ranks = _nearest_lists(x, width, metric)
    rows, cols = _expanded_sets(ranks, k1)
    if weighting == "spcl":
        values = _weights(x, rows, cols)
    else:
        values = _zhong_weights(x, rows, cols, metric, _farthest(x, metric))
    if k2 != 1:
        rows, cols, values = _query_expansion(_crow(rows, num_rows), cols, values, ranks, k2)
    low, high, distances = _jaccard_pairs(_both_orders(rows, cols, values, num_rows), max_distance)
    all_rows = torch.cat([low, high, diagonal])
    all_cols = torch.cat([high, low, diagonal])
    all_values = torch.cat([distances, distances, torch.zeros(num_rows, dtype=torch.float32, device=device)])
    return to_csr(all_rows, all_cols, all_values, num_rows)


# ----------------------------------------------------------------------------- dbscan


def _components(num_rows: int, sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] int64: the smallest vertex index of every vertex's connected component.

    ``sources``/``targets`` list every edge in both directions (a symmetric matrix does).
    """
    parent = torch.arange(num_rows, device=sources.device)
    if sources.numel() == 0:
        return parent
    jumps = max(1, math.ceil(math.log2(max(num_rows, 2)))) + 1
    while True:
        # Hook: the parent of each source moves to the smaller parent of its target.
        parent.scatter_reduce_(0, parent[sources], parent[targets], reduce="amin")
        for _ in range(jumps):
            parent = parent[parent]
        if not bool((parent[sources] != parent[targets]).any()):
            return parent


def dbscan_triton(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, num_rows: int,
                  eps: float, min_samples: int) -> torch.Tensor:
    """DBSCAN labels of a symmetric sparse distance matrix, on its device, equal to scikit-learn's.

    Parameters
    ----------
    crow_indices : Tensor [N+1], int64
    col_indices : Tensor [nnz], int64, sorted within rows, no duplicates
    values : Tensor [nnz], float, finite, non-negative, symmetric matrix
    num_rows : int
    eps : float >= 0
    min_samples : int >= 1

    Returns
    -------
    Tensor [N], int64: cluster numbers from 0 in scikit-learn's order, -1 for noise.
    """
    device = values.device
    indices = torch.arange(num_rows, device=device)
    rows = torch.repeat_interleave(indices, crow_indices[1:] - crow_indices[:-1], output_size=col_indices.numel())
    on_diagonal = rows == col_indices
    stored_diagonal = torch.zeros(num_rows, dtype=torch.int64, device=device)
    stored_diagonal.index_add_(0, rows, on_diagonal.to(torch.int64))
    # eps in the values' dtype: scikit-learn compares a float32 matrix with a float32-rounded eps.
    near = values <= torch.tensor(eps, dtype=values.dtype, device=device)
    degree = torch.zeros(num_rows, dtype=torch.int64, device=device).index_add_(0, rows, near.to(torch.int64))
    core = degree + (stored_diagonal == 0).to(torch.int64) >= min_samples
    linked = near & ~on_diagonal & core[rows] & core[col_indices]
    roots = _components(num_rows, rows[linked], col_indices[linked])
    # Roots of core components are core points; an exclusive count numbers them in index order.
    is_root = core & (roots == indices)
    number = torch.cumsum(is_root.to(torch.int64), 0) - 1
    labels = torch.where(core, number[roots], -1)
    border = near & core[col_indices] & ~core[rows]
    unreached = torch.iinfo(torch.int64).max
    reached = torch.full((num_rows,), unreached, dtype=torch.int64, device=device)
    reached.scatter_reduce_(0, rows[border], labels[col_indices[border]], reduce="amin")
    return torch.where(reached != unreached, reached, labels)


# ----------------------------------------------------------------------------- cluster_centres


@triton.jit
def _segment_mean_kernel(
    # pointers
    features_ptr, members_ptr, offsets_ptr, out_ptr,
    # sizes
    dim,
    # strides
    stride_features, stride_out,
    # meta-parameters
    ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[c, d-block] = mean of the rows ``members[offsets[c]:offsets[c + 1]]``, summed in that order."""
    cluster = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < dim
    start = tl.load(offsets_ptr + cluster)
    stop = tl.load(offsets_ptr + cluster + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    for position in range(start, stop):
        row = tl.load(members_ptr + position)
        acc += tl.load(features_ptr + row * stride_features + offs_d, mask=d_mask, other=0.0).to(ACC_DTYPE)
    count = tl.maximum(stop - start, 1).to(ACC_DTYPE)
    tl.store(out_ptr + cluster * stride_out + offs_d, acc / count, mask=d_mask)


_BLOCK_D = 128


def cluster_centres_triton(features: torch.Tensor, labels: torch.Tensor, num_clusters: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of the rows of every cluster ``0 .. num_clusters - 1`` (label -1 ignored), on the features' device.

    Parameters
    ----------
    features : Tensor [N, D], float
    labels : Tensor [N], int64 in [-1, num_clusters)
    num_clusters : int >= 0

    Returns
    -------
    centres : Tensor [C, D], float32 (float64 stays float64); a cluster without rows is all zeros
    counts : Tensor [C], int64
    """
    device = features.device
    dtype = compute_dtype(features)
    dim = features.shape[1]
    # Noise (-1) sorts first and falls outside every segment; the stable sort keeps index order.
    order = torch.sort(labels, stable=True).indices
    counts = torch.bincount(labels + 1, minlength=num_clusters + 1)[1:]
    offsets = torch.zeros(num_clusters + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    offsets += labels.numel() - offsets[-1]          # skip the noise rows at the front
    centres = torch.empty((num_clusters, dim), dtype=dtype, device=device)
    if num_clusters == 0 or dim == 0:
        return centres, counts
    rows = features.contiguous()
    grid = (num_clusters, triton.cdiv(dim, _BLOCK_D))
    _common.launch(_segment_mean_kernel, grid, rows, order, offsets, centres, dim, rows.stride(0),
                   centres.stride(0), device=device, op="cluster_centres",
                   ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK_D=_BLOCK_D)
    return centres, counts
