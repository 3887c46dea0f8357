"""Reference segmented soft cross-entropy: the spec and oracle of ``segmented_cross_entropy``.

Algorithm
---------
For rows ``b`` of ``features`` [B, D], classes ``j`` of ``weight`` [C, D] split into
segments by ``class_offsets`` [S+1], and non-negative sparse targets ``t`` [B, C] (CSR):

    z_bj = scale * f_b . w_j
    L    = (1/B) sum_b sum_j t_bj * (logsumexp_{j' in seg(j)} z_bj' - z_bj)

Rows are processed in chunks of at most ``_backend.tile_elements()`` logits
(``_tiles.row_chunks(B, C)``; a chunk always holds at least one row, so a tile is at
most ``max(tile_elements(), C)`` elements). Each chunk's loss is wrapped in
``torch.utils.checkpoint`` so its ``b x C`` logits are freed after the forward and
recomputed one chunk at a time during backward: peak memory is a few tiles, never
the full ``B x C`` matrix. Gradients come from plain autograd.

Per-segment logsumexp is vectorised over segments: the (detached) per-row segment
maximum is subtracted before ``exp`` for stability, and ``log(sum exp) - shifted logit``
is taken on the target entries only, so empty segments (never indexed by a target)
never produce ``log 0``. Duplicate CSR entries add up.

Limits: arithmetic in float32 (float64 inputs stay float64); the loss is returned as
a 0-dim tensor in ``features``' dtype. ``B = 0`` gives 0 with a gradient path to both
inputs (zero gradients).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ._tiles import compute_dtype, row_chunks


def _chunk_loss(features_chunk: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                target_values: torch.Tensor, class_segment: torch.Tensor, num_segments: int,
                scale: float) -> torch.Tensor:
    """Unnormalised loss of one row chunk: sum over its target entries (compute dtype, 0-dim).

    ``rows`` are chunk-local row indices of the target entries, ``cols`` their classes.
    """
    logits = (features_chunk.to(weight.dtype) @ weight.T) * scale                  # [b, C]
    num_rows = logits.shape[0]
    with torch.no_grad():
        # The shift cancels in log(sum exp(z - m)) - (z - m); detaching it keeps
        # the gradient exact and avoids amax's tie-splitting backward.
        segment_max = logits.new_zeros((num_rows, num_segments)).scatter_reduce_(
            1, class_segment.expand(num_rows, -1), logits, reduce="amax", include_self=False)
    shifted = logits - segment_max.index_select(1, class_segment)
    sum_exp = logits.new_zeros((num_rows, num_segments)).index_add_(1, class_segment, shifted.exp())
    # Every gathered segment contains its own maximum, so sum_exp >= 1 there.
    log_partition = sum_exp[rows, class_segment[cols]].log()
    return (target_values * (log_partition - shifted[rows, cols])).sum()


def segmented_cross_entropy_reference(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                      class_offsets: torch.Tensor, scale: float) -> torch.Tensor:
    """Soft cross-entropy with one softmax per class segment, in bounded row chunks.

    Parameters
    ----------
    features : Tensor [B, D], float; differentiable
    weight : Tensor [C, D], same dtype and device; differentiable
    targets : Tensor [B, C], sparse CSR, non-negative values (not differentiated)
    class_offsets : Tensor [S+1], int64, 0 = offsets[0] <= ... <= offsets[S] = C
    scale : float

    Returns
    -------
    Tensor [], in ``features``' dtype.
    """
    num_rows, num_classes = features.shape[0], weight.shape[0]
    dtype = compute_dtype(features)
    device = features.device
    if num_rows == 0:
        # Keeps loss.backward() valid (zero gradients) for an empty batch.
        return (features.sum() + weight.sum()) * 0

    num_segments = class_offsets.shape[0] - 1
    segment_sizes = class_offsets[1:] - class_offsets[:-1]
    class_segment = torch.repeat_interleave(
        torch.arange(num_segments, device=device), segment_sizes, output_size=num_classes)

    crow = targets.crow_indices().to(torch.int64)
    cols_all = targets.col_indices().to(torch.int64)
    values_all = targets.values().detach().to(dtype)
    entries_per_row = crow[1:] - crow[:-1]
    rows_all = torch.repeat_interleave(
        torch.arange(num_rows, device=device), entries_per_row, output_size=cols_all.shape[0])
    crow_host = crow.tolist()

    weight_compute = weight.to(dtype)
    use_checkpoint = torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad)
    total = None
    for start, stop in row_chunks(num_rows, num_classes):
        lo, hi = crow_host[start], crow_host[stop]
        args = (features[start:stop], weight_compute, rows_all[lo:hi] - start, cols_all[lo:hi],
                values_all[lo:hi], class_segment, num_segments, scale)
        if use_checkpoint:
            chunk = checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            chunk = _chunk_loss(*args)
        total = chunk if total is None else total + chunk
    return (total / num_rows).to(features.dtype)
