"""Triton nearest-anchor ranking and mutual kNN: ``topk_anchors_triton``, ``mutual_knn_triton``.

Algorithm
---------
``topk_anchors``: queries are stably sorted by segment; every non-empty segment is a
row group searching its own anchor range, so a query pays only for its segment's
anchors. For ``k <= 64`` one launch of the fused distance + top-k kernel
(``_common._fused_topk_kernel``) does the work: distance tiles live in registers and
are merged into per-row lists; when there are too few query blocks to fill the GPU the
segment's anchors are split into chunks whose lists are merged afterwards on the host
side of the launch (two stable sorts over ``chunks * k`` entries per query).

Large ``k`` (> 64) takes the documented two-stage path: stage 1 is the fused distance
kernel writing masked distance tiles of at most ``tile_elements()`` entries
(``_common.distance_tiles``; the excluded anchor is +inf), stage 2 a stable
``torch.sort`` of each tile row, whose first ``k`` entries are the answer (ties keep
the anchor order). This is the only path where distances go through global memory.

``mutual_knn``: one pass yields both directions. Each program computes its
``a``-block x ``b``-tile distances once and takes from the same registers (1) the
row candidates (the running top-k of every ``a`` row) and (2) the column candidates:
for every ``b`` column of the tile, its ``k`` best rows among the block's rows, written
to ``[blocks, columns, k]``. Merging the column candidates over the row blocks gives
every ``b`` row's top-k in ``a``. A second launch with the roles swapped would cost a
second full GEMM; the column lists cost ``k`` extra passes over each tile in registers
plus ``Na / BLOCK_M * Nb * k`` words of traffic, so ``b`` is processed in column passes
that keep that buffer within ``tile_elements()`` entries. Pairs are mutual when the key
``i * Nb + j`` of a row list occurs among the column-list keys (``torch.isin``), as in
the reference. ``k > 64``: two ``topk_anchors`` calls (one per direction).

Tie-breaking
------------
(distance, index) lexicographic everywhere (see ``_common``), equal to the reference.

Must equal ``fastassoc.kernels.reference.knn.topk_anchors_reference`` and
``mutual_knn_reference``: indices exactly (well-separated or exactly representable
data), distances within float32 summation-order rounding.
"""
from __future__ import annotations

import math

import torch

from ... import _backend
from ..reference.knn import mutual_pairs, nearest_in
from . import _common
from ._common import Operand, RowGroup


def _columns(operand: Operand, low: int, high: int) -> Operand:
    """The operand restricted to rows ``low:high``."""
    aux = operand.aux[low:high] if operand.aux.shape[0] == operand.features.shape[0] else operand.aux
    return Operand(operand.features[low:high], aux, operand.metric_code)


def _sorted_smallest(tile: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 of the large-k path: first ``k`` entries of a stable row sort; +inf = masked."""
    width = min(k, tile.shape[1])
    values, columns = torch.sort(tile, dim=1, stable=True)
    values, columns = values[:, :width], columns[:, :width]
    return values, columns.masked_fill(torch.isinf(values), -1)


def topk_anchors_triton(queries: torch.Tensor, anchors: torch.Tensor, k: int, metric: str,
                        anchor_offsets: torch.Tensor, query_segments: torch.Tensor, exclude: torch.Tensor,
                        precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest anchors of every query inside its segment (see the module docstring).

    Parameters and result as ``topk_anchors_reference`` (``anchors`` on the queries' device);
    ``precision`` in {"highest", "tf32"} selects the ``tl.dot`` input precision of fp32 features.
    """
    num_queries, num_anchors = queries.shape[0], anchors.shape[0]
    device = queries.device
    distances = torch.full((num_queries, k), math.inf, dtype=torch.float32, device=device)
    indices = torch.full((num_queries, k), -1, dtype=torch.int64, device=device)
    if k == 0 or num_queries == 0 or num_anchors == 0:
        return distances, indices
    rows = _common.prepare(queries, metric)
    cols = _common.prepare(anchors, metric)
    order = torch.argsort(query_segments, stable=True)
    counts = torch.bincount(query_segments, minlength=anchor_offsets.shape[0] - 1).tolist()
    bounds = anchor_offsets.tolist()
    excluded = exclude[order].contiguous()
    groups, first = [], 0
    for segment, count in enumerate(counts):
        low, high = bounds[segment], bounds[segment + 1]
        if count and high > low:
            groups.append(RowGroup(first, first + count, [(low, high, 0)]))
        first += count
    if not groups:
        return distances, indices
    if k <= _common.K_MAX:
        result = _common.fused_topk(rows, cols, k, groups, 1, row_ids=order, precision=precision,
                                    row_ref=excluded, ref_mode=_common.REF_EXCLUDE)
        values, found = _common.finish(result.values[:, 0], result.indices[:, 0])
        distances[order] = values
        indices[order] = found
        return distances, indices
    for group in groups:
        low, high, _ = group.ranges[0]
        positions = order[group.start:group.stop]
        for start, stop, tile in _common.distance_tiles(rows, _columns(cols, low, high), positions,
                                                        precision=precision,
                                                        exclude=(excluded[group.start:group.stop] - low)):
            values, columns = _sorted_smallest(tile, k)
            chunk = positions[start:stop]
            distances[chunk, :values.shape[1]] = values.to(torch.float32)
            indices[chunk, :values.shape[1]] = torch.where(columns >= 0, columns + low, columns)
    return distances, indices


def mutual_knn_triton(a: torch.Tensor, b: torch.Tensor, k: int, metric: str, max_distance: float | None,
                      precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mutual k-nearest-neighbour pairs between ``a`` and ``b`` (see the module docstring).

    Parameters and result as ``mutual_knn_reference``; ``precision`` in {"highest", "tf32"}
    selects the ``tl.dot`` input precision of fp32 features.
    """
    num_a, num_b = a.shape[0], b.shape[0]
    device = a.device
    empty = torch.empty(0, dtype=torch.int64, device=device)
    if k == 0 or num_a == 0 or num_b == 0:
        return empty, empty.clone(), torch.empty(0, dtype=torch.float32, device=device)
    if k > _common.K_MAX:
        row_values, row_lists = nearest_in(a, b, k, metric, precision, topk_anchors_triton)
        _, column_rows = nearest_in(b, a, k, metric, precision, topk_anchors_triton)
    else:
        row_values, row_lists, column_rows = _one_pass_lists(a, b, k, metric, precision)
    return mutual_pairs(row_values, row_lists, column_rows, max_distance)


def _one_pass_lists(a: torch.Tensor, b: torch.Tensor, k: int, metric: str, precision: str):
    """Row lists of ``a`` in ``b`` and column lists of ``b`` in ``a`` from one fused pass.

    Returns ``(row_distances [Na, k] float32, row_indices [Na, k], column_rows [Nb, k])``
    with padding ``(inf, -1)``.
    """
    num_a, num_b = a.shape[0], b.shape[0]
    device = a.device
    rows = _common.prepare(a, metric)
    cols = _common.prepare(b, metric)
    row_ids = torch.arange(num_a, device=device)
    acc_dtype = _common.compute_dtype(a.dtype)
    k_pad = max(2, 1 << (k - 1).bit_length())
    block_m = _common.block_m_for(k_pad)
    num_blocks = -(-num_a // block_m)
    floor = _common.INTERPRET_BLOCKS[1] if _common.interpreting() else 128
    pass_columns = max(floor, _backend.tile_elements() // (num_blocks * k))
    row_values = torch.full((num_a, k), math.inf, dtype=acc_dtype, device=device)
    row_indices = torch.full((num_a, k), _common.PAD_INDEX, dtype=torch.int64, device=device)
    column_rows = torch.full((num_b, k), -1, dtype=torch.int64, device=device)
    for c0 in range(0, num_b, pass_columns):
        c1 = min(c0 + pass_columns, num_b)
        width = c1 - c0
        col_value = torch.full((num_blocks, width, k), math.inf, dtype=acc_dtype, device=device)
        col_index = torch.full((num_blocks, width, k), _common.NO_COLUMN, dtype=torch.int32, device=device)
        result = _common.fused_topk(rows, cols, k, [RowGroup(0, num_a, [(c0, c1, 0)])], 1, row_ids=row_ids,
                                    precision=precision, col_k=k, col_out=(col_value, col_index),
                                    col_pass=(c0, width), block_m=block_m, op="mutual_knn")
        row_values, row_indices = _common.select_smallest(torch.cat([row_values, result.values[:, 0]], 1),
                                                          torch.cat([row_indices, result.indices[:, 0]], 1), k)
        candidates = col_index.to(torch.int64).permute(1, 0, 2).reshape(width, num_blocks * k)
        candidates = candidates.masked_fill(candidates >= _common.NO_COLUMN, _common.PAD_INDEX)
        _, best_rows = _common.select_smallest(col_value.permute(1, 0, 2).reshape(width, num_blocks * k),
                                               candidates, k)
        column_rows[c0:c1] = best_rows.masked_fill(best_rows >= _common.PAD_INDEX, -1)
    distances, indices = _common.finish(row_values, row_indices)
    return distances, indices, column_rows
