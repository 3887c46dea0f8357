"""Nearest-anchor ranking and mutual nearest neighbours (DAL Eqs. 2 and 4, UTAL Eq. 9).

Both are torch custom ops (``torch.ops.fastassoc.topk_anchors``, ``.mutual_knn``); see
:mod:`fastassoc.ops._custom` for how a public op, its real and its fake implementation split
the work.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from ..segments import segments_from_labels
from ._custom import backend_name, dynamic_size, fake_features, fake_index, fake_same_feature_dim, \
    optional_tensor_input, tensor_input


# ----------------------------------------------------------------------------- topk_anchors

def topk_anchors(queries: torch.Tensor, anchors: torch.Tensor, k: int = 1, *,
                 metric: str = "sqeuclidean", anchor_offsets: torch.Tensor | None = None,
                 anchor_segments: torch.Tensor | None = None,
                 query_segments: torch.Tensor | None = None, exclude: torch.Tensor | None = None,
                 precision: str = "highest", backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ``k`` nearest anchors of every query, searched inside one segment per query.

    DAL Eq. 2 (rank-1 anchor of a tracklet in its own camera); the neighbour search
    of UTAL (Eq. 9) and TSSL (Eq. 5). Not differentiable: behaves as under
    ``torch.no_grad`` (inputs that require grad are accepted and detached).
    Runs as the custom op ``torch.ops.fastassoc.topk_anchors``; its output shapes follow
    from the input shapes, so it also runs on meta tensors.

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
    anchor_segments : Tensor [N], integer >= 0, optional
        The segment label of every anchor (e.g. its camera id), in any order, instead of
        ``anchor_offsets``; labels may be arbitrarily large. ``query_segments`` then holds the
        label each query searches (a label no anchor has finds nothing). Runs on a stably
        label-sorted copy of ``anchors`` (one N x D gather: sort a fixed anchor set once and
        pass offsets when calling often); ``exclude`` and the returned ``indices`` stay in the
        caller's anchor order. See :func:`fastassoc.segments_from_labels`.
    query_segments : Tensor [B], integer, optional
        The segment each query searches: in [0, S) with ``anchor_offsets``, a label with
        ``anchor_segments``. Default: 0 for every query (one segment only).
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
    queries = tensor_input("queries", queries)
    anchors = tensor_input("anchors", anchors)
    anchor_offsets = optional_tensor_input("anchor_offsets", anchor_offsets)
    query_segments = optional_tensor_input("query_segments", query_segments)
    exclude = optional_tensor_input("exclude", exclude)
    k = _checks.non_negative_int("k", k)
    metric = _checks.choice("metric", metric, _checks.METRICS)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    if anchor_segments is not None:
        if anchor_offsets is not None:
            raise ValueError("give anchor_offsets (rows already grouped) or anchor_segments (a label per row), "
                             "not both")
        if query_segments is None:
            raise ValueError("query_segments (the label each query searches) is required with anchor_segments")
        fake_features("anchors", anchors)
        layout = segments_from_labels(tensor_input("anchor_segments", anchor_segments), length=anchors.shape[0],
                                      device=anchors.device, name="anchor_segments")
        distances, indices = torch.ops.fastassoc.topk_anchors(
            queries, anchors[layout.order], k, metric, layout.offsets,
            layout.segment_of(query_segments, name="query_segments"),
            None if exclude is None else layout.to_sorted(exclude, name="exclude"), precision, backend_name(backend))
        return distances, layout.to_original(indices)
    return torch.ops.fastassoc.topk_anchors(queries, anchors, k, metric, anchor_offsets, query_segments, exclude,
                                            precision, backend_name(backend))


@torch.library.custom_op("fastassoc::topk_anchors", mutates_args=())
def _topk_anchors_op(queries: Tensor, anchors: Tensor, k: int, metric: str, anchor_offsets: Optional[Tensor],
                     query_segments: Optional[Tensor], exclude: Optional[Tensor], precision: str,
                     backend: str) -> tuple[Tensor, Tensor]:
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
    # float32 distances + int64 indices per output entry.
    _checks.allocation("k", num_queries * k, 12, device=device, what=f"[{num_queries}, k] distances and indices")
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


@_topk_anchors_op.register_fake
def _topk_anchors_fake(queries, anchors, k, metric, anchor_offsets, query_segments, exclude, precision, backend):
    fake_features("queries", queries)
    fake_features("anchors", anchors)
    _checks.same_device(queries=queries, anchors=anchors)
    _checks.same_dtype(queries=queries, anchors=anchors)
    fake_same_feature_dim(queries=queries, anchors=anchors)
    num_queries, device = queries.shape[0], queries.device
    fake_index("anchor_offsets", anchor_offsets, device=device)
    fake_index("query_segments", query_segments, length=num_queries, device=device)
    fake_index("exclude", exclude, length=num_queries, device=device)
    return (queries.new_empty((num_queries, k), dtype=torch.float32),
            queries.new_empty((num_queries, k), dtype=torch.int64))


# ----------------------------------------------------------------------------- mutual_knn

def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 1, *, metric: str = "sqeuclidean",
               max_distance: float | None = None, precision: str = "highest",
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Mutual k-nearest-neighbour pairs between two sets (DAL Eq. 4 cyclic ranking, UTAL Eq. 9).

    A pair ``(i, j)`` is kept when ``b[j]`` is among the ``k`` nearest of ``a[i]`` in ``b``
    **and** ``a[i]`` is among the ``k`` nearest of ``b[j]`` in ``a`` (ties to the smaller
    index, as in :func:`topk_anchors`), and, if given, ``distance <= max_distance``.
    Not differentiable: behaves as under ``torch.no_grad`` (inputs that require grad are
    accepted and detached). Runs as the custom op ``torch.ops.fastassoc.mutual_knn``;
    the number of pairs ``P`` depends on the values, so it traces under torch.compile
    with a symbolic ``P`` (with ``fullgraph=True``, or else
    ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``; without either
    dynamo breaks the graph here, as it does at ``torch.nonzero``) and raises ValueError
    on meta tensors.

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
    a = tensor_input("a", a)
    b = tensor_input("b", b)
    k = _checks.non_negative_int("k", k)
    metric = _checks.choice("metric", metric, _checks.METRICS)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    max_distance = _checks.real("max_distance", max_distance, allow_none=True)
    return torch.ops.fastassoc.mutual_knn(a, b, k, metric, max_distance, precision, backend_name(backend))


@torch.library.custom_op("fastassoc::mutual_knn", mutates_args=())
def _mutual_knn_op(a: Tensor, b: Tensor, k: int, metric: str, max_distance: Optional[float], precision: str,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    a = _checks.features("a", a)
    b = _checks.features("b", b)
    _checks.same_device(a=a, b=b)
    _checks.same_dtype(a=a, b=b)
    _checks.same_feature_dim(a=a, b=b)
    k = _checks.non_negative_int("k", k)
    metric = _checks.choice("metric", metric, _checks.METRICS)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    max_distance = _checks.real("max_distance", max_distance, allow_none=True)
    # k past both sets keeps every pair: the same result without k-sized scratch.
    k = min(k, max(a.shape[0], b.shape[0]))
    _, impl = _backend.resolve("mutual_knn", backend, {"a": a, "b": b})
    return impl(a, b, k, metric, max_distance, precision)


@_mutual_knn_op.register_fake
def _mutual_knn_fake(a, b, k, metric, max_distance, precision, backend):
    fake_features("a", a)
    fake_features("b", b)
    _checks.same_device(a=a, b=b)
    _checks.same_dtype(a=a, b=b)
    fake_same_feature_dim(a=a, b=b)
    num_pairs = dynamic_size("mutual_knn", a, b)
    return (a.new_empty((num_pairs,), dtype=torch.int64), a.new_empty((num_pairs,), dtype=torch.int64),
            a.new_empty((num_pairs,), dtype=torch.float32))
