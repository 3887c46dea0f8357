"""Compiled CPU launcher of ``segmented_cross_entropy`` (csrc/cpu/loss.cpp).

Algorithm: a ``torch.autograd.Function``. Forward walks ``[rows x classes]`` tiles of at
most ``tile_elements()`` logits (whole class rows when they fit); torch's GEMM fills a
reused buffer with ``f_b . w_j`` and a C++/OpenMP pass scales it to logits, merges it
into a per-(row, segment) online logsumexp and reads the target logits through the CSR
targets. Only the per-(row, segment) logsumexp and target mass ``[B, S]`` are saved,
plus the logits themselves when a single tile covers the whole ``B x C`` (then they fit
the tile bound and keeping them saves backward a GEMM). Otherwise backward recomputes
each tile with the same GEMM; a C++ pass turns it into ``scale * dL/dz`` in place, and
two GEMMs accumulate ``grad_f += G W`` and ``grad_w += G^T F``. Logits beyond one
bounded tile never exist.

Must equal :func:`fastassoc.kernels.reference.loss.segmented_cross_entropy_reference`
within float32 rounding (float64 inputs are computed in float64; float16/bfloat16 in
float32 on float32 copies of the operands, gradients cast back).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._core import DotTiles, compute_dtype, core, ptr, tiles


def _kernels(dtype: torch.dtype):
    suffix = "f64" if dtype == torch.float64 else "f32"
    module = core()
    return (getattr(module, f"sce_forward_tile_{suffix}"), getattr(module, f"sce_finish_{suffix}"),
            getattr(module, f"sce_backward_tile_{suffix}"))


class _SegmentedCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, features, weight, crow, columns, values, class_offsets, scale):
        dtype = compute_dtype(features)
        f = features.detach().to(dtype).contiguous()
        w = weight.detach().to(dtype).contiguous()
        num_rows, num_classes = f.shape[0], w.shape[0]
        num_segments = class_offsets.shape[0] - 1
        forward_tile, finish, _ = _kernels(dtype)
        segment_max = torch.full((num_rows, num_segments), float("-inf"), dtype=dtype)
        segment_sum = torch.zeros(num_rows, num_segments, dtype=torch.float64)
        target_logits = torch.zeros(num_rows, dtype=torch.float64)
        tile_list = list(tiles(num_rows, num_classes))
        # One tile covering the batch fits the memory bound anyway: its logits (in a tensor
        # of their own, not the shared scratch buffer) are kept for backward instead of
        # recomputing the GEMM.
        single = len(tile_list) == 1
        buffer = None if single else DotTiles.for_blocks([(num_rows, num_classes)], dtype)
        for r0, r1, c0, c1 in tile_list:
            tile = torch.mm(f, w.T) if single else buffer.mm(f[r0:r1], w[c0:c1])
            forward_tile(ptr(tile), r1 - r0, c1 - c0, r0, c0, scale, ptr(crow), ptr(columns), ptr(values),
                         ptr(class_offsets), num_segments, ptr(segment_max), ptr(segment_sum), ptr(target_logits))
        ctx.logits = tile if single and any(ctx.needs_input_grad[:2]) else None
        lse = torch.empty(num_rows, num_segments, dtype=dtype)
        target_mass = torch.empty(num_rows, num_segments, dtype=dtype)
        total = finish(num_rows, ptr(crow), ptr(columns), ptr(values), ptr(class_offsets), num_segments,
                       ptr(segment_max), ptr(segment_sum), ptr(target_logits), ptr(lse), ptr(target_mass))
        ctx.save_for_backward(features, weight, crow, columns, values, class_offsets, lse, target_mass)
        ctx.scale = scale
        return torch.tensor(total / num_rows, dtype=features.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        features, weight, crow, columns, values, class_offsets, lse, target_mass = ctx.saved_tensors
        need_features, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_features or need_weight):
            return None, None, None, None, None, None, None
        dtype = lse.dtype
        f = features.detach().to(dtype).contiguous()
        w = weight.detach().to(dtype).contiguous()
        num_rows, num_classes = f.shape[0], w.shape[0]
        num_segments = class_offsets.shape[0] - 1
        _, _, backward_tile = _kernels(dtype)
        factor = float(grad_loss) / num_rows
        tile_list = list(tiles(num_rows, num_classes))
        if len(tile_list) == 1:
            # The forward's logits when still there (a second backward recomputes them:
            # the same GEMM, so the same bits), then plain GEMMs for both gradients.
            logits, ctx.logits = ctx.logits, None
            holds_logits = logits is not None
            if not holds_logits:
                logits = torch.mm(f, w.T)
            backward_tile(ptr(logits), num_rows, num_classes, 0, 0, ctx.scale, ptr(crow), ptr(columns), ptr(values),
                          ptr(class_offsets), num_segments, ptr(lse), ptr(target_mass), factor, holds_logits)
            grad_f = torch.mm(logits, w) if need_features else None
            grad_w = torch.mm(logits.T, f) if need_weight else None
        else:
            grad_f = torch.zeros_like(f) if need_features else None
            grad_w = torch.zeros_like(w) if need_weight else None
            buffer = DotTiles.for_blocks([(num_rows, num_classes)], dtype)
            for r0, r1, c0, c1 in tile_list:
                tile = buffer.mm(f[r0:r1], w[c0:c1])
                backward_tile(ptr(tile), r1 - r0, c1 - c0, r0, c0, ctx.scale, ptr(crow), ptr(columns), ptr(values),
                              ptr(class_offsets), num_segments, ptr(lse), ptr(target_mass), factor, False)
                if need_features:
                    grad_f[r0:r1].addmm_(tile, w[c0:c1])
                if need_weight:
                    grad_w[c0:c1].addmm_(tile.T, f[r0:r1])
        return (grad_f.to(features.dtype) if need_features else None,
                grad_w.to(weight.dtype) if need_weight else None, None, None, None, None, None)


def segmented_cross_entropy_cpu(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                class_offsets: torch.Tensor, scale: float) -> torch.Tensor:
    """Soft cross-entropy with one softmax per class segment; see the module docstring.

    Parameters
    ----------
    features : Tensor [B, D], float, CPU; differentiable
    weight : Tensor [C, D], same dtype; differentiable
    targets : Tensor [B, C], sparse CSR, non-negative values (not differentiated)
    class_offsets : Tensor [S+1], int64, 0 = offsets[0] <= ... <= offsets[S] = C
    scale : float

    Returns
    -------
    Tensor [], in ``features``' dtype.
    """
    if features.shape[0] == 0:
        # Keeps loss.backward() valid (zero gradients) for an empty batch, as the reference.
        return (features.sum() + weight.sum()) * 0
    dtype = compute_dtype(features)
    crow = targets.crow_indices().to(torch.int64).contiguous()
    columns = targets.col_indices().to(torch.int64).contiguous()
    values = targets.values().detach().to(dtype).contiguous()
    return _SegmentedCrossEntropy.apply(features, weight, crow, columns, values,
                                        class_offsets.to(torch.int64).contiguous(), float(scale))
