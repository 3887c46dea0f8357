"""Triton sparse affinity graphs: ``cross_camera_graph_triton``, ``knn_soft_labels_triton``.

Algorithm
---------
Rows are stably sorted by camera so every camera is one contiguous column range whose
order is the global index order (ties still go to the smaller global index). One
launch of the fused distance + top-k kernel (``_common._fused_topk_kernel``) then
serves the whole graph:

``cross_camera_graph`` (cosine distance ``1 - x_hat_i . x_hat_j``): the rows of
camera ``t`` form one row group whose column ranges are the other cameras.
``pairwise`` keeps one list per (row, camera ``m``) (the range of ``m`` is its own
merge target); ``pooled`` merges all other cameras into one list per row (chunk lists
are merged after mapping columns back to global indices, so cross-camera ties are
ordered by global index). A directed pair ``i -> j`` is an edge when ``j -> i`` is also
listed (keys ``i * N + j``, ``torch.isin``). Each cross-camera block of distances is
computed twice (once from each side); the alternative, column candidates from the
same tile as in ``mutual_knn``, would halve the FLOPs at the price of per-camera
column buffers (a possible next step; the graph is not on the issue's benchmark list).
Edge weights are the float32 dot product of the L2-normalised rows ``min(i, j)`` and
``max(i, j)`` (the reference's formula, so the matrix is exactly symmetric), computed
for the O(N k) edges only; ``min_similarity`` is compared in float64.

``knn_soft_labels`` (UTAL Eqs. 4-6, squared Euclidean): camera ``t`` searches its own
range, each row excluding itself. ``sigma_t^2`` is the float64 mean of the listed
distances of the camera, weights ``exp(-d / sigma_t^2)`` (1 when ``sigma_t^2 = 0``),
self weight 1, rows divided by their sum. Cameras with ``<= k`` tracklets naturally
list all they have.

``k > 64`` goes through ``topk_anchors_triton``'s large-k path camera by camera.
Sparse assembly (sort of ``row * N + col`` keys, ``bincount`` row pointers) stays on
the device.

Must equal ``fastassoc.kernels.reference.graph.cross_camera_graph_reference`` and
``knn_soft_labels_reference``: same edges (well-separated or exact data), values
within float32 rounding.
"""
from __future__ import annotations

import torch

from . import _common
from ..reference.graph import graph_from_directed_pairs, to_csr
from ..reference.knn import nearest_in
from ._common import Operand, RowGroup
from .knn import topk_anchors_triton


def _by_camera(cameras: torch.Tensor, num_cameras: int) -> tuple[torch.Tensor, list[int]]:
    """Stable camera order and camera offsets [C+1] (host list)."""
    order = torch.argsort(cameras, stable=True)
    counts = torch.bincount(cameras, minlength=num_cameras).tolist()
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    return order, offsets


def _sorted_operand(operand: Operand, order: torch.Tensor) -> Operand:
    aux = operand.aux[order] if operand.aux.shape[0] == operand.features.shape[0] else operand.aux
    return Operand(operand.features[order].contiguous(), aux.contiguous(), operand.metric_code)


def _directed_pairs_fused(x, order, offsets, num_cameras, k, mode, precision):
    """Directed pairs (source, target) in global indices from one fused launch (k <= 64)."""
    operand = _common.prepare(x, "cosine")
    columns = _sorted_operand(operand, order)
    pairwise = mode == "pairwise"
    groups = []
    for camera in range(num_cameras):
        low, high = offsets[camera], offsets[camera + 1]
        if high == low:
            continue
        ranges = [(offsets[m], offsets[m + 1], m if pairwise else 0) for m in range(num_cameras)
                  if m != camera and offsets[m + 1] > offsets[m]]
        if ranges:
            groups.append(RowGroup(low, high, ranges))
    result = _common.fused_topk(operand, columns, k, groups, num_cameras if pairwise else 1, row_ids=order,
                                precision=precision, index_map=order, op="cross_camera_graph")
    targets = result.indices
    found = targets < _common.PAD_INDEX
    sources = order.view(-1, 1, 1).expand_as(targets)
    return sources[found], targets[found]


def _directed_pairs_large_k(x, cameras, order, offsets, num_cameras, k, mode, precision):
    """Directed pairs for k > 64, camera by camera through topk_anchors' large-k path."""
    device = x.device
    sources, targets = [], []
    for camera in range(num_cameras):
        members = order[offsets[camera]:offsets[camera + 1]]
        if members.numel() == 0 or members.numel() == x.shape[0]:
            continue
        others = torch.nonzero(cameras != camera).squeeze(1)
        queries, anchors = (others, members) if mode == "pairwise" else (members, others)
        _, columns = nearest_in(x[queries], x[anchors], k, "cosine", precision, topk_anchors_triton)
        found = columns >= 0
        sources.append(queries.unsqueeze(1).expand_as(columns)[found])
        targets.append(anchors[columns[found]])
    if not sources:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty.clone()
    return torch.cat(sources), torch.cat(targets)


def cross_camera_graph_triton(x: torch.Tensor, cameras: torch.Tensor, num_cameras: int, k: int,
                              min_similarity: float | None, self_loops: bool, mode: str,
                              precision: str) -> torch.Tensor:
    """Symmetric cross-camera mutual-kNN cosine graph (UGA Eqs. 4-5, EEA Eqs. 6-7).

    Parameters and result as ``cross_camera_graph_reference``; ``precision`` in
    {"highest", "tf32"} selects the ``tl.dot`` input precision of fp32 features.
    """
    num_rows, device = x.shape[0], x.device
    sources = targets = torch.empty(0, dtype=torch.int64, device=device)
    if k > 0 and num_rows > 0:
        order, offsets = _by_camera(cameras, num_cameras)
        if k <= _common.K_MAX:
            sources, targets = _directed_pairs_fused(x, order, offsets, num_cameras, k, mode, precision)
        else:
            sources, targets = _directed_pairs_large_k(x, cameras, order, offsets, num_cameras, k, mode, precision)
    normalised = torch.nn.functional.normalize(x.to(_common.compute_dtype(x.dtype)), dim=1)
    return graph_from_directed_pairs(sources, targets, normalised, min_similarity, self_loops)


def knn_soft_labels_triton(x: torch.Tensor, cameras: torch.Tensor, num_cameras: int, k: int,
                           precision: str) -> torch.Tensor:
    """Per-camera kNN soft labels (UTAL Eqs. 4-6) as a block-diagonal sparse matrix.

    Parameters and result as ``knn_soft_labels_reference``; ``precision`` in
    {"highest", "tf32"} selects the ``tl.dot`` input precision of fp32 features.
    """
    num_rows, device = x.shape[0], x.device
    dtype = _common.compute_dtype(x.dtype)
    diagonal = torch.arange(num_rows, device=device)
    if num_rows == 0 or k == 0:
        return to_csr(diagonal, diagonal, torch.ones(num_rows, dtype=dtype, device=device), num_rows)
    order, offsets = _by_camera(cameras, num_cameras)
    sizes = [offsets[c + 1] - offsets[c] for c in range(num_cameras)]
    width = min(k, max(sizes) - 1)
    if width <= 0:
        return to_csr(diagonal, diagonal, torch.ones(num_rows, dtype=dtype, device=device), num_rows)
    # distances / neighbours [N, width] in camera-sorted positions, padding (inf, PAD_INDEX).
    if width <= _common.K_MAX:
        operand = _common.prepare(x, "sqeuclidean")
        columns = _sorted_operand(operand, order)
        groups = [RowGroup(offsets[c], offsets[c + 1], [(offsets[c], offsets[c + 1], 0)])
                  for c in range(num_cameras) if sizes[c] > 1]
        result = _common.fused_topk(operand, columns, width, groups, 1, row_ids=order, precision=precision,
                                    index_map=order, row_ref=diagonal, ref_mode=_common.REF_EXCLUDE,
                                    op="knn_soft_labels")
        distances, neighbours = result.values[:, 0], result.indices[:, 0]
    else:
        distances = torch.full((num_rows, width), float("inf"), dtype=dtype, device=device)
        neighbours = torch.full((num_rows, width), _common.PAD_INDEX, dtype=torch.int64, device=device)
        for c in range(num_cameras):
            if sizes[c] <= 1:
                continue
            members = order[offsets[c]:offsets[c + 1]]
            zeros = torch.zeros(sizes[c], dtype=torch.int64, device=device)
            local = min(width, sizes[c] - 1)
            values, columns = topk_anchors_triton(x[members], x[members], local, "sqeuclidean",
                                                  torch.tensor([0, sizes[c]], device=device), zeros,
                                                  torch.arange(sizes[c], device=device), precision)
            distances[offsets[c]:offsets[c + 1], :local] = values.to(dtype)
            neighbours[offsets[c]:offsets[c + 1], :local] = members[columns]
    found = neighbours < _common.PAD_INDEX
    camera_of_position = cameras[order]
    listed = torch.where(found, distances, torch.zeros_like(distances)).to(torch.float64)
    totals = torch.zeros(num_cameras, dtype=torch.float64, device=device).index_add_(0, camera_of_position,
                                                                                     listed.sum(1))
    counts = torch.zeros(num_cameras, dtype=torch.float64, device=device).index_add_(
        0, camera_of_position, found.sum(1).to(torch.float64))
    sigma_sq = (totals / counts.clamp_min(1)).to(dtype)[camera_of_position].unsqueeze(1)
    safe = torch.where(found, distances, torch.zeros_like(distances))
    weight = torch.where(sigma_sq > 0, torch.exp(-safe / torch.where(sigma_sq > 0, sigma_sq, 1.0)),
                         torch.ones_like(safe))
    weight = torch.where(found, weight, torch.zeros_like(weight))
    row_sums = 1.0 + weight.sum(1)
    self_weights = torch.empty(num_rows, dtype=dtype, device=device)
    self_weights[order] = 1.0 / row_sums
    sources = order.unsqueeze(1).expand_as(neighbours)
    rows = torch.cat([diagonal, sources[found]])
    cols = torch.cat([diagonal, neighbours[found]])
    weights = torch.cat([self_weights, (weight / row_sums.unsqueeze(1))[found]])
    return to_csr(rows, cols, weights, num_rows)
