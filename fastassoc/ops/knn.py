"""Nearest-anchor ranking and mutual nearest neighbours (DAL Eqs. 2 and 4, UTAL Eq. 9)."""
from __future__ import annotations

import torch

from .. import _backend
from . import _checks


def topk_anchors(queries: torch.Tensor, anchors: torch.Tensor, k: int = 1, *,
                 metric: str = "sqeuclidean", anchor_offsets: torch.Tensor | None = None,
                 query_segments: torch.Tensor | None = None, exclude: torch.Tensor | None = None,
                 precision: str = "highest", backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ``k`` nearest anchors of every query, searched inside one segment per query.

    DAL Eq. 2 (rank-1 anchor of a tracklet in its own camera); the neighbour search
    of UTAL (Eq. 9) and TSSL (Eq. 5).

    Parameters
    ----------
    queries : Tensor [B, D], float32 / float16 / bfloat16 / float64
    anchors : Tensor [N, D], same dtype and device as ``queries``
    k : int >= 0
        Neighbours per query.
    metric : {"sqeuclidean", "euclidean", "cosine"}
        :math:`\|q-a\|^2`, :math:`\|q-a\|` or :math:`1-\cos(q, a)`.
    anchor_offsets : Tensor [S+1], integer, optional
        Anchors ``anchor_offsets[s] : anchor_offsets[s+1]`` form segment ``s`` (e.g. one
        camera). Default: one segment holding every anchor.
    query_segments : Tensor [B], integer in [0, S), optional
        The segment each query searches. Default: 0 for every query.
    exclude : Tensor [B], integer in [-1, N), optional
        One anchor index each query must skip (its own tracklet); -1 skips nothing.
    precision : {"highest", "tf32"}
        float32 GPU kernels may use TF32 tensor cores with ``"tf32"``; the CPU and
        reference backends always compute in full float32.
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    distances : Tensor [B, k], float32, ascending per row
    indices : Tensor [B, k], int64, global anchor indices
        Ties go to the smaller anchor index. Rows with fewer than ``k`` candidates
        are padded with ``(inf, -1)``.
    """
    queries = _checks.features("queries", queries)
    anchors = _checks.features("anchors", anchors)
    _checks.same_device(queries=queries, anchors=anchors)
    _checks.same_dtype(queries=queries, anchors=anchors)
    _checks.same_feature_dim(queries=queries, anchors=anchors)
    k = _checks.non_negative_int("k", k)
    metric = _checks.choice("metric", metric, _checks.METRICS)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    num_queries, num_anchors = queries.shape[0], anchors.shape[0]
    device = queries.device
    if anchor_offsets is None:
        anchor_offsets = torch.tensor([0, num_anchors], dtype=torch.int64, device=device)
    else:
        anchor_offsets = _checks.offsets("anchor_offsets", anchor_offsets, total=num_anchors, device=device)
    num_segments = anchor_offsets.shape[0] - 1
    if query_segments is None:
        if num_segments != 1:
            raise ValueError(f"query_segments is required when anchor_offsets defines {num_segments} segments")
        query_segments = torch.zeros(num_queries, dtype=torch.int64, device=device)
    else:
        query_segments = _checks.index_vector("query_segments", query_segments, length=num_queries,
                                              low=0, high=num_segments, device=device)
    if exclude is None:
        exclude = torch.full((num_queries,), -1, dtype=torch.int64, device=device)
    else:
        exclude = _checks.index_vector("exclude", exclude, length=num_queries, low=-1, high=num_anchors,
                                       device=device)
    _, impl = _backend.resolve("topk_anchors", backend, {
        "queries": queries, "anchors": anchors, "anchor_offsets": anchor_offsets,
        "query_segments": query_segments, "exclude": exclude})
    return impl(queries, anchors, k, metric, anchor_offsets, query_segments, exclude, precision)


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 1, *, metric: str = "sqeuclidean",
               max_distance: float | None = None, precision: str = "highest",
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Mutual k-nearest-neighbour pairs between two sets (DAL Eq. 4 cyclic ranking, UTAL Eq. 9).

    A pair ``(i, j)`` is kept when ``b[j]`` is among the ``k`` nearest of ``a[i]`` in ``b``
    **and** ``a[i]`` is among the ``k`` nearest of ``b[j]`` in ``a`` (ties to the smaller
    index, as in :func:`topk_anchors`), and, if given, ``distance <= max_distance``.

    Parameters
    ----------
    a : Tensor [Na, D]
    b : Tensor [Nb, D], same dtype and device
    k : int >= 0
    metric : {"sqeuclidean", "euclidean", "cosine"}
    max_distance : float, optional
    precision : {"highest", "tf32"}
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    ia : Tensor [P], int64
    ib : Tensor [P], int64
    distances : Tensor [P], float32
        Sorted by ``(ia, ib)``.
    """
    a = _checks.features("a", a)
    b = _checks.features("b", b)
    _checks.same_device(a=a, b=b)
    _checks.same_dtype(a=a, b=b)
    _checks.same_feature_dim(a=a, b=b)
    k = _checks.non_negative_int("k", k)
    metric = _checks.choice("metric", metric, _checks.METRICS)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    max_distance = _checks.real("max_distance", max_distance, allow_none=True)
    _, impl = _backend.resolve("mutual_knn", backend, {"a": a, "b": b})
    return impl(a, b, k, metric, max_distance, precision)
