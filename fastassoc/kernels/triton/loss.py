"""Triton segmented soft cross-entropy: ``segmented_cross_entropy_triton``.

Must equal ``fastassoc.kernels.reference.loss.segmented_cross_entropy_reference``:

    z_bj = scale * f_b . w_j
    L    = (1/B) sum_b sum_j t_bj (lse_{seg(j)}(z_b) - z_bj)

The forward and backward below are the two halves of the ``fastassoc::segmented_cross_entropy_*``
custom ops (``fastassoc.ops.loss``, which owns autograd and validation); the forward returns
the loss with ``lse`` and the target mass ``T`` [B, S], which the backward takes back.

Forward (three kernels, never a ``B x C`` logits matrix)
--------------------------------------------------------
1. ``_target_mass_kernel``, one program per row: the row's target mass per segment,
   ``T_bs = sum_{j in s} t_bj``, summed in CSR order (deterministic).
2. ``_segment_lse_kernel``, one program per (segment, row block, class chunk): logits
   tiles ``BLOCK_B x BLOCK_C`` with ``tl.dot`` (float32 accumulation, ``BLOCK_D`` slices
   of the feature dimension), consumed at once by an online logsumexp (running max and
   rescaled sum, as in flash attention). Chunks never straddle a segment. A program whose
   rows all have zero target mass in its segment skips the work: with camera-sorted
   batches (UTAL/UGA style targets, one camera per row) this saves ``(S-1)/S`` of the
   FLOPs. It writes per-chunk partial (max, sum) pairs ``[B, S, K]``.
3. ``_row_loss_kernel``, one program per row: merges the row's partials into
   ``lse [B, S]`` (kept for the backward) and, for each CSR entry ``t_bj`` of the row,
   ``t_bj * (lse_{seg(j)} - z_bj)`` with ``z_bj`` recomputed as one dot product (the
   targets are sparse, so this is ``nnz * D`` work), summed in CSR order. The loss is
   the float32 (float64 for float64 inputs) sum of the row losses over ``B``.

Backward
--------
``dL/dz_bj = (p_bj T_{b,seg(j)} - t_bj) / B`` with ``p`` the per-segment softmax.
``_logit_grad_kernel`` recomputes logits tiles with ``tl.dot`` and writes the dense part
``p_bj T_{b,seg(j)}`` of one bounded chunk (at most ``_backend.tile_elements()`` entries)
of ``dz``; the sparse part ``-t_bj`` is subtracted at the chunk's CSR entries; then
``dfeatures += dz @ W_chunk`` and ``dweight[chunk] += dz^T @ F`` run as two GEMMs (cuBLAS on
GPU), scaled by ``grad * scale / B`` at the end. Why not accumulate the GEMMs in the
Triton kernel: with re-id feature sizes (``D = 2048``) a ``[BLOCK, D]`` float32
accumulator does not fit in registers, so a fused backward would recompute the logits
once per ``D`` slice or round-trip partial sums through memory; one bounded ``dz`` chunk
plus two library GEMMs costs one logits recompute and no atomics. Everything is
deterministic: no atomics, CSR-order sums, GEMMs without split-K races (the sparse
correction is an ``index_put_(accumulate=True)``, sort-based and deterministic on CUDA).

Host syncs: none in the forward with up to ``_SYNC_FREE_SEGMENTS`` segments (cameras);
beyond that the largest segment size is read once. None in the backward unless the
rows need several chunks (more than ``tile_elements()`` rows).

Precision and limits
--------------------
float32 accumulation (float64 inputs stay float64). float32 inputs use exact fp32 dots
(``input_precision="ieee"``) unless ``torch.get_float32_matmul_precision()`` allows
TF32 (``"high"``/``"medium"``), the same switch that governs torch's own matmuls.
bfloat16/float16 inputs: dots in the input precision with float32 accumulation;
``dz`` is stored in the input dtype for the two GEMMs (as torch autograd does), so
gradients carry one input-precision rounding per term. Tie-breaking does not apply
(no selection). Columns of a CSR row may be unsorted and may repeat (entries add up).
Grid limits: at most ``65535 * BLOCK_B`` rows (over a million); chunks grow past the
65535 grid limit on their own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _backend
from ..reference.loss import LossKernels
from ._common import launch

# Classes per (segment, row block) program in the forward; ``None`` picks a size that
# gives enough programs to fill the GPU. Tests lower it to exercise the chunk merge.
CLASS_CHUNK: int | None = None

# Up to this many segments the forward never reads class_offsets on the host.
_SYNC_FREE_SEGMENTS = 32

_INTERPRET_BLOCKS = dict(BLOCK_B=16, BLOCK_C=16, BLOCK_D=16)


def _gpu_configs():
    # Eight configs keep the first-call autotuning short; warps follow the tile size.
    configs = []
    for block_b, block_c, warps in ((64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8)):
        for block_d, stages in ((32, 4), (64, 3)):
            configs.append(triton.Config(dict(BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=block_d),
                                         num_warps=warps, num_stages=stages))
    return configs


@triton.jit
def _target_mass_kernel(
    # pointers
    crow_ptr, target_ptr, entry_segment_ptr, mass_ptr,
    # sizes
    num_segments,
    # meta-parameters
    ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    entry_start = tl.load(crow_ptr + row)
    entry_stop = tl.load(crow_ptr + row + 1)
    offs_s = tl.arange(0, BLOCK_S)
    # Segments in register-sized blocks: each entry adds to the lane of its segment,
    # in CSR order, so the sums are deterministic without atomics.
    for segment_start in range(0, num_segments, BLOCK_S):
        mass = tl.zeros([BLOCK_S], dtype=ACC_DTYPE)
        for entry in range(entry_start, entry_stop):
            segment = tl.load(entry_segment_ptr + entry)
            target = tl.load(target_ptr + entry).to(ACC_DTYPE)
            mass += tl.where(offs_s + segment_start == segment, target, 0.0)
        tl.store(mass_ptr + row * num_segments + segment_start + offs_s, mass,
                 mask=segment_start + offs_s < num_segments)


@triton.jit
def _segment_lse_kernel(
    # pointers
    features_ptr, weight_ptr, class_offsets_ptr, mass_ptr, scale_ptr, partial_max_ptr, partial_sum_ptr,
    # sizes
    num_rows, dim, num_segments, num_chunks, chunk_size,
    # strides
    stride_features, stride_weight,
    # meta-parameters
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    segment = tl.program_id(0)
    pid_b = tl.program_id(1)
    chunk = tl.program_id(2)
    segment_start = tl.load(class_offsets_ptr + segment)
    segment_stop = tl.load(class_offsets_ptr + segment + 1)
    class_start = segment_start + chunk * chunk_size
    class_stop = tl.minimum(segment_stop, class_start + chunk_size)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < num_rows
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(ACC_DTYPE)
    mass = tl.load(mass_ptr + offs_b.to(tl.int64) * num_segments + segment, mask=mask_b, other=0.0)

    running_max = tl.full([BLOCK_B], float("-inf"), dtype=ACC_DTYPE)
    running_sum = tl.zeros([BLOCK_B], dtype=ACC_DTYPE)
    if tl.max(mass, axis=0) > 0:
        feature_rows = features_ptr + offs_b[:, None].to(tl.int64) * stride_features
        for tile_start in range(class_start, class_stop, BLOCK_C):
            cols = tile_start + offs_c
            mask_c = cols < class_stop
            weight_rows = weight_ptr + cols[None, :].to(tl.int64) * stride_weight
            logits = tl.zeros([BLOCK_B, BLOCK_C], dtype=ACC_DTYPE)
            for d_start in range(0, dim, BLOCK_D):
                mask_d = d_start + offs_d < dim
                f = tl.load(feature_rows + d_start + offs_d[None, :], mask=mask_b[:, None] & mask_d[None, :],
                            other=0.0)
                w = tl.load(weight_rows + d_start + offs_d[:, None], mask=mask_c[None, :] & mask_d[:, None],
                            other=0.0)
                if UPCAST_DOT:
                    f = f.to(tl.float32)
                    w = w.to(tl.float32)
                logits = tl.dot(f, w, logits, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            logits = tl.where(mask_c[None, :], logits * scale, float("-inf"))
            # Every tile holds at least one valid class, so new_max is finite.
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            running_sum = running_sum * tl.exp(running_max - new_max) + \
                tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            running_max = new_max

    partial_offs = (offs_b.to(tl.int64) * num_segments + segment) * num_chunks + chunk
    tl.store(partial_max_ptr + partial_offs, running_max, mask=mask_b)
    tl.store(partial_sum_ptr + partial_offs, running_sum, mask=mask_b)


@triton.jit
def _merged_lse(partial_max_ptr, partial_sum_ptr, base, num_chunks,
                ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Logsumexp of one (row, segment) from its chunks' (max, sum) pairs; -inf if all skipped."""
    offs_k = tl.arange(0, BLOCK_K)
    lane_max = tl.full([BLOCK_K], float("-inf"), dtype=ACC_DTYPE)
    lane_sum = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    for chunk_start in range(0, num_chunks, BLOCK_K):
        mask_k = chunk_start + offs_k < num_chunks
        chunk_max = tl.load(partial_max_ptr + base + chunk_start + offs_k, mask=mask_k, other=float("-inf"))
        chunk_sum = tl.load(partial_sum_ptr + base + chunk_start + offs_k, mask=mask_k, other=0.0)
        new_max = tl.maximum(lane_max, chunk_max)
        # A finite shift keeps exp(-inf - shift) = 0 and never forms -inf - (-inf).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - shift) + chunk_sum * tl.exp(chunk_max - shift)
        lane_max = new_max
    top = tl.max(lane_max, axis=0)
    skipped = top == float("-inf")
    shift = tl.where(skipped, 0.0, top)
    total = tl.sum(lane_sum * tl.exp(lane_max - shift), axis=0)
    # A computed segment's total is >= 1 (its maximum contributes exp(0)).
    return tl.where(skipped, float("-inf"), shift + tl.log(tl.where(skipped, 1.0, total)))


@triton.jit
def _row_loss_kernel(
    # pointers
    features_ptr, weight_ptr, crow_ptr, col_ptr, target_ptr, entry_segment_ptr, partial_max_ptr, partial_sum_ptr,
    scale_ptr, lse_ptr, row_loss_ptr,
    # sizes
    dim, num_segments, num_chunks,
    # strides
    stride_features, stride_weight,
    # meta-parameters
    ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Merges the forward's chunk partials into lse[row, :] (kept for the backward), and
    # sums t_bj * (lse_seg(j) - z_bj) over the row's entries in CSR order. Entries
    # merge their segment's partials again instead of reading lse back: a program's
    # own global stores are not guaranteed visible to its other threads.
    row = tl.program_id(0).to(tl.int64)
    for each_segment in range(0, num_segments):
        segment_lse = _merged_lse(partial_max_ptr, partial_sum_ptr, (row * num_segments + each_segment) * num_chunks,
                                  num_chunks, ACC_DTYPE, BLOCK_K)
        tl.store(lse_ptr + row * num_segments + each_segment + tl.arange(0, 1),
                 tl.zeros([1], dtype=ACC_DTYPE) + segment_lse)

    entry_start = tl.load(crow_ptr + row)
    entry_stop = tl.load(crow_ptr + row + 1)
    scale = tl.load(scale_ptr).to(ACC_DTYPE)
    offs_d = tl.arange(0, BLOCK_D)
    total = tl.zeros([1], dtype=ACC_DTYPE)
    for entry in range(entry_start, entry_stop):
        col = tl.load(col_ptr + entry)
        target = tl.load(target_ptr + entry).to(ACC_DTYPE)
        segment = tl.load(entry_segment_ptr + entry)
        products = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
        for d_start in range(0, dim, BLOCK_D):
            mask_d = d_start + offs_d < dim
            f = tl.load(features_ptr + row * stride_features + d_start + offs_d, mask=mask_d, other=0.0)
            w = tl.load(weight_ptr + col * stride_weight + d_start + offs_d, mask=mask_d, other=0.0)
            products += f.to(ACC_DTYPE) * w.to(ACC_DTYPE)
        logit = scale * tl.sum(products, axis=0)
        lse = _merged_lse(partial_max_ptr, partial_sum_ptr, (row * num_segments + segment) * num_chunks,
                          num_chunks, ACC_DTYPE, BLOCK_K)
        # A zero target may sit in a segment whose lse was skipped (-inf): contributes 0.
        total += tl.where(target > 0, target * (lse - logit), 0.0)
    tl.store(row_loss_ptr + row + tl.arange(0, 1), total)


@triton.jit
def _bfloat16_rne(x):
    """float32 -> bfloat16 rounding to nearest even (the CPU interpreter truncates)."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _logit_grad_kernel(
    # pointers
    features_ptr, weight_ptr, class_segment_ptr, lse_ptr, mass_ptr, scale_ptr, grad_ptr,
    # sizes
    row_start, num_rows, class_start, num_classes, dim, num_segments,
    # strides
    stride_features, stride_weight, stride_grad,
    # meta-parameters
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BF16_RNE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Dense part p_bj * T_{b,seg(j)} of dL/dz for rows [row_start, +num_rows) and
    # classes [class_start, +num_classes), written to a chunk-local grad buffer.
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    local_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    local_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_b = local_b < num_rows
    mask_c = local_c < num_classes
    mask_bc = mask_b[:, None] & mask_c[None, :]
    rows = (row_start + local_b).to(tl.int64)
    cols = (class_start + local_c).to(tl.int64)
    segment = tl.load(class_segment_ptr + cols, mask=mask_c, other=0)
    stat_offs = rows[:, None] * num_segments + segment[None, :]
    mass = tl.load(mass_ptr + stat_offs, mask=mask_bc, other=0.0)

    grad = tl.zeros([BLOCK_B, BLOCK_C], dtype=ACC_DTYPE)
    if tl.max(tl.max(mass, axis=1), axis=0) > 0:
        lse = tl.load(lse_ptr + stat_offs, mask=mask_bc, other=0.0)
        scale = tl.load(scale_ptr).to(ACC_DTYPE)
        offs_d = tl.arange(0, BLOCK_D)
        logits = tl.zeros([BLOCK_B, BLOCK_C], dtype=ACC_DTYPE)
        for d_start in range(0, dim, BLOCK_D):
            mask_d = d_start + offs_d < dim
            f = tl.load(features_ptr + rows[:, None] * stride_features + d_start + offs_d[None, :],
                        mask=mask_b[:, None] & mask_d[None, :], other=0.0)
            w = tl.load(weight_ptr + cols[None, :] * stride_weight + d_start + offs_d[:, None],
                        mask=mask_c[None, :] & mask_d[:, None], other=0.0)
            if UPCAST_DOT:
                f = f.to(tl.float32)
                w = w.to(tl.float32)
            logits = tl.dot(f, w, logits, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        # Zero-mass segments may have lse = -inf (skipped); they contribute nothing.
        grad = tl.where(mass > 0, tl.exp(logits * scale - lse) * mass, 0.0)

    grad_ptrs = grad_ptr + local_b[:, None].to(tl.int64) * stride_grad + local_c[None, :]
    if BF16_RNE:
        tl.store(grad_ptrs, _bfloat16_rne(grad), mask=mask_bc)
    else:
        tl.store(grad_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=mask_bc)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _launch_config(kernel, tuned):
    """Interpreted runs use one small fixed config; GPU runs autotune."""
    if _backend.triton_interpret():
        return kernel, dict(_INTERPRET_BLOCKS)
    return tuned, {}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _TargetLayout:
    """The CSR targets flattened for the kernels (int64 indices, compute-dtype values)."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, class_offsets: torch.Tensor,
                 acc_dtype: torch.dtype):
        self.crow = crow.to(torch.int64).contiguous()
        self.cols = col.to(torch.int64).contiguous()
        self.values = values.to(acc_dtype).contiguous()
        # searchsorted(right) - 1 maps a class to the last segment starting at or before
        # it, which skips empty segments (equal offsets) correctly.
        self.segments = (torch.searchsorted(class_offsets, self.cols, right=True) - 1).contiguous()


def _target_mass(layout: _TargetLayout, num_rows: int, num_segments: int, acc_dtype: torch.dtype) -> torch.Tensor:
    mass = torch.empty((num_rows, num_segments), dtype=acc_dtype, device=layout.crow.device)
    block_s = min(triton.next_power_of_2(max(num_segments, 1)), 128)
    launch(_target_mass_kernel, (num_rows,), layout.crow, layout.values, layout.segments, mass, num_segments,
           device=mass.device, op="segmented_cross_entropy", ACC_DTYPE=_tl_dtype(acc_dtype), BLOCK_S=block_s)
    return mass


def _chunk_plan(class_offsets: torch.Tensor, num_rows: int, num_classes: int) -> tuple[int, int]:
    """(classes per program, chunk slots per segment) for the forward grid.

    With few segments (cameras) the plan avoids reading ``class_offsets`` on the host
    (a GPU sync that would stall the launch queue): every segment gets slots for up
    to ``C`` classes and slots past a segment's end only store (-inf, 0). With many
    segments that over-provisioning would cost memory, so the largest segment is read.
    """
    num_segments = class_offsets.shape[0] - 1
    if num_segments <= _SYNC_FREE_SEGMENTS:
        typical = bound = num_classes
        if num_segments > 1:
            typical = triton.cdiv(num_classes, num_segments)
    else:
        offsets_host = class_offsets.tolist()
        typical = bound = max(b - a for a, b in zip(offsets_host[:-1], offsets_host[1:]))
    bound = max(bound, 1)
    if CLASS_CHUNK is not None:
        size = max(1, int(CLASS_CHUNK))
    elif _backend.triton_interpret() or class_offsets.device.type != "cuda":
        size = bound
    else:
        # Aim at ~4 working programs per SM with 64-row blocks; multiples of 128 classes.
        programs_wanted = 4 * torch.cuda.get_device_properties(class_offsets.device).multi_processor_count
        chunks_wanted = max(1, triton.cdiv(programs_wanted, triton.cdiv(num_rows, 64) * num_segments))
        size = max(128, triton.cdiv(triton.cdiv(max(typical, 1), chunks_wanted), 128) * 128)
    # The chunk index is grid axis 2, limited to 65535.
    size = max(size, triton.cdiv(bound, 65535))
    return size, triton.cdiv(bound, size)


def _segment_lse(features, weight, class_offsets, mass, scale_tensor, acc_dtype):
    """Chunk partials (max, sum of exp) [B, S, K] of the per-segment logsumexp."""
    num_rows, dim = features.shape
    num_segments = class_offsets.shape[0] - 1
    chunk_size, num_chunks = _chunk_plan(class_offsets, num_rows, weight.shape[0])
    partial_max = torch.empty((num_rows, num_segments, num_chunks), dtype=acc_dtype, device=features.device)
    partial_sum = torch.empty_like(partial_max)
    kernel, blocks = _launch_config(_segment_lse_kernel, _segment_lse_tuned)
    grid = lambda meta: (num_segments, triton.cdiv(num_rows, meta["BLOCK_B"]), num_chunks)  # noqa: E731
    launch(kernel, grid, features, weight, class_offsets, mass, scale_tensor, partial_max, partial_sum,
                 num_rows, dim, num_segments, num_chunks, chunk_size,
                 features.stride(0), weight.stride(0), device=features.device, op="segmented_cross_entropy",
                 ACC_DTYPE=_tl_dtype(acc_dtype), DOT_PRECISION=_dot_precision(features.dtype),
                 UPCAST_DOT=features.dtype == torch.bfloat16 and _backend.triton_interpret(), **blocks)
    return partial_max, partial_sum


def segmented_cross_entropy_forward_triton(features: torch.Tensor, weight: torch.Tensor, crow: torch.Tensor,
                                           col: torch.Tensor, values: torch.Tensor, class_offsets: torch.Tensor,
                                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, per-(row, segment) logsumexp and target mass (see the module docstring).

    Parameters and results as ``segmented_cross_entropy_forward_reference``; ``lse`` is
    ``-inf`` where a (row, segment) has no target mass (skipped), which the backward ignores.
    """
    features, weight = features.contiguous(), weight.contiguous()
    class_offsets = class_offsets.to(torch.int64).contiguous()
    num_rows, dim = features.shape
    num_segments = class_offsets.shape[0] - 1
    acc_dtype = _acc_dtype(features.dtype)
    layout = _TargetLayout(crow, col, values, class_offsets, acc_dtype)
    # Through memory so float64 inputs keep a float64 scale (Triton passes floats as fp32);
    # torch.full fills on the device, without a host-to-device copy.
    scale_tensor = torch.full((1,), scale, dtype=acc_dtype, device=features.device)

    mass = _target_mass(layout, num_rows, num_segments, acc_dtype)
    partial_max, partial_sum = _segment_lse(features, weight, class_offsets, mass, scale_tensor, acc_dtype)
    num_chunks = partial_max.shape[2]
    lse = torch.empty((num_rows, num_segments), dtype=acc_dtype, device=features.device)
    row_loss = torch.empty(num_rows, dtype=acc_dtype, device=features.device)
    launch(_row_loss_kernel, (num_rows,),
        features, weight, layout.crow, layout.cols, layout.values, layout.segments, partial_max, partial_sum,
        scale_tensor, lse, row_loss,
        dim, num_segments, num_chunks,
        features.stride(0), weight.stride(0), device=features.device, op="segmented_cross_entropy",
        ACC_DTYPE=_tl_dtype(acc_dtype), BLOCK_D=min(triton.next_power_of_2(max(dim, 1)), 1024),
        BLOCK_K=min(triton.next_power_of_2(num_chunks), 128))

    return (row_loss.sum() / num_rows).to(features.dtype), lse, mass


def segmented_cross_entropy_backward_triton(grad_loss: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                                            crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                                            class_offsets: torch.Tensor, lse: torch.Tensor, mass: torch.Tensor,
                                            scale: float, need_features: bool, need_weight: bool
                                            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients with respect to ``features`` and ``weight`` (``None`` where not needed).

    ``lse`` and ``mass`` (the target mass) are :func:`segmented_cross_entropy_forward_triton`'s;
    ``grad_loss`` [] is the loss's incoming gradient.
    """
    features, weight = features.contiguous(), weight.contiguous()
    class_offsets = class_offsets.to(torch.int64).contiguous()
    lse, mass = lse.contiguous(), mass.contiguous()
    num_rows, dim = features.shape
    num_classes = weight.shape[0]
    num_segments = class_offsets.shape[0] - 1
    acc_dtype = lse.dtype
    device = features.device
    crow = crow.to(torch.int64).contiguous()
    cols = col.to(torch.int64).contiguous()
    values = values.to(acc_dtype).contiguous()
    scale_tensor = torch.full((1,), scale, dtype=acc_dtype, device=device)
    class_segment = (torch.searchsorted(class_offsets, torch.arange(num_classes, device=device), right=True)
                     - 1).contiguous()
    entry_rows = torch.repeat_interleave(torch.arange(num_rows, device=device), crow[1:] - crow[:-1],
                                         output_size=cols.shape[0])

    # The dz chunk is the only B x C-shaped buffer: at most tile_elements() entries.
    tile = _backend.tile_elements()
    rows_per_chunk = max(1, min(num_rows, tile))
    # Class tiles are grid axis 1 (at most 65535 of them, BLOCK_C >= 16).
    cols_per_chunk = max(1, min(num_classes, tile // rows_per_chunk, 65535 * 16))
    row_chunks = range(0, num_rows, rows_per_chunk)
    grad_features = torch.zeros((num_rows, dim), dtype=acc_dtype, device=device) if need_features else None
    several_row_chunks = len(row_chunks) > 1
    grad_weight = None
    if need_weight:
        grad_weight = (torch.zeros((num_classes, dim), dtype=acc_dtype, device=device) if several_row_chunks
                       else torch.empty((num_classes, dim), dtype=features.dtype, device=device))
    gemm_dtype = features.dtype
    kernel, blocks = _launch_config(_logit_grad_kernel, _logit_grad_tuned)
    # Entry ranges of row chunks; one chunk (the usual case) needs no host sync.
    crow_host = crow.tolist() if several_row_chunks else [0] * num_rows + [cols.shape[0]]

    for row_start in row_chunks:
        row_stop = min(row_start + rows_per_chunk, num_rows)
        lo, hi = crow_host[row_start], crow_host[row_stop]
        chunk_entry_rows, chunk_entry_cols, chunk_values = entry_rows[lo:hi], cols[lo:hi], values[lo:hi]
        for class_start in range(0, num_classes, cols_per_chunk):
            class_stop = min(class_start + cols_per_chunk, num_classes)
            rows_here, cols_here = row_stop - row_start, class_stop - class_start
            grad_logits = torch.empty((rows_here, cols_here), dtype=gemm_dtype, device=device)
            grid = lambda meta: (triton.cdiv(rows_here, meta["BLOCK_B"]),  # noqa: E731
                                 triton.cdiv(cols_here, meta["BLOCK_C"]))
            launch(kernel, grid, features, weight, class_segment, lse, mass, scale_tensor, grad_logits,
                         row_start, rows_here, class_start, cols_here, dim, num_segments,
                         features.stride(0), weight.stride(0), grad_logits.stride(0),
                         device=features.device, op="segmented_cross_entropy",
                         ACC_DTYPE=_tl_dtype(acc_dtype), DOT_PRECISION=_dot_precision(features.dtype),
                         UPCAST_DOT=features.dtype == torch.bfloat16 and _backend.triton_interpret(),
                         BF16_RNE=features.dtype == torch.bfloat16 and _backend.triton_interpret(),
                         **blocks)
            # Sparse part: -t_bj at the chunk's entries (accumulate: repeated entries add up).
            # Entries of other class chunks add an exact 0 at a clamped position instead of
            # being filtered out, which would need a host sync.
            inside = (chunk_entry_cols >= class_start) & (chunk_entry_cols < class_stop)
            local_cols = (chunk_entry_cols - class_start).clamp_(0, cols_here - 1)
            corrections = torch.where(inside, -chunk_values, torch.zeros_like(chunk_values)).to(gemm_dtype)
            grad_logits.index_put_((chunk_entry_rows - row_start, local_cols), corrections, accumulate=True)
            if need_features:
                grad_features[row_start:row_stop] += grad_logits @ weight[class_start:class_stop]
            if need_weight:
                part = grad_logits.T @ features[row_start:row_stop]
                if several_row_chunks:
                    grad_weight[class_start:class_stop] += part
                else:
                    grad_weight[class_start:class_stop] = part

    coefficient = grad_loss.to(acc_dtype) * scale_tensor[0] / num_rows
    if need_features:
        grad_features = grad_features.mul_(coefficient).to(features.dtype)
    if need_weight:
        # In place: no second [C, D] buffer (the op's peak memory is the point).
        grad_weight = grad_weight.mul_(coefficient).to(weight.dtype)
    return grad_features, grad_weight


_segment_lse_tuned = triton.autotune(configs=_gpu_configs(), key=["dim", "num_segments", "chunk_size"])(
    _segment_lse_kernel)
_logit_grad_tuned = triton.autotune(configs=_gpu_configs(), key=["num_rows", "num_classes", "dim"])(
    _logit_grad_kernel)


segmented_cross_entropy_triton = LossKernels(segmented_cross_entropy_forward_triton,
                                             segmented_cross_entropy_backward_triton)
