"""One progressive agglomerative merging step (TSSL Eq. 8 in two readings, BUC, centroid linkage)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from ._custom import backend_name, fake_features, fake_index, tensor_input

LINKAGES = ("tssl", "tssl_typeset", "centroid", "buc", "buc_l2")


def agglomerative_merge(x: torch.Tensor, labels: torch.Tensor, num_merges: int, *, linkage: str = "tssl",
                        neighbours: int = 4, size_penalty: float = 0.0, precision: str = "highest",
                        backend: str = "auto") -> torch.Tensor:
    r"""Merge the closest cluster pairs greedily; returns new labels.

    Clusters are the distinct values of ``labels``; cluster ``i`` is the ``i``-th smallest
    label value. Linkages (Euclidean distances of the rows of ``x``):

    * ``"centroid"``: :math:`D_{ij} = \|\mu_i - \mu_j\|` between cluster means.
    * ``"tssl"``: TSSL Eq. 8 read as :math:`D_{ij} + \exp(2 D_{ij} - (a_i + a_j))` with
      :math:`D` the centroid distance and :math:`a_i` the mean centroid distance of cluster
      ``i`` to its ``neighbours`` nearest other clusters (all others if fewer).
    * ``"tssl_typeset"``: TSSL Eq. 8 as typeset,

      .. math::

          \tilde D_{ij} = D_{ij} + \exp(2 D_{ij}) - \frac{1}{N_k}\Big(\sum_{l=1}^{N_k} D_{i K^i_l}
          + \sum_{l=1}^{N_k} D_{j K^j_l}\Big) = D_{ij} + \exp(2 D_{ij}) - (a_i + a_j),

      with the same :math:`D` and :math:`a_i` (:math:`N_k` = ``neighbours``). The readings
      differ only in where :math:`a_i + a_j` goes. The typeset equation closes the
      parenthesis of :math:`\exp` after :math:`2 D_c` and subtracts the neighbour means
      outside it; the text after it says the exponential term models "the difference
      between" the pair's centroid distance and those means, which ``"tssl"`` reads as
      the exponent :math:`2 D_{ij} - (a_i + a_j)`. Both favour pairs of clusters with large
      :math:`a` (sparse regions), but ``"tssl"`` scales the exponential term by
      :math:`e^{-(a_i + a_j)}` (the neighbour means weigh most for far pairs, where
      :math:`\exp(2D)` dominates), while ``"tssl_typeset"`` lowers every pair's linkage
      by :math:`a_i + a_j` whatever its distance. Rounded as ``(D + exp(2 D)) - (a_i + a_j)``;
      ``exp(2 D)`` overflows to ``inf`` (ties, broken by ``(i, j)``) beyond
      :math:`D \approx 44.4` in float32 (L2-normalised features, :math:`D \le 2`, never
      come near).
    * ``"buc"``: minimum sample-to-sample *squared* distance + ``size_penalty`` (|C_i| + |C_j|):
      BUC's minimum-distance criterion with its diversity regulariser as the public BUC code
      ranks pairs (Lin et al., AAAI 2019: squared Euclidean sample distances plus
      ``ratio_n * (|C_i| + |C_j|)``).
    * ``"buc_l2"``: the same with the plain (not squared) minimum distance,
      :math:`\min \|s - t\| + \lambda (|C_i| + |C_j|)`. Without a penalty both orders
      are the same; with ``size_penalty > 0`` they differ (the penalty weighs against a
      distance or a squared distance).

    All unordered cluster pairs are ordered by linkage (ties by ``(i, j)``) and walked
    greedily, merging pairs not yet in one cluster (union-find), until ``num_merges``
    merges are done; distances and sizes stay frozen during the step. Never holds the
    full cluster-pair matrix beyond a bounded tile.

    Not differentiable: behaves as under ``torch.no_grad`` (inputs that require grad are
    accepted and detached). Runs as the custom op ``torch.ops.fastassoc.agglomerative_merge``;
    the output shape is the input's, so it also runs on meta tensors.

    Parameters
    ----------
    x : Tensor [N, D], float
    labels : Tensor [N], integer >= 0
    num_merges : int, 0 <= num_merges < number of clusters (or 0 when there are none)
    linkage : {"tssl", "tssl_typeset", "centroid", "buc", "buc_l2"}
    neighbours : int >= 1, for ``"tssl"`` and ``"tssl_typeset"``
    size_penalty : float >= 0, for ``"buc"`` and ``"buc_l2"``
    precision : {"highest", "tf32"}
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    Tensor [N], int64: clusters renumbered ``0..C'-1`` in order of first appearance in ``x``.
    """
    x = tensor_input("x", x)
    labels = tensor_input("labels", labels)
    num_merges = _checks.non_negative_int("num_merges", num_merges)
    linkage = _checks.choice("linkage", linkage, LINKAGES)
    neighbours = _checks.non_negative_int("neighbours", neighbours, minimum=1)
    size_penalty = _checks.real("size_penalty", size_penalty, low=0.0)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    return torch.ops.fastassoc.agglomerative_merge(x, labels, num_merges, linkage, neighbours, size_penalty,
                                                   precision, backend_name(backend))


@torch.library.custom_op("fastassoc::agglomerative_merge", mutates_args=())
def _agglomerative_merge_op(x: Tensor, labels: Tensor, num_merges: int, linkage: str, neighbours: int,
                            size_penalty: float, precision: str, backend: str) -> Tensor:
    x = _checks.features("x", x)
    labels = _checks.index_vector("labels", labels, length=x.shape[0], low=0, high=2**62, device=x.device)
    num_merges = _checks.non_negative_int("num_merges", num_merges)
    linkage = _checks.choice("linkage", linkage, LINKAGES)
    neighbours = _checks.non_negative_int("neighbours", neighbours, minimum=1)
    size_penalty = _checks.real("size_penalty", size_penalty, low=0.0)
    precision = _checks.choice("precision", precision, _checks.PRECISIONS)
    num_clusters = int(torch.unique(labels).numel())
    if num_merges > max(num_clusters - 1, 0):
        raise ValueError(f"num_merges must be at most the number of clusters minus one "
                         f"({max(num_clusters - 1, 0)}), got {num_merges}")
    _, impl = _backend.resolve("agglomerative_merge", backend, {"x": x, "labels": labels})
    return impl(x, labels, num_merges, linkage, neighbours, size_penalty, precision)


@_agglomerative_merge_op.register_fake
def _agglomerative_merge_fake(x, labels, num_merges, linkage, neighbours, size_penalty, precision, backend):
    fake_features("x", x)
    fake_index("labels", labels, length=x.shape[0], device=x.device)
    return labels.new_empty((x.shape[0],), dtype=torch.int64)
