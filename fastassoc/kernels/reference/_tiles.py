"""Bounded distance tiles shared by the reference kernels.

Every reference op walks its B x N work in row chunks of at most
``fastassoc._backend.tile_elements()`` elements, so the reference itself runs at
100k scale without an N x N matrix. Distances use the formulas all backends share:
squared Euclidean as ``|q|^2 + |a|^2 - 2 q.a`` clamped at 0, cosine as
``1 - q_hat . a_hat`` with L2-normalised rows, accumulated in float32 (float64 inputs
stay float64).
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
