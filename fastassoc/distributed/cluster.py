"""Sharded :func:`fastassoc.agglomerative_merge` (every linkage: centroid, tssl, tssl_typeset, buc, buc_l2).

Algorithm
---------
1. Clusters are the distinct labels of all ranks (cluster ``i`` the ``i``-th smallest).
   Centroid linkages: clusters are owned in contiguous blocks of cluster ids. Every sample
   row travels to its cluster's owner, ranks in rank order, so the owner's ``index_add_``
   adds a cluster's rows in global sample order: the single-process means to the bit.
   buc linkages: samples stay where they are; every rank learns the cluster sizes.
2. ``tssl`` / ``tssl_typeset``: ``a_i`` from the exact sharded search over the means
   (``smallest_k_exact``, self excluded by index), summed in ascending order as the
   single-process op sums them.
3. The greedy walk needs the cluster pairs in exact ``(linkage, i, j)`` order up to the
   ``num_merges``-th merge. Candidates are *entries*: a cluster pair ``i < j`` for the centroid
   linkages, scored by the owner of ``j`` from the gathered means of ``i``; a sample pair
   ``s < t`` (global sample order) of two different clusters for buc, scored by the rank holding
   ``t`` from the gathered samples ``s`` (chunks of ``query_chunk`` clusters or samples per rank).
   A buc entry's value ``d(s, t) + size_penalty (|C_i| + |C_j|)`` is rounded as the single-process
   op rounds a pair's linkage; ``sqrt`` and ``+ penalty`` are monotone roundings, so the minimum
   over a cluster pair's entries is its exact linkage ``sqrt(min d^2) + penalty``, and every
   entry is ``>=`` its cluster pair's linkage. Sizes are frozen during the step, so every
   linkage is a fixed number and the walk is Kruskal's on fixed weights.
   Pass 1: each rank sends its ``M`` smallest cluster pairs (entries with the smallest GEMM-based
   lower bounds, reduced to one per cluster pair) with exact values; walking them gives a forest
   of ``num_merges`` merges (``M`` doubles until it does), and its largest entry ``U`` bounds
   the exact linkages of the forest's pairs. The ``m``-th merge of a greedy walk has the
   smallest ``m``-th smallest linkage over all forests of ``m`` edges (matroid greedy, any tie
   order), so the exact walk's last merge has linkage ``<= U``. Pass 2: each rank sends, per
   cluster pair, the smallest exact entry among those whose lower bound is ``<= U`` and whose
   exact value is ``<= U``: every pair with linkage ``<= U`` comes back with its exact linkage
   (its minimising entry is ``<= U``), none above ``U`` does. Every rank walks the gathered
   pairs in ``(linkage, i, j)`` order (a pair's repeats from other ranks come later and are
   skipped): the single-process walk.
4. Labels are renumbered by first appearance over the global sample order.
"""
from __future__ import annotations

import torch

from .. import ops as _ops
from ..kernels.reference import _tiles
from ..kernels.reference.cluster import (BUC_LINKAGES, TSSL_LINKAGES, tssl_typeset_linkage, union_find_roots,
                                         union_pair_keys)
from ..kernels.reference.knn import smallest_k_exact
from ._checks import agree_rows
from ._comm import (QUERY_CHUNK, ShardLayout, all_gather_padded, exchange_counts, layout_from_sizes, route_to_owners,
                    sharded_search)

# Relative slack on lower bounds, as the single-process op's (float32 roundings of sqrt, exp, sums).
_SLACK = 2.0 ** -20
_FIRST_PAIRS = 1024
_PAIRS_PER_MERGE = 4
LINKAGES = ("tssl", "tssl_typeset", "centroid", "buc", "buc_l2")


def agglomerative_merge(x: torch.Tensor, labels: torch.Tensor, num_merges: int, *, linkage: str = "tssl",
                        neighbours: int = 4, size_penalty: float = 0.0, group=None,
                        query_chunk: int = QUERY_CHUNK) -> torch.Tensor:
    r"""Sharded :func:`fastassoc.agglomerative_merge`, every linkage of the single-process op.

    ``x`` / ``labels`` are this rank's block of the samples (clusters may span blocks). Returns
    this rank's merged labels: the ranks' outputs concatenated in rank order equal
    ``agglomerative_merge(cat(x), cat(labels), num_merges, linkage=..., neighbours=..., size_penalty=...)``
    (clusters renumbered by first appearance over all samples). Collective.

    Parameters
    ----------
    x : Tensor [n, D], float; labels : Tensor [n], integer >= 0
    num_merges : int, 0 <= num_merges < number of clusters over all ranks (0 when there are none)
    linkage : {"tssl", "tssl_typeset", "centroid", "buc", "buc_l2"}
    neighbours : int >= 1, for ``"tssl"`` and ``"tssl_typeset"``
    size_penalty : float >= 0, for ``"buc"`` and ``"buc_l2"``
    group : ProcessGroup, optional
    query_chunk : int >= 1, clusters (centroid linkages) or samples (buc) per rank per gathered chunk

    Returns
    -------
    Tensor [n], int64

    Communication
    -------------
    Bytes sent per rank (``C`` clusters, ``C_r`` owned by rank ``r``, ``u_r`` distinct labels on
    rank ``r``, ``e`` = 4, or 8 for float64): ``32 (W - 1)`` (sizes, check) + ``8 (W - 1) max_r u_r``
    (labels) + ``8 (W - 1) + 16 (W - 1) max_r u'_r`` (first appearances; ``u'_r`` distinct merged
    labels on rank ``r``); with ``num_merges > 0`` and ``C > 1``, centroid linkages:
    ``8 (W - 1)`` + ``D e + 8`` per sample owned by another rank's cluster (step 1);
    tssl, tssl_typeset: a sharded search over the means (per chunk ``(W - 1) c (D e + 8)``, candidates
    ``sum_{r != rank} C_r k (e + 8)``); per pass and chunk ``(W - 1) c ((D + 1) e + 8)`` (gathered
    means with ``a_i``, ids) plus, per walk, ``8 (W - 1)`` and ``24 (W - 1) max_r P_r`` (``P_r``
    the rank's distinct cluster pairs: at most ``M`` in pass 1, per try, those under ``U`` in
    pass 2). buc, buc_l2 (``n_r`` samples on rank ``r``, ``c = min(query_chunk, max_r n_r)``):
    ``8 (W - 1) max_r u_r`` (cluster sizes); per pass (one per pass-1 try, then pass 2)
    ``ceil(max_r n_r / c)`` chunks of ``(W - 1) c (D e + 16)`` (samples, global ids and clusters),
    and per walk ``8 (W - 1) + 24 (W - 1) max_r P_r`` as above.
    Never a cluster-pair or sample-pair matrix beyond a bounded tile.
    """
    error = None
    try:
        x = _ops._checks.features("x", x)
        labels = _ops._checks.index_vector("labels", labels, length=x.shape[0], low=0, high=2 ** 62,
                                           device=x.device)
        num_merges = _ops._checks.non_negative_int("num_merges", num_merges)
        linkage = _ops._checks.choice("linkage", linkage, LINKAGES)
        neighbours = _ops._checks.non_negative_int("neighbours", neighbours, minimum=1)
        size_penalty = _ops._checks.real("size_penalty", size_penalty, low=0.0)
        query_chunk = _ops._checks.non_negative_int("query_chunk", query_chunk, minimum=1)
        distinct_local = torch.unique(labels)
    except (TypeError, ValueError) as caught:
        error = caught
    layout, counts = agree_rows(error, "x", x, None if error else [distinct_local.numel()], 1, group)
    distinct_parts = all_gather_padded(distinct_local, [c[0] for c in counts], group)
    distinct = torch.unique(torch.cat(distinct_parts))
    num_clusters = distinct.numel()
    if num_merges > max(num_clusters - 1, 0):
        raise ValueError(f"num_merges must be at most the number of clusters minus one ({max(num_clusters - 1, 0)}, "
                         f"over all ranks), got {num_merges}")
    cluster_of_sample = torch.searchsorted(distinct, labels)
    roots = torch.arange(num_clusters, device=x.device)
    if num_merges > 0 and num_clusters > 1 and linkage in BUC_LINKAGES:
        sizes = _cluster_sizes(labels, distinct_parts, distinct, [c[0] for c in counts], group)
        roots = _forest_walk(_sample_pair_passes(_tiles.prepare(x, "euclidean"), cluster_of_sample, sizes,
                                                 size_penalty, linkage == "buc", layout, group, query_chunk),
                             num_clusters, num_merges, layout.total ** 2, x.device, group)
    elif num_merges > 0 and num_clusters > 1:
        roots = _merged_roots(_tiles.prepare(x, "euclidean"), cluster_of_sample, num_clusters, num_merges, linkage,
                              neighbours, layout, group, query_chunk)
    return _renumber(roots[cluster_of_sample], layout, group)


def _cluster_sizes(labels, distinct_parts, distinct, counts, group) -> torch.Tensor:
    """Samples per cluster over all ranks [C], int64 (each rank's counts of its distinct labels)."""
    _, local = torch.unique(labels, return_counts=True)
    sizes = torch.zeros(distinct.numel(), dtype=torch.int64, device=labels.device)
    for part, part_counts in zip(distinct_parts, all_gather_padded(local, counts, group)):
        sizes.index_add_(0, torch.searchsorted(distinct, part), part_counts)
    return sizes


def _sample_pair_passes(features, cluster_of_sample, sizes, size_penalty, squared, layout, group, query_chunk):
    """The ``passes`` of :func:`_forest_walk` for buc / buc_l2: entries are sample pairs ``s < t``.

    A sample pair of two clusters scores ``d(s, t) + size_penalty (|C_i| + |C_j|)`` (``d``
    squared for buc) as the single-process op rounds it; ``sqrt`` and ``+ penalty`` round
    monotonically, so the cluster pair's linkage is the minimum over its sample pairs. Pair
    ``(s, t)`` is scored by the rank holding ``t`` from gathered chunks of ``s``.
    """
    world, dtype = layout.world_size, features.dtype
    sizes = sizes.to(dtype)
    sq_norms = (features * features).sum(1)
    global_ids = torch.arange(layout.size, device=features.device) + layout.offset
    meta = torch.stack([global_ids, cluster_of_sample], 1)

    def passes(select):
        most = max(layout.sizes)
        chunk = min(query_chunk, most)
        for start in range(0, most, chunk):
            counts = [max(0, min(chunk, size - start)) for size in layout.sizes]
            mine = slice(start, start + counts[layout.rank])
            q = torch.cat([g[:n] for g, n in zip(all_gather_padded(features[mine], [chunk] * world, group), counts)])
            q_meta = torch.cat([g[:n] for g, n in zip(all_gather_padded(meta[mine], [chunk] * world, group), counts)])
            if layout.size == 0 or q.shape[0] == 0:
                select(None, None, None, None)
                continue
            q_ids, q_clusters = q_meta[:, 0], q_meta[:, 1]
            q_sq = (q * q).sum(1)
            for low, high in _tiles.row_chunks(q.shape[0], layout.size):
                tile = _tiles.distance_tile(q[low:high], features, "sqeuclidean", sq_norms)
                bound = _tiles.band(q[low:high], features, "sqeuclidean", q_sq[low:high], sq_norms)
                lower = (tile.to(torch.float64) - bound.unsqueeze(1)).clamp_min_(0.0)
                lower = lower.mul_(1 - _SLACK) if squared else lower.sqrt_().mul_(1 - _SLACK)
                penalty = size_penalty * (sizes[q_clusters[low:high], None] + sizes[None, cluster_of_sample])
                lower += penalty.to(torch.float64) * (1 - _SLACK)
                lower.masked_fill_((q_ids[low:high, None] >= global_ids[None, :]) |
                                   (q_clusters[low:high, None] == cluster_of_sample[None, :]), torch.inf)

                def exact(a, b, low=low):
                    distances = _tiles.exact_distances(q[low + a], features[b], "sqeuclidean", q_sq[low + a],
                                                       sq_norms[b])
                    if not squared:
                        distances = distances.sqrt_()
                    return distances + size_penalty * (sizes[q_clusters[low + a]] + sizes[cluster_of_sample[b]])

                select(q_clusters[low:high], cluster_of_sample, lower, exact)

    return passes


def _renumber(ids: torch.Tensor, layout: ShardLayout, group) -> torch.Tensor:
    """Ids [n] renumbered 0..K-1 by first appearance over the concatenated samples of all ranks."""
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((unique_ids.numel(),), 2 ** 62, dtype=torch.int64, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel(), device=ids.device) + layout.offset, "amin")
    sizes = [row[0] for row in exchange_counts([unique_ids.numel()], group, ids.device)]
    table = torch.cat(all_gather_padded(torch.stack([unique_ids, first], 1), sizes, group))
    every_id, every_inverse = torch.unique(table[:, 0], return_inverse=True)
    every_first = torch.full((every_id.numel(),), 2 ** 62, dtype=torch.int64, device=ids.device)
    every_first.scatter_reduce_(0, every_inverse, table[:, 1], "amin")
    rank = torch.empty_like(every_first)
    rank[torch.argsort(every_first)] = torch.arange(every_first.numel(), device=ids.device)
    return rank[torch.searchsorted(every_id, ids)]


def _merged_roots(features, cluster_of_sample, num_clusters, num_merges, linkage, neighbours, layout, group,
                  query_chunk) -> torch.Tensor:
    world, device, dtype = layout.world_size, features.device, features.dtype
    cluster_sizes = [num_clusters * (r + 1) // world - num_clusters * r // world for r in range(world)]
    clusters = layout_from_sizes(cluster_sizes, group)
    # Step 1: every sample to its cluster's owner, in global sample order.
    (rows, ids), _, _ = route_to_owners(clusters.owner(cluster_of_sample), [features, cluster_of_sample], world,
                                        group)
    local_ids = ids - clusters.offset
    sizes = torch.bincount(local_ids, minlength=clusters.size).to(dtype)
    means = torch.zeros(clusters.size, features.shape[1], dtype=dtype, device=device)
    means.index_add_(0, local_ids, rows)
    means /= sizes.unsqueeze(1)
    sq_norms = (means * means).sum(1)
    global_ids = torch.arange(clusters.size, device=device) + clusters.offset
    density = torch.zeros(clusters.size, dtype=dtype, device=device)
    if linkage in TSSL_LINKAGES:
        density = _mean_neighbour_distance(means, sq_norms, global_ids, min(neighbours, num_clusters - 1), clusters,
                                           group, query_chunk)

    def passes(select):
        """Run ``select(i ids, j ids, lower [q, n], exact(a, b))`` over every chunk of gathered means."""
        most = max(clusters.sizes)
        chunk = min(query_chunk, most)
        for start in range(0, most, chunk):
            counts = [max(0, min(chunk, size - start)) for size in clusters.sizes]
            mine = slice(start, start + counts[clusters.rank])
            payload = torch.cat([means[mine], density[mine].unsqueeze(1)], 1)
            gathered = all_gather_padded(payload, [chunk] * world, group)
            id_parts = all_gather_padded(global_ids[mine], [chunk] * world, group)
            q = torch.cat([g[:n] for g, n in zip(gathered, counts)])
            q_ids = torch.cat([g[:n] for g, n in zip(id_parts, counts)])
            q_means, q_density = q[:, :-1].contiguous(), q[:, -1].contiguous()
            q_sq = (q_means * q_means).sum(1)
            if clusters.size == 0 or q.shape[0] == 0:
                select(None, None, None, None)
                continue
            for low, high in _tiles.row_chunks(q.shape[0], clusters.size):
                squared = _tiles.distance_tile(q_means[low:high], means, "sqeuclidean", sq_norms)
                bound = _tiles.band(q_means[low:high], means, "sqeuclidean", q_sq[low:high], sq_norms)
                lower = (squared.to(torch.float64) - bound.unsqueeze(1)).clamp_min_(0.0).sqrt_().mul_(1 - _SLACK)
                if linkage == "tssl_typeset":
                    # As the single-process bound: slack on D + exp(2D), on a_i + a_j and on their difference.
                    density_sum = (q_density[low:high, None] + density[None, :]).double()
                    lower = (lower * 2).exp_().add_(lower).mul_(1 - _SLACK) - density_sum * (1 + _SLACK)
                    lower = torch.where(torch.isinf(lower), lower, lower - _SLACK * lower.abs())  # inf - inf is NaN
                elif linkage == "tssl":
                    exponent = lower * 2 - (q_density[low:high, None] + density[None, :]).double()
                    exponent -= _SLACK * exponent.abs()
                    lower += exponent.exp_().mul_(1 - _SLACK)
                lower.masked_fill_(q_ids[low:high, None] >= global_ids[None, :], torch.inf)

                def exact(a, b, low=low):
                    distances = _tiles.exact_distances(q_means[low + a], means[b], "euclidean", q_sq[low + a],
                                                       sq_norms[b])
                    if linkage == "tssl_typeset":
                        return tssl_typeset_linkage(distances, q_density[low + a] + density[b])
                    if linkage != "tssl":
                        return distances
                    exponent = q_density[low + a] + density[b]
                    return exponent.sub_(distances, alpha=2.0).neg_().exp_().add_(distances)

                select(q_ids[low:high], global_ids, lower, exact)

    return _forest_walk(passes, num_clusters, num_merges, num_clusters * num_clusters, device, group)


def _forest_walk(passes, num_clusters: int, num_merges: int, max_pairs: int, device, group) -> torch.Tensor:
    """Root of every cluster [C] after the exact greedy walk, from candidate tiles.

    ``passes(select)`` calls ``select(i, j, lower, exact)`` on every tile of this rank's share
    of the candidate pairs (``select(None, None, None, None)`` on a collective step with
    none): cluster ids ``i`` [q] and ``j`` [n] of the tile's rows and columns, ``lower``
    [q, n] float64 lower bounds on the linkages (``inf`` where no pair), and ``exact(a, b)``
    the exact linkages of entries ``(a, b)``. Entries may repeat a cluster pair (buc's sample
    pairs); the cluster pair's linkage is the minimum over its entries. Every rank must run
    the same number of tiles' collectives; ``max_pairs`` bounds the entries over all ranks.
    """
    # Pass 1: a forest of num_merges merges from each rank's M entries of smallest lower bound.
    capacity = max(_FIRST_PAIRS, _PAIRS_PER_MERGE * num_merges)
    while True:
        kept = []

        def keep_smallest(i_ids, j_ids, lower, exact):
            if lower is None:
                return
            flat = lower.flatten()
            take = min(capacity, flat.numel())
            best = torch.topk(flat, take, largest=False).indices
            best = best[torch.isfinite(flat[best])]
            a, b = best // lower.shape[1], best % lower.shape[1]
            kept.append(_pair_rows(exact(a, b), i_ids[a], j_ids[b]))
            merged = _first_per_pair(torch.cat(kept), num_clusters)
            kept[:] = [merged[:capacity]]

        passes(keep_smallest)
        mine = kept[0] if kept else torch.empty((0, 3), dtype=torch.float64, device=device)
        values, keys = _gathered_pairs(mine, num_clusters, group)
        parent = list(range(num_clusters))
        merged, last = union_pair_keys(parent, keys.tolist(), num_clusters, num_merges)
        if merged == num_merges:
            # The forest's largest entry linkage (entries are walked in ascending order): it bounds
            # the exact linkages of the forest's pairs, each at most its entry's.
            limit = float(values[last])
            break
        if capacity >= max_pairs:
            raise RuntimeError("agglomerative_merge: ran out of cluster pairs before num_merges merges")
        capacity *= 2

    # Pass 2: every entry with exact linkage <= limit, walked in (linkage, i, j) order.
    found = []

    def keep_under_limit(i_ids, j_ids, lower, exact):
        if lower is None:
            return
        a, b = (lower <= limit).nonzero(as_tuple=True)
        rows = _pair_rows(exact(a, b), i_ids[a], j_ids[b])
        found.append(rows[rows[:, 0] <= limit])
        found[:] = [_first_per_pair(torch.cat(found), num_clusters)]

    passes(keep_under_limit)
    mine = found[0] if found else torch.empty((0, 3), dtype=torch.float64, device=device)
    values, keys = _gathered_pairs(mine, num_clusters, group)
    parent = list(range(num_clusters))
    merged, _ = union_pair_keys(parent, keys.tolist(), num_clusters, num_merges)
    if merged != num_merges:
        raise AssertionError("agglomerative_merge: the exact walk under the forest bound did not complete")
    return union_find_roots(parent, device)


def _pair_rows(linkages: torch.Tensor, i_ids: torch.Tensor, j_ids: torch.Tensor) -> torch.Tensor:
    """(linkage, min(i, j), max(i, j)) rows [P, 3], float64 (ids below 2^53)."""
    return torch.stack([linkages.to(torch.float64), torch.minimum(i_ids, j_ids).double(),
                        torch.maximum(i_ids, j_ids).double()], 1)


def _first_per_pair(rows: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """``rows`` sorted by (linkage, i, j), keeping each cluster pair's smallest linkage only."""
    keys = rows[:, 1].to(torch.int64) * num_clusters + rows[:, 2].to(torch.int64)
    by_key = torch.argsort(keys)
    rows, keys = rows[by_key], keys[by_key]
    by_value = torch.argsort(rows[:, 0], stable=True)
    rows, keys = rows[by_value], keys[by_value]
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((unique_keys.numel(),), rows.shape[0], dtype=torch.int64, device=rows.device)
    first.scatter_reduce_(0, inverse, torch.arange(rows.shape[0], device=rows.device), "amin")
    return rows[torch.sort(first).values]


def _gathered_pairs(pairs: torch.Tensor, num_clusters: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (linkage, i, j) rows, sorted by (linkage, i * C + j): (linkages, keys)."""
    sizes = [row[0] for row in exchange_counts([pairs.shape[0]], group, pairs.device)]
    every = torch.cat(all_gather_padded(pairs, sizes, group))
    keys = every[:, 1].to(torch.int64) * num_clusters + every[:, 2].to(torch.int64)
    by_key = torch.argsort(keys)
    values, keys = every[by_key, 0], keys[by_key]
    by_value = torch.argsort(values, stable=True)
    return values[by_value], keys[by_value]


def _mean_neighbour_distance(means, sq_norms, global_ids, k, clusters, group, query_chunk) -> torch.Tensor:
    """a_i of the owned clusters: mean exact distance to the k nearest other clusters, summed in ascending order."""
    offset = clusters.offset

    def local_search(rows, meta):
        row_sq = (rows * rows).sum(1)
        skip = meta[:, 0] - offset  # the query itself, when it is one of this block's clusters
        found, columns = smallest_k_exact(rows, means, "euclidean", k, skip, row_sq, sq_norms)
        return found.unsqueeze(1), torch.where(columns >= 0, columns + offset, -1).unsqueeze(1), []

    values, _, _ = sharded_search(means, global_ids.unsqueeze(1), clusters, k, 1, local_search, means.dtype,
                                  query_chunk=query_chunk, group=group)
    nearest = values[:, 0]
    total = nearest[:, 0].clone()
    for column in range(1, k):
        total += nearest[:, column]
    return total / k
