"""Reference sparse affinity graphs: the spec and oracle of ``cross_camera_graph``
(UGA Eqs. 4-5, EEA Eqs. 6-7) and ``knn_soft_labels`` (UTAL Eqs. 4-6).

Algorithm
---------
Both graphs are built from top-k lists, never from an N x N matrix. Rows of ``x`` are
grouped by camera (``cameras == c`` in ascending index order, so a local column order
is the global index order and ties still go to the smaller global index); each group
is searched in row chunks of at most ``_backend.tile_elements()`` distances and ranked
with :func:`fastassoc.kernels.reference.knn.smallest_k_exact` (GEMM tiles propose, exact
pair distances as ``_tiles`` defines them decide).

``cross_camera_graph``: ranking is by cosine distance ``1 - x_hat_i . x_hat_j`` (the most
similar first).

* ``pairwise``: for every camera ``m``, every tracklet outside ``m`` lists its ``k``
  nearest in ``m``. This yields the directed pairs ``i -> j`` with ``j`` among the ``k``
  most similar of ``i`` in camera ``cameras[j]``.
* ``pooled``: for every camera ``t``, its tracklets list their ``k`` nearest among all
  tracklets of the other cameras.

A directed pair ``i -> j`` becomes an edge when ``j -> i`` is also listed: key
``j * N + i`` found among the keys ``i * N + j`` (``torch.isin``). The weight of an edge
is computed once per unordered pair, as the float32 dot product of the L2-normalised
rows ``min(i, j)`` and ``max(i, j)``, so the matrix is exactly symmetric; with
``min_similarity`` only weights ``> min_similarity`` (compared in float64) are kept.
``self_loops`` adds weight 1 on the diagonal.

``knn_soft_labels``: inside camera ``t`` every tracklet lists its ``min(k, n_t - 1)``
nearest *other* tracklets of ``t`` by squared Euclidean distance ``d2``;
``sigma_t^2`` is the mean of all listed ``d2`` of camera ``t`` (summed in float64),
weights are ``exp(-d2 / sigma_t^2)`` (1 when ``sigma_t^2 = 0``), the tracklet itself has
weight 1, and each row is divided by its sum.

Tie-breaking
------------
Equal distances go to the smaller global index (see ``knn.smallest_k_exact``); the
distance of a pair depends on the two rows only, so copies of a vector tie exactly.

Limits
------
Arithmetic in float32 (float64 inputs stay float64); ``precision`` is ignored.
Memory: a few tiles plus O(N k) edge lists. Python loops run over non-empty cameras.
"""
from __future__ import annotations

import warnings

import torch

from ._tiles import prepare, row_chunks
from .knn import smallest_k_exact


def to_csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """Sparse CSR [size, size] float32 from unique (row, col) entries, columns sorted per row."""
    device = values.device
    order = torch.argsort(rows * size + cols)
    rows, cols, values = rows[order], cols[order], values[order]
    crow = torch.zeros(size + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=size), 0)
    with warnings.catch_warnings():
        # torch warns once per process that sparse CSR is "beta"; that is not the caller's concern.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values.to(torch.float32), size=(size, size),
                                       check_invariants=False)


def graph_from_directed_pairs(sources: torch.Tensor, targets: torch.Tensor, normalised: torch.Tensor,
                              min_similarity: float | None, self_loops: bool) -> torch.Tensor:
    """Symmetric cross-camera graph from directed top-k pairs (shared by the reference and Triton).

    A pair ``i -> j`` becomes an edge when ``j -> i`` is also listed (keys ``i * N + j``,
    ``torch.isin``). Its weight is the dot product of ``normalised`` rows ``min(i, j)`` and
    ``max(i, j)`` (once per unordered pair, so the matrix is exactly symmetric); with
    ``min_similarity`` only weights ``> min_similarity`` (compared in float64) are kept;
    ``self_loops`` adds weight 1 on the diagonal.

    Parameters
    ----------
    sources, targets : Tensor [P], int64 global indices of the directed pairs
    normalised : Tensor [N, D], the L2-normalised rows (their dtype is the weights' dtype)
    min_similarity : float or None
    self_loops : bool

    Returns
    -------
    Tensor [N, N], sparse CSR, float32, column indices sorted per row.
    """
    num_rows = normalised.shape[0]
    mutual = torch.isin(targets * num_rows + sources, sources * num_rows + targets)
    rows, cols = sources[mutual], targets[mutual]
    low, high = torch.minimum(rows, cols), torch.maximum(rows, cols)
    weights = (normalised[low] * normalised[high]).sum(1)
    if min_similarity is not None:
        strong = weights.to(torch.float64) > min_similarity
        rows, cols, weights = rows[strong], cols[strong], weights[strong]
    if self_loops:
        diagonal = torch.arange(num_rows, device=normalised.device)
        rows, cols = torch.cat([rows, diagonal]), torch.cat([cols, diagonal])
        weights = torch.cat([weights, weights.new_ones(num_rows)])
    return to_csr(rows, cols, weights, num_rows)


def _camera_members(cameras: torch.Tensor, num_cameras: int) -> list[torch.Tensor]:
    """Global indices of each camera's tracklets, ascending ([] entries for empty cameras)."""
    order = torch.argsort(cameras, stable=True)
    counts = torch.bincount(cameras, minlength=num_cameras).tolist()
    return list(torch.split(order, counts))


def _nearest_pairs(xn: torch.Tensor, query_rows: torch.Tensor, anchor_rows: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed pairs (query, anchor), global indices: each query's k nearest anchors by cosine distance.

    ``anchor_rows`` must be ascending so that ties go to the smaller global index.
    """
    anchors = xn[anchor_rows]
    sources, targets = [], []
    for start, stop in row_chunks(query_rows.numel(), anchor_rows.numel()):
        chunk = query_rows[start:stop]
        _, columns = smallest_k_exact(xn[chunk], anchors, "cosine", k)
        found = columns >= 0
        sources.append(chunk.unsqueeze(1).expand_as(columns)[found])
        targets.append(anchor_rows[columns[found]])
    return torch.cat(sources), torch.cat(targets)


def cross_camera_graph_reference(x: torch.Tensor, cameras: torch.Tensor, num_cameras: int, k: int,
                                 min_similarity: float | None, self_loops: bool, mode: str,
                                 precision: str) -> torch.Tensor:
    """Symmetric cross-camera mutual-kNN cosine graph.

    Parameters
    ----------
    x : Tensor [N, D], float
    cameras : Tensor [N], int64 in [0, num_cameras)
    num_cameras : int
    k : int >= 0
    min_similarity : float or None
        Strict lower bound on edge weights.
    self_loops : bool
    mode : {"pairwise", "pooled"}
    precision : str, ignored

    Returns
    -------
    Tensor [N, N], sparse CSR, float32, symmetric, column indices sorted per row.
    """
    num_rows, device = x.shape[0], x.device
    xn = prepare(x, "cosine")
    sources = [torch.empty(0, dtype=torch.int64, device=device)]
    targets = [torch.empty(0, dtype=torch.int64, device=device)]
    if k > 0:
        for camera, members in enumerate(_camera_members(cameras, num_cameras)):
            if members.numel() == 0 or members.numel() == num_rows:
                continue
            others = torch.nonzero(cameras != camera).squeeze(1)
            if mode == "pairwise":
                pair = _nearest_pairs(xn, others, members, k)
            else:
                pair = _nearest_pairs(xn, members, others, k)
            sources.append(pair[0])
            targets.append(pair[1])
    return graph_from_directed_pairs(torch.cat(sources), torch.cat(targets), xn, min_similarity, self_loops)


def knn_soft_labels_reference(x: torch.Tensor, cameras: torch.Tensor, num_cameras: int, k: int,
                              precision: str) -> torch.Tensor:
    """Per-camera kNN soft labels (UTAL Eqs. 4-6) as a block-diagonal sparse matrix.

    Parameters
    ----------
    x : Tensor [N, D], float
    cameras : Tensor [N], int64 in [0, num_cameras)
    num_cameras : int
    k : int >= 0
    precision : str, ignored

    Returns
    -------
    Tensor [N, N], sparse CSR, float32, rows summing to 1, column indices sorted per row.
    """
    num_rows, device = x.shape[0], x.device
    xs = prepare(x, "sqeuclidean")
    diagonal = torch.arange(num_rows, device=device)
    self_weights = xs.new_ones(num_rows)
    rows, cols, weights = [diagonal], [diagonal], [self_weights]
    for members in _camera_members(cameras, num_cameras):
        size = members.numel()
        width = min(k, size - 1)
        if width <= 0:
            continue
        anchors = xs[members]
        norms = (anchors * anchors).sum(1)
        positions = torch.arange(size, device=device)
        distances, neighbours = [], []
        for start, stop in row_chunks(size, size):
            values, columns = smallest_k_exact(anchors[start:stop], anchors, "sqeuclidean", width,
                                               positions[start:stop], norms[start:stop], norms)
            distances.append(values)
            neighbours.append(columns)
        distances, neighbours = torch.cat(distances), torch.cat(neighbours)   # [size, width], all found
        sigma_sq = (distances.to(torch.float64).sum() / distances.numel()).to(distances.dtype)
        weight = torch.exp(-distances / sigma_sq) if bool(sigma_sq > 0) else torch.ones_like(distances)
        # Row sums over a dense [size, width] block keep the summation order fixed on every device.
        row_sums = 1.0 + weight.sum(1)
        self_weights[members] = 1.0 / row_sums
        rows.append(members.unsqueeze(1).expand_as(neighbours).reshape(-1))
        cols.append(members[neighbours].reshape(-1))
        weights.append((weight / row_sums.unsqueeze(1)).reshape(-1))
    return to_csr(torch.cat(rows), torch.cat(cols), torch.cat(weights), num_rows)
