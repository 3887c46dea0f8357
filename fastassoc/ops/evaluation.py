"""Re-id ranking evaluation: CMC, mAP and mINP under the Market-1501 / MARS protocol."""
from __future__ import annotations

from collections.abc import Mapping
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


def evaluate_ranking(query: torch.Tensor | None = None, gallery: torch.Tensor | None = None,
                     query_pids: torch.Tensor | None = None, gallery_pids: torch.Tensor | None = None,
                     query_cameras: torch.Tensor | None = None, gallery_cameras: torch.Tensor | None = None,
                     *, distances: torch.Tensor | None = None, metric: str = "euclidean", max_rank: int = 50,
                     precision: str = "highest", rerank: Mapping | None = None,
                     backend: str = "auto") -> RankingResult:
    r"""CMC, mAP and mINP of ranking ``gallery`` for every query (Market-1501 / MARS protocol).

    Gallery entries with the query's identity *and* camera, and entries with identity
    -1, are junk: removed from that query's ranking. Queries without a true match are
    skipped. Ties in distance are ranked by gallery index. Never holds the Q x G
    distance matrix beyond a bounded tile.

    With ``distances`` instead of ``query`` and ``gallery`` (a precomputed Q x G matrix,
    e.g. a re-ranked one), the gallery is ranked by its rows as given (ascending, ties by
    gallery index) and scored with the same junk rules, in row chunks whose sort workspace
    stays within the tile bound; ``metric`` and ``precision`` do not apply to it. Runs as
    the custom op ``torch.ops.fastassoc.evaluate_ranking_distances``, whose implementation
    is the reference one (pure torch, on the matrix's device) for every ``backend``;
    ``backend`` is still checked. The features path equals it on the matrix of its ranking
    distance (squared Euclidean for ``"euclidean"``, where the root keeps the order).

    With ``rerank``, the gallery is ranked by torchreid's ``re_ranking`` final distance
    (Zhong et al., CVPR 2017) over query and gallery together, as torchreid's engine computes
    it for the same features and ``metric``: it passes ``compute_distance_matrix(qf, gf,
    metric)`` -- the *squared* Euclidean distance for ``"euclidean"``, ``1 - cos`` for
    ``"cosine"`` -- and ``re_ranking`` squares it again. So, with ``d`` the squared Euclidean
    distance (``"euclidean"`` and ``"sqeuclidean"``) or ``1 - cos`` (``"cosine"``)::

        final[q, g] = (1 - lambda_value) * J[q, g] + lambda_value * d[q, g]^2 / max_r d[q, r]^2

    ``max_r`` over all query and gallery rows (torchreid's per-column maximum, the query's
    column; 0 where every row equals the query, where torchreid divides 0 by 0), ``J`` the
    Jaccard distance of :func:`fastassoc.jaccard_distance` with ``weighting="zhong"``, ``k1``,
    ``k2`` over all query and gallery rows (k-reciprocal sets and the shared weights run over
    both, as torchreid's do), 1 where nothing is shared. Memory stays bounded: the sparse
    k-reciprocal weights plus per-query-chunk tiles of ``final``; never a (Q + G)^2 array.
    The re-ranked path runs the compiled lists and weights under the reference's scoring on
    the ``cpu`` backend, and the reference implementation (pure torch, on the inputs' device)
    on the others.
    With ``lambda_value=1`` the order is that of ``d`` (the scaling per query is positive),
    so the result equals the plain evaluation's unless squaring and scaling round two
    different distances of one query to the same value.

    Not differentiable: behaves as under ``torch.no_grad`` (inputs that require grad are
    accepted and detached). The computation runs as the custom op
    ``torch.ops.fastassoc.evaluate_ranking`` (returning ``cmc`` float64 [max_rank] and
    float64 [3] ``(mAP, mINP, num_valid_queries)``); this function turns its output into
    Python numbers, so it reads values: call it outside a compiled training step, and
    not on meta tensors (ValueError).

    Parameters
    ----------
    query : Tensor [Q, D], float (None with ``distances``)
    gallery : Tensor [G, D], same dtype and device (None with ``distances``)
    query_pids, gallery_pids : Tensor [Q], [G], integer identities (gallery -1: junk)
    query_cameras, gallery_cameras : Tensor [Q], [G], integer cameras >= 0
    distances : Tensor [Q, G], float, optional
        Precomputed query-gallery distances (smaller ranks first); NaN is refused, +-inf
        ranks last / first. Replaces ``query`` and ``gallery``; no ``rerank`` with it
        (pass the re-ranked matrix itself).
    metric : {"euclidean", "sqeuclidean", "cosine"}
    max_rank : int >= 1
        Length of the CMC curve; ranks past the gallery size repeat the last value.
    precision : {"highest", "tf32"}
    rerank : dict, optional
        ``{"k1": int >= 1, "k2": int in [1, k1], "lambda_value": float in [0, 1]}``; missing
        keys take torchreid's defaults ``k1=20, k2=6, lambda_value=0.3`` (``{}`` re-ranks with
        all defaults). Runs as the custom op ``torch.ops.fastassoc.evaluate_ranking_reranked``.
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    RankingResult

    Raises
    ------
    ValueError
        When no query has a true match in the gallery.

    Examples
    --------
    >>> import torch, fastassoc
    >>> pids, cameras = torch.tensor([0, 1]), torch.tensor([0, 0])
    >>> gallery_pids, gallery_cameras = torch.tensor([1, 0, 0]), torch.tensor([1, 1, 0])
    >>> distances = torch.tensor([[0.1, 0.5, 0.0], [0.2, 0.9, 0.3]])
    >>> result = fastassoc.evaluate_ranking(query_pids=pids, gallery_pids=gallery_pids, query_cameras=cameras,
    ...                                     gallery_cameras=gallery_cameras, distances=distances, max_rank=3)
    >>> result.cmc.tolist(), result.mAP
    ([0.5, 1.0, 1.0], 0.75)
    """
    labels = {"query_pids": query_pids, "gallery_pids": gallery_pids, "query_cameras": query_cameras,
              "gallery_cameras": gallery_cameras}
    if distances is not None:
        return _evaluate_distances(query, gallery, distances, labels, metric, max_rank, precision, rerank, backend)
    if query is None or gallery is None:
        raise TypeError("evaluate_ranking needs query and gallery features, or a precomputed Q x G matrix as "
                        f"distances=; got {'no query' if query is None else 'no gallery'} and no distances")
    missing = [name for name, value in labels.items() if value is None]
    if missing:
        raise TypeError(f"evaluate_ranking needs {', '.join(missing)}")
    query = tensor_input("query", query)
    gallery = tensor_input("gallery", gallery)
    query_pids = tensor_input("query_pids", query_pids)
    gallery_pids = tensor_input("gallery_pids", gallery_pids)
    query_cameras = tensor_input("query_cameras", query_cameras)
    gallery_cameras = tensor_input("gallery_cameras", gallery_cameras)
    metric = _checks.choice("metric", metric, _checks.METRICS)
    max_rank = _checks.non_negative_int("max_rank", max_rank, minimum=1)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    if rerank is None:
        cmc, scores = torch.ops.fastassoc.evaluate_ranking(query, gallery, query_pids, gallery_pids, query_cameras,
                                                           gallery_cameras, metric, max_rank, precision,
                                                           backend_name(backend))
    else:
        k1, k2, lambda_value = _rerank_options(rerank)
        cmc, scores = torch.ops.fastassoc.evaluate_ranking_reranked(
            query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric, max_rank, precision,
            k1, k2, lambda_value, backend_name(backend))
    if scores.is_meta:
        raise ValueError("evaluate_ranking: mAP, mINP and the number of valid queries are values of the inputs, "
                         "so they cannot be computed from meta tensors; call it on real tensors")
    mean_ap, mean_inp, num_valid = scores.tolist()
    return RankingResult(cmc=cmc, mAP=mean_ap, mINP=mean_inp, num_valid_queries=int(num_valid))


def _evaluate_distances(query, gallery, distances, labels, metric, max_rank, precision, rerank,
                        backend) -> RankingResult:
    """The ``distances=`` entry of :func:`evaluate_ranking`: argument form checked, then the custom op."""
    given = [name for name, value in (("query", query), ("gallery", gallery)) if value is not None]
    if given:
        raise ValueError(f"evaluate_ranking takes query and gallery features or distances, not both; got "
                         f"distances and {' and '.join(given)}")
    if rerank is not None:
        raise ValueError("rerank needs query and gallery features; with distances=, re-rank the matrix first "
                         "(e.g. fastassoc.jaccard_distance) and pass the re-ranked matrix")
    missing = [name for name, value in labels.items() if value is None]
    if missing:
        raise TypeError(f"evaluate_ranking with distances= needs {', '.join(missing)}")
    distances = tensor_input("distances", distances)
    labels = {name: tensor_input(name, value) for name, value in labels.items()}
    _checks.choice("metric", metric, _checks.METRICS)
    max_rank = _checks.non_negative_int("max_rank", max_rank, minimum=1)
    _checks.choice("precision", precision, _checks.PRECISIONS)
    cmc, scores = torch.ops.fastassoc.evaluate_ranking_distances(distances, *labels.values(), max_rank,
                                                                 backend_name(backend))
    if scores.is_meta:
        raise ValueError("evaluate_ranking: mAP, mINP and the number of valid queries are values of the inputs, "
                         "so they cannot be computed from meta tensors; call it on real tensors")
    mean_ap, mean_inp, num_valid = scores.tolist()
    return RankingResult(cmc=cmc, mAP=mean_ap, mINP=mean_inp, num_valid_queries=int(num_valid))


RERANK_DEFAULTS = {"k1": 20, "k2": 6, "lambda_value": 0.3}


def _rerank_options(rerank) -> tuple[int, int, float]:
    """``(k1, k2, lambda_value)`` of a ``rerank`` mapping, defaults filled in, every error naming ``rerank``."""
    if not isinstance(rerank, Mapping):
        raise TypeError(f"rerank must be None or a dict with keys 'k1', 'k2', 'lambda_value', "
                        f"got {type(rerank).__name__}")
    unknown = [key for key in rerank if key not in RERANK_DEFAULTS]
    if unknown:
        raise ValueError(f"rerank has unknown key(s) {', '.join(map(repr, unknown))}; it takes 'k1', 'k2' and "
                         "'lambda_value' (torchreid's re_ranking parameters)")
    return _checked_rerank(**{**RERANK_DEFAULTS, **rerank})


def _checked_rerank(k1, k2, lambda_value) -> tuple[int, int, float]:
    k1 = _checks.non_negative_int("rerank['k1']", k1, minimum=1)
    k2 = _checks.non_negative_int("rerank['k2']", k2, minimum=1)
    if k2 > k1:
        raise ValueError(f"rerank['k2'] must be <= rerank['k1'] ({k1}): query expansion averages over the "
                         f"k1-nearest lists; got {k2}")
    lambda_value = _checks.real("rerank['lambda_value']", lambda_value, low=0.0, high=1.0)
    return k1, k2, lambda_value


def _checked_labels(query_pids, gallery_pids, query_cameras, gallery_cameras, num_query: int, num_gallery: int,
                    device):
    """Identities and cameras of both sides: int64 vectors of the right lengths on ``device``.
    Gallery identity -1 marks distractors; cameras are non-negative."""
    big = 2**62
    return (_checks.index_vector("query_pids", query_pids, length=num_query, low=-big, high=big, device=device),
            _checks.index_vector("gallery_pids", gallery_pids, length=num_gallery, low=-1, high=big, device=device),
            _checks.index_vector("query_cameras", query_cameras, length=num_query, low=0, high=big, device=device),
            _checks.index_vector("gallery_cameras", gallery_cameras, length=num_gallery, low=0, high=big,
                                 device=device))


def _checked_inputs(query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric, max_rank,
                    precision):
    """What both evaluation ops validate: features, identities, cameras, options."""
    query = _checks.features("query", query)
    gallery = _checks.features("gallery", gallery)
    _checks.same_device(query=query, gallery=gallery)
    _checks.same_dtype(query=query, gallery=gallery)
    _checks.same_feature_dim(query=query, gallery=gallery)
    query_pids, gallery_pids, query_cameras, gallery_cameras = _checked_labels(
        query_pids, gallery_pids, query_cameras, gallery_cameras, query.shape[0], gallery.shape[0], query.device)
    metric = _checks.choice("metric", metric, _checks.METRICS)
    max_rank = _checks.non_negative_int("max_rank", max_rank, minimum=1)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    _checks.allocation("max_rank", max_rank, 8, device=query.device, what="a float64 CMC curve")
    return query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric, max_rank, precision


def _scores(result: RankingResult) -> tuple[Tensor, Tensor]:
    # float64 holds mAP and mINP (Python floats) exactly, and any realistic query count.
    scores = torch.tensor([result.mAP, result.mINP, result.num_valid_queries], dtype=torch.float64,
                          device=result.cmc.device)
    return result.cmc, scores


@torch.library.custom_op("fastassoc::evaluate_ranking", mutates_args=())
def _evaluate_ranking_op(query: Tensor, gallery: Tensor, query_pids: Tensor, gallery_pids: Tensor,
                         query_cameras: Tensor, gallery_cameras: Tensor, metric: str, max_rank: int,
                         precision: str, backend: str) -> tuple[Tensor, Tensor]:
    inputs = _checked_inputs(query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric,
                             max_rank, precision)
    query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras = inputs[:6]
    _, impl = _backend.resolve("evaluate_ranking", backend, {
        "query": query, "gallery": gallery, "query_pids": query_pids, "gallery_pids": gallery_pids,
        "query_cameras": query_cameras, "gallery_cameras": gallery_cameras})
    return _scores(impl(*inputs))


@torch.library.custom_op("fastassoc::evaluate_ranking_reranked", mutates_args=())
def _evaluate_ranking_reranked_op(query: Tensor, gallery: Tensor, query_pids: Tensor, gallery_pids: Tensor,
                                  query_cameras: Tensor, gallery_cameras: Tensor, metric: str, max_rank: int,
                                  precision: str, k1: int, k2: int, lambda_value: float,
                                  backend: str) -> tuple[Tensor, Tensor]:
    # Imported here: the reference kernels import RankingResult from this module.
    from ..kernels.reference.rerank import evaluate_reranked_reference

    inputs = _checked_inputs(query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric,
                             max_rank, precision)
    query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric, max_rank, _ = inputs
    k1, k2, lambda_value = _checked_rerank(k1, k2, lambda_value)
    name, _ = _backend.resolve("evaluate_ranking", backend, {"query": query, "gallery": gallery})
    evaluate = evaluate_reranked_reference
    if name == "cpu":
        # The compiled steps (exact knn self-join lists, C++ weights) under the reference's bounded scoring.
        from ..kernels.cpu.rerank import evaluate_reranked_cpu as evaluate
    return _scores(evaluate(query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric,
                            max_rank, k1, k2, lambda_value))


def _evaluate_ranking_fake(query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric,
                           max_rank, precision, backend, *rerank):
    fake_features("query", query)
    fake_features("gallery", gallery)
    _checks.same_device(query=query, gallery=gallery)
    _checks.same_dtype(query=query, gallery=gallery)
    fake_same_feature_dim(query=query, gallery=gallery)
    for name, ids, rows in (("query_pids", query_pids, query), ("gallery_pids", gallery_pids, gallery),
                            ("query_cameras", query_cameras, query), ("gallery_cameras", gallery_cameras, gallery)):
        fake_index(name, ids, length=rows.shape[0], device=query.device)
    return (query.new_empty((max_rank,), dtype=torch.float64), query.new_empty((3,), dtype=torch.float64))


_evaluate_ranking_op.register_fake(_evaluate_ranking_fake)


@_evaluate_ranking_reranked_op.register_fake
def _evaluate_ranking_reranked_fake(query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras,
                                    metric, max_rank, precision, k1, k2, lambda_value, backend):
    return _evaluate_ranking_fake(query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras, metric,
                                  max_rank, precision, backend)


def _checked_distances(distances: Tensor) -> Tensor:
    """A 2-D floating matrix without NaN (what ranking by it needs), returned contiguous."""
    if distances.layout != torch.strided:
        raise TypeError(f"distances must be a dense (strided) tensor, got layout {distances.layout}")
    fake_distances(distances)
    _checks.not_meta("distances", distances)
    distances = distances.contiguous()
    if distances.numel():
        has_nan = torch.isnan(distances.reshape(-1)).any()

        def first_nan() -> str:
            position = tuple(torch.nonzero(torch.isnan(distances))[0].tolist())
            return f"distances contains NaN (first at index {position}); a NaN distance has no rank"

        _checks._require(~has_nan, "distances contains NaN; a NaN distance has no rank", first_nan)
    return distances


def fake_distances(distances: Tensor) -> None:
    if distances.dim() != 2:
        raise ValueError(f"distances must be a 2-D [Q, G] matrix, got shape {tuple(distances.shape)}")
    if distances.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"distances must be float32, float16, bfloat16 or float64, got {distances.dtype}")


@torch.library.custom_op("fastassoc::evaluate_ranking_distances", mutates_args=())
def _evaluate_ranking_distances_op(distances: Tensor, query_pids: Tensor, gallery_pids: Tensor,
                                   query_cameras: Tensor, gallery_cameras: Tensor, max_rank: int,
                                   backend: str) -> tuple[Tensor, Tensor]:
    from ..kernels.reference.evaluation import evaluate_distances_reference

    distances = _checked_distances(distances)
    device = distances.device
    query_pids, gallery_pids, query_cameras, gallery_cameras = _checked_labels(
        query_pids, gallery_pids, query_cameras, gallery_cameras, *distances.shape, device)
    max_rank = _checks.non_negative_int("max_rank", max_rank, minimum=1)
    _checks.allocation("max_rank", max_rank, 8, device=device, what="a float64 CMC curve")
    # Only checked (name, device, availability), as with rerank: ranking a given matrix is one sort per row.
    _backend.resolve("evaluate_ranking", backend, {"distances": distances})
    return _scores(evaluate_distances_reference(distances, query_pids, gallery_pids, query_cameras,
                                                gallery_cameras, max_rank))


@_evaluate_ranking_distances_op.register_fake
def _evaluate_ranking_distances_fake(distances, query_pids, gallery_pids, query_cameras, gallery_cameras,
                                     max_rank, backend):
    fake_distances(distances)
    for name, ids, length in (("query_pids", query_pids, distances.shape[0]),
                              ("gallery_pids", gallery_pids, distances.shape[1]),
                              ("query_cameras", query_cameras, distances.shape[0]),
                              ("gallery_cameras", gallery_cameras, distances.shape[1])):
        fake_index(name, ids, length=length, device=distances.device)
    return (distances.new_empty((max_rank,), dtype=torch.float64), distances.new_empty((3,), dtype=torch.float64))
