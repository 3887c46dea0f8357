"""Pure-torch reference of one progressive agglomerative merging step.

Algorithm (the spec every backend's ``agglomerative_merge_<backend>`` must equal):

1. Clusters are the distinct label values; cluster ``i`` is the ``i``-th smallest value.
2. Linkage of every unordered cluster pair ``i < j``, in the compute dtype (float32, or
   float64 for float64 features), from the exact distances of ``_tiles`` (a fixed-order
   inner product: a pair's distance depends on its two points only, so copies tie exactly):

   * ``centroid``: ``D_ij = sqrt(max(|mu_i|^2 + |mu_j|^2 - 2 mu_i.mu_j, 0))`` between
     cluster means ``mu`` (sums in the compute dtype divided by the sizes).
   * ``tssl`` (TSSL Eq. 8): ``D_ij + exp(2 D_ij - (a_i + a_j))`` where ``a_i`` is the mean
     of the ``k = min(neighbours, C - 1)`` smallest ``D_il`` over ``l != i``, summed in
     ascending order and divided by ``k``. Large exponents overflow to ``inf``; such
     pairs tie and fall back to ``(i, j)`` order.
   * ``tssl_typeset`` (TSSL Eq. 8 as typeset): ``(D_ij + exp(2 D_ij)) - (a_i + a_j)``, rounded
     in that order (``a_i + a_j`` once, as for ``tssl``), same ``a_i``. ``exp(2 D)``
     overflows to ``inf`` for ``D`` above about 44.36 (float32; 354.9 in float64).
   * ``buc``: ``min over samples s in i, t in j of the clamped squared distance
     + size_penalty * (|C_i| + |C_j|)`` (BUC's minimum distance with its diversity term, as
     the public BUC code ranks pairs: squared distances plus ``ratio_n (|C_i| + |C_j|)``).
   * ``buc_l2``: the same with ``sqrt`` of that minimum (the plain distance).

3. Pairs are ordered by ``(linkage, i, j)`` lexicographically and walked greedily with a
   union-find; a pair whose clusters are already joined is skipped. The walk stops after
   ``num_merges`` merges. Distances and sizes are frozen for the whole step.
4. Output labels are the merged clusters renumbered ``0..C'-1`` by first appearance.

Exact walk (:func:`exact_merged_roots`): float32 GEMM tiles give every linkage to within
a bound (``_tiles.band``, carried through sqrt, exp and the size penalty as a lower
bound). Phase 1 walks the GEMM linkages (as below); the pairs that merged there suffice
for ``num_merges`` merges, so the exact walk stops at a linkage ``<= U``, the largest
exact linkage among them. Phase 2 walks exact linkages: every pair whose lower bound is
``<= U`` is rescored exactly (buc: the sample pairs within two bounds of the cluster pair's
GEMM minimum), every other pair is ``inf`` (its exact linkage exceeds ``U``). The ``a_i`` of
tssl and tssl_typeset come from exact nearest lists (``knn.smallest_k_exact``).

Memory: the C x C pair matrix is never held. Cluster-pair linkages are produced in row
tiles of at most ``_backend.tile_elements()`` entries (``j > i`` only); a running buffer
keeps the smallest ``M`` pairs in ``(linkage, i, j)`` order. When those ``M`` pairs yield
too few merges, the stream is replayed for the next pairs strictly after the last one
walked, with ``M`` doubled (at most ``tile_elements()``). ``buc`` sorts the samples by
cluster and tiles over groups of whole clusters, so the sample-to-sample minimum reduces
to a cluster-pair minimum inside one tile (a cluster larger than a tile is reduced over
several row sub-tiles). Tile sizes change only the number of passes, never the result.

``precision`` is accepted for the common signature; the reference always computes at full
precision of its compute dtype.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from ... import _backend
from . import _tiles
from .knn import smallest_k_exact

# Linkages over sample pairs (minimum distance between clusters): squared (BUC's code) and plain.
BUC_LINKAGES = ("buc", "buc_l2")
# The two readings of TSSL Eq. 8 (text and typeset): both need every cluster's a_i first.
TSSL_LINKAGES = ("tssl", "tssl_typeset")

# Smallest first batch of pairs kept for the greedy walk (and how much it exceeds
# num_merges): redundant pairs inside already-joined clusters are common.
_MIN_PAIR_BUFFER = 1024
_PAIRS_PER_MERGE = 4

# A block of linkages: (first row cluster, linkage tile [rows, C - first - 1]) where
# tile[a, b] is the linkage of clusters (first + a, first + 1 + b); entries with j <= i
# are ignored by the consumer.
LinkageBlocks = Callable[[], Iterator[tuple[int, torch.Tensor]]]


def agglomerative_merge_reference(x: torch.Tensor, labels: torch.Tensor, num_merges: int, linkage: str,
                                  neighbours: int, size_penalty: float, precision: str) -> torch.Tensor:
    """One greedy merging step; see the module docstring for the exact spec.

    Parameters
    ----------
    x : Tensor [N, D], float (validated, contiguous)
    labels : Tensor [N], int64 >= 0
    num_merges : int, 0 <= num_merges <= C - 1
    linkage : {"tssl", "tssl_typeset", "centroid", "buc", "buc_l2"}
    neighbours : int >= 1
    size_penalty : float >= 0
    precision : {"highest", "tf32"} (ignored: the reference is always exact)

    Returns
    -------
    Tensor [N], int64, labels renumbered 0..C'-1 by first appearance.
    """
    def merged_roots(cluster_of_sample: torch.Tensor, num_clusters: int) -> torch.Tensor:
        return exact_merged_roots(x, cluster_of_sample, num_clusters, num_merges, linkage, neighbours, size_penalty)

    return merge_step(x, labels, num_merges, merged_roots)


def exact_merged_roots(x: torch.Tensor, cluster_of_sample: torch.Tensor, num_clusters: int, num_merges: int,
                       linkage: str, neighbours: int, size_penalty: float) -> torch.Tensor:
    """Root cluster of every cluster [C] after the greedy walk over exact linkages (shared with cpu).

    Phase 1 walks the float32 GEMM linkages; the pairs that merged there suffice for
    ``num_merges`` merges, so the exact walk stops at a linkage ``<= U``, the largest exact
    linkage among them. Phase 2 walks the exact linkages of every pair whose GEMM-based
    lower bound is ``<= U`` (``inf`` for the others, which are all above ``U``).
    """
    features = _tiles.prepare(x, "euclidean")
    if linkage in BUC_LINKAGES:
        source = _BucLinkages(features, cluster_of_sample, num_clusters, size_penalty, squared=linkage == "buc")
    else:
        source = _CentroidLinkages(features, cluster_of_sample, num_clusters, linkage, neighbours)
    merging = _merging_keys(source.gemm_blocks, num_clusters, num_merges, x.device)
    limit = float(source.exact(merging // num_clusters, merging % num_clusters).max())
    return _greedy_merge(lambda: source.candidate_blocks(limit), num_clusters, num_merges, x.device)


# Relative slack on lower bounds for the float32 roundings of sqrt, exp and sums.
_SLACK = 2.0 ** -20


def _lower_distance(squared: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """float64 lower bound on the exact Euclidean distance of entries whose GEMM squared distance is ``squared``."""
    return (squared.to(torch.float64) - bound).clamp_min_(0.0).sqrt_().mul_(1 - _SLACK)


def _merging_keys(blocks: LinkageBlocks, num_clusters: int, num_merges: int, device: torch.device) -> torch.Tensor:
    """Keys ``i * C + j`` [num_merges] of the pairs that merge in the greedy walk over ``blocks``."""
    parent = list(range(num_clusters))
    capacity = min(max(_PAIRS_PER_MERGE * num_merges, _MIN_PAIR_BUFFER), _backend.tile_elements())
    merging: list[int] = []
    after = None
    while len(merging) < num_merges:
        values, keys = _smallest_pairs(blocks, num_clusters, capacity, after)
        if keys.numel() == 0:
            raise RuntimeError("agglomerative_merge: ran out of cluster pairs before num_merges merges")
        for key in keys.tolist():
            root_i, root_j = find_root(parent, key // num_clusters), find_root(parent, key % num_clusters)
            if root_i != root_j:
                parent[max(root_i, root_j)] = min(root_i, root_j)
                merging.append(key)
                if len(merging) == num_merges:
                    break
        last_key = int(keys[-1])
        after = (values[-1], last_key // num_clusters, last_key % num_clusters)
        capacity = min(2 * capacity, _backend.tile_elements())
    return torch.tensor(merging, dtype=torch.int64, device=device)


class _CentroidLinkages:
    """centroid / tssl linkages between cluster means: GEMM blocks, exact pairs, candidate blocks."""

    def __init__(self, x: torch.Tensor, cluster_of_sample: torch.Tensor, num_clusters: int, linkage: str,
                 neighbours: int):
        self.sizes = torch.bincount(cluster_of_sample, minlength=num_clusters).to(x.dtype)
        means = torch.zeros(num_clusters, x.shape[1], dtype=x.dtype, device=x.device)
        means.index_add_(0, cluster_of_sample, x)
        means /= self.sizes.unsqueeze(1)
        self.means, self.sq_norms = means, (means * means).sum(1)
        self.typeset = linkage == "tssl_typeset"
        self.density = (_mean_neighbour_distance(means, self.sq_norms, neighbours) if linkage in TSSL_LINKAGES
                        else None)
        self.gemm_blocks = _centroid_blocks(means, self.sq_norms, self.density, self.typeset)

    def link(self, distances: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Linkages of pairs (i, j) from their distances (the expression of :func:`_centroid_blocks`)."""
        if self.density is None:
            return distances
        if self.typeset:
            return tssl_typeset_linkage(distances, self.density[i] + self.density[j])
        exponent = self.density[i] + self.density[j]
        return exponent.sub_(distances, alpha=2.0).neg_().exp_().add_(distances)

    def exact(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        distances = _tiles.exact_distances(self.means[i], self.means[j], "euclidean", self.sq_norms[i],
                                           self.sq_norms[j])
        return self.link(distances, i, j)

    def candidate_blocks(self, limit: float) -> Iterator[tuple[int, torch.Tensor]]:
        means, sq_norms, num_clusters = self.means, self.sq_norms, self.means.shape[0]
        for start, stop in _tiles.row_chunks(num_clusters, num_clusters):
            squared = _tiles.distance_tile(means[start:stop], means[start + 1:], "sqeuclidean", sq_norms[start + 1:])
            bound = _tiles.band(means[start:stop], means[start + 1:], "sqeuclidean", sq_norms[start:stop],
                                sq_norms[start + 1:])
            lower = _lower_distance(squared, bound.unsqueeze(1))
            if self.typeset:
                # Increasing in the distance for fixed a_i + a_j. The exact path rounds
                # D + exp(2D), a_i + a_j and their difference (which may cancel): slack on each term.
                density_sum = (self.density[start:stop, None] + self.density[None, start + 1:]).double()
                lower = (lower * 2).exp_().add_(lower).mul_(1 - _SLACK) - density_sum * (1 + _SLACK)
                lower = torch.where(torch.isinf(lower), lower, lower - _SLACK * lower.abs())  # inf - inf is NaN
            elif self.density is not None:
                # Increasing in the distance for fixed a_i + a_j (rounded as the exact path rounds it).
                exponent = lower * 2 - (self.density[start:stop, None] + self.density[None, start + 1:]).double()
                exponent -= _SLACK * exponent.abs()
                lower += exponent.exp_().mul_(1 - _SLACK)
            # tile[a, b] is the pair (start + a, start + 1 + b): only b >= a are pairs i < j.
            wanted = (lower <= limit).triu_()
            rows, cols = wanted.nonzero(as_tuple=True)
            tile = torch.full(squared.shape, float("inf"), dtype=squared.dtype, device=squared.device)
            tile[rows, cols] = self.exact(rows + start, cols + start + 1)
            yield start, tile


class _BucLinkages:
    """buc linkages (minimum sample distance, squared for ``buc``, plus the size penalty): GEMM
    blocks, exact pairs, candidates."""

    def __init__(self, x: torch.Tensor, cluster_of_sample: torch.Tensor, num_clusters: int, size_penalty: float,
                 squared: bool):
        order = torch.argsort(cluster_of_sample, stable=True)
        self.x = x[order]
        self.sample_cluster = cluster_of_sample[order]
        counts = torch.bincount(self.sample_cluster, minlength=num_clusters)
        self.offsets = torch.zeros(num_clusters + 1, dtype=torch.int64, device=x.device)
        self.offsets[1:] = counts.cumsum(0)
        self.sizes = counts.to(x.dtype)
        self.sq_norms = (self.x * self.x).sum(1)
        self.size_penalty = size_penalty
        self.squared = squared
        self.gemm_blocks = _buc_blocks(self, None)

    def penalty(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.size_penalty * (self.sizes[i] + self.sizes[j])

    def distance(self, squared_minimum: torch.Tensor) -> torch.Tensor:
        """The linkage's distance term of squared minima (in place for ``buc_l2``)."""
        return squared_minimum if self.squared else squared_minimum.sqrt_()

    def exact(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Exact linkages of cluster pairs (i, j): the minimum over all their sample pairs."""
        counts_i = self.offsets[i + 1] - self.offsets[i]
        counts_j = self.offsets[j + 1] - self.offsets[j]
        per_pair = counts_i * counts_j
        pair = torch.repeat_interleave(torch.arange(i.numel(), device=i.device), per_pair)
        within = torch.arange(pair.numel(), device=i.device) - (torch.cumsum(per_pair, 0) - per_pair)[pair]
        rows = self.offsets[i][pair] + within // counts_j[pair]
        cols = self.offsets[j][pair] + within % counts_j[pair]
        squared = _tiles.exact_distances(self.x[rows], self.x[cols], "sqeuclidean", self.sq_norms[rows],
                                         self.sq_norms[cols])
        minimum = torch.full((i.numel(),), float("inf"), dtype=self.x.dtype, device=i.device)
        minimum.scatter_reduce_(0, pair, squared, "amin")
        return self.distance(minimum) + self.penalty(i, j)

    def candidate_blocks(self, limit: float) -> Iterator[tuple[int, torch.Tensor]]:
        return _buc_blocks(self, limit)()


def merge_step(x: torch.Tensor, labels: torch.Tensor, num_merges: int,
               merged_roots: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """The frame of one merging step around a backend's greedy walk (shared with Triton).

    Clusters are the distinct label values (cluster ``i`` the ``i``-th smallest);
    ``merged_roots(cluster_of_sample [N], num_clusters)`` returns the root cluster of
    every cluster [C] and is called only when ``num_merges > 0`` and ``C > 1``. Returns
    the merged labels [N], int64, renumbered ``0..C'-1`` by first appearance.
    """
    device = x.device
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    _, cluster_of_sample = torch.unique(labels, sorted=True, return_inverse=True)
    num_clusters = int(cluster_of_sample.max()) + 1
    root = torch.arange(num_clusters, device=device)
    if num_merges > 0 and num_clusters > 1:
        root = merged_roots(cluster_of_sample, num_clusters)
    return renumber_by_first_appearance(root[cluster_of_sample])


def tssl_typeset_linkage(distances: torch.Tensor, density_sum: torch.Tensor) -> torch.Tensor:
    """TSSL Eq. 8 as typeset: ``(D + exp(2 D)) - (a_i + a_j)`` rounded in that order (shared with cpu).

    ``density_sum`` holds ``a_i + a_j`` already rounded; overflowed ``exp(2 D)`` gives ``inf``.
    """
    return (distances * 2).exp_().add_(distances).sub_(density_sum)


def _centroid_blocks(means: torch.Tensor, sq_norms: torch.Tensor, density: torch.Tensor | None,
                     typeset: bool) -> LinkageBlocks:
    num_clusters = means.shape[0]

    def blocks() -> Iterator[tuple[int, torch.Tensor]]:
        for start, stop in _tiles.row_chunks(num_clusters, num_clusters):
            distances = _tiles.distance_tile(means[start:stop], means[start + 1:], "euclidean", sq_norms[start + 1:])
            if typeset:
                distances = tssl_typeset_linkage(distances, density[start:stop, None] + density[None, start + 1:])
            elif density is not None:
                # TSSL Eq. 8: D + exp(2D - (a_i + a_j)); a_i + a_j rounds first. In place:
                # -(s - 2D) is exactly 2D - s, since 2D and negation are exact.
                exponent = density[start:stop, None] + density[None, start + 1:]
                exponent.sub_(distances, alpha=2.0).neg_().exp_()
                distances = exponent.add_(distances)
            yield start, distances

    return blocks


def _mean_neighbour_distance(means: torch.Tensor, sq_norms: torch.Tensor, neighbours: int) -> torch.Tensor:
    """a_i: mean exact centroid distance of cluster i to its k nearest other clusters [C]."""
    num_clusters = means.shape[0]
    k = min(neighbours, num_clusters - 1)
    nearest = []
    for start, stop in _tiles.row_chunks(num_clusters, num_clusters):
        rows = torch.arange(start, stop, device=means.device)
        # Self excluded by index, not by value.
        values, _ = smallest_k_exact(means[start:stop], means, "euclidean", k, rows, sq_norms[start:stop], sq_norms)
        nearest.append(values)
    nearest = torch.cat(nearest)
    # Summed in ascending order so that the value is defined up to the last bit.
    total = nearest[:, 0].clone()
    for column in range(1, k):
        total += nearest[:, column]
    return total / k


def _buc_blocks(source: "_BucLinkages", limit: float | None) -> LinkageBlocks:
    """buc linkage blocks from GEMM tiles (``limit`` None), or exact linkages of the cluster
    pairs whose lower bound is ``<= limit`` (``inf`` elsewhere)."""
    x, sample_cluster, offsets, sq_norms = source.x, source.sample_cluster, source.offsets, source.sq_norms
    device = x.device
    num_clusters = offsets.numel() - 1
    offsets_list = offsets.tolist()
    num_samples = x.shape[0]

    def blocks() -> Iterator[tuple[int, torch.Tensor]]:
        rows_per_tile = max(1, _backend.tile_elements() // num_samples)
        first = 0
        while first < num_clusters - 1:
            # Whole clusters first..last-1 whose samples fit in one row tile (at least one cluster).
            last = int(torch.searchsorted(offsets, offsets[first] + rows_per_tile, right=True)) - 1
            last = min(max(last, first + 1), num_clusters)
            column_start = offsets_list[first + 1]
            column_cluster = (sample_cluster[column_start:] - (first + 1)).unsqueeze(0)
            columns = x[column_start:]
            column_norms = sq_norms[column_start:]
            row_range = range(offsets_list[first], offsets_list[last], rows_per_tile)
            minimum = torch.full((last - first, num_clusters - first - 1), float("inf"), dtype=x.dtype,
                                 device=device)
            for row_start in row_range:
                row_stop = min(row_start + rows_per_tile, offsets_list[last])
                squared = _tiles.distance_tile(x[row_start:row_stop], columns, "sqeuclidean", column_norms)
                per_sample = torch.full((row_stop - row_start, minimum.shape[1]), float("inf"), dtype=x.dtype,
                                        device=device)
                per_sample.scatter_reduce_(1, column_cluster.expand(squared.shape[0], -1), squared, "amin")
                row_cluster = (sample_cluster[row_start:row_stop] - first).unsqueeze(1)
                minimum.scatter_reduce_(0, row_cluster.expand(-1, per_sample.shape[1]), per_sample, "amin")
            pair_i = torch.arange(first, last, device=device).unsqueeze(1)
            pair_j = torch.arange(first + 1, num_clusters, device=device).unsqueeze(0)
            penalty = source.size_penalty * (source.sizes[first:last, None] + source.sizes[None, first + 1:])
            if limit is None:
                # sqrt is monotone, so sqrt(min) equals min(sqrt): the same value as the spec.
                yield first, source.distance(minimum) + penalty
                first = last
                continue
            rows_all = x[offsets_list[first]:offsets_list[last]]
            bound = _tiles.band(rows_all, columns, "sqeuclidean", sq_norms[offsets_list[first]:offsets_list[last]],
                                column_norms).max()
            if source.squared:
                lower = (minimum.to(torch.float64) - bound).clamp_min_(0.0).mul_(1 - _SLACK)
            else:
                lower = _lower_distance(minimum, bound)
            lower += penalty.to(torch.float64) * (1 - _SLACK)
            wanted = (lower <= limit) & (pair_j > pair_i)
            exact_minimum = torch.full_like(minimum, float("inf"))
            if bool(wanted.any()):
                # A sample pair can hold a cluster pair's exact minimum only within 2 bounds of its GEMM minimum.
                reach = torch.where(wanted, minimum.to(torch.float64) + 2 * bound, -1.0)
                for row_start in row_range:
                    row_stop = min(row_start + rows_per_tile, offsets_list[last])
                    squared = _tiles.distance_tile(x[row_start:row_stop], columns, "sqeuclidean", column_norms)
                    row_cluster = sample_cluster[row_start:row_stop] - first
                    near = squared.to(torch.float64) <= reach[row_cluster.unsqueeze(1), column_cluster]
                    rows, cols = near.nonzero(as_tuple=True)
                    exact = _tiles.exact_distances(x[row_start + rows], columns[cols], "sqeuclidean",
                                                   sq_norms[row_start + rows], column_norms[cols])
                    flat = row_cluster[rows] * minimum.shape[1] + column_cluster[0, cols]
                    exact_minimum.view(-1).scatter_reduce_(0, flat, exact, "amin")
            yield first, source.distance(exact_minimum) + penalty
            first = last

    return blocks


def _smallest_pairs(blocks: LinkageBlocks, num_clusters: int, capacity: int,
                    after: tuple[torch.Tensor, int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``capacity`` smallest pairs ``i < j`` in (linkage, i, j) order, strictly after ``after``.

    Returns (linkages [M'], keys [M'] = i * C + j), sorted, M' <= capacity.
    """
    kept_values = kept_keys = None
    threshold = None  # largest kept linkage once the buffer is full
    for first, tile in blocks():
        _mark_unwanted(tile, first, after)
        cutoff = threshold
        if cutoff is None and tile.numel() > capacity:
            # The capacity-th smallest of this tile bounds the final cutoff from above.
            local = torch.kthvalue(tile.flatten(), capacity).values
            cutoff = None if bool(torch.isnan(local)) else local
        wanted = ~torch.isnan(tile) if cutoff is None else tile <= cutoff
        row_index, column_index = wanted.nonzero(as_tuple=True)
        values = tile[row_index, column_index]
        keys = (row_index + first) * num_clusters + (column_index + first + 1)
        if kept_values is not None:
            values = torch.cat([kept_values, values])
            keys = torch.cat([kept_keys, keys])
        if values.numel() > capacity:
            small = values <= torch.kthvalue(values, capacity).values
            values, keys = _lexsort(values[small], keys[small])
            values, keys = values[:capacity], keys[:capacity]
            threshold = values[-1]
        kept_values, kept_keys = values, keys
    if kept_values is None:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return _lexsort(kept_values, kept_keys)


def _mark_unwanted(tile: torch.Tensor, first: int, after: tuple[torch.Tensor, int, int] | None) -> None:
    """Set to NaN (never selected, sorted last) the pairs j <= i and those not after ``after``.

    ``tile[a, b]`` is pair (first + a, first + 1 + b); linkages themselves are never NaN.
    """
    num_rows, num_columns = tile.shape
    lead = min(num_rows, num_columns)
    below_diagonal = torch.ones(num_rows, lead, dtype=torch.bool, device=tile.device).tril_(-1)
    tile[:, :lead].masked_fill_(below_diagonal, float("nan"))
    if after is None:
        return
    after_value, after_row, after_column = after
    tile.masked_fill_(tile < after_value, float("nan"))
    tie_rows, tie_columns = (tile == after_value).nonzero(as_tuple=True)
    rows, columns = tie_rows + first, tie_columns + first + 1
    not_later = (rows < after_row) | ((rows == after_row) & (columns <= after_column))
    tile[tie_rows[not_later], tie_columns[not_later]] = float("nan")


def _lexsort(values: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort by (value, key): keys first, then a stable sort by value."""
    by_key = torch.argsort(keys)
    values, keys = values[by_key], keys[by_key]
    by_value = torch.argsort(values, stable=True)
    return values[by_value], keys[by_value]


def _greedy_merge(blocks: LinkageBlocks, num_clusters: int, num_merges: int, device: torch.device) -> torch.Tensor:
    """Walk pairs in (linkage, i, j) order with a union-find; returns a root per cluster [C]."""
    parent = list(range(num_clusters))
    capacity = min(max(_PAIRS_PER_MERGE * num_merges, _MIN_PAIR_BUFFER), _backend.tile_elements())
    merges = 0
    after = None
    while merges < num_merges:
        values, keys = _smallest_pairs(blocks, num_clusters, capacity, after)
        if keys.numel() == 0:
            raise RuntimeError("agglomerative_merge: ran out of cluster pairs before num_merges merges")
        merged, _ = union_pair_keys(parent, keys.tolist(), num_clusters, num_merges - merges)
        merges += merged
        last_key = int(keys[-1])
        after = (values[-1], last_key // num_clusters, last_key % num_clusters)
        capacity = min(2 * capacity, _backend.tile_elements())
    return union_find_roots(parent, device)


def find_root(parent: list[int], node: int) -> int:
    """Root of ``node`` in the union-find forest ``parent`` (path halving, updates ``parent``)."""
    while parent[node] != node:
        parent[node] = parent[parent[node]]
        node = parent[node]
    return node


def union_pair_keys(parent: list[int], keys: list[int], num_clusters: int, merges_left: int
                    ) -> tuple[int, int | None]:
    """Greedy union of cluster pairs given as keys ``i * num_clusters + j``, in the given order.

    A pair whose clusters already share a root is skipped; otherwise the larger root is
    attached to the smaller one. Stops once ``merges_left`` (>= 1) merges are made.
    Shared by the reference and the Triton merging step.

    Returns
    -------
    (merges made, position in ``keys`` of the pair that made the last needed merge, or
    None when the keys ran out first)
    """
    merges = 0
    for position, key in enumerate(keys):
        root_i, root_j = find_root(parent, key // num_clusters), find_root(parent, key % num_clusters)
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)
            merges += 1
            if merges == merges_left:
                return merges, position
    return merges, None


def union_find_roots(parent: list[int], device: torch.device) -> torch.Tensor:
    """Root of every node of the union-find forest ``parent`` as an int64 tensor [C] on ``device``."""
    return torch.tensor([find_root(parent, node) for node in range(len(parent))], dtype=torch.int64,
                        device=device)


def renumber_by_first_appearance(ids: torch.Tensor) -> torch.Tensor:
    """Map arbitrary int64 ids [N] to 0..K-1 in order of first appearance (shared with Triton)."""
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((unique_ids.numel(),), ids.numel(), dtype=torch.int64, device=ids.device)
    first.scatter_reduce_(0, inverse, positions, "amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(first.numel(), device=ids.device)
    return rank[inverse]
