"""Sharded sparse affinity graphs: :func:`fastassoc.cross_camera_graph` and
:func:`fastassoc.knn_soft_labels` over tracklets split by rows across a process group.

Each rank returns the rows of the graph that belong to its block, as a
:class:`fastassoc.CSRMatrix` of shape ``(n, N)`` with global column indices: stacking the
ranks' rows in rank order gives the single-process matrix (same columns, same float32
values). The neighbour lists come from the sharded search of :mod:`.knn` (exact, ties to
the smaller global index).
"""
from __future__ import annotations

import torch

from .. import ops as _ops
from ..kernels.reference._tiles import prepare
from ..ops._sparse import CSRMatrix
from ._checks import agree, agree_rows, value_dtype
from ._comm import QUERY_CHUNK, all_gather_padded, route_to_owners, sharded_search
from .knn import local_topk, search


def _rows_csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, num_rows: int, num_cols: int
              ) -> CSRMatrix:
    """CSRMatrix [num_rows, num_cols] from unique local-row / global-column entries, columns sorted per row."""
    order = torch.argsort(rows * max(num_cols, 1) + cols)
    crow = torch.zeros(num_rows + 1, dtype=torch.int64, device=values.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=num_rows), 0)
    return CSRMatrix(crow, cols[order], values[order].to(torch.float32), (num_rows, num_cols))


def _camera_inputs(x, cameras, num_cameras, k, group):
    """Validate locally, agree over the ranks; (x, camera ids [n] in [0, C), C, layout, k)."""
    error = None
    try:
        x = _ops._checks.features("x", x)
        if num_cameras is not None:
            num_cameras = _ops._checks.non_negative_int("num_cameras", num_cameras, minimum=1)
        k = _ops._checks.non_negative_int("k", k)
        cameras = _ops._checks.index_vector("cameras", cameras, length=x.shape[0], low=0,
                                            high=num_cameras if num_cameras is not None else 2 ** 62,
                                            device=x.device)
        labels = torch.unique(cameras)
    except (TypeError, ValueError) as caught:
        error = caught
    layout, counts = agree_rows(error, "x", x, None if error else [labels.numel()], 1, group)
    # Only which rows share a camera matters: number the distinct labels of all ranks.
    distinct = torch.unique(torch.cat(all_gather_padded(labels, [c[0] for c in counts], group)))
    return x, torch.searchsorted(distinct, cameras), distinct.numel(), layout, min(k, layout.total)


def _mutual_rows(sources: torch.Tensor, targets: torch.Tensor, layout, group) -> torch.Tensor:
    """Which directed pairs ``i -> j`` (``i`` on this rank) are also listed as ``j -> i`` on ``j``'s owner.

    Each pair is sent reversed to the owner of ``j``: 16 bytes per pair with ``j`` on another rank.
    """
    (received,), _, _ = route_to_owners(layout.owner(targets), [torch.stack([targets, sources], 1)],
                                        layout.world_size, group)
    total = layout.total
    return torch.isin(sources * total + targets, received[:, 0] * total + received[:, 1])


def cross_camera_graph(x: torch.Tensor, cameras: torch.Tensor, k: int = 1, *, min_similarity: float | None = None,
                       self_loops: bool = True, mode: str = "pairwise", num_cameras: int | None = None,
                       precision: str = "highest", backend: str = "auto", group=None,
                       query_chunk: int = QUERY_CHUNK) -> CSRMatrix:
    r"""Sharded :func:`fastassoc.cross_camera_graph`: this rank's rows of the graph over every rank's tracklets.

    ``x`` / ``cameras`` are this rank's block of the tracklets (global row = block offset +
    local row). Returns the graph's rows ``offset : offset + n`` as a CSRMatrix ``(n, N)``
    with global columns; the ranks' rows stacked in rank order equal the single-process
    ``cross_camera_graph(cat(x), cat(cameras), ..., as_tuple=True)``. The neighbour lists
    (``k`` per other camera, or ``k`` pooled) are merged exactly across ranks; each edge
    weight ``x_hat_i . x_hat_j`` is computed by the rank holding ``j`` from the gathered
    row ``i``, with the single-process formula (a function of the two rows), so the matrix
    stays exactly symmetric. Collective.

    Parameters
    ----------
    x : Tensor [n, D], float; cameras : Tensor [n], integer >= 0
    k, min_similarity, self_loops, mode, num_cameras, precision, backend :
        as in :func:`fastassoc.cross_camera_graph`
    group : ProcessGroup, optional; query_chunk : int >= 1, rows per rank per gathered chunk

    Returns
    -------
    CSRMatrix, size ``(n, N)``, float32 values, columns sorted per row.

    Communication
    -------------
    Bytes sent per rank, with ``L`` the number of distinct cameras (``mode="pairwise"``) or 1
    (``"pooled"``): ``32 (W - 1)`` (sizes, check) + ``8 (W - 1) max_r u_r`` (camera labels,
    ``u_r`` distinct on rank ``r``) + per chunk ``(W - 1) c (D e + 8)`` (gathered rows and
    cameras) + ``sum_{r != rank} n_r L k 24`` (candidates: index, distance and weight) +
    ``8 (W - 1)`` + ``16`` per listed pair whose target lives on another rank (at most ``16 n L k``).
    """
    error = None
    try:
        mode = _ops._checks.choice("mode", mode, ("pairwise", "pooled"))
        min_similarity = _ops._checks.real("min_similarity", min_similarity, allow_none=True)
        query_chunk = _ops._checks.non_negative_int("query_chunk", query_chunk, minimum=1)
    except (TypeError, ValueError) as caught:
        error = caught
    if error is not None:
        agree(error, None, 3, group, None)
    x, cameras, num_ids, layout, k = _camera_inputs(x, cameras, num_cameras, k, group)
    offset, size = layout.offset, layout.size
    num_lists = num_ids if mode == "pairwise" else 1
    xn_local = prepare(x, "cosine")

    def local_search(rows, meta):
        query_cameras = meta[:, 0]
        values = torch.full((rows.shape[0], num_lists, k), float("inf"), dtype=value_dtype(x), device=x.device)
        indices = torch.full((rows.shape[0], num_lists, k), -1, dtype=torch.int64, device=x.device)
        weights = torch.zeros((rows.shape[0], num_lists, k), dtype=xn_local.dtype, device=x.device)
        xn_rows = prepare(rows, "cosine")
        for camera in range(num_ids):
            if mode == "pairwise":
                anchors = (cameras == camera).nonzero().squeeze(1)
                queries = (query_cameras != camera).nonzero().squeeze(1)
                slot = camera
            else:
                anchors = (cameras != camera).nonzero().squeeze(1)
                queries = (query_cameras == camera).nonzero().squeeze(1)
                slot = 0
            if anchors.numel() == 0 or queries.numel() == 0:
                continue
            found_values, columns = local_topk(rows[queries], x[anchors], k, "cosine", 0, precision=precision,
                                               backend=backend)
            found = columns >= 0
            targets = torch.where(found, anchors[columns.clamp_min(0)], -1)
            values[queries, slot] = found_values
            indices[queries, slot] = torch.where(found, targets + offset, -1)
            query_rows = queries.unsqueeze(1).expand_as(columns)[found]
            weights[queries, slot] = weights.new_zeros(columns.shape).masked_scatter(
                found, _pair_dots(xn_rows, xn_local, query_rows, targets[found]))
        return values, indices, [weights]

    values, indices, (weights,) = sharded_search(x, cameras.unsqueeze(1), layout, k, num_lists, local_search,
                                                 value_dtype(x), 1, query_chunk=query_chunk, group=group)
    found = indices >= 0
    sources = (torch.arange(size, device=x.device) + offset).view(-1, 1, 1).expand_as(indices)[found]
    targets, weights = indices[found], weights[found].to(xn_local.dtype)
    mutual = _mutual_rows(sources, targets, layout, group)
    sources, targets, weights = sources[mutual], targets[mutual], weights[mutual]
    if min_similarity is not None:
        strong = weights.to(torch.float64) > min_similarity
        sources, targets, weights = sources[strong], targets[strong], weights[strong]
    if self_loops:
        diagonal = torch.arange(size, device=x.device) + offset
        sources, targets = torch.cat([sources, diagonal]), torch.cat([targets, diagonal])
        weights = torch.cat([weights, weights.new_ones(size)])
    return _rows_csr(sources - offset, targets, weights, size, layout.total)


# Pairs per chunk of the weight pass, as the CPU backend's (each row's sum is the same either way).
_EDGE_CHUNK = 512


def _pair_dots(xn_rows: torch.Tensor, xn_local: torch.Tensor, query_rows: torch.Tensor, anchor_rows: torch.Tensor
               ) -> torch.Tensor:
    """``(xn_rows[q] * xn_local[a]).sum(1)``: the single-process edge weight of each pair, in chunks."""
    out = torch.empty(query_rows.shape[0], dtype=xn_local.dtype, device=xn_local.device)
    for start in range(0, query_rows.shape[0], _EDGE_CHUNK):
        stop = start + _EDGE_CHUNK
        torch.sum(xn_rows[query_rows[start:stop]] * xn_local[anchor_rows[start:stop]], 1, out=out[start:stop])
    return out


def knn_soft_labels(x: torch.Tensor, cameras: torch.Tensor, k: int = 4, *, num_cameras: int | None = None,
                    precision: str = "highest", backend: str = "auto", group=None,
                    query_chunk: int = QUERY_CHUNK) -> CSRMatrix:
    r"""Sharded :func:`fastassoc.knn_soft_labels`: this rank's rows of the soft-label matrix.

    Neighbour lists (the ``k`` nearest other tracklets of the same camera) come from the exact
    sharded search; :math:`\sigma_t^2` (UTAL Eq. 5) is a float64 sum over a camera's whole
    ``[size_t, width]`` distance block, whose rounding depends on the order of its terms, so
    the ranks all-gather the ``N x k`` neighbour distances (``O(N k)``, not ``N x N``) and
    each computes the single-process expressions on the same blocks. Returns rows
    ``offset : offset + n`` as a CSRMatrix ``(n, N)``; stacked in rank order they equal
    ``knn_soft_labels(cat(x), cat(cameras), ..., as_tuple=True)``. Collective.

    Parameters
    ----------
    x : Tensor [n, D], float; cameras : Tensor [n], integer >= 0
    k, num_cameras, precision, backend : as in :func:`fastassoc.knn_soft_labels`
    group : ProcessGroup, optional; query_chunk : int >= 1

    Returns
    -------
    CSRMatrix, size ``(n, N)``, float32 values, columns sorted per row.

    Communication
    -------------
    Bytes sent per rank (``k' = min(k, N)``, ``v`` = 4, or 8 for float64): ``32 (W - 1)`` +
    ``8 (W - 1) max_r u_r`` (camera labels) + per chunk ``(W - 1) c (D e + 16)`` +
    ``sum_{r != rank} n_r k' (v + 8)`` (candidates) + ``(W - 1) max_r n_r (k' v + 8)`` (the gathered
    neighbour distances and camera ids).
    """
    x, cameras, num_ids, layout, k_search = _camera_inputs(x, cameras, num_cameras, k, group)
    query_chunk = _ops._checks.non_negative_int("query_chunk", query_chunk, minimum=1)
    offset, size = layout.offset, layout.size
    global_rows = torch.arange(size, device=x.device) + offset
    meta = torch.stack([cameras, global_rows], 1)
    options = {"anchor_offsets": None, "anchor_segments": cameras}
    rows, cols = [torch.arange(size, device=x.device)], [global_rows]
    if k_search == 0:
        return _rows_csr(rows[0], cols[0], torch.ones(size, dtype=torch.float32, device=x.device), size,
                         layout.total)
    values, neighbours = search(x, x, meta, k_search, layout, layout, "sqeuclidean", options, precision, backend,
                                group, query_chunk)
    every_values = torch.cat(all_gather_padded(values, layout.sizes, group))
    every_cameras = torch.cat(all_gather_padded(cameras, layout.sizes, group))
    self_weights = torch.ones(size, dtype=values.dtype, device=x.device)
    weights = [self_weights]
    for camera in range(num_ids):
        members = (every_cameras == camera).nonzero().squeeze(1)
        width = min(k, members.numel() - 1)
        if width <= 0:
            continue
        distances = every_values[members, :width].contiguous()
        # The single-process expressions on the same [size_t, width] block: the same bits.
        sigma_sq = (distances.to(torch.float64).sum() / distances.numel()).to(distances.dtype)
        weight = torch.exp(-distances / sigma_sq) if bool(sigma_sq > 0) else torch.ones_like(distances)
        row_sums = 1.0 + weight.sum(1)
        mine = (members >= offset) & (members < offset + size)
        local = members[mine] - offset
        if local.numel() == 0:
            continue
        self_weights[local] = 1.0 / row_sums[mine]
        rows.append(local.unsqueeze(1).expand(-1, width).reshape(-1))
        cols.append(neighbours[local, :width].reshape(-1))
        weights.append((weight / row_sums.unsqueeze(1))[mine].reshape(-1))
    return _rows_csr(torch.cat(rows), torch.cat(cols), torch.cat(weights), size, layout.total)
