"""Triton backend of the re-ranking family: ``jaccard_distance_triton``, ``dbscan_triton`` and
``cluster_centres_triton``.

Must equal :mod:`fastassoc.kernels.reference.rerank` (``jaccard_distance_reference``,
``dbscan_reference``, ``cluster_centres_reference``): nearest lists, CSR structure and labels
exactly, values to float32 summation-order rounding on a GPU (see Limits).

Algorithm
---------
Nothing is copied to the host: every step runs on the features' device.

``jaccard_distance``:

1. *k1-nearest lists*, as the reference defines them: every row's ``K`` nearest rows by
   (exact distance, index), itself included (exact distances of ``_tiles.exact_distances``
   with the fixed-order squared norms of ``reference.rerank.exact_squared_norms``, so a row
   and its copies are at exactly 0). The fused distance + top-k kernel of the kNN family
   (``_common.fused_topk``, distance tiles in registers; ``_common.distance_tiles`` and a
   sort of bounded tiles past ``K_MAX`` proposals) proposes ``K + 8`` rows per row from its
   float32 distances ``t``, whose error against the exact ones ``_tiles.band`` bounds by
   ``B``. When a row's last proposal lies more than ``2 B`` (and the reference's square-root
   margin) beyond its ``K``-th, every row not proposed is strictly farther in exact distance
   than the exact ``K``-th, so ranking the proposals by (exact distance, index) on the device
   is the reference's list; the rows where it is not (near ties across the proposal edge) are
   redone by the reference's exact path (``knn.smallest_k_exact``). ``weighting="zhong"``
   also needs every row's largest exact distance, found the same way from bounded Triton
   distance tiles (entries within ``2 B`` of a row's largest are rescored exactly).
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
``jaccard_distance``: the launch planning of the kNN kernel, the number of rows to redo, the
sizes of the sparse pieces (one per piece and per row block) and the number of stored pairs.
``dbscan``: one per connected-components round (``O(log N)`` rounds on the usual graphs).
``cluster_centres``: none beyond the launch.

Limits
------
The lists and the farthest distances are the reference's exactly (bounds, not rounding luck).
The sums of step 2 on a GPU go through atomic ``index_add_``, whose order is not fixed:
values agree with the reference to float32 rounding, and a pair whose Jaccard distance lies
within rounding of ``max_distance`` or of 1 may be kept by one backend and dropped by the
other. On the CPU (interpreter) every step is the reference's, so the matrices are identical.
Memory as the reference: the ``N x K`` lists, ``V``, one dense tile of ``tile_elements()``
entries and the stored pairs; never an ``N x N`` array.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ... import _backend
from ..reference._tiles import band, compute_dtype, exact_distances, prepare, row_chunks
from ..reference.graph import to_csr
from ..reference.knn import smallest_k_exact
from ..reference.rerank import (_both_orders, _crow, _expanded_sets, _jaccard_pairs, _query_expansion, _weights,
                                _zhong_weights, exact_squared_norms)
from . import _common
from ._common import RowGroup

# ----------------------------------------------------------------------------- jaccard_distance


# Candidates the Triton pass proposes beyond the list width: rows whose candidates do not
# prove the exact order (two rescoring bounds apart) are redone by the reference's exact path.
_EXTRA_CANDIDATES = 8
# float32 roundings of sqrt are far below this relative separation (the reference's margin).
_SQRT_MARGIN = 2.0 ** -20


def _operand(x: torch.Tensor, metric: str, norms: torch.Tensor | None) -> _common.Operand:
    """The kernel's operand with the reference's exact squared norms (Euclidean metrics rank in
    squared space), so Triton and exact distances differ only by the inner product's rounding."""
    if metric == "cosine":
        return _common.Operand(x.contiguous(), x.new_empty(1), _common.METRIC_CODES["cosine"])
    return _common.Operand(x.contiguous(), norms, _common.METRIC_CODES["sqeuclidean"])


def _proposals(operand: _common.Operand, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's ``count`` smallest Triton distances to all rows (itself included), sorted by
    (value, column): (values [N, count] compute dtype, columns [N, count] int64)."""
    num_rows = operand.features.shape[0]
    everyone = torch.arange(num_rows, device=operand.features.device)
    if count <= _common.K_MAX:
        result = _common.fused_topk(operand, operand, count, [RowGroup(0, num_rows, [(0, num_rows, 0)])], 1,
                                    row_ids=everyone, precision="highest", op="jaccard_distance")
        return _common.select_smallest(result.values[:, 0], result.indices[:, 0], count)
    values = torch.empty((num_rows, count), dtype=compute_dtype(operand.features), device=everyone.device)
    columns = torch.empty((num_rows, count), dtype=torch.int64, device=everyone.device)
    for start, stop, tile in _common.distance_tiles(operand, operand, everyone, precision="highest",
                                                    op="jaccard_distance"):
        chunk_columns = torch.argsort(tile, dim=1, stable=True)[:, :count]
        values[start:stop], columns[start:stop] = tile.gather(1, chunk_columns), chunk_columns
    return values, columns


def _nearest_lists(x: torch.Tensor, width: int, metric: str, norms: torch.Tensor | None) -> torch.Tensor:
    """Every row's ``width`` nearest rows by (exact distance, index), itself included: [N, width] int64.

    Equals :func:`fastassoc.kernels.reference.rerank.nearest_lists`. The Triton pass proposes
    ``width + extra`` candidates with its float32 distances ``t``; ``_tiles.band`` bounds
    ``|t - exact|`` by ``B``. When a row's last proposal exceeds its ``width``-th by more than
    ``2 B`` (with the reference's square-root margin), every unproposed row is strictly farther
    in exact distance than the exact ``width``-th, so ranking the proposals by (exact distance,
    index) gives the reference's list; other rows are redone by the reference's exact path.
    """
    num_rows, device = x.shape[0], x.device
    ranking = "sqeuclidean" if metric == "euclidean" else metric
    count = min(num_rows, width + _EXTRA_CANDIDATES)
    proposed_values, proposed = _proposals(_operand(x, metric, norms), count)
    lists = torch.empty((num_rows, width), dtype=torch.int64, device=device)
    if count == num_rows:
        uncertain = torch.zeros(num_rows, dtype=torch.bool, device=device)
    else:
        magnitudes = norms if norms is not None else exact_squared_norms(x)
        bound = band(x, x, ranking, magnitudes, magnitudes)
        reach = (proposed_values[:, width - 1].to(torch.float64) + 2 * bound) * (1 + _SQRT_MARGIN) + 1e-300
        uncertain = proposed_values[:, -1].to(torch.float64) <= reach
    # Exact distances of the proposals, rows gathered in chunks of about tile_elements() values.
    exact = torch.empty((num_rows, count), dtype=x.dtype, device=device)
    step = max(1, _backend.tile_elements() // max(x.shape[1] * count, 1))
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        rows = torch.arange(start, stop, device=device).repeat_interleave(count)
        cols = proposed[start:stop].reshape(-1)
        exact[start:stop] = exact_distances(x[rows], x[cols], metric, norms[rows] if norms is not None else None,
                                            norms[cols] if norms is not None else None).view(stop - start, count)
    lists[:] = _common.select_smallest(exact, proposed, width)[1]
    redo = uncertain.nonzero().squeeze(1)
    if redo.numel():   # one host sync, sized by the (rare) rows whose proposals prove nothing
        for start, stop in row_chunks(redo.numel(), num_rows):
            rows = redo[start:stop]
            lists[rows] = smallest_k_exact(x[rows], x, metric, width, None,
                                           norms[rows] if norms is not None else None, norms)[1]
    return lists


def _farthest(x: torch.Tensor, metric: str, norms: torch.Tensor | None) -> torch.Tensor:
    """[N] every row's largest exact distance to all rows, compute dtype; equals
    :func:`fastassoc.kernels.reference.rerank.farthest_distances`.

    Triton distance tiles of at most ``tile_elements()`` entries propose: with ``t`` a row's
    largest tile value, entries below ``t - 2 B`` cannot hold the exact maximum; the others are
    rescored exactly (squared space for Euclidean, square root at the end).
    """
    ranking = "sqeuclidean" if metric == "euclidean" else metric
    num_rows, device = x.shape[0], x.device
    everyone = torch.arange(num_rows, device=device)
    farthest = torch.empty(num_rows, dtype=x.dtype, device=device)
    # Bounds need the rows' magnitudes only (cosine too): no [N, D] temporary per tile.
    magnitudes = norms if norms is not None else exact_squared_norms(x)
    bound = band(x, x, ranking, magnitudes, magnitudes)
    operand = _operand(x, metric, norms)
    for start, stop, tile in _common.distance_tiles(operand, operand, everyone, precision="highest",
                                                    op="jaccard_distance"):
        block_norms = norms[start:stop] if norms is not None else None
        top = tile.amax(1).to(torch.float64)
        floor = (top - 2 * bound[start:stop]) * (1 - _SQRT_MARGIN) - 1e-300
        rows, cols = (tile.to(torch.float64) >= floor.unsqueeze(1)).nonzero(as_tuple=True)
        del tile
        exact = exact_distances(x[start + rows], x[cols], ranking, block_norms[rows] if norms is not None else None,
                                norms[cols] if norms is not None else None)
        high = torch.full((stop - start,), -torch.inf, dtype=x.dtype, device=device)
        farthest[start:stop] = high.scatter_reduce_(0, rows, exact, reduce="amax")
    return farthest.sqrt_() if metric == "euclidean" else farthest


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
    norms = exact_squared_norms(x) if metric != "cosine" else None
    width = min(k1 if weighting == "spcl" else k1 + 1, num_rows)
    ranks = _nearest_lists(x, width, metric, norms)
    rows, cols = _expanded_sets(ranks, k1)
    if weighting == "spcl":
        values = _weights(x, rows, cols)
    else:
        values = _zhong_weights(x, rows, cols, metric, _farthest(x, metric, norms))
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
    """:func:`~fastassoc.kernels.reference.rerank.dbscan_reference` (same arguments and labels,
    equal to scikit-learn's) on the matrix's device."""
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
    """:func:`~fastassoc.kernels.reference.rerank.cluster_centres_reference` (same arguments, shapes
    and results) on the features' device: one program per cluster and column block sums its rows
    in index order, without atomics, so the means equal the reference's bits."""
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
