"""Sharded :func:`fastassoc.evaluate_ranking`: CMC / mAP / mINP with the gallery split by rows.

Algorithm (per chunk of gathered queries):

1. each rank finds the true matches of every gathered query in its gallery block (same
   identity, other camera, identity not -1) with their exact distances (``_tiles``'s
   fixed-order inner product, the distance the single-process op ranks matches by);
2. the match lists are all-gathered, so every rank knows every match ``(d_g, g)``;
3. each rank counts, for every match, the entries of its block ranked before it under
   ``(distance, global index)`` order: all entries (the match's position in the full
   ranking) and kept entries (not junk). A float32 GEMM tile proposes the distances and
   every entry within the GEMM's rounding bound (``_tiles.band``) of a match is rescored
   exactly, as in the reference, so the counts are those of the exact order;
4. the counts go to the query's owner (``all_to_all``), which sums them over the ranks:
   match ``t``'s rank among kept entries is ``1 + sum of kept counts``;
5. first-match rank, AP and INP per query follow with the single-process op's arithmetic,
   and the per-query values are all-gathered so that every rank reduces the same ``[Q]``
   float64 arrays in the same order as the single-process op.

AP's float64 sum follows the backend the single-process op would run: the compiled CPU
backend adds ``t / r_t`` in match order; the reference and Triton sum a ``[rows, G]``
tile holding ``t / r_t`` at each match's position in the full ranking (its summation order
depends on the positions), which step 3's "all entries" counts give. That position is
exact unless a junk entry (same identity and camera, or identity -1) lies within the
GEMM's rounding bound of a true match: the reference does not rescore junk, so its own
placement of such an entry depends on its tile layout; there AP may differ in the last bit.
"""
from __future__ import annotations

import torch

from .. import _backend
from .. import ops as _ops
from ..kernels.reference import _tiles
from ..ops.evaluation import RankingResult
from ._checks import agree
from ._comm import QUERY_CHUNK, all_gather_padded, all_to_all_rows, exchange_counts, layout_from_sizes

_BIG = 2 ** 62


def evaluate_ranking(query: torch.Tensor, gallery: torch.Tensor, query_pids: torch.Tensor,
                     gallery_pids: torch.Tensor, query_cameras: torch.Tensor, gallery_cameras: torch.Tensor, *,
                     metric: str = "euclidean", max_rank: int = 50, precision: str = "highest",
                     backend: str = "auto", group=None, query_chunk: int = QUERY_CHUNK) -> RankingResult:
    r"""Sharded :func:`fastassoc.evaluate_ranking` (features path): the gallery split by rows over ``group``.

    Every rank passes its own queries (any number, 0 included) and its block of the gallery
    (global gallery index = block offset + local row). Every rank returns the same
    RankingResult, equal to the single-process ``evaluate_ranking(cat(query), cat(gallery),
    ...)`` over all ranks' queries and gallery: the same CMC, and mAP / mINP to the bit (see
    the module docstring for the one corner of the reference backend). Collective.

    Parameters
    ----------
    query : Tensor [b, D], float; gallery : Tensor [n, D], same dtype
    query_pids, query_cameras : Tensor [b], integer; gallery_pids, gallery_cameras : Tensor [n], integer
    metric, max_rank, precision, backend : as in :func:`fastassoc.evaluate_ranking`
    group : ProcessGroup, optional; query_chunk : int >= 1, query rows per rank per chunk

    Returns
    -------
    RankingResult

    Communication
    -------------
    Bytes sent per rank (``v`` = 4, or 8 for float64 features): ``32 (W - 1)`` (sizes, check); per
    chunk ``(W - 1) c (D v + 16)`` (gathered queries in the compute dtype, with identity and camera)
    + ``8 (W - 1)`` (match counts) + ``24 (W - 1) max_r m_r`` (``m_r`` true matches
    of the chunk's queries in rank ``r``'s block) + ``16`` per match of another rank's queries
    (the two counts); at the end ``24 (W - 1) max_r b_r`` (per-query first rank, AP, INP).
    Never a ``Q x G`` block.
    """
    error = None
    try:
        query = _ops._checks.features("query", query)
        gallery = _ops._checks.features("gallery", gallery)
        _ops._checks.same_dtype(query=query, gallery=gallery)
        _ops._checks.same_feature_dim(query=query, gallery=gallery)
        device = query.device
        query_pids = _ops._checks.index_vector("query_pids", query_pids, length=query.shape[0], low=-_BIG,
                                               high=_BIG, device=device)
        query_cameras = _ops._checks.index_vector("query_cameras", query_cameras, length=query.shape[0], low=0,
                                                  high=_BIG, device=device)
        gallery_pids = _ops._checks.index_vector("gallery_pids", gallery_pids, length=gallery.shape[0], low=-1,
                                                 high=_BIG, device=device)
        gallery_cameras = _ops._checks.index_vector("gallery_cameras", gallery_cameras, length=gallery.shape[0],
                                                    low=0, high=_BIG, device=device)
        metric = _ops._checks.choice("metric", metric, _ops._checks.METRICS)
        max_rank = _ops._checks.non_negative_int("max_rank", max_rank, minimum=1)
        query_chunk = _ops._checks.non_negative_int("query_chunk", query_chunk, minimum=1)
        name, _ = _backend.resolve("evaluate_ranking", backend, {"query": query, "gallery": gallery})
    except (TypeError, ValueError, RuntimeError) as caught:
        error = caught
    stats = agree(error, None if error else [query.shape[0], gallery.shape[0], query.shape[1]], 3, group,
                  query.device if isinstance(query, torch.Tensor) else None)
    if len({s[2] for s in stats}) > 1:
        raise ValueError(f"query and gallery must have the same feature dimension on every rank; got "
                         f"{[s[2] for s in stats]}")
    layout_q = layout_from_sizes([s[0] for s in stats], group)
    layout_g = layout_from_sizes([s[1] for s in stats], group)
    # The compiled CPU backend adds AP's terms in match order; the others sum a ranked tile.
    in_match_order = name == "cpu" and query.dtype != torch.float64
    ranking = "cosine" if metric == "cosine" else "sqeuclidean"
    q_rows = _tiles.prepare(query, metric)
    g_rows = _tiles.prepare(gallery, metric)
    g_norms = (g_rows * g_rows).sum(1)
    num_local = query.shape[0]
    first_rank = torch.zeros(num_local, dtype=torch.int64, device=device)
    average_precision = torch.zeros(num_local, dtype=torch.float64, device=device)
    inverse_negative_penalty = torch.zeros(num_local, dtype=torch.float64, device=device)
    world, rank = layout_q.world_size, layout_q.rank
    most = max(layout_q.sizes)
    chunk = min(query_chunk, most) if most else 1
    for start in range(0, most, chunk):
        counts = [max(0, min(chunk, size - start)) for size in layout_q.sizes]
        mine = slice(start, start + counts[rank])
        meta = torch.stack([query_pids[mine], query_cameras[mine]], 1)
        rows = torch.cat([g[:n] for g, n in zip(all_gather_padded(q_rows[mine], [chunk] * world, group), counts)])
        metas = torch.cat([m[:n] for m, n in zip(all_gather_padded(meta, [chunk] * world, group), counts)])
        local_matches = _block_matches(rows, metas, g_rows, g_norms, gallery_pids, gallery_cameras, ranking,
                                       layout_g.offset)
        sizes = [s[0] for s in exchange_counts([local_matches.shape[0]], group, device)]
        matches = torch.cat(all_gather_padded(local_matches, sizes, group))
        # (row, distance, gallery index) order: every rank holds the same sorted list.
        matches = matches[_lexsort(matches[:, 0], matches[:, 1], matches[:, 2])]
        before = _count_before(rows, metas, matches, g_rows, g_norms, gallery_pids, gallery_cameras, ranking,
                               layout_g.offset)
        owner_rows = torch.tensor([0] + counts, device=device).cumsum(0)
        split = torch.searchsorted(matches[:, 0].contiguous(), owner_rows.to(torch.float64)).tolist()
        per_owner = [before[split[r]:split[r + 1]] for r in range(world)]
        received = all_to_all_rows(per_owner, [split[rank + 1] - split[rank]] * world, group)
        totals = torch.stack(received).sum(0) if received else before[:0]
        my_matches = matches[split[rank]:split[rank + 1]]
        _score(my_matches[:, 0].to(torch.int64) - int(owner_rows[rank]), totals, counts[rank], layout_g.total,
               in_match_order, first_rank[mine], average_precision[mine], inverse_negative_penalty[mine])
    every = torch.stack([first_rank.to(torch.float64), average_precision, inverse_negative_penalty], 1)
    every = torch.cat(all_gather_padded(every, layout_q.sizes, group))
    first_rank, average_precision, inverse_negative_penalty = every[:, 0].to(torch.int64), every[:, 1], every[:, 2]
    valid = first_rank > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(f"evaluate_ranking: none of the {layout_q.total} queries has a true match among the "
                         f"{layout_g.total} gallery entries (same identity, not junk); nothing to evaluate")
    counted = first_rank[valid & (first_rank <= max_rank)] - 1
    cmc = torch.bincount(counted, minlength=max_rank).to(torch.float64).cumsum(0) / num_valid
    return RankingResult(cmc=cmc, mAP=float(average_precision.sum()) / num_valid,
                         mINP=float(inverse_negative_penalty.sum()) / num_valid, num_valid_queries=num_valid)


def _lexsort(*keys: torch.Tensor) -> torch.Tensor:
    """Order by ``keys[0]``, then ``keys[1]``, ... (stable sorts from the last key)."""
    order = torch.argsort(keys[-1], stable=True)
    for key in reversed(keys[:-1]):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def _block_matches(rows, metas, g_rows, g_norms, gallery_pids, gallery_cameras, ranking, offset) -> torch.Tensor:
    """float64 [m, 3]: (query row, exact distance, global gallery index) of the true matches in this block."""
    pids, cams = metas[:, 0], metas[:, 1]
    out = []
    for start, stop in _tiles.row_chunks(rows.shape[0], g_rows.shape[0]):
        is_match = (gallery_pids.unsqueeze(0) == pids[start:stop].unsqueeze(1)) & \
            (gallery_cameras.unsqueeze(0) != cams[start:stop].unsqueeze(1)) & (pids[start:stop] != -1).unsqueeze(1)
        r, c = is_match.nonzero(as_tuple=True)
        r = r + start
        q_norms = (rows[r] * rows[r]).sum(1) if ranking != "cosine" else None
        d = _tiles.exact_distances(rows[r], g_rows[c], ranking, q_norms, g_norms[c] if q_norms is not None else None)
        out.append(torch.stack([r.to(torch.float64), d.to(torch.float64), (c + offset).to(torch.float64)], 1))
    return torch.cat(out) if out else torch.empty((0, 3), dtype=torch.float64, device=rows.device)


def _count_before(rows, metas, matches, g_rows, g_norms, gallery_pids, gallery_cameras, ranking, offset
                  ) -> torch.Tensor:
    """int64 [M, 2]: for every match, the block's entries before it (all, kept) in (distance, index) order."""
    device = rows.device
    out = torch.zeros((matches.shape[0], 2), dtype=torch.int64, device=device)
    num_gallery = g_rows.shape[0]
    if num_gallery == 0 or matches.shape[0] == 0:
        return out
    match_rows = matches[:, 0].to(torch.int64)
    global_index = torch.arange(num_gallery, device=device) + offset
    q_norms_all = (rows * rows).sum(1)
    for start, stop in _tiles.row_chunks(rows.shape[0], num_gallery * 4):
        lo, hi = torch.searchsorted(match_rows, torch.tensor([start, stop], device=device)).tolist()
        if lo == hi:
            continue
        q = rows[start:stop]
        q_norms = q_norms_all[start:stop]
        tile = _tiles.distance_tile(q, g_rows, ranking, g_norms)
        # Each row's match distances, padded with inf, to find the entries near one of them.
        local_row = match_rows[lo:hi] - start
        per_row = torch.bincount(local_row, minlength=stop - start)
        slot = torch.arange(hi - lo, device=device) - (torch.cumsum(per_row, 0) - per_row)[local_row]
        slots = torch.full((stop - start, int(per_row.max())), float("inf"), dtype=torch.float64, device=device)
        slots[local_row, slot] = matches[lo:hi, 1]
        bound = _tiles.band(q, g_rows, ranking, q_norms, g_norms).unsqueeze(1)
        approx = tile.to(torch.float64)
        near = torch.searchsorted(slots, approx - bound) != torch.searchsorted(slots, approx + bound, right=True)
        r, c = near.nonzero(as_tuple=True)
        values = approx
        if r.numel():
            values[r, c] = _tiles.exact_distances(q[r], g_rows[c], ranking, q_norms[r] if ranking != "cosine" else None,
                                                  g_norms[c] if ranking != "cosine" else None).to(torch.float64)
        same_pid = gallery_pids.unsqueeze(0) == metas[start:stop, 0].unsqueeze(1)
        junk = (same_pid & (gallery_cameras.unsqueeze(0) == metas[start:stop, 1].unsqueeze(1))) | \
            (gallery_pids == -1).unsqueeze(0)
        distances = matches[lo:hi, 1]
        index = matches[lo:hi, 2].to(torch.int64)
        for column, candidates in enumerate((values, values.masked_fill(junk, float("inf")))):
            ordered = candidates.sort(dim=1).values[local_row]
            less = torch.searchsorted(ordered, distances.unsqueeze(1), right=False).squeeze(1)
            upto = torch.searchsorted(ordered, distances.unsqueeze(1), right=True).squeeze(1)
            out[lo:hi, column] = less
            ties = (upto > less).nonzero().squeeze(1)
            for t in ties.tolist():
                # Equal distances rank by global index (rare: copies of a vector).
                row = candidates[local_row[t]]
                out[lo + t, column] += int(((row == distances[t]) & (global_index < index[t])).sum())
    return out


def _score(match_rows, totals, num_rows, num_gallery, in_match_order, first_rank, average_precision,
           inverse_negative_penalty) -> None:
    """Per-query first rank, AP and INP from each match's global counts (matches sorted by row, then rank)."""
    if num_rows == 0:
        return
    device = totals.device
    per_row = torch.bincount(match_rows, minlength=num_rows)
    ordinal = torch.arange(match_rows.numel(), device=device) - (torch.cumsum(per_row, 0) - per_row)[match_rows]
    ranks = totals[:, 1] + 1
    precision = (ordinal + 1).to(torch.float64) / ranks
    has = per_row > 0
    first = torch.zeros(num_rows, dtype=torch.int64, device=device)
    last = torch.zeros(num_rows, dtype=torch.int64, device=device)
    first.scatter_reduce_(0, match_rows, ranks, "amin", include_self=False)
    last.scatter_reduce_(0, match_rows, ranks, "amax", include_self=False)
    first_rank.copy_(torch.where(has, first, 0))
    inverse_negative_penalty.copy_(per_row.to(torch.float64) / last.clamp_min(1))
    if in_match_order:
        # The C++ loop adds match by match from 0.0; cumsum is a sequential scan and trailing
        # zero padding leaves the last partial sum unchanged.
        padded = torch.zeros((num_rows, int(per_row.max()) if match_rows.numel() else 1), dtype=torch.float64,
                             device=device)
        padded[match_rows, ordinal] = precision
        average_precision.copy_(padded.cumsum(1)[:, -1] / per_row.clamp_min(1))
        return
    # The reference sums a [rows, G] tile holding t / r_t at each match's position in the full
    # ranking (entries before it, junk included).
    positions = totals[:, 0]
    for start, stop in _tiles.row_chunks(num_rows, num_gallery * 4):
        pick = (match_rows >= start) & (match_rows < stop)
        tile = torch.zeros((stop - start, num_gallery), dtype=torch.float64, device=device)
        tile[match_rows[pick] - start, positions[pick]] = precision[pick]
        average_precision[start:stop] = tile.sum(1) / per_row[start:stop].clamp_min(1)
