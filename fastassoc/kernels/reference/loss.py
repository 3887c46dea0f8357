"""Reference segmented soft cross-entropy: the spec and oracle of ``segmented_cross_entropy``.

Algorithm
---------
For rows ``b`` of ``features`` [B, D], classes ``j`` of ``weight`` [C, D] split into
segments by ``class_offsets`` [S+1], and non-negative sparse targets ``t`` [B, C] (CSR):

    z_bj = scale * f_b . w_j
    L    = (1/B) sum_b sum_j t_bj * (logsumexp_{j' in seg(j)} z_bj' - z_bj)
    dL/dz_bj = (1/B) (p_bj T_{b,seg(j)} - t_bj),   p = softmax over seg(j),  T_bs = sum_{j in s} t_bj
    dL/dF = scale * dZ W,   dL/dW = scale * dZ^T F

Two functions, the forward and the backward of the ``fastassoc::segmented_cross_entropy_*``
custom ops (``fastassoc.ops.loss``): the forward returns the loss plus the per-(row, segment)
logsumexp ``lse`` [B, S] and target mass ``T`` [B, S]; the backward takes them and returns
both gradients from the closed form above. Rows are processed in chunks of at most
``_backend.tile_elements()`` logits (``_tiles.row_chunks(B, C)``; a chunk always holds at
least one row, so a tile is at most ``max(tile_elements(), C)`` elements), in the forward
and again in the backward, which recomputes each chunk's logits: peak memory is a few
tiles, never the full ``B x C`` matrix, and nothing ``B x C``-shaped is kept between them.

Per-segment logsumexp is vectorised over segments: the per-row segment maximum is
subtracted before ``exp`` for stability, and ``log(sum exp) - shifted logit`` is taken on
the target entries only, so empty segments (never indexed by a target) never enter the
loss (their ``lse`` is ``-inf``; no class belongs to them, so the backward never reads it).
Duplicate CSR entries add up.

Limits: arithmetic in float32 (float64 inputs stay float64); the loss is returned as a
0-dim tensor in ``features``' dtype, the gradients in the inputs' dtypes. Inputs are the
already validated components of the CSR targets (int64 ``crow``/``col``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._tiles import compute_dtype, row_chunks


@dataclass(frozen=True)
class LossKernels:
    """What a backend provides for ``segmented_cross_entropy``: the two halves of its autograd.

    ``forward(features, weight, crow, col, values, class_offsets, scale) -> (loss, lse, target_mass)``
    with ``loss`` [] in ``features``' dtype and ``lse``, ``target_mass`` [B, S] in the compute
    dtype (float64 for float64 inputs, else float32); ``backward(grad_loss, features, weight,
    crow, col, values, class_offsets, lse, target_mass, scale, need_features, need_weight)
    -> (grad_features or None, grad_weight or None)`` in the inputs' dtypes. Both receive
    validated, non-empty problems (``B > 0`` and at least one target entry).
    """

    forward: Callable
    backward: Callable

    @property
    def __name__(self) -> str:
        # What _backend names an implementation: ``segmented_cross_entropy_<backend>``.
        return self.forward.__name__.replace("_forward_", "_")


def _class_segment(class_offsets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Segment of every class [C], int64."""
    num_segments = class_offsets.shape[0] - 1
    return torch.repeat_interleave(torch.arange(num_segments, device=class_offsets.device),
                                   class_offsets[1:] - class_offsets[:-1], output_size=num_classes)


def _entry_rows(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    """Row of every CSR entry [nnz], int64."""
    return torch.repeat_interleave(torch.arange(crow.shape[0] - 1, device=crow.device), crow[1:] - crow[:-1],
                                   output_size=nnz)


def _chunk_forward(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, target_values: torch.Tensor,
                   class_segment: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised loss of one row chunk (0-dim) and its rows' segment logsumexp [b, S].

    ``rows`` are chunk-local row indices of the target entries, ``cols`` their classes.
    """
    num_rows = logits.shape[0]
    # The shift cancels in log(sum exp(z - m)) - (z - m).
    segment_max = logits.new_zeros((num_rows, num_segments)).scatter_reduce_(
        1, class_segment.expand(num_rows, -1), logits, reduce="amax", include_self=False)
    shifted = logits - segment_max.index_select(1, class_segment)
    sum_exp = logits.new_zeros((num_rows, num_segments)).index_add_(1, class_segment, shifted.exp())
    # Every gathered segment contains its own maximum, so sum_exp >= 1 there.
    log_partition = sum_exp.log()
    loss = (target_values * (log_partition[rows, class_segment[cols]] - shifted[rows, cols])).sum()
    return loss, log_partition + segment_max


def segmented_cross_entropy_forward_reference(features: torch.Tensor, weight: torch.Tensor, crow: torch.Tensor,
                                              col: torch.Tensor, values: torch.Tensor, class_offsets: torch.Tensor,
                                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, per-(row, segment) logsumexp and target mass, in bounded row chunks.

    Parameters
    ----------
    features : Tensor [B, D], float
    weight : Tensor [C, D], same dtype and device
    crow : Tensor [B+1], int64; col : Tensor [nnz], int64; values : Tensor [nnz], float, >= 0
        The CSR targets.
    class_offsets : Tensor [S+1], int64, 0 = offsets[0] <= ... <= offsets[S] = C
    scale : float

    Returns
    -------
    (loss [] in ``features``' dtype, lse [B, S], target_mass [B, S]) in the compute dtype.
    """
    num_rows, num_classes = features.shape[0], weight.shape[0]
    num_segments = class_offsets.shape[0] - 1
    dtype = compute_dtype(features)
    class_segment = _class_segment(class_offsets, num_classes)
    values = values.to(dtype)
    rows = _entry_rows(crow, col.shape[0])
    target_mass = features.new_zeros((num_rows, num_segments), dtype=dtype).index_put_(
        (rows, class_segment[col]), values, accumulate=True)
    lse = features.new_empty((num_rows, num_segments), dtype=dtype)
    weight_compute = weight.to(dtype)
    crow_host = crow.tolist()
    total = features.new_zeros((), dtype=dtype)
    for start, stop in row_chunks(num_rows, num_classes):
        lo, hi = crow_host[start], crow_host[stop]
        logits = (features[start:stop].to(dtype) @ weight_compute.T) * scale
        chunk_loss, lse[start:stop] = _chunk_forward(logits, rows[lo:hi] - start, col[lo:hi], values[lo:hi],
                                                     class_segment, num_segments)
        total = total + chunk_loss
    return (total / num_rows).to(features.dtype), lse, target_mass


def segmented_cross_entropy_backward_reference(grad_loss: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                                               crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                                               class_offsets: torch.Tensor, lse: torch.Tensor,
                                               target_mass: torch.Tensor, scale: float, need_features: bool,
                                               need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the loss with respect to ``features`` and ``weight``, in bounded row chunks.

    ``lse`` and ``target_mass`` are the forward's; ``grad_loss`` [] is the loss's incoming
    gradient. Returns ``(grad_features [B, D] or None, grad_weight [C, D] or None)`` in the
    inputs' dtypes (``None`` where not needed).
    """
    num_rows, num_classes = features.shape[0], weight.shape[0]
    dtype = lse.dtype
    class_segment = _class_segment(class_offsets, num_classes)
    values = values.to(dtype)
    rows = _entry_rows(crow, col.shape[0])
    features_compute, weight_compute = features.to(dtype), weight.to(dtype)
    grad_features = torch.zeros_like(features_compute) if need_features else None
    grad_weight = torch.zeros_like(weight_compute) if need_weight else None
    coefficient = grad_loss.to(dtype) * scale / num_rows
    crow_host = crow.tolist()
    for start, stop in row_chunks(num_rows, num_classes):
        lo, hi = crow_host[start], crow_host[stop]
        logits = (features_compute[start:stop] @ weight_compute.T) * scale
        # p_bj T_b,seg(j) - t_bj; empty segments own no class, so their lse (-inf) is never read.
        grad_logits = (logits - lse[start:stop].index_select(1, class_segment)).exp_().mul_(
            target_mass[start:stop].index_select(1, class_segment))
        grad_logits.index_put_((rows[lo:hi] - start, col[lo:hi]), -values[lo:hi], accumulate=True)
        grad_logits.mul_(coefficient)
        if need_features:
            grad_features[start:stop] = grad_logits @ weight_compute
        if need_weight:
            grad_weight.addmm_(grad_logits.T, features_compute[start:stop])
    return (grad_features.to(features.dtype) if need_features else None,
            grad_weight.to(weight.dtype) if need_weight else None)


segmented_cross_entropy_reference = LossKernels(segmented_cross_entropy_forward_reference,
                                                segmented_cross_entropy_backward_reference)
