"""k-reciprocal re-ranking and density clustering: Jaccard distance (Zhong et al., CVPR 2017,
as SpCL's ``compute_jaccard_distance``), DBSCAN on a sparse distance matrix and cluster centres.

All three are torch custom ops (``torch.ops.fastassoc.jaccard_distance``, ``.dbscan``,
``.cluster_centres``); see :mod:`fastassoc.ops._custom` for how a public op, its real and its
fake implementation split the work. CSR matrices cross the op boundary as their three
component tensors.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from ._custom import backend_name, dynamic_size, fake_features, fake_index, flag, tensor_input
from ._sparse import CSRMatrix

WEIGHTINGS = ("spcl", "zhong")


def jaccard_distance(features: torch.Tensor, k1: int = 20, k2: int = 6, *, weighting: str = "spcl",
                     max_distance: float | None = None, metric: str = "sqeuclidean", as_tuple: bool = False,
                     backend: str = "auto"):
    r"""k-reciprocal Jaccard distance between all rows, as a symmetric sparse matrix.

    The semantics of SpCL's ``compute_jaccard_distance`` (Zhong et al., CVPR 2017, Eqs. 7-12
    with SpCL's weights) on the rows given (pass L2-normalised features, as SpCL's callers
    do): every row's ``k1`` nearest rows by exact distance (a function of the two rows alone, so
    copies and rows at one exact distance tie wherever they sit; itself included at distance
    0, ties to the smaller index); k-reciprocal sets :math:`R(i, k_1)` and :math:`R(i, \mathrm{round}(k_1/2))`
    (the latter over ``round(k1/2) + 1`` neighbours, as SpCL slices); each
    :math:`R(c, \mathrm{round}(k_1/2))` with more than 2/3 of its members in
    :math:`R(i, k_1)` is added to :math:`R(i, k_1)`; weights
    :math:`V_{ij} = \mathrm{softmax}_j(-(2 - 2 x_i \cdot x_j))` over that expanded set; with
    ``k2 > 1`` :math:`V_i` becomes the mean of :math:`V` over the ``k2`` nearest of ``i``;
    :math:`J_{ij} = 1 - m_{ij} / (2 - m_{ij})` with :math:`m_{ij} = \sum_k \min(V_{ik}, V_{jk})`,
    clamped at 0. ``N < k1`` uses all ``N`` rows. ``weighting="zhong"`` is the paper's form as
    in torchreid's ``re_ranking`` (all rows as one set): ``k1 + 1`` neighbours in the lists
    and weights :math:`\exp(-d_{ij}^2 / \max_k d_{ik}^2)` normalised per row, ``d`` the
    metric's distance. Not differentiable (runs as under ``torch.no_grad``). Runs as the custom
    op ``torch.ops.fastassoc.jaccard_distance`` (returning the CSR components); the number of
    stored pairs depends on the values, so it traces under torch.compile with a symbolic
    ``nnz`` (use ``as_tuple=True`` there: compiled code cannot build sparse tensors) and raises
    ValueError on meta tensors.

    Parameters
    ----------
    features : Tensor [N, D], float, finite
    k1 : int >= 1
        Size of the nearest lists.
    k2 : int, 1 <= k2 <= k1
        Query expansion width (1: none).
    weighting : {"spcl", "zhong"}
        SpCL's softmax weights, or torchreid's ``re_ranking`` (Zhong et al.) weights and lists.
    max_distance : float >= 0, optional
        Store only pairs with ``J <= max_distance`` (compared in float64); others read as 1.
    metric : {"sqeuclidean", "euclidean", "cosine"}
        Ranking of the nearest lists; ``"cosine"`` L2-normalises the rows first (weights too).
    as_tuple : bool
        Return a :class:`fastassoc.ops._sparse.CSRMatrix` instead of a torch sparse tensor.
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    Tensor [N, N], sparse CSR, float32 (or ``CSRMatrix``), symmetric, column indices sorted per
    row: every pair with ``J < 1`` (and ``<= max_distance``) and explicit zeros on the
    diagonal. Pairs not stored have distance 1.

    Examples
    --------
    >>> import torch
    >>> from fastassoc.ops.rerank import jaccard_distance
    >>> x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    >>> d = jaccard_distance(x, k1=2, k2=1).to_dense()
    >>> d.diagonal().tolist(), bool(d[0, 1] < 1), float(d[0, 2])
    ([0.0, 0.0, 0.0], True, 0.0)
    """
    features = tensor_input("features", features)
    k1, k2 = _k1_k2(k1, k2)
    weighting = _checks.choice("weighting", weighting, WEIGHTINGS)
    max_distance = _checks.real("max_distance", max_distance, low=0.0, allow_none=True)
    metric = _checks.choice("metric", metric, _checks.METRICS)
    as_tuple = flag("as_tuple", as_tuple)
    crow, cols, values = torch.ops.fastassoc.jaccard_distance(features, k1, k2, weighting, max_distance, metric,
                                                              backend_name(backend))
    matrix = CSRMatrix(crow, cols, values, (features.shape[0], features.shape[0]))
    if as_tuple:
        return matrix
    with warnings.catch_warnings():
        # torch warns once per process that sparse CSR is "beta"; that is not the caller's concern.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.to_sparse_csr()


def _k1_k2(k1, k2) -> tuple[int, int]:
    k1 = _checks.non_negative_int("k1", k1, minimum=1)
    k2 = _checks.non_negative_int("k2", k2, minimum=1)
    if k2 > k1:
        raise ValueError(f"k2 must be <= k1 ({k1}): query expansion averages over the k1-nearest lists; got {k2}")
    return k1, k2


@torch.library.custom_op("fastassoc::jaccard_distance", mutates_args=())
def _jaccard_distance_op(features: Tensor, k1: int, k2: int, weighting: str, max_distance: Optional[float],
                         metric: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    features = _checks.features("features", features)
    k1, k2 = _k1_k2(k1, k2)
    weighting = _checks.choice("weighting", weighting, WEIGHTINGS)
    max_distance = _checks.real("max_distance", max_distance, low=0.0, allow_none=True)
    metric = _checks.choice("metric", metric, _checks.METRICS)
    _, impl = _backend.resolve("jaccard_distance", backend, {"features": features})
    matrix = impl(features, k1, k2, weighting, max_distance, metric)
    # A custom op returns plain tensors; these belong to a matrix the kernel just built.
    return matrix.crow_indices(), matrix.col_indices(), matrix.values()


@_jaccard_distance_op.register_fake
def _jaccard_distance_fake(features, k1, k2, weighting, max_distance, metric, backend):
    fake_features("features", features)
    nnz = dynamic_size("jaccard_distance", features)
    return (features.new_empty((features.shape[0] + 1,), dtype=torch.int64),
            features.new_empty((nnz,), dtype=torch.int64), features.new_empty((nnz,), dtype=torch.float32))


def _symmetric(name: str, matrix: CSRMatrix) -> None:
    """Raise unless the CSR matrix has no duplicate entries and equals its transpose."""
    crow, cols, values = matrix.crow_indices, matrix.col_indices, matrix.values
    num_rows = matrix.size[0]
    rows = torch.repeat_interleave(torch.arange(num_rows, device=cols.device), crow[1:] - crow[:-1])
    keys, order = torch.sort(rows * num_rows + cols)
    repeated = keys[1:] == keys[:-1]
    if bool(repeated.any()):
        # A repeated pair would count twice as a neighbour; scikit-learn's radius search does the same
        # only by accident of its storage, so it is refused rather than given a meaning.
        key = int(keys[1:][repeated][0])
        raise ValueError(f"{name} must hold each entry once, but ({key // num_rows}, {key % num_rows}) "
                         f"is stored more than once; sum duplicates first (scipy: m.sum_duplicates())")
    mirrored_keys, mirrored_order = torch.sort(cols * num_rows + rows)
    if not torch.equal(keys, mirrored_keys):
        missing = ~torch.isin(mirrored_keys, keys)
        first = int(mirrored_keys[missing.nonzero()[0, 0]]) if bool(missing.any()) else None
        where = f" (entry ({first % num_rows}, {first // num_rows}) has no mirror)" if first is not None else ""
        raise ValueError(f"{name} must be symmetric: its sparsity pattern differs from its transpose's{where}")
    unequal = values[order] != values[mirrored_order]
    if bool(unequal.any()):
        key = int(keys[unequal.nonzero()[0, 0]])
        row, col = key // num_rows, key % num_rows
        raise ValueError(f"{name} must be symmetric: entry ({row}, {col}) is {float(values[order][unequal][0])} "
                         f"but ({col}, {row}) is {float(values[mirrored_order][unequal][0])}")


def dbscan(distances, eps: float, min_samples: int, *, backend: str = "auto") -> torch.Tensor:
    """DBSCAN on a symmetric sparse distance matrix, labels identical to scikit-learn's.

    Equal, numbering included, to ``sklearn.cluster.DBSCAN(eps=eps, min_samples=min_samples,
    metric="precomputed").fit_predict(m)`` with ``m`` the matrix as a ``scipy.sparse``
    CSR matrix (or dense, with a value above ``eps`` where nothing is stored and 0 on an
    unstored diagonal). Stored entries ``<= eps`` are neighbours (compared in the values'
    dtype, as scikit-learn compares float32 data with a Python float); a point is its own
    neighbour unless its stored diagonal exceeds ``eps``; core points have at least
    ``min_samples`` neighbours; clusters are numbered in the order of their smallest core
    point and a border point joins the smallest-numbered cluster among its core neighbours.
    Not differentiable. Runs as the custom op ``torch.ops.fastassoc.dbscan`` on the three CSR
    component tensors (values are read only inside it); the output shape follows from the
    input's, so it also runs on meta tensors.

    Parameters
    ----------
    distances : Tensor [N, N], sparse CSR, or CSRMatrix
        Finite, non-negative, symmetric; absent pairs are not neighbours.
    eps : float >= 0
    min_samples : int >= 1
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    Tensor [N], int64: cluster numbers from 0, -1 for noise.

    Examples
    --------
    >>> import torch
    >>> from fastassoc.ops.rerank import dbscan
    >>> d = torch.tensor([[0.0, 0.1, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]]).to_sparse_csr()
    >>> dbscan(d, eps=0.2, min_samples=2).tolist()
    [0, 0, -1]
    """
    crow, cols, values, size = _checks.csr_components("distances", distances)
    try:
        num_rows, num_cols = (int(s) for s in size)
    except (TypeError, ValueError):
        raise TypeError(f"distances.size must be a pair of ints, got {size!r}") from None
    if num_rows != num_cols:
        raise ValueError(f"distances must be square, got shape {(num_rows, num_cols)}")
    eps = _checks.real("eps", eps, low=0.0)
    min_samples = _checks.non_negative_int("min_samples", min_samples, minimum=1)
    return torch.ops.fastassoc.dbscan(tensor_input("distances.crow_indices", crow),
                                      tensor_input("distances.col_indices", cols),
                                      tensor_input("distances.values", values), num_rows, eps, min_samples,
                                      backend_name(backend))


@torch.library.custom_op("fastassoc::dbscan", mutates_args=())
def _dbscan_op(crow_indices: Tensor, col_indices: Tensor, values: Tensor, num_rows: int, eps: float,
               min_samples: int, backend: str) -> Tensor:
    matrix = _checks.csr("distances", CSRMatrix(crow_indices, col_indices, values, (num_rows, num_rows)),
                         shape=(num_rows, num_rows), device=values.device)
    eps = _checks.real("eps", eps, low=0.0)
    min_samples = _checks.non_negative_int("min_samples", min_samples, minimum=1)
    _symmetric("distances", matrix)
    _, impl = _backend.resolve("dbscan", backend, {"distances": matrix.values})
    return impl(matrix.crow_indices, matrix.col_indices, matrix.values, num_rows, eps, min_samples)


@_dbscan_op.register_fake
def _dbscan_fake(crow_indices, col_indices, values, num_rows, eps, min_samples, backend):
    fake_index("distances.crow_indices", crow_indices, length=num_rows + 1, device=values.device)
    fake_index("distances.col_indices", col_indices, device=values.device)
    if values.dim() != 1 or values.dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"distances.values must be a 1-D floating tensor, got {values.dtype} of shape "
                         f"{tuple(values.shape)}")
    return values.new_empty((num_rows,), dtype=torch.int64)


def cluster_centres(features: torch.Tensor, labels: torch.Tensor, *, num_clusters: int | None = None,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature of every cluster, noise (label -1) left out. Not differentiable.

    Runs as the custom op ``torch.ops.fastassoc.cluster_centres``. With ``num_clusters`` the
    output shapes follow from the inputs' (meta tensors work); without it ``C`` is read from
    the labels: a symbolic size under torch.compile, a ValueError on meta tensors.

    Parameters
    ----------
    features : Tensor [N, D], float, finite
    labels : Tensor [N], integer in [-1, num_clusters)
    num_clusters : int, optional
        Number of clusters ``C``; defaults to ``labels.max() + 1`` (0 when every label is -1).
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    centres : Tensor [C, D], float32 (float64 stays float64), row ``c`` the mean of the rows
        labelled ``c`` (all zeros when no row is)
    counts : Tensor [C], int64, rows per cluster

    Examples
    --------
    >>> import torch
    >>> from fastassoc.ops.rerank import cluster_centres
    >>> centres, counts = cluster_centres(torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([0, 0, -1]))
    >>> centres.tolist(), counts.tolist()
    ([[1.0]], [2])
    """
    features = tensor_input("features", features)
    labels = tensor_input("labels", labels)
    if num_clusters is not None:
        num_clusters = _checks.non_negative_int("num_clusters", num_clusters)
    return torch.ops.fastassoc.cluster_centres(features, labels, num_clusters, backend_name(backend))


@torch.library.custom_op("fastassoc::cluster_centres", mutates_args=())
def _cluster_centres_op(features: Tensor, labels: Tensor, num_clusters: Optional[int],
                        backend: str) -> tuple[Tensor, Tensor]:
    features = _checks.features("features", features)
    if num_clusters is not None:
        num_clusters = _checks.non_negative_int("num_clusters", num_clusters)
    high = num_clusters if num_clusters is not None else 2**62
    labels = _checks.index_vector("labels", labels, length=features.shape[0], low=-1, high=high,
                                  device=features.device)
    if num_clusters is None:
        num_clusters = int(labels.max()) + 1 if labels.numel() else 0
    _, impl = _backend.resolve("cluster_centres", backend, {"features": features, "labels": labels})
    return impl(features, labels, num_clusters)


@_cluster_centres_op.register_fake
def _cluster_centres_fake(features, labels, num_clusters, backend):
    fake_features("features", features)
    fake_index("labels", labels, length=features.shape[0], device=features.device)
    rows = num_clusters if num_clusters is not None else dynamic_size("cluster_centres", features, labels)
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    return (features.new_empty((rows, features.shape[1]), dtype=dtype),
            features.new_empty((rows,), dtype=torch.int64))
