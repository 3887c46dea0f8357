"""Sparse affinity graphs over tracklet features: cross-camera mutual-kNN graphs
(UGA Eqs. 4-5, EEA Eqs. 6-7) and per-camera kNN soft labels (UTAL Eqs. 4-6)."""
from __future__ import annotations

import torch

from .. import _backend
from . import _checks


def _cameras(cameras, num_rows: int, num_cameras: int | None, device) -> tuple[torch.Tensor, int]:
    if num_cameras is not None:
        num_cameras = _checks.non_negative_int("num_cameras", num_cameras, minimum=1)
    high = num_cameras if num_cameras is not None else 2**62
    cameras = _checks.index_vector("cameras", cameras, length=num_rows, low=0, high=high, device=device)
    if num_cameras is None:
        num_cameras = int(cameras.max()) + 1 if cameras.numel() else 0
    return cameras, num_cameras


def cross_camera_graph(x: torch.Tensor, cameras: torch.Tensor, k: int = 1, *,
                       min_similarity: float | None = None, self_loops: bool = True,
                       mode: str = "pairwise", num_cameras: int | None = None,
                       precision: str = "highest", backend: str = "auto") -> torch.Tensor:
    r"""Symmetric cross-camera mutual-kNN cosine graph (UGA Eqs. 4-5, EEA Eqs. 6-7).

    ``mode="pairwise"``: for every ordered pair of cameras ``t != m`` there is an edge
    ``i - j`` (``i`` in ``t``, ``j`` in ``m``) with weight :math:`\cos(x_i, x_j)` when ``j`` is
    among the ``k`` most similar tracklets of ``i`` in camera ``m``, ``i`` is among the
    ``k`` most similar of ``j`` in camera ``t``, and the cosine exceeds ``min_similarity``.
    ``mode="pooled"``: the ``k`` most similar are taken over all other cameras at once
    (as DAL's public code does). Ties go to the smaller index.

    Parameters
    ----------
    x : Tensor [N, D], float
    cameras : Tensor [N], integer in [0, num_cameras)
    k : int >= 0
    min_similarity : float, optional
        Strict lower bound on the cosine of an edge; ``None`` keeps every mutual pair.
    self_loops : bool
        Put 1 on the diagonal.
    mode : {"pairwise", "pooled"}
    num_cameras : int, optional
        Number of cameras; defaults to ``cameras.max() + 1``.
    precision : {"highest", "tf32"}
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    Tensor [N, N], sparse CSR, float32, symmetric, column indices sorted in each row.
    """
    x = _checks.features("x", x)
    cameras, num_cameras = _cameras(cameras, x.shape[0], num_cameras, x.device)
    k = _checks.non_negative_int("k", k)
    min_similarity = _checks.real("min_similarity", min_similarity, allow_none=True)
    if not isinstance(self_loops, bool):
        raise TypeError(f"self_loops must be a bool, got {type(self_loops).__name__}")
    mode = _checks.choice("mode", mode, ("pairwise", "pooled"))
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    _, impl = _backend.resolve("cross_camera_graph", backend, {"x": x, "cameras": cameras})
    return impl(x, cameras, num_cameras, k, min_similarity, self_loops, mode, precision)


def knn_soft_labels(x: torch.Tensor, cameras: torch.Tensor, k: int = 4, *, num_cameras: int | None = None,
                    precision: str = "highest", backend: str = "auto") -> torch.Tensor:
    r"""Per-camera kNN soft tracklet labels (UTAL Eqs. 4-6), as a block-diagonal sparse matrix.

    Row ``i`` (camera ``t``) holds ``i`` itself with weight 1 and its ``k`` nearest *other*
    tracklets of camera ``t`` (squared Euclidean distance, ties to the smaller index)
    with weight :math:`\exp(-\|x_i - x_j\|^2 / \sigma_t^2)`, where :math:`\sigma_t^2` is the mean
    squared distance to those neighbours over all tracklets of camera ``t``
    (:math:`\sigma_t^2 = 0` gives weight 1). Rows are L1-normalised. ``k = 0`` gives one-hot
    rows; a camera with ``<= k`` tracklets uses all it has.

    Parameters
    ----------
    x : Tensor [N, D], float
    cameras : Tensor [N], integer in [0, num_cameras)
    k : int >= 0
    num_cameras : int, optional
    precision : {"highest", "tf32"}
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    Tensor [N, N], sparse CSR, float32, column indices sorted in each row.
    """
    x = _checks.features("x", x)
    cameras, num_cameras = _cameras(cameras, x.shape[0], num_cameras, x.device)
    k = _checks.non_negative_int("k", k)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    _, impl = _backend.resolve("knn_soft_labels", backend, {"x": x, "cameras": cameras})
    return impl(x, cameras, num_cameras, k, precision)
