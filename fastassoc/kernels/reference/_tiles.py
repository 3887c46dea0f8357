"""Bounded distance tiles and the exact pair distances shared by the reference kernels.

Every reference op walks its B x N work in row chunks of at most
``fastassoc._backend.tile_elements()`` elements, so the reference itself runs at
100k scale without an N x N matrix.

How distances are defined
-------------------------
The distance of a pair is a function of the two rows alone (copies of one vector get
bit-identical distances, so ties between them go to the smaller index wherever they sit):

* the inner product ``q.a`` is :func:`exact_dots`: products of the compute-dtype values in
  float64, summed in 16 lanes (element ``i`` into lane ``i % 16``, in index order) combined
  by a fixed tree, rounded to the compute dtype: the bits of ``fastassoc._C``'s
  ``screen_dot`` (csrc/cpu/screen.cpp) for float32 rows;
* squared Euclidean is ``(|q|^2 + |a|^2) - 2 q.a`` clamped at 0 with the squared norms
  ``(x * x).sum(1)`` in the compute dtype; Euclidean is torch's ``sqrt`` of it; cosine
  is ``1 - q_hat.a_hat`` with rows L2-normalised by ``torch.nn.functional.normalize``;
* the compute dtype is float32 (float64 inputs stay float64, their lanes then hold
  rounded float64 products).

A float32 GEMM's result for a pair depends on the pair's position in its output (the
BLAS kernel's vectorised body and edge code round differently), so GEMM tiles
(:func:`distance_tile`) only *propose*: :func:`band` bounds a row's GEMM distances'
distance from the exact ones, and the ops rescore exactly every entry that can matter
(``knn.smallest_k_exact``).
"""
from __future__ import annotations

from typing import Iterator

import torch

from ... import _backend


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def prepare(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Cast to the compute dtype and, for cosine, L2-normalise the rows."""
    x = x.to(compute_dtype(x))
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    return x


def row_chunks(num_rows: int, num_cols: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` row ranges whose tiles hold at most tile_elements() entries."""
    step = max(1, _backend.tile_elements() // max(num_cols, 1))
    for start in range(0, num_rows, step):
        yield start, min(start + step, num_rows)


def distance_tile(q: torch.Tensor, a: torch.Tensor, metric: str, a_sq_norms: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Distances between prepared rows ``q`` [b, D] and ``a`` [n, D] -> [b, n] (compute dtype).

    ``q`` and ``a`` must come from :func:`prepare` with the same metric.
    ``a_sq_norms`` may pass precomputed ``(a * a).sum(1)`` to avoid recomputing it per tile.
    """
    # In-place steps: the tile is the largest array of every op and each extra pass
    # over it shows in the time. The rounding is that of the out-of-place formula.
    dots = q @ a.T
    if metric == "cosine":
        return dots.neg_().add_(1.0)
    if a_sq_norms is None:
        a_sq_norms = (a * a).sum(1)
    squared = (q * q).sum(1, keepdim=True) + a_sq_norms.unsqueeze(0)
    squared.sub_(dots.mul_(2.0)).clamp_min_(0.0)
    return squared.sqrt_() if metric == "euclidean" else squared


# Lanes of the fixed-order dot product (csrc/cpu/screen.cpp screen_dot).
_LANES = 16


def exact_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products ``x[p] . y[p]`` [P] in ``x.dtype``, a function of the two rows alone.

    Parameters
    ----------
    x, y : Tensor [P, D], float32 or float64 (the compute dtype)

    Products in float64 (exact for float32 values), accumulated per lane ``i % 16`` in
    index order (``cumsum`` is a sequential scan), lanes combined as ``l += l + width``
    for width 8, 4, 2, 1, then rounded to ``x.dtype``: ``screen_dot``'s bits.
    """
    num_pairs, dim = x.shape
    if dim == 0 or num_pairs == 0:
        return x.new_zeros(num_pairs)
    products = x.to(torch.float64) * y.to(torch.float64)
    if dim % _LANES:
        # Adding +0.0 changes no float64 partial sum.
        products = torch.nn.functional.pad(products, (0, _LANES - dim % _LANES))
    lanes = products.view(num_pairs, -1, _LANES).cumsum(1)[:, -1]
    width = _LANES // 2
    while width:
        lanes = lanes[:, :width] + lanes[:, width:2 * width]
        width //= 2
    return lanes[:, 0].to(x.dtype)


def exact_distances(q: torch.Tensor, a: torch.Tensor, metric: str, q_sq_norms: torch.Tensor | None = None,
                    a_sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Distances [P] of the prepared row pairs ``(q[p], a[p])`` as the module docstring defines them.

    ``q_sq_norms`` / ``a_sq_norms`` [P] are the rows' ``(x * x).sum(1)`` (Euclidean metrics).
    Work is split into chunks of at most ``tile_elements()`` float64 products.
    """
    out = q.new_empty(q.shape[0])
    step = max(1, _backend.tile_elements() // max(q.shape[1], 1))
    for start in range(0, q.shape[0], step):
        stop = min(start + step, q.shape[0])
        dots = exact_dots(q[start:stop], a[start:stop])
        if metric == "cosine":
            out[start:stop] = 1.0 - dots
            continue
        squared = (q_sq_norms[start:stop] + a_sq_norms[start:stop]) - 2.0 * dots
        out[start:stop] = squared.clamp_min_(0.0)
    return out.sqrt_() if metric == "euclidean" else out


def band(q: torch.Tensor, a: torch.Tensor, metric: str, q_sq_norms: torch.Tensor | None = None,
         a_sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [b]: a bound on ``|GEMM tile distance - exact distance|`` for row ``q[r]`` and any row of ``a``.

    ``metric`` is "sqeuclidean" or "cosine" (Euclidean is bounded in squared space). A GEMM
    sums ``D`` products in any order: its inner product is within ``D u |q| |a|`` of the true
    one (``u`` the unit roundoff), the exact one within ``u |q.a|`` plus float64 summation;
    the distance formula adds a few roundings of its largest term. Slack on every term.
    """
    unit = 2.0 ** -53 if q.dtype == torch.float64 else 2.0 ** -24
    dim = q.shape[1]
    # Norms from the squared norms when given (else in the compute dtype), enlarged by
    # their own worst-case rounding.
    widen = 1 + (dim + 2) * unit * 2
    q_sq = q_sq_norms if q_sq_norms is not None else (q * q).sum(1)
    q_norm = q_sq.to(torch.float64).sqrt() * widen
    if a.shape[0]:
        a_sq = a_sq_norms if a_sq_norms is not None else (a * a).sum(1)
        a_norm = a_sq.max().to(torch.float64).sqrt() * widen
    else:
        a_norm = q_norm.new_zeros(())
    dot_bound = ((dim + 4) * unit * 1.01 + dim * 2.0 ** -52) * q_norm * a_norm + 1e-300
    if metric == "cosine":
        return dot_bound + 4 * unit
    squares = q_sq_norms.to(torch.float64) + (a_sq_norms.to(torch.float64).max() if a.shape[0] else 0.0)
    return 2 * dot_bound + 8 * unit * squares
