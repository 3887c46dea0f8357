"""Sharded nearest-anchor ranking and mutual kNN: :func:`fastassoc.topk_anchors` and
:func:`fastassoc.mutual_knn` over a bank split by rows across a process group.

Each rank holds one contiguous block of the bank (global row = block offset + local row;
blocks may be empty) and its own queries. The queries are all-gathered in chunks, every
rank runs the single-process op on its block, and each query's owner merges the ``W k``
candidates by (distance, global index) (see :mod:`fastassoc.distributed._comm` for why that
is exact). Results equal the single-process op on the concatenated bank and queries.

Bytes sent per rank (``W`` ranks, ``D`` features of ``e`` bytes, ``b_r`` queries on rank
``r``, ``c = min(query_chunk, max_r b_r)``, ``v`` = 4 for float32 distances, 8 for float64)
are written in each op's docstring.
"""
from __future__ import annotations

import torch

from .. import ops as _ops
from ..kernels.reference._tiles import exact_distances, prepare
from ._comm import QUERY_CHUNK, check_same, layout_from_sizes, route_to_owners, sharded_search
from ._checks import agree, value_dtype


def _exact_values(queries: torch.Tensor, anchors: torch.Tensor, columns: torch.Tensor, metric: str
                  ) -> torch.Tensor:
    """float64 exact distances of each query row to its listed anchors (columns [q, k], -1: inf)."""
    q = prepare(queries, metric)
    a = prepare(anchors, metric)
    rows = torch.arange(q.shape[0], device=q.device).unsqueeze(1).expand_as(columns)
    found = columns >= 0
    r, c = rows[found], columns[found]
    norms = metric != "cosine"
    values = torch.full(columns.shape, float("inf"), dtype=q.dtype, device=q.device)
    values[found] = exact_distances(q[r], a[c], metric, (q[r] * q[r]).sum(1) if norms else None,
                                    (a[c] * a[c]).sum(1) if norms else None)
    return values


def local_topk(queries: torch.Tensor, anchors: torch.Tensor, k: int, metric: str, offset: int, **options
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-process ``topk_anchors`` on this rank's block: distances in the compute dtype, global indices.

    float64 inputs are ranked in float64 by the op but returned in float32, so their
    candidates are rescored in float64 (the exact pair distances the op ranked by) to be
    merged in the same order.
    """
    dtype = value_dtype(queries)
    if anchors.shape[0] == 0 or queries.shape[0] == 0:
        return (torch.full((queries.shape[0], k), float("inf"), dtype=dtype, device=queries.device),
                torch.full((queries.shape[0], k), -1, dtype=torch.int64, device=queries.device))
    values, columns = _ops.topk_anchors(queries, anchors, k, metric=metric, **options)
    if dtype == torch.float64:
        values = _exact_values(queries, anchors, columns, metric)
    return values.to(dtype), torch.where(columns >= 0, columns + offset, columns)


def topk_anchors(queries: torch.Tensor, anchors: torch.Tensor, k: int = 1, *, metric: str = "sqeuclidean",
                 anchor_offsets: torch.Tensor | None = None, anchor_segments: torch.Tensor | None = None,
                 query_segments: torch.Tensor | None = None, exclude: torch.Tensor | None = None,
                 precision: str = "highest", backend: str = "auto", group=None,
                 query_chunk: int = QUERY_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Sharded :func:`fastassoc.topk_anchors`: this rank's queries against the bank split over ``group``.

    The bank is the concatenation of every rank's ``anchors`` in rank order; the queries are
    the concatenation of every rank's ``queries``. Each rank gets the rows of the
    single-process result that belong to its own queries: equal to
    ``fastassoc.topk_anchors(cat(queries), cat(anchors), k, ...)[rows of this rank]``,
    indices global, ties to the smaller global index. Collective: every rank of ``group``
    must call it (a rank may pass no queries and/or no anchors).

    Parameters
    ----------
    queries : Tensor [b, D], float; this rank's queries
    anchors : Tensor [n, D], same dtype; this rank's block of the bank (rows ``offset : offset + n``
        of the global bank, ``offset`` = the rows of the lower ranks)
    k, metric, precision, backend : as in :func:`fastassoc.topk_anchors`
    anchor_offsets : Tensor [S+1], integer, optional
        Segment offsets into the **global** bank, the same on every rank; segments may span blocks.
    anchor_segments : Tensor [n], integer, optional
        This rank's anchors' segment labels (instead of ``anchor_offsets``).
    query_segments : Tensor [b], integer, optional
        The segment (or label) each of this rank's queries searches.
    exclude : Tensor [b], integer in [-1, N), optional
        One **global** anchor index per query to skip.
    group : ProcessGroup, optional (default: the world)
    query_chunk : int >= 1
        Query rows each rank contributes per gathered chunk (bounds memory and message size).

    Returns
    -------
    distances : Tensor [b, k], float32; indices : Tensor [b, k], int64 global anchor indices.

    Communication
    -------------
    Bytes sent per rank: ``40 (W - 1)`` for the sizes and the argument check, per chunk ``(W - 1) c (D e + 16)`` for the
    gathered queries (with their segment and exclude), and ``sum_{r != rank} b_r k (v + 8)`` for
    the candidates sent back. Never a ``B x N`` block.
    """
    k = _ops._checks.non_negative_int("k", k)
    query_chunk = _ops._checks.non_negative_int("query_chunk", query_chunk, minimum=1)
    error = None
    try:
        queries, anchors, meta, options = _topk_inputs(queries, anchors, anchor_offsets, anchor_segments,
                                                       query_segments, exclude)
    except (TypeError, ValueError) as caught:
        error = caught
    device = queries.device if isinstance(queries, torch.Tensor) else None
    stats = agree(error, None if error else [anchors.shape[0], queries.shape[0], queries.shape[1]], 3, group,
                  device)
    layout_q = layout_from_sizes([s[1] for s in stats], group)
    layout_a = layout_from_sizes([s[0] for s in stats], group)
    check_same("the feature dimension", [s[2] for s in stats], "queries.shape[1] and anchors.shape[1]")
    error = None
    try:
        global_checks(meta, options, layout_a)
    except ValueError as caught:
        error = caught
    agree(error, [], 0, group, device)
    values, indices = search(queries, anchors, meta, k, layout_q, layout_a, metric, options, precision, backend,
                             group, query_chunk)
    return values.to(torch.float32), indices


def _topk_inputs(queries, anchors, anchor_offsets, anchor_segments, query_segments, exclude):
    """Validated local inputs: (queries, anchors, meta [b, 2] = (segment, global exclude), options)."""
    queries = _ops._checks.features("queries", queries)
    anchors = _ops._checks.features("anchors", anchors)
    _ops._checks.same_device(queries=queries, anchors=anchors)
    _ops._checks.same_dtype(queries=queries, anchors=anchors)
    num_queries, device = queries.shape[0], queries.device
    if anchor_segments is not None and anchor_offsets is not None:
        raise ValueError("give anchor_offsets (rows already grouped) or anchor_segments (a label per row), not both")
    if anchor_segments is not None and query_segments is None:
        raise ValueError("query_segments (the label each query searches) is required with anchor_segments")
    big = 2 ** 62
    segments = torch.zeros(num_queries, dtype=torch.int64, device=device) if query_segments is None else \
        _ops._checks.index_vector("query_segments", query_segments, length=num_queries, low=-big, high=big,
                                  device=device)
    excluded = torch.full((num_queries,), -1, dtype=torch.int64, device=device) if exclude is None else \
        _ops._checks.index_vector("exclude", exclude, length=num_queries, low=-1, high=big, device=device)
    options = {"anchor_offsets": None, "anchor_segments": None}
    if anchor_segments is not None:
        options["anchor_segments"] = _ops._checks.index_vector("anchor_segments", anchor_segments,
                                                               length=anchors.shape[0], low=-big, high=big,
                                                               device=device)
    if anchor_offsets is not None:
        options["anchor_offsets"] = torch.as_tensor(anchor_offsets, device=device).to(torch.int64)
    return queries, anchors, torch.stack([segments, excluded], 1), options


def global_checks(meta: torch.Tensor, options: dict, layout_a) -> None:
    """Checks that need the global bank size: offsets span the global bank, segments and exclude in range."""
    total = layout_a.total
    offsets = options.get("anchor_offsets")
    if options.get("anchor_segments") is None:
        if offsets is None:
            num_segments = 1
        else:
            if offsets.ndim != 1 or offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != total or \
                    bool((offsets[1:] < offsets[:-1]).any()):
                raise ValueError(f"anchor_offsets must be non-decreasing from 0 to the global bank size {total} "
                                 f"(every rank's anchors together), got {offsets.tolist()}")
            num_segments = offsets.numel() - 1
        bad = (meta[:, 0] < 0) | (meta[:, 0] >= num_segments)
        if bool(bad.any()):
            raise ValueError(f"query_segments must be in [0, {num_segments}), got {int(meta[bad, 0][0])}")
    if bool((meta[:, 1] >= total).any()):
        raise ValueError(f"exclude must be in [-1, {total}) (global anchor indices), got {int(meta[:, 1].max())}")


def search(queries, anchors, meta, k, layout_q, layout_a, metric, options, precision, backend, group,
           query_chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """The sharded search after validation: (values [b, k] compute dtype, global indices [b, k])."""
    offset, size, total = layout_a.offset, layout_a.size, layout_a.total
    offsets = options.get("anchor_offsets")
    if options.get("anchor_segments") is None:
        if offsets is None:
            offsets = torch.tensor([0, total], dtype=torch.int64, device=queries.device)
        local_offsets = (offsets - offset).clamp(0, size)

    def local_search(rows, rows_meta):
        excluded = rows_meta[:, 1]
        local_exclude = torch.where((excluded >= offset) & (excluded < offset + size), excluded - offset, -1)
        if options.get("anchor_segments") is not None:
            kwargs = {"anchor_segments": options["anchor_segments"], "query_segments": rows_meta[:, 0]}
        else:
            kwargs = {"anchor_offsets": local_offsets, "query_segments": rows_meta[:, 0]}
        values, indices = local_topk(rows, anchors, k, metric, offset, exclude=local_exclude, precision=precision,
                                     backend=backend, **kwargs)
        return values.unsqueeze(1), indices.unsqueeze(1), []

    values, indices, _ = sharded_search(queries, meta, layout_q, k, 1, local_search, value_dtype(queries),
                                        query_chunk=query_chunk, group=group)
    return values[:, 0], indices[:, 0]


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 1, *, metric: str = "sqeuclidean",
               max_distance: float | None = None, precision: str = "highest", backend: str = "auto", group=None,
               query_chunk: int = QUERY_CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Sharded :func:`fastassoc.mutual_knn`: both sets split by rows over ``group``.

    ``a`` and ``b`` are this rank's blocks of the two sets (global ``a`` = every rank's ``a``
    in rank order, likewise ``b``; blocks may be empty). Each rank returns the mutual pairs
    whose ``ia`` lies in its ``a`` block, with global ``ia`` and ``ib``, sorted by ``(ia, ib)``:
    the concatenation over ranks in rank order equals ``fastassoc.mutual_knn(cat(a), cat(b), ...)``.
    Collective: every rank of ``group`` must call it.

    Parameters
    ----------
    a : Tensor [na, D], b : Tensor [nb, D], same dtype
    k, metric, max_distance, precision, backend : as in :func:`fastassoc.mutual_knn`
    group : ProcessGroup, optional
    query_chunk : int >= 1, rows per rank per gathered chunk

    Returns
    -------
    ia, ib : Tensor [P], int64 global indices; distances : Tensor [P], float32 (the a -> b distance)

    Communication
    -------------
    Bytes sent per rank: ``32 (W - 1)`` (sizes and the argument check) plus :func:`topk_anchors` ``a -> b`` (queries
    ``a``, ``M = 2``) and ``b -> a`` (queries ``b``), plus ``8 (W - 1)`` for the counts and ``16`` bytes per
    reverse pair ``(i, j)`` of this rank's ``b`` lists whose ``i`` lives on another rank
    (at most ``16 nb k``).
    """
    k = _ops._checks.non_negative_int("k", k)
    query_chunk = _ops._checks.non_negative_int("query_chunk", query_chunk, minimum=1)
    error = None
    try:
        a = _ops._checks.features("a", a)
        b = _ops._checks.features("b", b)
        _ops._checks.same_device(a=a, b=b)
        _ops._checks.same_dtype(a=a, b=b)
        _ops._checks.same_feature_dim(a=a, b=b)
        max_distance = _ops._checks.real("max_distance", max_distance, allow_none=True)
    except (TypeError, ValueError) as caught:
        error = caught
    device = a.device if isinstance(a, torch.Tensor) else None
    stats = agree(error, None if error else [a.shape[0], b.shape[0], a.shape[1]], 3, group, device)
    check_same("the feature dimension", [s[2] for s in stats], "a.shape[1] and b.shape[1]")
    layout_a = layout_from_sizes([s[0] for s in stats], group)
    layout_b = layout_from_sizes([s[1] for s in stats], group)
    k = min(k, max(layout_a.total, layout_b.total))
    plain = {"anchor_offsets": None, "anchor_segments": None}
    none_meta = lambda n: torch.stack([torch.zeros(n, dtype=torch.int64, device=a.device),  # noqa: E731
                                       torch.full((n,), -1, dtype=torch.int64, device=a.device)], 1)
    ab_values, ab_indices = search(a, b, none_meta(a.shape[0]), k, layout_a, layout_b, metric, plain, precision,
                                   backend, group, query_chunk)
    _, ba_indices = search(b, a, none_meta(b.shape[0]), k, layout_b, layout_a, metric, plain, precision, backend,
                           group, query_chunk)
    # Route every reverse pair (i listed by b row j) to the owner of a row i.
    found = ba_indices >= 0
    rows_b = (torch.arange(b.shape[0], device=a.device) + layout_b.offset).unsqueeze(1).expand_as(ba_indices)
    reverse = torch.stack([ba_indices[found], rows_b[found]], 1)
    (received,), _, _ = route_to_owners(layout_a.owner(reverse[:, 0]), [reverse], layout_a.world_size, group)
    num_b = layout_b.total
    rows_a = torch.arange(a.shape[0], device=a.device).unsqueeze(1).expand_as(ab_indices)
    found = ab_indices >= 0
    ia, ib = rows_a[found] + layout_a.offset, ab_indices[found]
    distances = ab_values[found].to(torch.float32)
    keep = torch.isin(ia * num_b + ib, received[:, 0] * num_b + received[:, 1])
    if max_distance is not None:
        keep &= distances.to(torch.float64) <= max_distance
    ia, ib, distances = ia[keep], ib[keep], distances[keep]
    order = torch.argsort(ia * num_b + ib)
    return ia[order], ib[order], distances[order]
