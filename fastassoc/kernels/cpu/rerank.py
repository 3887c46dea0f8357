"""Compiled CPU backend of the re-ranking family: ``jaccard_distance_cpu``, ``dbscan_cpu``
and ``cluster_centres_cpu`` (kernels in csrc/cpu/rerank.cpp).

Algorithm
---------
``jaccard_distance``, as :func:`fastassoc.kernels.reference.rerank.jaccard_distance_reference`
defines it, in three compiled passes:

1. *k1-nearest lists.* The reference's exact lists
   (:func:`~fastassoc.kernels.reference.rerank.nearest_lists`) from the knn family's exact
   self-join (:func:`fastassoc.kernels.cpu.knn.topk_self_join`: upper-triangle GEMM tiles,
   bf16-screened where the CPU has bf16 dot products, candidates rescored exactly), with the
   family's squared norms (:func:`exact_squared_norms`, compiled). Zhong's farthest distances
   are the reference's :func:`~fastassoc.kernels.reference.rerank.farthest_distances`.
2. *Encoding.* ``_C.rerank_encode``: reciprocal sets, the 2/3 expansion, the weights
   (products of the rows in the fixed-order float64 dot, the reference's bits; the softmax
   and its sums within rounding of the reference's torch ones) and query expansion (dense
   per-thread row buffer, list order), as CSR.
3. *Jaccard.* ``_C.rerank_jaccard``: inverted (column) lists of ``V``; per row the
   partners accumulate ``min(V_ik, V_jk)`` in ascending ``k`` (the reference's order, so
   ``m_ij`` has its bits, from either end of the pair) into a dense per-thread buffer with a
   bitmap of touched columns. One pass over the upper triangle sizes every row and keeps
   its pairs (8 bytes each: a third of the 24 bytes the two mirrored entries take in the
   result) while they are few (:data:`KEPT_PAIRS_BUDGET`); the returned arrays are
   allocated at their final size and written from the kept pairs (their mirror images by
   target-row ranges, so rows come out sorted) or, past the budget, by recomputing each full
   row in column order (three times the sums of one triangle, at ~1.05x instead of ~1.35x
   the returned bytes at peak, and faster when the result is large: see the budget).

``dbscan``: the neighbour test ``values <= eps`` in the values' dtype (torch, as the
reference), then ``_C.rerank_dbscan`` (neighbour counts, union-find, numbering by the
smallest core point, border points to the smallest cluster number). ``cluster_centres``:
``_C.rerank_cluster_centres`` sums each cluster's rows in row order (the reference's
``index_add_`` order, so the same bits) and divides by the counts.

Limits
------
Memory beyond the inputs: the knn self-join's tiles and lists, the ``N x K`` lists,
``V`` (twice, rows and columns), one dense row buffer per thread and the returned matrix.
Results do not depend on the thread count nor on the tile limit.

Why compiled C++ and not numba (the design card lists numba for irregular sparse work):
measured in bench/bench_numba_rerank.py (W-jaccard, 2 threads, numba 0.68.1, the 2-core EPYC
dev box), numba versions of the two passes (prange over rows, per-thread dense buffers and
bitmap) give bit-identical ``V`` and ``J`` but run 2.2x (encoding: 0.51-0.55 s against
0.23-0.24 s) and 2.0x (Jaccard: 0.58-0.62 s against 0.29-0.32 s, fastest calls) slower than
these kernels: numba's LLVM does not vectorise the fixed-order float64 dot the reference's
bits need (fastmath would, by reordering the sums). They would also add numba and llvmlite
as dependencies and 13-17 s of JIT compile to each process's first call (about 0.25 s from
a warm ``cache=True`` cache), to save about half the lines (265 against 484).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from ... import _backend
from ..reference.rerank import exact_squared_norms as _reference_norms
from ..reference.rerank import evaluate_reranked_reference, farthest_distances
from . import _core, _screen
from . import knn as _knn

_PAIR_METRICS = {"sqeuclidean": 0, "cosine": 1, "euclidean": 2}
_WEIGHTINGS = {"spcl": 0, "zhong": 1}
# Upper-triangle pairs the Jaccard counting pass may keep for the writing pass. None (the
# default): with max_distance the kernel's own budget (max(2^22, 8 nnz(V)) pairs: a bounded
# result is small and keeping it saves two triangles of sums), without it none. Measured on
# W-jaccard (21 M kept pairs, 496 MB returned, bench/bench_rerank.py): keeping them all took
# 0.87-1.07 s against 0.35 s for the recomputation, because the kept pairs' ~3 x 168 MB of
# fresh pages (vector growth, then trimming) cost more than the sums they save, and the
# peak is 1.35x the returned bytes instead of 1.05x. KEEP_ALL keeps every pair, 0 none (tests).
KEPT_PAIRS_BUDGET: int | None = None
KEEP_ALL = 2**62
_KERNEL_BUDGET = -1   # rerank_jaccard: its own budget


def exact_squared_norms(x: torch.Tensor) -> torch.Tensor:
    """The reference's :func:`~fastassoc.kernels.reference.rerank.exact_squared_norms`, compiled.

    ``_C.screen_exact_distance`` of the pair ``(x_i, -x_i)`` with zero norms is
    ``max(0, -2 round(x_i . -x_i)) = 2 round(x_i . x_i)`` (the fixed-order dot is odd in either
    argument, doubling and halving are exact): the same bits as the reference's torch lanes.
    """
    if x.dtype != torch.float32:
        return _reference_norms(x)
    out = torch.empty(x.shape[0], dtype=torch.float32)
    # Small pieces: the negated copy is the only temporary.
    step = max(1, min(_backend.tile_elements(), 2**20) // max(x.shape[1], 1))
    for start in range(0, x.shape[0], step):
        rows = x[start:start + step]
        index = torch.arange(rows.shape[0])
        zeros = torch.zeros(rows.shape[0], dtype=torch.float32)
        out[start:start + step] = _screen.exact_distances(rows, (-rows).contiguous(), index, index, "sqeuclidean",
                                                          row_norms=zeros, col_norms=zeros).mul_(0.5)
    return out


def _nearest_lists(x: torch.Tensor, width: int, metric: str, norms: torch.Tensor | None,
                   screen: bool = True) -> torch.Tensor:
    """Every row's ``width`` nearest rows ([N, width] int64, by (exact distance, index)): the
    reference's :func:`~fastassoc.kernels.reference.rerank.nearest_lists`.

    The knn family's exact self-join (:func:`.knn.topk_self_join`: upper-triangle GEMM
    proposals, rescored exactly) with the family's squared norms ``norms``
    (:func:`exact_squared_norms`; None for cosine). ``screen``: let it propose with a bf16
    GEMM where the CPU has bf16 dot products (faster; its bf16 copy and GEMM buffers peak at
    about 8 bytes per feature element, 210 MB at W-jaccard, against ~55 MB for float32
    proposals); False forces the float32 proposals. Same lists either way.
    """
    values, indices = _knn.new_lists(x.shape[0], width, x.dtype)
    with contextlib.ExitStack() as stack:
        if not screen:
            stack.enter_context(_screen.forced("off"))
        _knn.topk_self_join(x, _knn.ranking_metric(metric), width, (values, indices), norms=norms)
    _knn.finish_lists(values, indices, metric)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= x.shape[0]):
        # Only non-finite distances (squared norms that overflow the compute dtype) get here.
        raise ValueError("features: distances overflow the compute dtype (squared norms are not finite); "
                         "scale the features down")
    return indices


def _encode(x: torch.Tensor, k1: int, k2: int, weighting: str, metric: str, screen: bool = True):
    """Steps 1-5 on prepared rows: ``V`` as CSR NumPy arrays (offsets [N+1] int64, columns
    int64, values compute dtype) and, for Zhong's weights, the farthest distances ([N] tensor;
    else None). ``screen`` as :func:`_nearest_lists`."""
    num_rows = x.shape[0]
    width = min(k1 if weighting == "spcl" else k1 + 1, num_rows)
    half = min(round(k1 / 2) + 1, width)
    norms = exact_squared_norms(x) if metric != "cosine" else None
    ranks = _nearest_lists(x, width, metric, norms, screen)
    # The knn search caches its tile buffers for the next call (up to ~140 MB at D = 2048): held
    # through the Jaccard pass they would add to its peak, beside the returned matrix.
    _core.release_scratch()
    # Only Zhong's weights read the farthest distances (the reference's exact ones).
    farthest = farthest_distances(x, metric, norms) if weighting == "zhong" else None
    crow, cols, values = _core.kernel("rerank_encode")(
        _core.ptr(ranks), num_rows, width, half, 0 if k2 == 1 else min(k2, width), _core.ptr(x),
        _core.is_double(x), x.shape[1], _core.ptr(norms), _core.ptr(farthest), _WEIGHTINGS[weighting],
        _PAIR_METRICS[metric])
    return crow, cols, values, farthest


def _encoding_tensors(x: torch.Tensor, k1: int, k2: int, weighting: str, metric: str):
    """:func:`_encode` in the reference's ``_encoding`` form: (rows, cols, values, farthest) tensors."""
    crow, cols, values, farthest = _encode(x, k1, k2, weighting, metric)
    crow = torch.from_numpy(crow)
    rows = torch.repeat_interleave(torch.arange(x.shape[0]), crow[1:] - crow[:-1])
    return rows, torch.from_numpy(cols), torch.from_numpy(values), farthest


def evaluate_reranked_cpu(*args, **kwargs):
    """``evaluate_ranking(..., rerank=...)`` on the CPU: the reference's
    :func:`~fastassoc.kernels.reference.rerank.evaluate_reranked_reference` (same arguments and
    result) with steps 1-5 compiled: the exact lists from the knn self-join and ``V`` from
    ``_C.rerank_encode`` (the reference's lists; weights within rounding)."""
    return evaluate_reranked_reference(*args, encode=_encoding_tensors, **kwargs)


def jaccard_distance_cpu(features: torch.Tensor, k1: int, k2: int, weighting: str, max_distance: float | None,
                         metric: str) -> torch.Tensor:
    """See :func:`fastassoc.jaccard_distance` (and ``jaccard_distance_reference``, which this equals).

    Parameters
    ----------
    features : Tensor [N, D], float, finite
    k1 : int >= 1; k2 : int in [1, k1]
    weighting : {"spcl", "zhong"}
    max_distance : float >= 0 or None
    metric : {"sqeuclidean", "euclidean", "cosine"}

    Returns
    -------
    Tensor [N, N], sparse CSR, float32, symmetric, columns sorted per row, diagonal stored as 0.
    """
    num_rows = features.shape[0]
    if num_rows == 0:
        return _csr(torch.zeros(1, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                    torch.empty(0, dtype=torch.float32), 0)
    x = _core.prepare(features, metric)
    # With max_distance the returned matrix is small and the lists' buffers set the peak: the
    # float32 proposals keep it at ~1/10 of SpCL's (issue 12). Without, the result dwarfs
    # them and the faster bf16 screen may run.
    crow, cols, values, _ = _encode(x, k1, k2, weighting, metric, screen=max_distance is None)
    crow, cols, values = _core.kernel("rerank_jaccard")(
        crow.ctypes.data, cols.ctypes.data, values.ctypes.data, _core.is_double(x), num_rows,
        max_distance is not None, 0.0 if max_distance is None else float(max_distance),
        _kept_budget(max_distance is not None))
    return _csr(torch.from_numpy(crow), torch.from_numpy(cols), torch.from_numpy(values), num_rows)


def _kept_budget(bounded: bool) -> int:
    """rerank_jaccard's kept_budget: :data:`KEPT_PAIRS_BUDGET`, or by default the kernel's
    own budget for a bounded result and none for an unbounded one."""
    if KEPT_PAIRS_BUDGET is not None:
        return KEPT_PAIRS_BUDGET
    return _KERNEL_BUDGET if bounded else 0


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    with warnings.catch_warnings():
        # torch warns once per process that sparse CSR is "beta"; that is not the caller's concern.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, size=(size, size), check_invariants=False)


def dbscan_cpu(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, num_rows: int,
               eps: float, min_samples: int) -> torch.Tensor:
    """See :func:`fastassoc.dbscan` (and ``dbscan_reference``, which this equals).

    Parameters
    ----------
    crow_indices : Tensor [N+1], int64; col_indices : Tensor [nnz], int64 (sorted per row, unique)
    values : Tensor [nnz], float, symmetric matrix
    num_rows : int; eps : float >= 0; min_samples : int >= 1

    Returns
    -------
    Tensor [N], int64 labels, -1 for noise.
    """
    labels = torch.empty(num_rows, dtype=torch.int64)
    if num_rows == 0:
        return labels
    # Compared in the values' dtype, as the reference (and scikit-learn on float32 data).
    near = (values <= torch.tensor(eps, dtype=values.dtype)).to(torch.uint8)
    crow, cols = crow_indices.to(torch.int64).contiguous(), col_indices.to(torch.int64).contiguous()
    _core.kernel("rerank_dbscan")(_core.ptr(crow), _core.ptr(cols), _core.ptr(near.contiguous()), num_rows,
                                  min_samples, _core.ptr(labels))
    return labels


def cluster_centres_cpu(features: torch.Tensor, labels: torch.Tensor, num_clusters: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`fastassoc.cluster_centres` (and ``cluster_centres_reference``, which this equals).

    Parameters
    ----------
    features : Tensor [N, D], float; labels : Tensor [N], int64 in [-1, num_clusters)
    num_clusters : int >= 0

    Returns
    -------
    centres : Tensor [C, D], float32 (float64 stays float64); counts : Tensor [C], int64
    """
    x = features.to(_core.compute_dtype(features)).contiguous()
    labels = labels.to(torch.int64).contiguous()
    counts = torch.bincount(labels[labels >= 0], minlength=num_clusters)
    centres = torch.empty((num_clusters, x.shape[1]), dtype=x.dtype)
    if centres.numel():
        _core.kernel("rerank_cluster_centres")(_core.ptr(x), _core.is_double(x), x.shape[0], x.shape[1],
                                               _core.ptr(labels), num_clusters, _core.ptr(centres))
    return centres, counts


def _core_has_kernels() -> bool:
    module = _backend.compiled_core()
    return module is not None and hasattr(module, "rerank_jaccard")


if not _core_has_kernels():
    # A core built before csrc/cpu/rerank.cpp: report the ops as not implemented here, so
    # backend="auto" keeps using the reference instead of failing until the core is rebuilt.
    del jaccard_distance_cpu, dbscan_cpu, cluster_centres_cpu, evaluate_reranked_cpu
