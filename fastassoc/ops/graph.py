"""Sparse affinity graphs over tracklet features: cross-camera mutual-kNN graphs
(UGA Eqs. 4-5, EEA Eqs. 6-7) and per-camera kNN soft labels (UTAL Eqs. 4-6)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from ._sparse import CSRMatrix
from ._custom import backend_name, dynamic_size, fake_features, fake_index, flag, tensor_input


def _components(matrix: torch.Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # A custom op returns plain tensors; these belong to a matrix the kernel just built.
    return matrix.crow_indices(), matrix.col_indices(), matrix.values()


def _result(parts: tuple[Tensor, Tensor, Tensor], num_rows, as_tuple: bool):
    matrix = CSRMatrix(parts[0], parts[1], parts[2], (num_rows, num_rows))
    if as_tuple:
        return matrix
    with warnings.catch_warnings():
        # torch warns once per process that sparse CSR is "beta"; that is not the caller's concern.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.to_sparse_csr()


def _fake_csr(op: str, x: Tensor, cameras: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    fake_features("x", x)
    fake_index("cameras", cameras, length=x.shape[0], device=x.device)
    nnz = dynamic_size(op, x, cameras)
    return (x.new_empty((x.shape[0] + 1,), dtype=torch.int64), x.new_empty((nnz,), dtype=torch.int64),
            x.new_empty((nnz,), dtype=torch.float32))


def cross_camera_graph(x: torch.Tensor, cameras: torch.Tensor, k: int = 1, *,
                       min_similarity: float | None = None, self_loops: bool = True,
                       mode: str = "pairwise", num_cameras: int | None = None,
                       precision: str = "highest", backend: str = "auto",
                       as_tuple: bool = False) -> torch.Tensor | CSRMatrix:
    r"""Symmetric cross-camera mutual-kNN cosine graph (UGA Eqs. 4-5, EEA Eqs. 6-7).

    ``mode="pairwise"``: for every ordered pair of cameras ``t != m`` there is an edge
    ``i - j`` (``i`` in ``t``, ``j`` in ``m``) with weight :math:`\cos(x_i, x_j)` when ``j`` is
    among the ``k`` most similar tracklets of ``i`` in camera ``m``, ``i`` is among the
    ``k`` most similar of ``j`` in camera ``t``, and the cosine exceeds ``min_similarity``.
    ``mode="pooled"``: the ``k`` most similar are taken over all other cameras at once
    (as DAL's public code does). Ties go to the smaller index.

    Not differentiable: behaves as under ``torch.no_grad`` (inputs that require grad are
    accepted and detached). Runs as the custom op ``torch.ops.fastassoc.cross_camera_graph``;
    the number of edges depends on the values, so it traces under torch.compile (with
    ``as_tuple=True``) with a symbolic ``nnz`` (as :func:`fastassoc.mutual_knn` does) and
    raises ValueError on meta tensors.

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
    as_tuple : bool
        Return a :class:`fastassoc.ops._sparse.CSRMatrix` of dense tensors instead of a
        torch sparse tensor: the form a step compiled with ``torch.compile`` can trace.

    Returns
    -------
    Tensor [N, N], sparse CSR, float32, symmetric, column indices sorted in each row
    (or its ``CSRMatrix``: crow int64 [N+1], col int64 [nnz], values float32 [nnz]).
    """
    x = tensor_input("x", x)
    cameras = tensor_input("cameras", cameras)
    if num_cameras is not None:
        num_cameras = _checks.non_negative_int("num_cameras", num_cameras, minimum=1)
    k = _checks.non_negative_int("k", k)
    min_similarity = _checks.real("min_similarity", min_similarity, allow_none=True)
    self_loops = flag("self_loops", self_loops)
    mode = _checks.choice("mode", mode, ("pairwise", "pooled"))
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    as_tuple = flag("as_tuple", as_tuple)
    parts = torch.ops.fastassoc.cross_camera_graph(x, cameras, k, min_similarity, self_loops, mode, num_cameras,
                                                   precision, backend_name(backend))
    return _result(parts, x.shape[0], as_tuple)


@torch.library.custom_op("fastassoc::cross_camera_graph", mutates_args=())
def _cross_camera_graph_op(x: Tensor, cameras: Tensor, k: int, min_similarity: Optional[float], self_loops: bool,
                           mode: str, num_cameras: Optional[int], precision: str,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    x = _checks.features("x", x)
    cameras, num_cameras = _checks.camera_ids("cameras", cameras, num_rows=x.shape[0], num_cameras=num_cameras,
                                              device=x.device)
    k = _checks.non_negative_int("k", k)
    min_similarity = _checks.real("min_similarity", min_similarity, allow_none=True)
    self_loops = flag("self_loops", self_loops)
    mode = _checks.choice("mode", mode, ("pairwise", "pooled"))
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    k = min(k, x.shape[0])  # k past the rows links every candidate: the same graph without k-sized scratch
    _, impl = _backend.resolve("cross_camera_graph", backend, {"x": x, "cameras": cameras})
    return _components(impl(x, cameras, num_cameras, k, min_similarity, self_loops, mode, precision))


@_cross_camera_graph_op.register_fake
def _cross_camera_graph_fake(x, cameras, k, min_similarity, self_loops, mode, num_cameras, precision, backend):
    return _fake_csr("cross_camera_graph", x, cameras)


def knn_soft_labels(x: torch.Tensor, cameras: torch.Tensor, k: int = 4, *, num_cameras: int | None = None,
                    precision: str = "highest", backend: str = "auto",
                    as_tuple: bool = False) -> torch.Tensor | CSRMatrix:
    r"""Per-camera kNN soft tracklet labels (UTAL Eqs. 4-6), as a block-diagonal sparse matrix.

    Row ``i`` (camera ``t``) holds ``i`` itself with weight 1 and its ``k`` nearest *other*
    tracklets of camera ``t`` (squared Euclidean distance, ties to the smaller index)
    with weight :math:`\exp(-\|x_i - x_j\|^2 / \sigma_t^2)`, where :math:`\sigma_t^2` is the mean
    squared distance to those neighbours over all tracklets of camera ``t``
    (:math:`\sigma_t^2 = 0` gives weight 1). Rows are L1-normalised. ``k = 0`` gives one-hot
    rows; a camera with ``<= k`` tracklets uses all it has.

    Not differentiable: behaves as under ``torch.no_grad`` (inputs that require grad are
    accepted and detached). Runs as the custom op ``torch.ops.fastassoc.knn_soft_labels``;
    the number of entries depends on the camera sizes, so it traces under torch.compile
    (with ``as_tuple=True``) with a symbolic ``nnz`` (as :func:`fastassoc.mutual_knn` does)
    and raises ValueError on meta tensors.

    Parameters
    ----------
    x : Tensor [N, D], float
    cameras : Tensor [N], integer in [0, num_cameras)
    k : int >= 0
    num_cameras : int, optional
    precision : {"highest", "tf32"}
    backend : {"auto", "reference", "cpu", "triton", "cuda"}
    as_tuple : bool
        Return a :class:`fastassoc.ops._sparse.CSRMatrix` of dense tensors instead of a
        torch sparse tensor: the form a step compiled with ``torch.compile`` can trace.

    Returns
    -------
    Tensor [N, N], sparse CSR, float32, column indices sorted in each row
    (or its ``CSRMatrix``: crow int64 [N+1], col int64 [nnz], values float32 [nnz]).
    """
    x = tensor_input("x", x)
    cameras = tensor_input("cameras", cameras)
    if num_cameras is not None:
        num_cameras = _checks.non_negative_int("num_cameras", num_cameras, minimum=1)
    k = _checks.non_negative_int("k", k)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    as_tuple = flag("as_tuple", as_tuple)
    parts = torch.ops.fastassoc.knn_soft_labels(x, cameras, k, num_cameras, precision, backend_name(backend))
    return _result(parts, x.shape[0], as_tuple)


@torch.library.custom_op("fastassoc::knn_soft_labels", mutates_args=())
def _knn_soft_labels_op(x: Tensor, cameras: Tensor, k: int, num_cameras: Optional[int], precision: str,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    x = _checks.features("x", x)
    cameras, num_cameras = _checks.camera_ids("cameras", cameras, num_rows=x.shape[0], num_cameras=num_cameras,
                                              device=x.device)
    k = _checks.non_negative_int("k", k)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    k = min(k, x.shape[0])  # a camera with <= k rows uses all it has: the same rows without k-sized scratch
    _, impl = _backend.resolve("knn_soft_labels", backend, {"x": x, "cameras": cameras})
    return _components(impl(x, cameras, num_cameras, k, precision))


@_knn_soft_labels_op.register_fake
def _knn_soft_labels_fake(x, cameras, k, num_cameras, precision, backend):
    return _fake_csr("knn_soft_labels", x, cameras)
