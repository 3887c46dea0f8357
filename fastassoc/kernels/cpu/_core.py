"""Launcher helpers shared by the compiled CPU backend (``fastassoc._C``).

The CPU kernels follow the faiss convention: Python validates and prepares the
tensors, then hands ``data_ptr()`` integers and sizes to plain pybind11 functions.
Distance work is split into bounded tiles: torch's GEMM (MKL/OpenBLAS) computes
the inner products of one tile into a reusable buffer, and a C++/OpenMP pass
turns that tile into distances and merges it into per-row (and per-column)
bounded top-k lists. This module holds what every CPU launcher needs for that:
the core handle, pointer extraction, the compute dtype and the tile shapes.

Distances use the formulas every backend shares: squared Euclidean as
``|q|^2 + |a|^2 - 2 q.a`` clamped at 0 (norms from ``(x * x).sum(1)``), cosine as
``1 - q_hat . a_hat`` with rows L2-normalised by ``torch.nn.functional.normalize``.
float64 inputs are computed in float64, every other dtype in float32.
"""
from __future__ import annotations

import threading
from typing import Iterator

import torch

from ... import _backend

# Metric codes understood by the C++ tile kernels (csrc/cpu/knn.cpp, enum Metric). Euclidean
# is ranked as squared Euclidean; launchers take torch's sqrt of the selected values.
METRIC_CODES = {"sqeuclidean": 0, "cosine": 1}


def core():
    """The compiled module ``fastassoc._C``; raises if it was not built.

    Every launcher reaches the kernels through here, so this is where the core learns
    torch's thread count for the calling thread (``torch.get_num_threads()``, which
    follows ``torch.set_num_threads`` and is per thread): its OpenMP regions use that
    many threads unless ``fastassoc._C.set_num_threads(n)`` overrides it.
    """
    module = _backend.compiled_core()
    if module is None:
        raise RuntimeError("the compiled core fastassoc._C is not built; reinstall with `pip install .` "
                           "or use backend='reference'")
    follow = getattr(module, "follow_torch_threads", None)
    if follow is not None:     # cores built before the thread control have no such hook
        follow(torch.get_num_threads())
    return module


def kernel(name: str):
    """The compiled function ``fastassoc._C.<name>``; a clear error when the core predates it."""
    module = core()
    function = getattr(module, name, None)
    if function is None:
        raise RuntimeError(f"the compiled core {getattr(module, '__file__', 'fastassoc._C')} has no {name}: it was "
                           "built from older sources; rebuild it (`make build`) or use backend='reference'")
    return function


def ptr(t: torch.Tensor | None) -> int:
    """``t.data_ptr()`` as an int for C++ (0 for ``None``); ``t`` must be a contiguous CPU tensor."""
    if t is None:
        return 0
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"CPU kernels need contiguous CPU tensors, got device={t.device}, "
                         f"contiguous={t.is_contiguous()}")
    return t.data_ptr()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def is_double(x: torch.Tensor) -> bool:
    """Selects the float64 instantiation of a C++ kernel (else float32)."""
    return x.dtype == torch.float64


def prepare(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Contiguous rows in the compute dtype, L2-normalised for cosine metrics."""
    x = x.to(compute_dtype(x))
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    return x.contiguous()


# Elements per chunk of the row-wise passes (squared norms, lengths, pair dots). Each chunk
# costs torch one parallel region per operator, and every region waits for its slowest
# thread: on a CPU shared with other busy processes that can be a descheduled thread's
# time slice per region (issue 11), so chunks are bounded by elements, not rows (1,024
# rows of D = 256 made a region per 1 MiB). The temporaries live in per-thread buffers
# (row_scratch): a fresh multi-MiB temporary per chunk is page-faulted whenever the
# allocator hands the memory back, which cost 4-8x the pass itself. 8 MiB of float32:
# in the last-level cache. Row results do not depend on the chunking.
ROW_CHUNK_ELEMENTS = 1 << 21


def chunk_rows(dim: int) -> int:
    """Rows per chunk of a row-wise pass over ``dim``-wide rows."""
    return max(1, ROW_CHUNK_ELEMENTS // max(dim, 1))


def row_scratch(slot: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``shape`` view of this thread's row-pass buffer ``slot`` (0-2), kept between calls.

    Separate from the tile buffers (:func:`scratch_buffer`), so a row pass never overwrites
    a tile in use. Freed by :func:`release_scratch`.
    """
    buffers = getattr(_scratch, "rows", None)
    if buffers is None:
        buffers = _scratch.rows = {}
    numel = shape[0] * shape[1]
    buffer = buffers.get((slot, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(max(1, numel), dtype=dtype)
        if numel <= ROW_CHUNK_ELEMENTS:
            buffers[(slot, dtype)] = buffer
    return buffer[:numel].view(shape)


def row_sq_sums(x: torch.Tensor) -> torch.Tensor:
    """``(x * x).sum(1)`` of 2-D ``x`` in its dtype, bit for bit, in bounded chunks."""
    out = torch.empty(x.shape[0], dtype=x.dtype)
    step = chunk_rows(x.shape[1])
    for start in range(0, x.shape[0], step):
        chunk = x[start:start + step]
        product = row_scratch(0, tuple(chunk.shape), x.dtype)
        torch.mul(chunk, chunk, out=product)
        torch.sum(product, 1, out=out[start:start + step])
    return out


def squared_norms(x: torch.Tensor, metric: str) -> torch.Tensor | None:
    """``(x * x).sum(1)`` for Euclidean metrics (the reference's expression, bit for bit), else None."""
    if metric not in ("sqeuclidean", "euclidean"):
        return None
    return row_sq_sums(x)


def row_lengths(x: torch.Tensor) -> torch.Tensor:
    """``x.norm(dim=1)`` of 2-D ``x`` (torch's vector norm, bit for bit), in bounded chunks."""
    out = torch.empty(x.shape[0], dtype=x.dtype)
    step = chunk_rows(x.shape[1])
    for start in range(0, x.shape[0], step):
        torch.linalg.vector_norm(x[start:start + step], dim=1, out=out[start:start + step])
    return out


class RowStats:
    """Per-row quantities of prepared rows that error bounds read, computed once per op call.

    ``sq`` is ``(x * x).sum(1)`` and ``length`` is ``x.norm(dim=1)``, both row-wise, so a
    slice of them equals what a block of rows would compute for itself (bit for bit). An
    op that searches many blocks of one tensor (cross_camera_graph's camera pairs) passes
    slices to :func:`fastassoc.kernels.cpu.knn.refine_lists` instead of having every
    block recompute them: fewer, larger parallel regions.
    """

    def __init__(self, x: torch.Tensor):
        self.sq = row_sq_sums(x)
        self.length = row_lengths(x)

    def __getitem__(self, item: slice) -> "RowStats":
        view = RowStats.__new__(RowStats)
        view.sq, view.length = self.sq[item], self.length[item]
        return view


def tile_shape(num_rows: int, num_cols: int) -> tuple[int, int]:
    """(row_step, col_step) of a dot tile with at most ``tile_elements()`` entries.

    Whole rows are preferred (one column tile) because the row lists then see
    every candidate in one pass; columns are split only when a single row of the
    segment exceeds the limit.
    """
    limit = _backend.tile_elements()
    col_step = max(1, min(num_cols, limit))
    row_step = max(1, min(num_rows, limit // col_step))
    return row_step, col_step


def tiles(num_rows: int, num_cols: int) -> Iterator[tuple[int, int, int, int]]:
    """``(r0, r1, c0, c1)`` tiles covering a ``num_rows x num_cols`` block, row-major.

    For a fixed row range the column ranges come in increasing order, so the
    candidates a row list sees arrive in increasing column order.
    """
    row_step, col_step = tile_shape(num_rows, num_cols)
    for r0 in range(0, num_rows, row_step):
        r1 = min(r0 + row_step, num_rows)
        for c0 in range(0, num_cols, col_step):
            yield r0, r1, c0, min(c0 + col_step, num_cols)


_scratch = threading.local()


def scratch_buffer(num_elements: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D buffer of at least ``num_elements`` kept per thread and dtype between op calls.

    A fresh multi-megabyte tensor is page-faulted on first touch, which costs about as
    much as the whole selection pass; reusing one buffer (bounded by the tile limit, so
    at most 64 MiB of float32 by default) avoids that. Freed by :func:`release_scratch`.
    """
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < num_elements:
        buffer = torch.empty(max(1, num_elements), dtype=dtype)
        if num_elements <= _backend.tile_elements():
            buffers[dtype] = buffer
    return buffer


def release_scratch() -> None:
    """Drop this thread's cached tile and row-pass buffers."""
    _scratch.buffers = {}
    _scratch.rows = {}


class DotTiles:
    """Output buffer for ``rows @ cols.T`` tiles, sized for the largest tile of an op call."""

    def __init__(self, num_elements: int, dtype: torch.dtype):
        self.buffer = scratch_buffer(num_elements, dtype)

    @classmethod
    def for_blocks(cls, shapes, dtype: torch.dtype) -> "DotTiles":
        """Buffer large enough for every tile of the ``(rows, cols)`` blocks in ``shapes``."""
        largest = 1
        for num_rows, num_cols in shapes:
            if num_rows and num_cols:
                row_step, col_step = tile_shape(num_rows, num_cols)
                largest = max(largest, row_step * col_step)
        return cls(largest, dtype)

    def mm(self, rows, cols) -> torch.Tensor:
        """``rows @ cols.T`` written into the buffer; returns the contiguous [r, c] view.

        ``rows`` and ``cols`` are float tensors, or both ``_screen.QRows`` (int8-quantised
        rows): then the tile holds their approximate inner products (int8 GEMM).
        """
        out = self.buffer[: rows.shape[0] * cols.shape[0]].view(rows.shape[0], cols.shape[0])
        if isinstance(rows, torch.Tensor):
            torch.mm(rows, cols.T, out=out)
            return out
        return rows.gram_into(cols, out)
