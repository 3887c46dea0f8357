"""Re-id ranking evaluation: CMC, mAP and mINP under the Market-1501 / MARS protocol."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _backend
from . import _checks


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
        return float(self.cmc[0]) if self.cmc.numel() else float("nan")


def evaluate_ranking(query: torch.Tensor, gallery: torch.Tensor, query_pids: torch.Tensor,
                     gallery_pids: torch.Tensor, query_cameras: torch.Tensor, gallery_cameras: torch.Tensor,
                     *, metric: str = "euclidean", max_rank: int = 50, precision: str = "highest",
                     backend: str = "auto") -> RankingResult:
    r"""CMC, mAP and mINP of ranking ``gallery`` for every query (Market-1501 / MARS protocol).

    Gallery entries with the query's identity *and* camera, and entries with identity
    -1, are junk: removed from that query's ranking. Queries without a true match are
    skipped. Ties in distance are ranked by gallery index. Never holds the Q x G
    distance matrix beyond a bounded tile.

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
    _, impl = _backend.resolve("evaluate_ranking", backend, {
        "query": query, "gallery": gallery, "query_pids": query_pids, "gallery_pids": gallery_pids,
        "query_cameras": query_cameras, "gallery_cameras": gallery_cameras})
    return impl(query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric, max_rank,
                precision)
