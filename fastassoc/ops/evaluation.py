"""Re-id ranking evaluation: CMC, mAP and mINP under the Market-1501 / MARS protocol."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from ._custom import backend_name, fake_features, fake_index, fake_same_feature_dim, tensor_input


@dataclass(frozen=True)
class RankingResult:
    """Result of :func:`evaluate_ranking`.

    Attributes
    ----------
    cmc : Tensor [max_rank], float64
        ``cmc[r]`` = fraction of valid queries whose first true match is at rank <= r+1.
    mAP : float
        Mean average precision over valid queries.
    mINP : float
        Mean inverse negative penalty (Ye et al.): mean over valid queries of
        (number of true matches) / (rank of the last true match).
    num_valid_queries : int
        Queries with at least one true match in the gallery.
    """

    cmc: torch.Tensor
    mAP: float
    mINP: float
    num_valid_queries: int

    @property
    def rank1(self) -> float:
        # len() rather than numel(): cmc is a NumPy/CuPy array when the inputs were.
        return float(self.cmc[0]) if len(self.cmc) else float("nan")


def evaluate_ranking(query: torch.Tensor, gallery: torch.Tensor, query_pids: torch.Tensor,
                     gallery_pids: torch.Tensor, query_cameras: torch.Tensor, gallery_cameras: torch.Tensor,
                     *, metric: str = "euclidean", max_rank: int = 50, precision: str = "highest",
                     backend: str = "auto") -> RankingResult:
    r"""CMC, mAP and mINP of ranking ``gallery`` for every query (Market-1501 / MARS protocol).

    Gallery entries with the query's identity *and* camera, and entries with identity
    -1, are junk: removed from that query's ranking. Queries without a true match are
    skipped. Ties in distance are ranked by gallery index. Never holds the Q x G
    distance matrix beyond a bounded tile.

    Not differentiable: behaves as under ``torch.no_grad`` (inputs that require grad are
    accepted and detached). The computation runs as the custom op
    ``torch.ops.fastassoc.evaluate_ranking`` (returning ``cmc`` float64 [max_rank] and
    float64 [3] ``(mAP, mINP, num_valid_queries)``); this function turns its output into
    Python numbers, so it reads values: call it outside a compiled training step, and
    not on meta tensors (ValueError).

    Parameters
    ----------
    query : Tensor [Q, D], float
    gallery : Tensor [G, D], same dtype and device
    query_pids, gallery_pids : Tensor [Q], [G], integer identities (gallery -1: junk)
    query_cameras, gallery_cameras : Tensor [Q], [G], integer cameras >= 0
    metric : {"euclidean", "sqeuclidean", "cosine"}
    max_rank : int >= 1
        Length of the CMC curve; ranks past the gallery size repeat the last value.
    precision : {"highest", "tf32"}
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    RankingResult

    Raises
    ------
    ValueError
        When no query has a true match in the gallery.
    """
    query = tensor_input("query", query)
    gallery = tensor_input("gallery", gallery)
    query_pids = tensor_input("query_pids", query_pids)
    gallery_pids = tensor_input("gallery_pids", gallery_pids)
    query_cameras = tensor_input("query_cameras", query_cameras)
    gallery_cameras = tensor_input("gallery_cameras", gallery_cameras)
    metric = _checks.choice("metric", metric, _checks.METRICS)
    max_rank = _checks.non_negative_int("max_rank", max_rank, minimum=1)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    cmc, scores = torch.ops.fastassoc.evaluate_ranking(query, gallery, query_pids, gallery_pids, query_cameras,
                                                       gallery_cameras, metric, max_rank, precision,
                                                       backend_name(backend))
    if scores.is_meta:
        raise ValueError("evaluate_ranking: mAP, mINP and the number of valid queries are values of the inputs, "
                         "so they cannot be computed from meta tensors; call it on real tensors")
    mean_ap, mean_inp, num_valid = scores.tolist()
    return RankingResult(cmc=cmc, mAP=mean_ap, mINP=mean_inp, num_valid_queries=int(num_valid))


@torch.library.custom_op("fastassoc::evaluate_ranking", mutates_args=())
def _evaluate_ranking_op(query: Tensor, gallery: Tensor, query_pids: Tensor, gallery_pids: Tensor,
                         query_cameras: Tensor, gallery_cameras: Tensor, metric: str, max_rank: int,
                         precision: str, backend: str) -> tuple[Tensor, Tensor]:
    query = _checks.features("query", query)
    gallery = _checks.features("gallery", gallery)
    _checks.same_device(query=query, gallery=gallery)
    _checks.same_dtype(query=query, gallery=gallery)
    _checks.same_feature_dim(query=query, gallery=gallery)
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    device = query.device
    big = 2**62
    query_pids = _checks.index_vector("query_pids", query_pids, length=num_query, low=-big, high=big, device=device)
    gallery_pids = _checks.index_vector("gallery_pids", gallery_pids, length=num_gallery, low=-1, high=big,
                                        device=device)
    query_cameras = _checks.index_vector("query_cameras", query_cameras, length=num_query, low=0, high=big,
                                         device=device)
    gallery_cameras = _checks.index_vector("gallery_cameras", gallery_cameras, length=num_gallery, low=0,
                                           high=big, device=device)
    metric = _checks.choice("metric", metric, _checks.METRICS)
    max_rank = _checks.non_negative_int("max_rank", max_rank, minimum=1)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    _checks.allocation("max_rank", max_rank, 8, device=device, what="a float64 CMC curve")
    _, impl = _backend.resolve("evaluate_ranking", backend, {
        "query": query, "gallery": gallery, "query_pids": query_pids, "gallery_pids": gallery_pids,
        "query_cameras": query_cameras, "gallery_cameras": gallery_cameras})
    result = impl(query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric, max_rank,
                  precision)
    # float64 holds mAP and mINP (Python floats) exactly, and any realistic query count.
    scores = torch.tensor([result.mAP, result.mINP, result.num_valid_queries], dtype=torch.float64,
                          device=result.cmc.device)
    return result.cmc, scores


@_evaluate_ranking_op.register_fake
def _evaluate_ranking_fake(query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric,
                           max_rank, precision, backend):
    fake_features("query", query)
    fake_features("gallery", gallery)
    _checks.same_device(query=query, gallery=gallery)
    _checks.same_dtype(query=query, gallery=gallery)
    fake_same_feature_dim(query=query, gallery=gallery)
    for name, ids, rows in (("query_pids", query_pids, query), ("gallery_pids", gallery_pids, gallery),
                            ("query_cameras", query_cameras, query), ("gallery_cameras", gallery_cameras, gallery)):
        fake_index(name, ids, length=rows.shape[0], device=query.device)
    return (query.new_empty((max_rank,), dtype=torch.float64), query.new_empty((3,), dtype=torch.float64))
