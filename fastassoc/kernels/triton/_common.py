"""Fused distance + per-row top-k: the Triton core of the distance-family ops.

Every distance-family op of the Triton backend (``topk_anchors``, ``mutual_knn``,
``cross_camera_graph``, ``knn_soft_labels``, ``agglomerative_merge``) is built on
:func:`fused_topk`; ``evaluate_ranking`` and the large-``k`` path use
:func:`distance_tiles`.

Algorithm of ``_fused_topk_kernel``
-----------------------------------
Rows ("positions") are grouped on the host into *row groups* that search the same
column ranges (a query segment; a camera; the upper triangle). Each group is cut into
blocks of ``BLOCK_M`` positions and each of its column ranges into *chunks*; the work
list holds one entry ``(row_start, row_end, col_start, col_end, slot, block)`` per
(block, chunk), so a query pays only for the anchors of its own segment. One program
runs one work entry:

1. for every ``BLOCK_N`` tile of its chunk it accumulates ``rows @ cols^T`` over
   ``BLOCK_K`` slices with ``tl.dot`` (fp32 accumulation, fp64 for fp64 inputs) and
   turns it into distances in registers: ``|q|^2 + |a|^2 - 2 q.a`` clamped at 0
   (``sqrt_rn`` of it for ``euclidean``), ``1 - q_hat.a_hat`` (rows normalised on the
   host, exactly as the reference does, for fp32/fp64) or ``1 - (q.a) / (|q| |a|)``
   (fp16/bf16: the raw half-precision rows feed the tensor cores, the norms are fp32);
   optional linkage epilogues (TSSL ``D + exp(2D - (a_i + a_j))``, BUC
   ``D + s (n_i + n_j)``) and masks (exclude one column, upper triangle, different
   group, strictly after a per-row lower bound) are applied to the tile;
2. it merges the tile into a running per-row list of the ``K`` best (value, column)
   pairs held in registers (``[BLOCK_M, K_PAD]``, ``K <= 64``). The merge is *exact*
   and cheap: only tile entries that beat the row's current worst pair take part, and
   a ``while`` loop extracts them one at a time (the row's smallest (value, column)
   pair) and overwrites the worst slot. The loop runs as many times as the
   most-improved row of the block gains entries from this tile -- about ``k`` times for
   the first tiles, ~0-1 once the lists have settled -- so the selection costs a few
   passes over the tile, not ``k``. For fp32 values a pair is one int64 key
   ``(order-preserving value bits << 32) | column`` (``-0.0`` folded onto ``+0.0``), so
   every (value, column) comparison is a single integer min/max; fp64 values keep
   separate value / column reductions. The distance tile never leaves registers;
3. it writes its list (unsorted) to ``out[position, slot, :K]``;
4. optionally (``COL_K > 0``, used by ``mutual_knn``) it also extracts each tile
   column's ``COL_K`` best rows among the block's rows and writes them to
   ``col_out[block, column, :COL_K]``: the column (b -> a) candidates come from the
   same pass as the row candidates.

The host then merges the chunk lists of each (position, target) with two stable
sorts (:func:`select_smallest`): that is the two-stage (split-anchor) path. Chunks
exist to keep the GPU busy when there are few query blocks (``target_programs``);
with one chunk the merge is just the final sort.

Tie-breaking
------------
Pairs are ordered by ``(value, column)`` lexicographically everywhere: the in-tile
extraction takes the smallest column among equal values, a tile entry replaces the
worst pair only when it is strictly smaller in that order, and the host merge sorts by
column then stably by value. Padding slots hold ``(inf, PAD_BASE + slot)`` so that a
genuine ``inf`` value (TSSL overflow) still beats padding and ranks by its column.
Columns must be in global index order within a chunk (callers guarantee it).
Ties between copies of one vector are only ties if the value of a pair depends on the
two vectors alone, not on where they sit in a tile: every pair's dot product is reduced
in one fixed order (on the GPU, ``tl.dot`` gives each output element the same FMA chain
or tensor-core instruction sequence; under the interpreter, whose ``tl.dot`` is BLAS with
position-dependent edge kernels, an explicit product + sum, ``INTERPRET_DOT``) and the
norms are per row, so copies get bit-identical distances and ties go to the smaller index.

Compile failures
----------------
Every launch goes through :func:`launch`: a kernel that Triton cannot build for the
user's GPU raises :class:`TritonKernelError` naming the op, the kernel, the device and
the ``backend=`` values that avoid Triton, instead of failing deep inside Triton (there
is no silent fallback from ``backend="auto"``).

Limits
------
``K <= 64`` (:data:`K_MAX`); larger ``k`` goes through :func:`distance_tiles` and a
sort on bounded tiles (see ``knn.py``). Fewer than ``2**31 - 256`` columns and rows
(int32 lists, 32-bit key halves). Output buffers are cut into passes of at most
``tile_elements()`` entries. Autotuning (GPU only) covers ``BLOCK_N``, ``BLOCK_K``,
warps and stages keyed on the feature dimension, ``K`` and the epilogue, over configs
that neither spill nor hit the register cap on sm_90 (:func:`gpu_configs`); ``BLOCK_M`` is
chosen on the host (64, or 32 for ``K > 32``: the lists live in registers) because the
work list depends on it. Under ``TRITON_INTERPRET=1`` one configuration
(:data:`INTERPRET_BLOCKS`) is used and bf16/fp16 tiles are widened to fp32 before the
dot product (the Triton 3.8 interpreter's half-precision ``dot`` gives wrong values; products of half
values are exact in fp32, so the numbers are those of the tensor-core path up to
summation order). Reductions are written ``tl.reduce(x, axis, _MIN_COMBINE)``: the
same code as ``tl.min`` on the GPU, ~100x faster in the interpreter. The distance tile
shared with ``_distance_tile_kernel`` (:func:`_load_rows`, :func:`_distance_block`) is a
nested @jit call once per program and per tile, which the interpreter affords.

Precision
---------
fp32 inputs use ``input_precision="ieee"`` for ``precision="highest"`` and ``"tf32"``
for ``"tf32"``; fp16/bf16 inputs use tensor cores with fp32 accumulation; fp64 inputs
accumulate in fp64. TF32 and half inputs perturb distances by ~1e-3 relative, which
can reorder near-ties: index equality with the reference is only promised for
well-separated data there.

Must equal ``fastassoc.kernels.reference.knn.topk_anchors_reference`` (and the other
references through the ops built on it) up to float32 summation order.
"""
from __future__ import annotations

import functools
import math
import os
import subprocess
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ... import _backend

K_MAX = 64
# Padding columns: above every real column, distinct per slot, below NO_COLUMN.
PAD_BASE = 2**31 - 1 - 2 * K_MAX
NO_COLUMN = 2**31 - 1
# Host-side padding index during merges (sorts after every real index).
PAD_INDEX = 2**62
_PAD_BASE = tl.constexpr(PAD_BASE)
_NO_COLUMN = tl.constexpr(NO_COLUMN)
# Packed (fp32) keys: padding = (inf bits << 32) | column, the maximum, and a key below
# every real pair for the unused slots.
_PAD_KEY = tl.constexpr((0x7F800000 << 32) + PAD_BASE)
_MAX_KEY = tl.constexpr(2**63 - 1)
_BELOW_KEY = tl.constexpr(-(2**63) + 1)
# The combine functions of tl.min / tl.max. ``tl.reduce(x, axis, _MIN_COMBINE)`` compiles
# to exactly what ``tl.min(x, axis)`` does for 32/64-bit inputs, but is not a nested
# @jit call, which the interpreter re-patches on every call (~7 ms each, 100x slower
# tests); the interpreter recognises these combine functions and uses numpy.
_MIN_COMBINE = tl.standard._elementwise_min
_MAX_COMBINE = tl.standard._elementwise_max

METRIC_CODES = {"sqeuclidean": 0, "euclidean": 1, "cosine": 2}
COSINE_SCALED = 3
LINKAGE_NONE, LINKAGE_TSSL, LINKAGE_ADD = 0, 1, 2
REF_NONE, REF_EXCLUDE, REF_UPPER = 0, 1, 2

# Scheduling knobs (tests shrink them to exercise the chunked path on tiny inputs).
# A chunk holds at least MIN_CHUNK_COLUMNS columns; chunks are added until the launch
# has about TARGET_WAVES programs per streaming multiprocessor.
MIN_CHUNK_COLUMNS = 2048
TARGET_WAVES = 4
INTERPRET_TARGET_PROGRAMS = 1
# BLOCK_M, BLOCK_N, BLOCK_K under TRITON_INTERPRET=1: the interpreter pays ~1 ms per op and
# tile, so a few large tiles are faster there (tests set (16, 16, 16) to get many tiles).
INTERPRET_BLOCKS = (32, 32, 32)


# ----------------------------------------------------------------------------- kernel

@triton.jit
def _load_rows(row_ids_ptr, row_aux_ptr, offs_m, row_mask, METRIC: tl.constexpr, ACC_DTYPE: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """Row ids of positions ``offs_m`` and their per-row metric term (zeros for cosine)."""
    row_ids = tl.load(row_ids_ptr + offs_m, mask=row_mask, other=0)
    if METRIC != 2:
        row_aux = tl.load(row_aux_ptr + row_ids, mask=row_mask, other=0.0)
    else:
        row_aux = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)   # unused: cosine rows are normalised on the host
    return row_ids, row_aux


@triton.jit
def _distance_block(rows_ptr, cols_ptr, col_aux_ptr, row_ids, row_mask, row_aux, offs_n, col_mask,
                    dim, stride_row, stride_col,
                    METRIC: tl.constexpr, PRECISION: tl.constexpr, CAST_F32: tl.constexpr,
                    INTERPRET_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_N] distances of rows ``row_ids`` to columns ``offs_n`` (both kernels).

    ``rows @ cols^T`` accumulated over ``BLOCK_K`` slices with ``tl.dot``, then the metric:
    ``1 - dot`` (cosine, rows and columns normalised on the host), ``1 - dot * row_aux *
    col_aux`` (scaled cosine, inverse norms), or ``|q|^2 + |a|^2 - 2 q.a`` clamped at 0
    (``row_aux`` / ``col_aux`` squared norms) and its correctly rounded square root for
    ``euclidean``. ``row_aux`` [BLOCK_M] comes from :func:`_load_rows` (ignored for cosine).
    """
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for k0 in range(0, dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < dim
        row_ptrs = rows_ptr + row_ids[:, None] * stride_row + offs_k[None, :]
        col_ptrs = cols_ptr + offs_n[None, :] * stride_col + offs_k[:, None]
        row_tile = tl.load(row_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        col_tile = tl.load(col_ptrs, mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if CAST_F32:
            row_tile = row_tile.to(tl.float32)
            col_tile = col_tile.to(tl.float32)
        if INTERPRET_DOT:
            # The interpreter's tl.dot is numpy.matmul, i.e. BLAS, whose rounding may depend
            # on where a pair sits in the tile (edge micro-kernels, thread splits): identical
            # vectors then get different distances and ties break by position. An explicit
            # product + sum reduces every pair in the same k order, wherever it sits.
            acc += tl.sum(row_tile[:, :, None].to(ACC_DTYPE) * col_tile[None, :, :].to(ACC_DTYPE), 1)
        else:
            acc = tl.dot(row_tile, col_tile, acc, input_precision=PRECISION)
    if METRIC == 2:
        value = 1.0 - acc
    else:
        col_aux = tl.load(col_aux_ptr + offs_n, mask=col_mask, other=0.0)
        if METRIC == 3:
            value = 1.0 - acc * row_aux[:, None] * col_aux[None, :]
        else:
            value = tl.maximum(row_aux[:, None] + col_aux[None, :] - 2.0 * acc, 0.0)
            if METRIC == 1:
                if ACC_DTYPE == tl.float64:
                    value = tl.sqrt(value)
                else:
                    value = tl.sqrt_rn(value)
    return value


@triton.jit
def _fused_topk_kernel(
    # pointers
    rows_ptr, cols_ptr, row_aux_ptr, col_aux_ptr,
    row_ids_ptr, row_ref_ptr, row_group_ptr, col_group_ptr, row_bias_ptr, col_bias_ptr,
    bias_scale_ptr, lower_value_ptr, lower_index_ptr, work_ptr,
    out_value_ptr, out_index_ptr, col_value_ptr, col_index_ptr,
    # sizes
    dim, num_slots, position_base, col_pass_start, col_pass_size,
    # strides
    stride_row, stride_col,
    # meta-parameters
    METRIC: tl.constexpr, LINKAGE: tl.constexpr, REF_MODE: tl.constexpr, GROUP_MASK: tl.constexpr,
    LOWER: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, COL_K: tl.constexpr,
    PRECISION: tl.constexpr, CAST_F32: tl.constexpr, INTERPRET_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    work_ptrs = work_ptr + tl.program_id(0).to(tl.int64) * 6
    row_start = tl.load(work_ptrs)
    row_end = tl.load(work_ptrs + 1)
    col_start = tl.load(work_ptrs + 2)
    col_end = tl.load(work_ptrs + 3)
    slot = tl.load(work_ptrs + 4)
    block = tl.load(work_ptrs + 5)

    offs_m = row_start + tl.arange(0, BLOCK_M)
    row_mask = offs_m < row_end
    row_ids, row_aux = _load_rows(row_ids_ptr, row_aux_ptr, offs_m, row_mask, METRIC, ACC_DTYPE, BLOCK_M)
    if REF_MODE != 0:
        row_ref = tl.load(row_ref_ptr + offs_m, mask=row_mask, other=-1)
    if GROUP_MASK:
        row_group = tl.load(row_group_ptr + offs_m, mask=row_mask, other=-1)
    if LINKAGE != 0:
        row_bias = tl.load(row_bias_ptr + offs_m, mask=row_mask, other=0.0)
        bias_scale = tl.load(bias_scale_ptr)
    if LOWER:
        lower_value = tl.load(lower_value_ptr + offs_m, mask=row_mask, other=0.0)
        lower_index = tl.load(lower_index_ptr + offs_m, mask=row_mask, other=0)

    # Running list: real slots start as padding (inf, _PAD_BASE + slot); slots >= K hold a
    # key below every real one forever, so they are never the worst and never replaced.
    offs_slot = tl.arange(0, K_PAD)
    real_slot = offs_slot[None, :] < K
    if PACKED:
        # fp32: one int64 key per pair, (order-preserving value bits << 32) | column, so a
        # single min/max reduction compares (value, column) lexicographically.
        list_key = tl.where(real_slot, offs_slot[None, :].to(tl.int64) + _PAD_KEY, _BELOW_KEY) \
            + tl.zeros([BLOCK_M, K_PAD], tl.int64)
        worst_key = tl.reduce(list_key, 1, _MAX_COMBINE)
    else:
        zero_list = tl.zeros([BLOCK_M, K_PAD], dtype=ACC_DTYPE)
        list_value = tl.where(real_slot, zero_list + float("inf"), zero_list - float("inf"))
        list_index = tl.where(real_slot, _PAD_BASE + offs_slot[None, :], -1) + tl.zeros([BLOCK_M, K_PAD], tl.int32)
        worst_value = tl.reduce(list_value, 1, _MAX_COMBINE)
        worst_index = tl.reduce(tl.where(list_value == worst_value[:, None], list_index, -1), 1,
                                _MAX_COMBINE)

    for col0 in range(col_start, col_end, BLOCK_N):
        offs_n = col0 + tl.arange(0, BLOCK_N)
        col_mask = offs_n < col_end
        value = _distance_block(rows_ptr, cols_ptr, col_aux_ptr, row_ids, row_mask, row_aux, offs_n, col_mask,
                                dim, stride_row, stride_col, METRIC, PRECISION, CAST_F32, INTERPRET_DOT, ACC_DTYPE,
                                BLOCK_M, BLOCK_N, BLOCK_K)
        if LINKAGE != 0:
            col_bias = tl.load(col_bias_ptr + offs_n, mask=col_mask, other=0.0)
            if LINKAGE == 1:
                # TSSL Eq. 8; the sum a_i + a_j rounds first, as in the reference.
                value = value + tl.exp(2.0 * value - (row_bias[:, None] + col_bias[None, :]))
            else:
                value = value + bias_scale * (row_bias[:, None] + col_bias[None, :])

        valid = row_mask[:, None] & col_mask[None, :]
        if REF_MODE == 1:
            valid = valid & (offs_n[None, :] != row_ref[:, None])
        if REF_MODE == 2:
            valid = valid & (offs_n[None, :] > row_ref[:, None])
        if GROUP_MASK:
            col_group = tl.load(col_group_ptr + offs_n, mask=col_mask, other=-1)
            valid = valid & (col_group[None, :] != row_group[:, None])
        if LOWER:
            valid = valid & ((value > lower_value[:, None])
                             | ((value == lower_value[:, None]) & (offs_n[None, :] > lower_index[:, None])))

        if PACKED:
            bits = value.to(tl.int32, bitcast=True)
            # Order-preserving int32 image of the float (-0.0 folded onto +0.0, which it equals).
            ordered = tl.where(value == 0.0, 0, bits ^ ((bits >> 31) & 0x7FFFFFFF))
            high = ordered.to(tl.int64) << 32
            key = high | offs_n[None, :]
            if COL_K > 0:
                # Column candidates of this block: each column's COL_K best rows, by (value, row).
                col_key = high | row_ids[:, None]
                col_valid = valid
                col_out = (block * col_pass_size + (offs_n - col_pass_start)) * COL_K
                for r in range(COL_K):
                    best = tl.reduce(tl.where(col_valid, col_key, _MAX_KEY), 0, _MIN_COMBINE)
                    found = best < _MAX_KEY
                    best_bits = (best >> 32).to(tl.int32)
                    best_value = (best_bits ^ ((best_bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
                    best_row = (best & 0xFFFFFFFF).to(tl.int32)
                    tl.store(col_value_ptr + col_out + r, tl.where(found, best_value, float("inf")), mask=col_mask)
                    tl.store(col_index_ptr + col_out + r, tl.where(found, best_row, _NO_COLUMN), mask=col_mask)
                    col_valid = col_valid & (col_key != best[None, :])
            # Exact merge of the tile into the running lists (see the module docstring).
            beats = valid & (key < worst_key[:, None])
            best_key = tl.reduce(tl.where(beats, key, _MAX_KEY), 1, _MIN_COMBINE)
            while tl.reduce(best_key, 0, _MIN_COMBINE) < _MAX_KEY:
                replace = (list_key == worst_key[:, None]) & (best_key < _MAX_KEY)[:, None]
                list_key = tl.where(replace, best_key[:, None], list_key)
                worst_key = tl.reduce(list_key, 1, _MAX_COMBINE)
                beats = beats & (key < worst_key[:, None]) & (key != best_key[:, None])
                best_key = tl.reduce(tl.where(beats, key, _MAX_KEY), 1, _MIN_COMBINE)
        else:
            cols32 = offs_n.to(tl.int32)
            if COL_K > 0:
                row_ids32 = row_ids.to(tl.int32)
                col_valid = valid
                col_out = (block * col_pass_size + (offs_n - col_pass_start)) * COL_K
                for r in range(COL_K):
                    best = tl.reduce(tl.where(col_valid, value, float("inf")), 0, _MIN_COMBINE)
                    best_row = tl.reduce(tl.where(col_valid & (value == best[None, :]), row_ids32[:, None],
                                               _NO_COLUMN), 0, _MIN_COMBINE)
                    found = best_row < _NO_COLUMN
                    tl.store(col_value_ptr + col_out + r, tl.where(found, best, float("inf")), mask=col_mask)
                    tl.store(col_index_ptr + col_out + r, tl.where(found, best_row, _NO_COLUMN), mask=col_mask)
                    col_valid = col_valid & (row_ids32[:, None] != best_row[None, :])
            beats = valid & ((value < worst_value[:, None])
                             | ((value == worst_value[:, None]) & (cols32[None, :] < worst_index[:, None])))
            while tl.reduce(tl.reduce(beats.to(tl.int32), 1, _MAX_COMBINE), 0, _MAX_COMBINE) > 0:
                best = tl.reduce(tl.where(beats, value, float("inf")), 1, _MIN_COMBINE)
                best_col = tl.reduce(tl.where(beats & (value == best[:, None]), cols32[None, :], _NO_COLUMN), 1,
                                     _MIN_COMBINE)
                replace = (list_index == worst_index[:, None]) & (best_col < _NO_COLUMN)[:, None]
                list_value = tl.where(replace, best[:, None], list_value)
                list_index = tl.where(replace, best_col[:, None], list_index)
                worst_value = tl.reduce(list_value, 1, _MAX_COMBINE)
                worst_index = tl.reduce(tl.where(list_value == worst_value[:, None], list_index, -1), 1,
                                _MAX_COMBINE)
                beats = beats & (cols32[None, :] != best_col[:, None]) & (
                    (value < worst_value[:, None])
                    | ((value == worst_value[:, None]) & (cols32[None, :] < worst_index[:, None])))

    if PACKED:
        list_bits = (list_key >> 32).to(tl.int32)
        list_value = (list_bits ^ ((list_bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        list_index = (list_key & 0xFFFFFFFF).to(tl.int32)
    out_offs = ((offs_m - position_base) * num_slots + slot)[:, None] * K + offs_slot[None, :]
    out_mask = row_mask[:, None] & real_slot
    tl.store(out_value_ptr + out_offs, list_value, mask=out_mask)
    tl.store(out_index_ptr + out_offs, list_index, mask=out_mask)


@triton.jit
def _distance_tile_kernel(
    # pointers
    rows_ptr, cols_ptr, row_aux_ptr, col_aux_ptr, row_ids_ptr,
    row_pid_ptr, row_cam_ptr, col_pid_ptr, col_cam_ptr, row_ref_ptr, out_ptr,
    # sizes
    num_rows, num_cols, dim,
    # strides
    stride_row, stride_col, stride_out,
    # meta-parameters
    METRIC: tl.constexpr, JUNK: tl.constexpr, EXCLUDE: tl.constexpr,
    PRECISION: tl.constexpr, CAST_F32: tl.constexpr, INTERPRET_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] distance tile, masked entries (junk / excluded) set to +inf."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < num_rows
    col_mask = offs_n < num_cols
    row_ids, row_aux = _load_rows(row_ids_ptr, row_aux_ptr, offs_m, row_mask, METRIC, ACC_DTYPE, BLOCK_M)
    value = _distance_block(rows_ptr, cols_ptr, col_aux_ptr, row_ids, row_mask, row_aux, offs_n, col_mask,
                            dim, stride_row, stride_col, METRIC, PRECISION, CAST_F32, INTERPRET_DOT, ACC_DTYPE,
                            BLOCK_M, BLOCK_N, BLOCK_K)
    if JUNK:
        # Market/MARS junk: same identity and camera, or gallery identity -1.
        row_pid = tl.load(row_pid_ptr + row_ids, mask=row_mask, other=0)
        row_cam = tl.load(row_cam_ptr + row_ids, mask=row_mask, other=0)
        col_pid = tl.load(col_pid_ptr + offs_n, mask=col_mask, other=0)
        col_cam = tl.load(col_cam_ptr + offs_n, mask=col_mask, other=0)
        junk = ((col_pid[None, :] == row_pid[:, None]) & (col_cam[None, :] == row_cam[:, None])) \
            | (col_pid[None, :] == -1)
        value = tl.where(junk, float("inf"), value)
    if EXCLUDE:
        row_ref = tl.load(row_ref_ptr + offs_m, mask=row_mask, other=-1)
        value = tl.where(offs_n[None, :] == row_ref[:, None], float("inf"), value)
    out_ptrs = out_ptr + offs_m[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, value, mask=row_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------- launching

class TritonKernelError(RuntimeError):
    """A Triton kernel could not be compiled (or its binary loaded) for the user's device."""


def _compile_failure(error: BaseException) -> bool:
    """Is ``error`` Triton failing to build or load a kernel (not a bug inside a running one)?"""
    try:   # module layout of Triton 3.x; older versions fall back to the checks below
        from triton.errors import TritonError
        from triton.runtime.errors import InterpreterError
    except ImportError:
        TritonError = InterpreterError = ()
    if InterpreterError and isinstance(error, InterpreterError):
        return False
    if TritonError and isinstance(error, TritonError):
        return True   # CompilationError, OutOfResources, PTXASError, AutotunerError
    if isinstance(error, (subprocess.CalledProcessError, FileNotFoundError)):
        return True   # ptxas crashed or is absent
    text = str(error)
    return isinstance(error, RuntimeError) and ("ptxas" in text or "Cannot find" in text)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{device.type} through the Triton interpreter (TRITON_INTERPRET=1)"


def other_backends(op: str, device: torch.device) -> str:
    """The ``backend=`` values that run ``op`` on ``device`` without Triton, for error messages."""
    report = _backend.available_backends(op)[op]
    usable = ("cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
    names = [f"backend={name!r}" for name in usable if report.get(name) is True] or ["backend='reference'"]
    return " or ".join(names)


def launch(kernel, grid, *args, device: torch.device, op: str, **meta) -> None:
    """``kernel[grid](*args, **meta)``; a compile failure names the op, kernel, device and way out.

    ``backend="auto"`` never falls back silently: when Triton cannot build a kernel for
    the user's GPU (CompilationError, out of shared memory or registers, ptxas missing or
    failing), :class:`TritonKernelError` says which kernel of which op failed on which
    device (``torch.cuda.get_device_name``) and which ``backend=`` runs the op without
    Triton. Errors of a kernel that did compile pass through unchanged.
    """
    try:
        kernel[grid](*args, **meta)
    except Exception as error:
        if not _compile_failure(error):
            raise
        inner = kernel
        while hasattr(inner, "fn"):   # Autotuner -> JITFunction -> python function
            inner = inner.fn
        name = getattr(inner, "__name__", repr(kernel))
        raise TritonKernelError(
            f"{op}: the Triton kernel {name} failed to compile on {device_name(device)} "
            f"({type(error).__name__}: {str(error).strip()[:2000]}). backend='auto' uses Triton for "
            f"{device.type} tensors; run this op without it with {other_backends(op, device)}.") from error


# ----------------------------------------------------------------------------- configs

# (BLOCK_N, BLOCK_K, num_warps, num_stages) per rows-per-program. Chosen from the sm_90
# resource reports of bench/triton_registers.py (table in bench/README.md): a program holds
# its [BLOCK_M, BLOCK_N] distance tile, the int64 keys of that tile and the [BLOCK_M, K_PAD]
# lists in registers, so configs keep BLOCK_M * BLOCK_N / threads <= 16 tile entries per
# thread, and fp32 "ieee" dots run on FMA units with both operand slices in registers, so
# BLOCK_K stays at 8-16. The earlier list (64-128 wide tiles, BLOCK_K up to 64, 4 warps) hit
# the 255-register cap and spilled in every configuration, at every k.
_TOPK_CONFIGS = {
    64: [(64, 8, 8, 3), (32, 8, 4, 3), (32, 16, 4, 2)],
    32: [(64, 16, 8, 2), (64, 8, 4, 3), (64, 16, 4, 2), (32, 16, 4, 2)],
}
_TILE_CONFIGS = [(64, 16, 8, 2), (64, 8, 8, 3), (32, 16, 4, 2), (128, 16, 8, 2)]


# Tensor-core dots of fp16/bf16 tiles need K >= 16 (tl.dot rejects 8 at compile time).
_HALF_MIN_BLOCK_K = 16


def _to_configs(shapes, half: bool) -> list:
    seen, configs = set(), []
    for n, k, w, s in shapes:
        k = max(k, _HALF_MIN_BLOCK_K) if half else k
        if (n, k, w, s) not in seen:
            seen.add((n, k, w, s))
            configs.append(triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s))
    return configs


def gpu_configs(k_pad: int, block_m: int, half: bool = False) -> list:
    """Autotuning candidates of ``_fused_topk_kernel`` for lists of ``k_pad`` and ``block_m`` rows.

    ``half``: fp16/bf16 rows (tensor-core ``tl.dot``, which needs ``BLOCK_K >= 16``).
    """
    return _to_configs(_TOPK_CONFIGS[block_m], half)


def tile_configs(half: bool = False) -> list:
    """Autotuning candidates of ``_distance_tile_kernel`` (64 rows per program)."""
    return _to_configs(_TILE_CONFIGS, half)


def _candidates(configs: list) -> list:
    """All configs, or the first alone with FASTASSOC_TRITON_AUTOTUNE=0 (``make gpu-check``'s
    test stage: one compile per kernel instead of one per candidate)."""
    return configs[:1] if os.environ.get("FASTASSOC_TRITON_AUTOTUNE", "1") == "0" else configs


@functools.lru_cache(maxsize=None)
def _autotuned_topk(k_pad: int, block_m: int, half: bool):
    return triton.autotune(configs=_candidates(gpu_configs(k_pad, block_m, half)),
                           key=["dim", "K", "METRIC", "LINKAGE", "COL_K", "BLOCK_M", "PRECISION", "REF_MODE"]
                           )(_fused_topk_kernel)


@functools.lru_cache(maxsize=None)
def _autotuned_tile(half: bool):
    return triton.autotune(configs=_candidates(tile_configs(half)),
                           key=["dim", "METRIC", "PRECISION", "BLOCK_M"])(_distance_tile_kernel)


def _is_half(features: torch.Tensor) -> bool:
    return features.dtype in (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return _backend.triton_interpret()


def block_m_for(k_pad: int) -> int:
    """Rows per program: fewer when the running lists are long (registers)."""
    if interpreting():
        return INTERPRET_BLOCKS[0]
    return block_m_for_gpu(k_pad)


def block_m_for_gpu(k_pad: int) -> int:
    return 64 if k_pad <= 32 else 32


def target_programs(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return INTERPRET_TARGET_PROGRAMS
    return TARGET_WAVES * torch.cuda.get_device_properties(device).multi_processor_count


# ----------------------------------------------------------------------------- operands

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclass
class Operand:
    """Rows as the kernel reads them, plus the per-row term of the metric."""
    features: torch.Tensor   # [N, D] contiguous, dtype fed to tl.dot
    aux: torch.Tensor        # [N] squared norms / inverse norms (compute dtype), or a dummy
    metric_code: int


def prepare(x: torch.Tensor, metric: str) -> Operand:
    """Operand for ``metric``: squared norms as the reference computes them (fp32/fp64 rows).

    Cosine: fp32/fp64 rows are L2-normalised on the host (``x / max(|x|, 1e-12)``, the
    reference's formula); fp16/bf16 rows stay raw for the tensor cores and the kernel
    scales the dot product by fp32 inverse norms.
    """
    dtype = compute_dtype(x.dtype)
    if metric == "cosine":
        if x.dtype in (torch.float16, torch.bfloat16):
            norms = torch.linalg.vector_norm(x.to(dtype), dim=1)
            return Operand(x.contiguous(), 1.0 / norms.clamp_min(1e-12), COSINE_SCALED)
        normalised = torch.nn.functional.normalize(x.to(dtype), dim=1).contiguous()
        return Operand(normalised, normalised.new_empty(1), METRIC_CODES["cosine"])
    wide = x.to(dtype)
    return Operand(x.contiguous(), (wide * wide).sum(1), METRIC_CODES[metric])


def _kernel_flags(features: torch.Tensor, precision: str) -> dict:
    half = features.dtype in (torch.float16, torch.bfloat16)
    tf32 = features.dtype == torch.float32 and precision == "tf32"
    return dict(PRECISION="tf32" if tf32 else "ieee", CAST_F32=bool(half and interpreting()),
                INTERPRET_DOT=interpreting(), ACC_DTYPE=_tl_dtype(features.dtype))


def _dummy(device, dtype=torch.int64) -> torch.Tensor:
    return torch.zeros(1, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- planning

@dataclass
class RowGroup:
    """Positions ``start:stop`` search the column ranges ``[(low, high, target), ...]``."""
    start: int
    stop: int
    ranges: list


def _chunk_size(groups: list[RowGroup], block_m: int, device: torch.device) -> int:
    work = sum(-(-(g.stop - g.start) // block_m) * sum(h - l for l, h, _ in g.ranges) for g in groups)
    programs = target_programs(device)
    size = max(MIN_CHUNK_COLUMNS, -(-work // max(programs, 1)))
    return int(size)


def _plan(groups: list[RowGroup], block_m: int, chunk: int, ref_min: list[int] | None):
    """Work entries and per-block position ranges.

    Returns ``(work [W, 6] list, blocks [(start, stop)], chunks_per_target)``; the slot of a
    work entry is ``target * chunks_per_target + chunk index``. ``ref_min[b]`` (upper
    triangle mode) lets a block skip the columns at or below its smallest row reference.
    """
    chunks_per_target = 1
    for g in groups:
        per_target: dict[int, int] = {}
        for low, high, target in g.ranges:
            per_target[target] = per_target.get(target, 0) + max(1, -(-(high - low) // chunk))
        if per_target:
            chunks_per_target = max(chunks_per_target, max(per_target.values()))
    work, blocks = [], []
    for g in groups:
        first_block = len(blocks)
        for start in range(g.start, g.stop, block_m):
            blocks.append((start, min(start + block_m, g.stop)))
        used: dict[int, int] = {}
        for low, high, target in g.ranges:
            for c_low in range(low, high, chunk):
                c_high = min(c_low + chunk, high)
                slot = target * chunks_per_target + used.get(target, 0)
                used[target] = used.get(target, 0) + 1
                # Chunk-major order: consecutive programs share the chunk's columns in L2.
                for b in range(first_block, len(blocks)):
                    lo = c_low
                    if ref_min is not None:
                        lo = max(lo, ref_min[b] + 1)
                    if lo < c_high:
                        work.append((blocks[b][0], blocks[b][1], lo, c_high, slot, b))
    return work, blocks, chunks_per_target


# ----------------------------------------------------------------------------- selection

def select_smallest(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest (value, index) pairs of every row, ordered lexicographically.

    Parameters
    ----------
    values : Tensor [..., M], float
    indices : Tensor [..., M], int64; padding entries hold ``PAD_INDEX``
    k : int <= M

    Returns
    -------
    values [..., k], indices [..., k] (padding still ``PAD_INDEX``)
    """
    if k == 1:
        # Two reductions instead of two sorts (mutual_knn's column merge at k = 1).
        best = values.amin(-1, keepdim=True)
        index = torch.where(values == best, indices, PAD_INDEX).amin(-1, keepdim=True)
        return best, index
    by_index = torch.argsort(indices, dim=-1)
    values = torch.gather(values, -1, by_index)
    indices = torch.gather(indices, -1, by_index)
    by_value = torch.sort(values, dim=-1, stable=True).indices[..., :k]
    return torch.gather(values, -1, by_value), torch.gather(indices, -1, by_value)


def finish(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding -> (inf, -1); values to float32."""
    pad = indices >= PAD_INDEX
    return (values.to(torch.float32).masked_fill(pad, math.inf),
            indices.masked_fill(pad, -1))


# ----------------------------------------------------------------------------- launchers

@dataclass
class TopkResult:
    values: torch.Tensor    # [P, T, k], compute dtype, PAD -> inf
    indices: torch.Tensor   # [P, T, k], int64 (index_map applied), padding PAD_INDEX


def fused_topk(rows: Operand, cols: Operand, k: int, groups: list[RowGroup], num_targets: int, *,
               row_ids: torch.Tensor, precision: str, index_map: torch.Tensor | None = None,
               row_ref: torch.Tensor | None = None, ref_mode: int = REF_NONE,
               row_group: torch.Tensor | None = None, col_group: torch.Tensor | None = None,
               linkage: int = LINKAGE_NONE, row_bias: torch.Tensor | None = None,
               col_bias: torch.Tensor | None = None, bias_scale: float = 0.0,
               lower: tuple[torch.Tensor, torch.Tensor] | None = None,
               col_k: int = 0, col_out: tuple[torch.Tensor, torch.Tensor] | None = None,
               col_pass: tuple[int, int] = (0, 0), block_m: int | None = None,
               op: str = "topk_anchors") -> TopkResult:
    """Per position and target, the ``k`` best columns (``k <= K_MAX``).

    Parameters
    ----------
    rows, cols : Operand
        Same metric code; ``rows`` rows are read through ``row_ids``.
    k : int in [1, K_MAX]
    groups : list of RowGroup
        Position ranges and the column ranges (with their target) they search.
    num_targets : int
        Targets are merged separately (e.g. one per camera); ``T`` of the result.
    row_ids : Tensor [P], int64
        Row of ``rows`` for every position.
    index_map : Tensor [N], int64, optional
        Column -> reported index; must be increasing inside every column range.
    row_ref, ref_mode :
        Per-position column to exclude (``REF_EXCLUDE``) or to stay strictly above
        (``REF_UPPER``).
    row_group, col_group : Tensor [P], [N], optional
        Pairs in the same group are skipped.
    linkage, row_bias, col_bias, bias_scale :
        Linkage epilogue (``LINKAGE_TSSL`` or ``LINKAGE_ADD``); ``row_bias`` is per position.
    lower : (values [P], columns [P]), optional
        Only pairs strictly after ``(value, column)`` in lexicographic order.
    col_k, col_out, col_pass :
        Column candidates (``mutual_knn``): ``col_out`` buffers [blocks, pass size, col_k]
        (values in the compute dtype, int32 rows) receive each block's best rows of the
        columns ``col_pass[0] : col_pass[0] + col_pass[1]``.
    op : str
        The public op this launch serves (named in compile-failure errors, see :func:`launch`).

    Returns
    -------
    TopkResult
    """
    device = rows.features.device
    num_positions = row_ids.shape[0]
    acc_dtype = compute_dtype(rows.features.dtype)
    values = torch.full((num_positions, num_targets, k), math.inf, dtype=acc_dtype, device=device)
    indices = torch.full((num_positions, num_targets, k), PAD_INDEX, dtype=torch.int64, device=device)
    if num_positions == 0 or k == 0 or not groups:
        return TopkResult(values, indices)
    if k > K_MAX:
        raise ValueError(f"fused_topk handles k <= {K_MAX}, got {k}")
    if cols.features.shape[0] >= PAD_BASE:
        raise ValueError(f"the Triton kernels index columns with int32; {cols.features.shape[0]} is too many")
    k_pad = max(triton.next_power_of_2(k), 2)
    block_m = block_m or block_m_for(k_pad)
    chunk = _chunk_size(groups, block_m, device)
    ref_min = None
    if ref_mode == REF_UPPER:
        ref_min = []
        for g in groups:   # blocks are cut per group, so the minimum is taken per group block
            refs = row_ref[g.start:g.stop]
            count = g.stop - g.start
            width = -(-count // block_m) * block_m
            padded = torch.full((width,), 2**62, dtype=torch.int64, device=device)
            padded[:count] = refs
            ref_min.extend(padded.view(-1, block_m).amin(1).tolist())
    work, blocks, chunks_per_target = _plan(groups, block_m, chunk, ref_min)
    num_slots = num_targets * chunks_per_target

    dummy = _dummy(device)
    dummy_float = _dummy(device, acc_dtype)
    flags = _kernel_flags(rows.features, precision)
    col_value, col_index = col_out if col_out is not None else (dummy_float, _dummy(device, torch.int32))
    common = dict(
        METRIC=rows.metric_code, LINKAGE=linkage, REF_MODE=ref_mode, GROUP_MASK=row_group is not None,
        LOWER=lower is not None, K=k, K_PAD=k_pad, COL_K=col_k, BLOCK_M=block_m,
        PACKED=acc_dtype == torch.float32, **flags)

    # Passes over blocks keep the [positions, slots, k] partial lists within one tile.
    per_pass = max(1, _backend.tile_elements() // max(num_slots * k, 1))
    work_tensor = torch.tensor(work, dtype=torch.int64).reshape(-1, 6)
    block_of_work = work_tensor[:, 5]
    first = 0
    while first < len(blocks):
        last = first + 1
        while last < len(blocks) and blocks[last][1] - blocks[first][0] <= per_pass:
            last += 1
        pass_start, pass_stop = blocks[first][0], blocks[last - 1][1]
        selected = work_tensor[(block_of_work >= first) & (block_of_work < last)]
        first = last
        if selected.shape[0] == 0:
            continue
        count = pass_stop - pass_start
        out_value = torch.full((count, num_slots, k), math.inf, dtype=acc_dtype, device=device)
        out_index = torch.full((count, num_slots, k), PAD_BASE, dtype=torch.int32, device=device)
        args = (rows.features, cols.features, rows.aux, cols.aux, row_ids,
                row_ref if row_ref is not None else dummy,
                row_group if row_group is not None else dummy,
                col_group if col_group is not None else dummy,
                row_bias if row_bias is not None else dummy_float,
                col_bias if col_bias is not None else dummy_float,
                torch.full((1,), float(bias_scale), dtype=acc_dtype, device=device),
                lower[0] if lower is not None else dummy_float,
                lower[1] if lower is not None else dummy,
                selected.to(device).contiguous(), out_value, out_index, col_value, col_index,
                rows.features.shape[1], num_slots, pass_start, col_pass[0], col_pass[1],
                rows.features.stride(0), cols.features.stride(0))
        grid = (selected.shape[0],)
        if interpreting():
            _, block_n, block_k = INTERPRET_BLOCKS
            launch(_fused_topk_kernel, grid, *args, device=device, op=op, **common, BLOCK_N=block_n,
                   BLOCK_K=block_k)
        else:
            launch(_autotuned_topk(k_pad, block_m, _is_half(rows.features)), grid, *args, device=device, op=op,
                   **common)
        part_index = out_index.to(torch.int64)
        pad = part_index >= PAD_BASE
        if index_map is not None:
            part_index = index_map[part_index.clamp(max=index_map.shape[0] - 1)]
        part_index = part_index.masked_fill(pad, PAD_INDEX)
        out_value = out_value.masked_fill(pad, math.inf)
        merged = select_smallest(out_value.view(count, num_targets, chunks_per_target * k),
                                 part_index.view(count, num_targets, chunks_per_target * k), k)
        values[pass_start:pass_stop] = merged[0]
        indices[pass_start:pass_stop] = merged[1]
    return TopkResult(values, indices)


def distance_tiles(rows: Operand, cols: Operand, row_ids: torch.Tensor, *, precision: str,
                   junk: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   exclude: torch.Tensor | None = None, rows_per_tile: int | None = None,
                   op: str = "topk_anchors"):
    """Yield ``(start, stop, tile)``: distances of positions ``start:stop`` to every column.

    Tiles hold at most ``tile_elements()`` entries (``rows_per_tile`` rows when given).
    ``junk = (row_pids, row_cams, col_pids, col_cams)`` (rows indexed by row id) sets
    Market/MARS junk entries to +inf; ``exclude`` [P] (column per position, -1 none)
    sets that entry to +inf. ``op`` is the public op named in compile-failure errors.
    """
    device = rows.features.device
    num_positions, num_cols = row_ids.shape[0], cols.features.shape[0]
    acc_dtype = compute_dtype(rows.features.dtype)
    step = rows_per_tile or max(1, _backend.tile_elements() // max(num_cols, 1))
    dummy = _dummy(device)
    flags = _kernel_flags(rows.features, precision)
    block_m = INTERPRET_BLOCKS[0] if interpreting() else 64
    for start in range(0, num_positions, step):
        stop = min(start + step, num_positions)
        tile = torch.empty((stop - start, num_cols), dtype=acc_dtype, device=device)
        if num_cols and stop > start:
            ids = row_ids[start:stop]
            args = (rows.features, cols.features, rows.aux, cols.aux, ids,
                    *(junk if junk is not None else (dummy, dummy, dummy, dummy)),
                    exclude[start:stop] if exclude is not None else dummy, tile,
                    stop - start, num_cols, rows.features.shape[1],
                    rows.features.stride(0), cols.features.stride(0), tile.stride(0))
            meta = dict(METRIC=rows.metric_code, JUNK=junk is not None, EXCLUDE=exclude is not None,
                        BLOCK_M=block_m, **flags)
            if interpreting():
                _, block_n, block_k = INTERPRET_BLOCKS
                grid = (triton.cdiv(stop - start, block_m), triton.cdiv(num_cols, block_n))
                launch(_distance_tile_kernel, grid, *args, device=device, op=op, **meta, BLOCK_N=block_n,
                       BLOCK_K=block_k)
            else:
                def grid(meta_):
                    return (triton.cdiv(stop - start, block_m), triton.cdiv(num_cols, meta_["BLOCK_N"]))
                launch(_autotuned_tile(_is_half(rows.features)), grid, *args, device=device, op=op, **meta)
        yield start, stop, tile
