"""Drop-in replacements with the public signatures other projects call.

* :func:`compute_jaccard_distance`: SpCL's and cluster-contrast's
  ``utils/faiss_rerank.compute_jaccard_distance`` (the k-reciprocal Jaccard distance that
  feeds ``DBSCAN(metric="precomputed")`` every epoch), on :func:`fastassoc.jaccard_distance`.
* :func:`re_ranking`: torchreid's ``torchreid.utils.rerank.re_ranking`` (Zhong et al.'s
  re-ranking of a query-gallery distance matrix), from the three distance matrices, in memory
  bounded by tiles plus the sparse encodings and the [Q, G] result.

Both keep the public signature and return type of the code they replace; where they differ
from it (exact search instead of faiss' choice, ties to the smaller index, degenerate inputs
the original turns into NaN or garbage) the docstrings say so. Public sources they match:

* SpCL ``spcl/utils/faiss_rerank.py`` at commit ``01a486e50f7324520a7d9e3741d6c7e1cfd540cf``
  (github.com/yxgeee/SpCL), and cluster-contrast's ``clustercontrast/utils/faiss_rerank.py`` at
  commit ``57b62e95eb3ade3da4a464c5eead69ca7d5f4e1d`` (github.com/alibaba/cluster-contrast-reid),
  which differs from SpCL's only in whitespace;
* deep-person-reid ``torchreid/utils/rerank.py`` at commit
  ``5ce43185b156c19c60d19be97dfb5ad89423e52c`` (github.com/KaiyangZhou/deep-person-reid).
"""
from __future__ import annotations

import numbers
import time

import numpy as np
import torch

from . import _backend
from .kernels.reference import rerank as _rerank
from .kernels.reference.knn import smallest_k
from .ops import _checks
from .ops.rerank import jaccard_distance

__all__ = ["compute_jaccard_distance", "re_ranking"]

SEARCH_OPTIONS = (0, 1, 2, 3)


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _as_features(target_features) -> torch.Tensor:
    if isinstance(target_features, torch.Tensor):
        return target_features.detach()
    if isinstance(target_features, np.ndarray):
        if target_features.dtype.kind != "f":
            raise TypeError(f"target_features must hold floating-point values, got dtype {target_features.dtype}")
        return torch.from_numpy(np.ascontiguousarray(target_features))
    raise TypeError(f"target_features must be a torch.Tensor or a NumPy array, got {type(target_features).__name__}")


def compute_jaccard_distance(target_features, k1: int = 20, k2: int = 6, print_flag: bool = True,
                             search_option: int = 0, use_float16: bool = False, *, sparse: bool = False,
                             max_distance: float | None = None):
    r"""SpCL's ``compute_jaccard_distance``: k-reciprocal Jaccard distances between all rows.

    Matches ``spcl/utils/faiss_rerank.py`` of github.com/yxgeee/SpCL at commit
    ``01a486e50f7324520a7d9e3741d6c7e1cfd540cf`` and cluster-contrast's
    ``clustercontrast/utils/faiss_rerank.py`` at ``57b62e95eb3ade3da4a464c5eead69ca7d5f4e1d`` (the
    same function up to whitespace): the k1-nearest lists by squared Euclidean distance with the row itself first,
    k-reciprocal sets over ``k1`` and ``round(k1 / 2) + 1`` neighbours, the 2/3-overlap expansion,
    weights :math:`\mathrm{softmax}(-(2 - 2 x_i \cdot x_j))`, query expansion over the ``k2``
    nearest and :math:`J_{ij} = 1 - m_{ij} / (2 - m_{ij})`, negatives set to 0 (Zhong et al.,
    CVPR 2017). Computed by :func:`fastassoc.jaccard_distance` (``weighting="spcl"``,
    ``metric="sqeuclidean"``): sparse, exact, never an N x N array unless the dense result
    is asked for. Not differentiable.

    Differences from the original, all outside what its callers rely on:

    * the nearest lists are exact, ties to the smaller index, each row's own distance taken as
      0 (faiss' order among equal distances is unspecified); ``search_option`` only picks the
      faiss index there and is ignored here;
    * the diagonal is exactly 0; the original computes :math:`1 - s_i / (2 - s_i)` with
      :math:`s_i = \sum_k V_{ik}`, which is 0 up to float32 rounding (below 1e-6) whenever row
      ``i``'s weights sum to one -- always, unless ``k1`` or more exact duplicates of a row
      precede it and crowd it out of every list;
    * ``N < k1`` uses all ``N`` rows (faiss pads the lists with -1 there, which the original
      then reads as the last row);
    * ``k2 > k1`` is refused (the original silently averages over ``k1`` rows).

    Parameters
    ----------
    target_features : Tensor [N, D] (any device) or ndarray [N, D], float, finite
        SpCL passes L2-normalised features; the weights use ``2 - 2 x_i . x_j`` as the
        original does, so unnormalised rows give the original's (odd) weights too.
    k1 : int >= 1
    k2 : int, 1 <= k2 <= k1
    print_flag : bool
        Print ``Computing jaccard distance...`` before and ``Jaccard distance computing time
        cost: <seconds>`` after, as the original does.
    search_option : {0, 1, 2, 3}
        Accepted for compatibility and ignored: the search is always exact.
    use_float16 : bool
        The dense result is float16, as the original returns then (computed in float32 and
        rounded once); the sparse result stays float32 (``scipy.sparse`` has no float16).
    sparse : bool, keyword-only
        Return a ``scipy.sparse.csr_matrix`` instead of the dense array (see Returns).
    max_distance : float >= 0, optional, keyword-only
        Keep only pairs with ``J <= max_distance``; the others read as 1 (absent). DBSCAN with
        ``eps <= max_distance`` gives the same labels and the matrix shrinks accordingly.

    Returns
    -------
    ndarray [N, N], float32 (float16 with ``use_float16``), when ``sparse=False``
        The original's matrix: ``J_ij`` where ``J_ij < 1``, exactly 1 elsewhere, 0 on the
        diagonal.
    scipy.sparse.csr_matrix [N, N], float32, when ``sparse=True``
        Symmetric, column indices sorted: the pairs with ``J < 1`` and explicit zeros on the
        diagonal. ``sklearn.cluster.DBSCAN(eps, min_samples, metric="precomputed")`` treats
        absent entries as non-neighbours, so it gives the dense matrix's labels for every
        ``eps < 1`` (the dense 1s are neighbours only when ``eps >= 1``).
        :func:`fastassoc.dbscan` takes it too (as a torch CSR tensor).

    Examples
    --------
    >>> import torch
    >>> from fastassoc.compat import compute_jaccard_distance
    >>> x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    >>> d = compute_jaccard_distance(x, k1=2, k2=1, print_flag=False)
    >>> d.dtype, d.shape, d.diagonal().tolist()
    (dtype('float32'), (3, 3), [0.0, 0.0, 0.0])
    >>> compute_jaccard_distance(x, k1=2, k2=1, print_flag=False, sparse=True).nnz >= 3
    True
    """
    start = time.time()
    print_flag = _flag("print_flag", print_flag)
    use_float16 = _flag("use_float16", use_float16)
    sparse = _flag("sparse", sparse)
    if isinstance(search_option, bool) or not isinstance(search_option, numbers.Integral) \
            or search_option not in SEARCH_OPTIONS:
        raise ValueError(f"search_option must be one of {SEARCH_OPTIONS} (it is ignored: the search is exact); "
                         f"got {search_option!r}")
    if print_flag:
        print("Computing jaccard distance...")
    features = _as_features(target_features)
    matrix = jaccard_distance(features, k1, k2, weighting="spcl", max_distance=max_distance, metric="sqeuclidean",
                              as_tuple=True)
    num_rows = int(matrix.size[0])
    crow = matrix.crow_indices.cpu().numpy()
    cols = matrix.col_indices.cpu().numpy()
    values = matrix.values.cpu().numpy().astype(np.float32, copy=False)
    if sparse:
        import scipy.sparse        # only this form needs scipy (not a core dependency)
        result = scipy.sparse.csr_matrix((values, cols, crow), shape=(num_rows, num_rows))
    else:
        result = np.ones((num_rows, num_rows), dtype=np.float16 if use_float16 else np.float32)
        # Row blocks: a row index per stored entry at once would cost 8 bytes per pair.
        step = max(1, _backend.tile_elements() // max(num_rows, 1))
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            first, last = crow[start], crow[stop]
            local_rows = np.repeat(np.arange(stop - start), np.diff(crow[start:stop + 1]))
            result[start:stop][local_rows, cols[first:last]] = values[first:last]
    if print_flag:
        print("Jaccard distance computing time cost: {}".format(time.time() - start))
    return result


# ----------------------------------------------------------------------------- re_ranking

def _distance_matrix(name: str, value, shape: tuple[int, int] | None) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {value.shape}")
    if value.dtype.kind != "f":
        raise TypeError(f"{name} must hold floating-point distances, got dtype {value.dtype}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"{name} must have shape {shape} to match q_g_dist, got {value.shape}")
    if value.size:
        largest = float(np.abs(value).max())          # NaN propagates
        if not np.isfinite(largest):
            raise ValueError(f"{name} contains NaN or infinite values")
        if largest > np.sqrt(np.finfo(np.float32).max):
            raise ValueError(f"{name} values must square to a finite float32 (|d| <= 1.8e19), got {largest:.3g}")
    return value


class _JointDistances:
    """The (Q + G) x (Q + G) matrix ``[[q_q, q_g], [q_g.T, g_g]]`` that torchreid concatenates,
    read by column blocks and by pairs without being built."""

    def __init__(self, q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray):
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.num_query = q_g.shape[0]
        self.total = q_g.shape[0] + q_g.shape[1]
        # torchreid squares in the concatenation's dtype, then casts to float32.
        self.dtype = np.result_type(q_g, q_q, g_g)

    def squared(self, values: np.ndarray) -> np.ndarray:
        return np.power(values.astype(self.dtype, copy=False), 2).astype(np.float32)

    def column_block(self, start: int, stop: int) -> np.ndarray:
        """``squared(M[:, start:stop])`` for a block wholly on one side of the query/gallery split."""
        q = self.num_query
        if stop <= q:
            top, bottom = self.q_q[:, start:stop], self.q_g[start:stop, :].T
        else:
            top, bottom = self.q_g[:, start - q:stop - q], self.g_g[:, start - q:stop - q]
        return np.concatenate([self.squared(top), self.squared(bottom)], axis=0)

    def pairs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``squared(M[rows, cols])`` for index arrays."""
        q = self.num_query
        out = np.empty(rows.shape, dtype=np.float32)
        row_query, col_query = rows < q, cols < q
        for row_side, col_side, source, row_shift, col_shift in (
                (True, True, self.q_q, 0, 0), (True, False, self.q_g, 0, q),
                (False, False, self.g_g, q, q)):
            mask = (row_query == row_side) & (col_query == col_side)
            out[mask] = self.squared(source[rows[mask] - row_shift, cols[mask] - col_shift])
        mask = ~row_query & col_query                     # M[g, q] = q_g[q, g]
        out[mask] = self.squared(self.q_g[cols[mask], rows[mask] - q])
        return out

    def blocks(self):
        """Column ranges of at most ``tile_elements() / total`` columns, none crossing the split."""
        step = max(1, _backend.tile_elements() // max(self.total, 1))
        for low, high in ((0, self.num_query), (self.num_query, self.total)):
            for start in range(low, high, step):
                yield start, min(start + step, high)


def _scaled(squared: np.ndarray, column_max: np.ndarray) -> np.ndarray:
    """torchreid's ``original_dist``: squared distances over their column's maximum (float32)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = squared / column_max
    # A column of zeros (every distance 0) gives 0 / 0 in torchreid; it is read as 0 here.
    return np.where(column_max > 0, scaled, np.float32(0.0)).astype(np.float32, copy=False)


def _query_gallery_jaccard(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, num_query: int,
                           total: int, start: int, stop: int) -> torch.Tensor:
    """[stop - start, G] float32 ``m_ig = sum_k min(V_ik, V_gk)`` of query rows start..stop-1."""
    num_gallery = total - num_query
    column_keys, order = torch.sort(cols * total + rows)
    column_rows, column_values = rows[order], values[order]
    crow = _rerank._crow(rows, total)
    first, last = int(crow[start]), int(crow[stop])
    owners, columns, mine = rows[first:last], cols[first:last], values[first:last]
    # The gallery rows of column k follow the key k * total + num_query.
    begin = torch.searchsorted(column_keys, columns * total + num_query)
    end = torch.searchsorted(column_keys, (columns + 1) * total)
    shared = torch.zeros((stop - start) * num_gallery, dtype=values.dtype)
    for piece_start, piece_stop in _rerank._pieces(end - begin, _rerank._triple_budget()):
        entry, offset = _rerank._expand(end[piece_start:piece_stop] - begin[piece_start:piece_stop])
        position = begin[piece_start:piece_stop][entry] + offset
        target = (owners[piece_start:piece_stop][entry] - start) * num_gallery + column_rows[position] - num_query
        shared.index_add_(0, target, torch.minimum(mine[piece_start:piece_stop][entry], column_values[position]))
    return shared.view(stop - start, num_gallery)


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    r"""torchreid's ``re_ranking``: k-reciprocal re-ranked query-gallery distances.

    Matches ``torchreid/utils/rerank.py`` of github.com/KaiyangZhou/deep-person-reid at commit
    ``5ce43185b156c19c60d19be97dfb5ad89423e52c`` (Zhong et al., CVPR 2017, as adapted there to
    distance matrices). With ``M = [[q_q, q_g], [q_g.T, g_g]]`` ((Q + G) x (Q + G), never built)
    and :math:`O_{ij} = M_{ji}^2 / \max_k M_{ki}^2` in float32: each row's ``k1 + 1`` smallest
    :math:`O` (itself included when it ranks there), k-reciprocal sets over ``k1 + 1`` and
    ``round(k1 / 2) + 1`` neighbours, the 2/3-overlap expansion, weights
    :math:`V_{ij} \propto \exp(-O_{ij})` over the expanded set, query expansion over the ``k2``
    nearest when ``k2 != 1``, then for query ``i`` and gallery ``g``
    :math:`(1 - \lambda)(1 - m_{ig} / (2 - m_{ig})) + \lambda O_{i, Q+g}` with
    :math:`m_{ig} = \sum_k \min(V_{ik}, V_{gk})` (not clamped, as there). Not differentiable.

    Memory: ``O`` is ranked in column blocks of ``M`` of at most ``fastassoc.tile_limit`` elements
    (the inputs are read in place), ``V`` is sparse, and the only [Q, G] arrays are one
    block of Jaccard sums and the result; torchreid holds about five dense (Q + G)^2 arrays.

    Differences from the original: ranks are ties-to-the-smaller-index (torchreid's
    ``np.argsort`` leaves the order of equal distances unspecified); a column of ``M`` that is
    all zeros gives ``O = 0`` there (torchreid divides 0 by 0 and ranks NaNs).

    Parameters
    ----------
    q_g_dist : ndarray [Q, G], float, finite
    q_q_dist : ndarray [Q, Q], float, finite
    g_g_dist : ndarray [G, G], float, finite
        Distances as torchreid's ``compute_distance_matrix`` gives them (squared Euclidean or
        cosine); torch CPU tensors are accepted too.
    k1 : int >= 1
    k2 : int >= 1
    lambda_value : float in [0, 1]

    Returns
    -------
    ndarray [Q, G], float32

    Examples
    --------
    >>> import numpy as np
    >>> from fastassoc.compat import re_ranking
    >>> rng = np.random.default_rng(0)
    >>> q, g = rng.random((3, 4)).astype(np.float32), rng.random((5, 4)).astype(np.float32)
    >>> d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)
    >>> re_ranking(d(q, g), d(q, q), d(g, g), k1=3, k2=2).shape
    (3, 5)
    """
    q_g = _distance_matrix("q_g_dist", q_g_dist, None)
    num_query, num_gallery = q_g.shape
    q_q = _distance_matrix("q_q_dist", q_q_dist, (num_query, num_query))
    g_g = _distance_matrix("g_g_dist", g_g_dist, (num_gallery, num_gallery))
    k1 = _checks.non_negative_int("k1", k1, minimum=1)
    k2 = _checks.non_negative_int("k2", k2, minimum=1)
    lambda_value = _checks.real("lambda_value", lambda_value, low=0.0, high=1.0)
    result = np.empty((num_query, num_gallery), dtype=np.float32)
    if num_query == 0 or num_gallery == 0:
        return result
    joint = _JointDistances(q_g, q_q, g_g)
    total = joint.total
    full_width = min(k1 + 1, total)
    width = max(full_width, min(k2, total))
    ranks = torch.empty((total, width), dtype=torch.int64)
    column_max = np.empty(total, dtype=np.float32)
    for start, stop in joint.blocks():
        block = joint.column_block(start, stop)                    # [total, b]
        column_max[start:stop] = block.max(axis=0)
        scaled = _scaled(block.T, column_max[start:stop, None])   # rows start..stop-1 of O
        ranks[start:stop] = smallest_k(torch.from_numpy(np.ascontiguousarray(scaled)), width)[1]
        del block, scaled
    rows, cols = _rerank._expanded_sets(ranks[:, :full_width].contiguous(), k1)
    rows_np, cols_np = rows.numpy(), cols.numpy()
    # O[i, m] = M[m, i]^2 / column_max[i]; weights exp(-O) normalised per row, in float32.
    weights = torch.from_numpy(np.exp(-_scaled(joint.pairs(cols_np, rows_np), column_max[rows_np])))
    sums = torch.zeros(total, dtype=torch.float32).index_add_(0, rows, weights)
    values = weights / sums[rows]
    if k2 != 1:
        rows, cols, values = _rerank._query_expansion(_rerank._crow(rows, total), cols, values, ranks, k2)
    del ranks
    step = max(1, _backend.tile_elements() // num_gallery)
    for start in range(0, num_query, step):
        stop = min(start + step, num_query)
        shared = _query_gallery_jaccard(rows, cols, values, num_query, total, start, stop).numpy()
        jaccard = 1 - shared / (np.float32(2.0) - shared)
        original = _scaled(joint.squared(q_g[start:stop]), column_max[start:stop, None])
        result[start:stop] = jaccard * np.float32(1 - lambda_value) + original * np.float32(lambda_value)
    return result
