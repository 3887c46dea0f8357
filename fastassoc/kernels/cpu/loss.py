"""Compiled CPU launcher of ``segmented_cross_entropy`` (csrc/cpu/loss.cpp).

Algorithm: the forward and backward of the ``fastassoc::segmented_cross_entropy_*``
custom ops (``fastassoc.ops.loss``). Forward walks ``[rows x classes]`` tiles of at
most ``tile_elements()`` logits (whole class rows when they fit); torch's GEMM fills a
reused buffer with ``f_b . w_j`` and a C++/OpenMP pass scales it to logits, merges it
into a per-(row, segment) online logsumexp and reads the target logits through the CSR
targets. Only the per-(row, segment) logsumexp and target mass ``[B, S]`` go to the
backward (as outputs of the forward op; handing it a logits tile would make the tile an
op output too, so even a single tile covering the batch is recomputed). Backward
recomputes each tile with the same GEMM; a C++ pass turns it into ``scale * dL/dz`` in
place, and two GEMMs accumulate ``grad_f += G W`` and ``grad_w += G^T F``. Logits beyond one
bounded tile never exist.

Must equal :func:`fastassoc.kernels.reference.loss.segmented_cross_entropy_reference`
within float32 rounding (float64 inputs are computed in float64; float16/bfloat16 in
float32 on float32 copies of the operands, gradients cast back).
"""
from __future__ import annotations

import torch

from ..reference.loss import LossKernels
from ._core import DotTiles, compute_dtype, core, ptr, tiles


def _kernels(dtype: torch.dtype):
    suffix = "f64" if dtype == torch.float64 else "f32"
    module = core()
    return (getattr(module, f"sce_forward_tile_{suffix}"), getattr(module, f"sce_finish_{suffix}"),
            getattr(module, f"sce_backward_tile_{suffix}"))


def segmented_cross_entropy_forward_cpu(features: torch.Tensor, weight: torch.Tensor, crow: torch.Tensor,
                                        col: torch.Tensor, values: torch.Tensor, class_offsets: torch.Tensor,
                                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, per-(row, segment) logsumexp and target mass; see the module docstring.

    Parameters
    ----------
    features : Tensor [B, D], float, CPU
    weight : Tensor [C, D], same dtype
    crow : Tensor [B+1], int64; col : Tensor [nnz], int64; values : Tensor [nnz], float, >= 0
        The CSR targets, already validated (the C++ passes index through them unchecked).
    class_offsets : Tensor [S+1], int64, 0 = offsets[0] <= ... <= offsets[S] = C
    scale : float

    Returns
    -------
    (loss [] in ``features``' dtype, lse [B, S], target_mass [B, S]) in the compute dtype.
    """
    dtype = compute_dtype(features)
    f = features.to(dtype).contiguous()
    w = weight.to(dtype).contiguous()
    crow, col, values, class_offsets = _flat_targets(crow, col, values, class_offsets, dtype)
    num_rows, num_classes = f.shape[0], w.shape[0]
    num_segments = class_offsets.shape[0] - 1
    forward_tile, finish, _ = _kernels(dtype)
    segment_max = torch.full((num_rows, num_segments), float("-inf"), dtype=dtype)
    segment_sum = torch.zeros(num_rows, num_segments, dtype=torch.float64)
    target_logits = torch.zeros(num_rows, dtype=torch.float64)
    buffer = DotTiles.for_blocks([(num_rows, num_classes)], dtype)
    for r0, r1, c0, c1 in tiles(num_rows, num_classes):
        tile = buffer.mm(f[r0:r1], w[c0:c1])
        forward_tile(ptr(tile), r1 - r0, c1 - c0, r0, c0, scale, ptr(crow), ptr(col), ptr(values),
                     ptr(class_offsets), num_segments, ptr(segment_max), ptr(segment_sum), ptr(target_logits))
    lse = torch.empty(num_rows, num_segments, dtype=dtype)
    target_mass = torch.empty(num_rows, num_segments, dtype=dtype)
    total = finish(num_rows, ptr(crow), ptr(col), ptr(values), ptr(class_offsets), num_segments,
                   ptr(segment_max), ptr(segment_sum), ptr(target_logits), ptr(lse), ptr(target_mass))
    return torch.tensor(total / num_rows, dtype=features.dtype), lse, target_mass


def segmented_cross_entropy_backward_cpu(grad_loss: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                                         crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                                         class_offsets: torch.Tensor, lse: torch.Tensor, target_mass: torch.Tensor,
                                         scale: float, need_features: bool, need_weight: bool
                                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients with respect to ``features`` and ``weight`` (``None`` where not needed).

    ``lse`` and ``target_mass`` are :func:`segmented_cross_entropy_forward_cpu`'s;
    ``grad_loss`` [] is the loss's incoming gradient.
    """
    dtype = lse.dtype
    f = features.to(dtype).contiguous()
    w = weight.to(dtype).contiguous()
    crow, col, values, class_offsets = _flat_targets(crow, col, values, class_offsets, dtype)
    lse, target_mass = lse.contiguous(), target_mass.contiguous()
    num_rows, num_classes = f.shape[0], w.shape[0]
    num_segments = class_offsets.shape[0] - 1
    _, _, backward_tile = _kernels(dtype)
    factor = float(grad_loss) / num_rows
    tile_list = list(tiles(num_rows, num_classes))
    if len(tile_list) == 1:
        # One tile: plain GEMMs for both gradients, no accumulation.
        logits = torch.mm(f, w.T)
        backward_tile(ptr(logits), num_rows, num_classes, 0, 0, scale, ptr(crow), ptr(col), ptr(values),
                      ptr(class_offsets), num_segments, ptr(lse), ptr(target_mass), factor, False)
        grad_f = torch.mm(logits, w) if need_features else None
        grad_w = torch.mm(logits.T, f) if need_weight else None
    else:
        grad_f = torch.zeros_like(f) if need_features else None
        grad_w = torch.zeros_like(w) if need_weight else None
        buffer = DotTiles.for_blocks([(num_rows, num_classes)], dtype)
        for r0, r1, c0, c1 in tile_list:
            tile = buffer.mm(f[r0:r1], w[c0:c1])
            backward_tile(ptr(tile), r1 - r0, c1 - c0, r0, c0, scale, ptr(crow), ptr(col), ptr(values),
                          ptr(class_offsets), num_segments, ptr(lse), ptr(target_mass), factor, False)
            if need_features:
                grad_f[r0:r1].addmm_(tile, w[c0:c1])
            if need_weight:
                grad_w[c0:c1].addmm_(tile.T, f[r0:r1])
    return (grad_f.to(features.dtype) if need_features else None,
            grad_w.to(weight.dtype) if need_weight else None)


def _flat_targets(crow, col, values, class_offsets, dtype):
    """The index and value arrays exactly as the C++ reads them (int64 / compute dtype, contiguous)."""
    return (crow.to(torch.int64).contiguous(), col.to(torch.int64).contiguous(), values.to(dtype).contiguous(),
            class_offsets.to(torch.int64).contiguous())


segmented_cross_entropy_cpu = LossKernels(segmented_cross_entropy_forward_cpu, segmented_cross_entropy_backward_cpu)
