"""Triton agglomerative merging step: ``agglomerative_merge_triton`` (TSSL Eq. 8, BUC, centroid).

Algorithm
---------
Pair linkages are computed on the GPU by the fused distance + top-k kernel
(``_common._fused_topk_kernel``) with a linkage epilogue, and the smallest pairs are
*streamed*: no pair matrix, only per-row lists of the next best pairs.

* ``centroid`` / ``tssl``: rows and columns are the cluster means (fp32, fp64 for fp64
  inputs; the reference's ``index_add_`` means). For ``tssl`` a first fused launch
  gives every cluster's ``neighbours`` nearest other clusters, ``a_i`` is their sum in
  ascending order divided by the count; the pair launch then evaluates
  ``D + exp(2D - (a_i + a_j))`` in registers. Only ``j > i`` is visited (upper
  triangle: blocks skip the column tiles left of their first row).
* ``tssl_typeset``: ``(D + exp(2D)) - (a_i + a_j)``, with the same ``a_i``. The pair
  launch streams plain distances (as ``centroid``); the linkage is evaluated on the host
  for the streamed pairs (:func:`fastassoc.kernels.reference.cluster.tssl_typeset_linkage`).
  It is increasing in ``D`` and decreasing in ``a_j``, so a row's unseen pairs (all at
  ``D >=`` its last streamed distance) have linkage at least its *floor*: the linkage at
  that distance with ``a_j`` the largest ``a`` among the row's columns ``j > i``.
* ``buc`` / ``buc_l2``: rows and columns are the samples; pairs ``s < t`` of *different*
  clusters (group mask) with value ``d^2(s, t) + size_penalty * (|C_s| + |C_t|)`` (``buc``,
  the public BUC code's expression) or ``sqrt(d^2(s, t)) + ...`` (``buc_l2``). The
  cluster-pair linkage is the minimum over its sample pairs, so walking sample pairs
  in ``(value, i, j)`` order (``i < j`` their clusters) visits every cluster pair first
  at its linkage; later sample pairs of a joined pair are skipped by the union-find.

Streaming selection: every row keeps its ``r`` smallest pairs by ``(value, column)``
(``r`` from ``num_merges / rows``, at least 8). The union ``U`` of the lists is sorted
by ``(value, i, j)`` and walked greedily (host union-find) until ``num_merges`` merges,
stopping at value ``tau``. The walk is exact when every pair with value ``<= tau`` is
in ``U``: a row whose list is full and whose last value (``tssl_typeset``: its floor) is
``<= tau`` may hide more
such pairs, so those rows alone are rescanned for their next 64 pairs strictly after
their last one (the kernel's lower-bound mask) and the walk is redone, until no row is
deficient. Typically one full pass (two for the tssl linkages) plus small rescans of dense rows.

Greedy union: on the host. The walk is inherently sequential (each merge decides the
next skip), touches ~``num_merges`` (plus skipped) pairs and needs only their keys: a
copy of a few thousand int64 keys and a Python union-find costs milliseconds at
W-merge-100k (5,000 merges), below the GPU pair pass (a 100k x 100k x 2048 GEMM
triangle); a single-thread GPU walk would save those milliseconds at the price of a
second kernel with serialized global-memory latency per step. Not measured (no GPU
in this session).

Must equal ``fastassoc.kernels.reference.cluster.agglomerative_merge_reference``:
identical labels on exact or well-separated data (ties by ``(i, j)``).
"""
from __future__ import annotations

import math

import torch

from ..reference.cluster import (BUC_LINKAGES, TSSL_LINKAGES, merge_step, tssl_typeset_linkage, union_find_roots,
                                 union_pair_keys)
from . import _common
from ._common import Operand, RowGroup
from .knn import topk_anchors_triton

_RESCAN = _common.K_MAX
_MIN_FIRST = 8


class _PairStream:
    """Per-row sorted pair lists of one merging step (rows: clusters or samples)."""

    def __init__(self, operand: Operand, num_rows: int, num_clusters: int, precision: str, *,
                 cluster_of_row: torch.Tensor | None, linkage: int, row_bias: torch.Tensor | None,
                 bias_scale: float, typeset_density: torch.Tensor | None = None):
        self.operand = operand
        self.num_rows = num_rows
        self.num_clusters = num_clusters
        self.precision = precision
        self.cluster_of_row = cluster_of_row   # buc: cluster of each sample (group mask)
        self.linkage = linkage
        self.row_bias = row_bias
        self.bias_scale = bias_scale
        # tssl_typeset: a_i [C] (the stream carries plain distances), and for every row the
        # largest a_j over its columns j > i (the last row has none; its entry is unused).
        self.typeset_density = typeset_density
        if typeset_density is not None:
            suffix_max = torch.flip(torch.cummax(torch.flip(typeset_density, [0]), 0).values, [0])
            self.column_density_max = torch.cat([suffix_max[1:], typeset_density[-1:]])

    def ranked(self, rows: torch.Tensor, values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The walk's values of streamed pairs (rows [R, 1], values and columns [R, c])."""
        if self.typeset_density is None:
            return values
        density = self.typeset_density
        columns = columns.clamp(max=self.num_rows - 1)   # padding: its value is dropped by the caller
        return tssl_typeset_linkage(values, density[rows] + density[columns])

    def floor(self, rows: torch.Tensor, last_value: torch.Tensor) -> torch.Tensor:
        """Lowest walk value of the pairs of ``rows`` [R] after their last streamed one (stream value ``last_value``)."""
        if self.typeset_density is None:
            return last_value
        return tssl_typeset_linkage(last_value, self.typeset_density[rows] + self.column_density_max[rows])

    def scan(self, rows: torch.Tensor, count: int, lower=None):
        """The ``count`` next pairs (j > row) of ``rows`` -> (values [R, count], columns [R, count])."""
        group = self.cluster_of_row
        result = _common.fused_topk(
            self.operand, self.operand, count, [RowGroup(0, rows.numel(), [(0, self.num_rows, 0)])], 1,
            row_ids=rows, precision=self.precision, row_ref=rows, ref_mode=_common.REF_UPPER,
            row_group=group[rows].contiguous() if group is not None else None, col_group=group,
            linkage=self.linkage,
            row_bias=self.row_bias[rows].contiguous() if self.row_bias is not None else None,
            col_bias=self.row_bias, bias_scale=self.bias_scale, lower=lower, op="agglomerative_merge")
        return result.values[:, 0], result.indices[:, 0]

    def pair_keys(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Cluster-pair keys ``i * C + j`` (i < j) of sample/cluster pairs (rows [R, 1], columns [R, c])."""
        if self.cluster_of_row is None:
            return rows * self.num_clusters + columns
        first = self.cluster_of_row[rows].expand_as(columns)
        second = self.cluster_of_row[columns.clamp(max=self.num_rows - 1)]
        return torch.minimum(first, second) * self.num_clusters + torch.maximum(first, second)


def _walk(values: torch.Tensor, keys: torch.Tensor, num_clusters: int, num_merges: int):
    """Greedy union-find walk of pairs sorted by (value, key); returns (parent, stop value)."""
    parent = list(range(num_clusters))
    merges, position, total = 0, 0, keys.numel()
    batch = max(4 * num_merges, 1024)
    while merges < num_merges and position < total:
        merged, offset = union_pair_keys(parent, keys[position:position + batch].tolist(), num_clusters,
                                         num_merges - merges)
        merges += merged
        if offset is not None:
            return parent, values[position + offset]
        position += batch
        batch *= 2
    return parent, None


def _greedy_merge(stream: _PairStream, num_merges: int, device: torch.device) -> torch.Tensor:
    num_rows, num_clusters = stream.num_rows, stream.num_clusters
    all_rows = torch.arange(num_rows, device=device)
    wanted = math.ceil(4 * num_merges / num_rows)   # ~4 pairs per merge over all rows
    first = min(_common.K_MAX, max(_MIN_FIRST, 1 << max(wanted - 1, 0).bit_length()))
    values, columns = stream.scan(all_rows, first)
    found = columns < _common.PAD_INDEX
    pool_values = [stream.ranked(all_rows.unsqueeze(1), values, columns)[found]]
    pool_keys = [stream.pair_keys(all_rows.unsqueeze(1), columns)[found]]
    full = found[:, -1].clone()
    last_value, last_column = values[:, -1].clone(), columns[:, -1].clone()
    while True:
        pool_value = torch.cat(pool_values)
        pool_key = torch.cat(pool_keys)
        by_key = torch.argsort(pool_key)
        pool_value, pool_key = pool_value[by_key], pool_key[by_key]
        by_value = torch.sort(pool_value, stable=True).indices
        pool_value, pool_key = pool_value[by_value], pool_key[by_value]
        parent, stop_value = _walk(pool_value, pool_key, num_clusters, num_merges)
        # Rows whose next (unseen) pair may be <= the stop value must be rescanned.
        deficient = full if stop_value is None else full & (stream.floor(all_rows, last_value) <= stop_value)
        rows = torch.nonzero(deficient).squeeze(1)
        if rows.numel() == 0:
            if stop_value is None:
                raise RuntimeError("agglomerative_merge: ran out of cluster pairs before num_merges merges")
            break
        lower = (last_value[rows].contiguous(), last_column[rows].contiguous())
        values, columns = stream.scan(rows, _RESCAN, lower=lower)
        found = columns < _common.PAD_INDEX
        pool_values = [pool_value, stream.ranked(rows.unsqueeze(1), values, columns)[found]]
        pool_keys = [pool_key, stream.pair_keys(rows.unsqueeze(1), columns)[found]]
        full[rows] = found[:, -1]
        last_value[rows] = values[:, -1]
        last_column[rows] = columns[:, -1]
    return union_find_roots(parent, device)


def _mean_neighbour_distance(means: Operand, num_clusters: int, neighbours: int, precision: str) -> torch.Tensor:
    """a_i: mean distance of cluster i to its ``neighbours`` nearest other clusters [C]."""
    device = means.features.device
    k = min(neighbours, num_clusters - 1)
    everyone = torch.arange(num_clusters, device=device)
    if k <= _common.K_MAX:
        result = _common.fused_topk(means, means, k, [RowGroup(0, num_clusters, [(0, num_clusters, 0)])], 1,
                                    row_ids=everyone, precision=precision, row_ref=everyone,
                                    ref_mode=_common.REF_EXCLUDE, op="agglomerative_merge")
        nearest = result.values[:, 0]
    else:
        zeros = torch.zeros(num_clusters, dtype=torch.int64, device=device)
        nearest, _ = topk_anchors_triton(means.features, means.features, k, "euclidean",
                                         torch.tensor([0, num_clusters], device=device), zeros, everyone, precision)
        nearest = nearest.to(means.features.dtype)
    # Summed in ascending order, as the reference, so the value is defined to the last bit.
    total = nearest[:, 0].clone()
    for column in range(1, k):
        total += nearest[:, column]
    return total / k


def agglomerative_merge_triton(x: torch.Tensor, labels: torch.Tensor, num_merges: int, linkage: str,
                               neighbours: int, size_penalty: float, precision: str) -> torch.Tensor:
    """One greedy merging step (see the module docstring).

    Parameters and result as ``agglomerative_merge_reference``; ``precision`` in
    {"highest", "tf32"} selects the ``tl.dot`` input precision of fp32 features.
    """
    def merged_roots(cluster_of_sample: torch.Tensor, num_clusters: int) -> torch.Tensor:
        dtype = _common.compute_dtype(x.dtype)
        sizes = torch.bincount(cluster_of_sample, minlength=num_clusters).to(dtype)
        if linkage in BUC_LINKAGES:
            # buc ranks squared distances (BUC's code), buc_l2 their square roots.
            operand = _common.prepare(x, "sqeuclidean" if linkage == "buc" else "euclidean")
            stream = _PairStream(operand, x.shape[0], num_clusters, precision, cluster_of_row=cluster_of_sample,
                                 linkage=_common.LINKAGE_ADD, row_bias=sizes[cluster_of_sample].contiguous(),
                                 bias_scale=size_penalty)
        else:
            means = torch.zeros(num_clusters, x.shape[1], dtype=dtype, device=x.device)
            means.index_add_(0, cluster_of_sample, x.to(dtype))
            means /= sizes.unsqueeze(1)
            operand = _common.prepare(means, "euclidean")
            density = None
            if linkage in TSSL_LINKAGES:
                density = _mean_neighbour_distance(operand, num_clusters, neighbours, precision).contiguous()
            if linkage == "tssl_typeset":
                # Plain distances streamed; the typeset linkage is applied to the streamed pairs.
                stream = _PairStream(operand, num_clusters, num_clusters, precision, cluster_of_row=None,
                                     linkage=_common.LINKAGE_NONE, row_bias=None, bias_scale=0.0,
                                     typeset_density=density)
            else:
                stream = _PairStream(operand, num_clusters, num_clusters, precision, cluster_of_row=None,
                                     linkage=_common.LINKAGE_TSSL if density is not None else _common.LINKAGE_NONE,
                                     row_bias=density, bias_scale=0.0)
        return _greedy_merge(stream, num_merges, x.device)

    return merge_step(x, labels, num_merges, merged_roots)
