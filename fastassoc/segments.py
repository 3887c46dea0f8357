"""Segments from per-row labels, camera layouts and CSR row selection.

Per-camera ops take their segments as offsets over rows that are already grouped by
segment (``anchor_offsets`` of :func:`fastassoc.topk_anchors`, ``class_offsets`` of
:func:`fastassoc.segmented_cross_entropy`). Data rarely arrives that way: a training set
holds one camera id per row, in any order. :func:`segments_from_labels` turns such labels
into the stable grouping an offsets-based op needs, and maps indices both ways, so results
come back in the caller's row order:

1. ``seg = segments_from_labels(labels)``;
2. run the op on ``rows[seg.order]`` with ``offsets=seg.offsets``, passing other rows'
   labels through :meth:`Segments.segment_of` and row indices through
   :meth:`Segments.to_sorted`;
3. map returned row indices back with :meth:`Segments.to_original`.

Grouping is stable (rows keep their order inside a label), so "ties go to the smaller
index" means the same thing before and after the permutation.

Everything here is built from tensor ops (stable sort, searchsorted, scatter, cumsum)
that never allocate per label id (a camera id of 2**40 costs nothing). Under
``torch.compile`` every shape depends only on the number of rows, never on label values,
so the helpers trace with ``fullgraph=True``; eager mode reads one count (the number of
distinct labels) to keep no more segments than it needs. Argument checks that read values
(non-negative labels, label ranges, CSR structure) run in eager mode only; under
``torch.compile`` they are skipped, because they would need a host sync, and out-of-range
indices are then left for the op's own checks to report (see :meth:`Segments.to_sorted`).
Meta tensors follow the compiled path (shapes only).

:class:`CameraLayout`, :func:`csr_rows` and :func:`one_hot_csr` are the helpers the
trainers in :mod:`fastassoc.methods` use to build per-camera class layouts and the sparse
targets of a batch.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .ops._custom import fake_index
from .ops._sparse import CSRMatrix

__all__ = ["Segments", "segments_from_labels", "CameraLayout", "csr_rows", "one_hot_csr",
           "renumber_csr_columns", "MAX_DENSE_SEGMENTS"]

#: The most segments a dense layout (one segment per label id: ``num_segments`` of
#: :func:`segments_from_labels`, camera ids of :class:`CameraLayout`) may have; 2**24 offsets
#: are 128 MiB. Larger label ids are compacted by :func:`segments_from_labels` instead.
MAX_DENSE_SEGMENTS = 2 ** 24


# -- argument checks ------------------------------------------------------------------------------

def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


def _checking() -> bool:
    # Value checks force a host sync and graph-break torch.compile; the compiled path skips them.
    return not torch.compiler.is_compiling()


def _int_vector(name: str, t, *, length: int | None = None, device=None) -> torch.Tensor:
    """A 1-D integer tensor, returned as contiguous int64 (metadata checks only)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor of integers, got {_describe(t)}")
    fake_index(name, t, length=length, device=None if device is None else torch.device(device))
    return t.to(torch.int64).contiguous()


def _in_range(name: str, t: torch.Tensor, low: int, high: int | None) -> None:
    """Eager-only value check: every entry of ``t`` in ``[low, high)`` (``high=None``: no bound).

    Meta tensors have no values to check; their shapes alone flow through the helpers.
    """
    if not _checking() or t.numel() == 0 or t.is_meta:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low:
        raise ValueError(f"{name} values must be >= {low}, found {lo}")
    if high is not None and hi >= high:
        raise ValueError(f"{name} values must be < {high}, found {hi}")


def _count(name: str, value, *, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} = {value} exceeds the limit of {maximum} dense segments "
                         f"(fastassoc.segments.MAX_DENSE_SEGMENTS); leave it None to compact the labels")
    return value


# -- segments from labels ---------------------------------------------------------------------------

class Segments(NamedTuple):
    """Rows grouped by label: the layout an offsets-based op wants, and the maps back.

    Built by :func:`segments_from_labels`. ``N`` is the number of rows, ``S`` the number
    of segments.

    Attributes
    ----------
    order : Tensor [N], int64
        ``order[r]`` is the original row at sorted position ``r``: rows grouped by segment,
        original order kept inside a segment (a stable sort).
    inverse : Tensor [N], int64
        ``inverse[i]`` is the sorted position of original row ``i``
        (``order[inverse] == arange(N)``).
    offsets : Tensor [S+1], int64
        Sorted positions ``offsets[s] : offsets[s+1]`` hold segment ``s``.
    sorted_labels : Tensor [N], int64
        ``labels[order]``: the label of every sorted position (non-decreasing).
    segment_labels : Tensor [S], int64
        The label of every segment; ``-1`` for the trailing empty segments of compacted
        labels.
    compact : bool
        True when labels were compacted (``num_segments=None``), False when segment ``s`` is
        label ``s``.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor
    sorted_labels: torch.Tensor
    segment_labels: torch.Tensor
    compact: bool

    @property
    def num_segments(self) -> int:
        """``S``, the number of segments (empty ones included)."""
        return self.offsets.shape[0] - 1

    def segment_of(self, labels: torch.Tensor, *, name: str = "labels") -> torch.Tensor:
        """The segment of other rows given by their labels (e.g. the queries' cameras).

        Parameters
        ----------
        labels : Tensor [M], integer
            Labels in the same numbering as the labels the segments were built from. A label
            no row carries maps to an empty segment (compacted labels: the last one,
            ``S - 1``, always empty), so a query with such a label finds no candidates.
        name : str
            Argument name used in error messages (ops pass their own, e.g. ``"query_segments"``).

        Returns
        -------
        Tensor [M], int64, segment indices in ``[0, S)``

        Examples
        --------
        >>> import torch
        >>> seg = segments_from_labels(torch.tensor([7, 3, 7]))
        >>> seg.segment_of(torch.tensor([3, 7, 5])).tolist()   # 5: no row, the empty segment
        [0, 1, 2]
        """
        labels = _int_vector(name, labels, device=self.offsets.device)
        if not self.compact:
            _in_range(name, labels, 0, self.num_segments)
            return labels.clone()
        _in_range(name, labels, 0, None)
        num_rows = self.order.shape[0]
        if num_rows == 0:
            return torch.zeros_like(labels)
        position = torch.searchsorted(self.sorted_labels, labels).clamp(max=num_rows - 1)
        found = self.sorted_labels[position] == labels
        # ``position`` is the first row of its label; the last segment starting at or before
        # it is that label's segment (every compacted label's segment is non-empty).
        rank = torch.searchsorted(self.offsets, position, right=True) - 1
        return torch.where(found, rank, torch.full_like(labels, self.num_segments - 1))

    def to_sorted(self, index: torch.Tensor, *, name: str = "index") -> torch.Tensor:
        """Original row indices -> sorted positions; ``-1`` (and any other value outside
        ``[0, N)``) is returned unchanged, so the op's own range check still reports it.

        Parameters
        ----------
        index : Tensor [...], integer
        name : str
            Argument name used in error messages (e.g. ``"exclude"``).

        Returns
        -------
        Tensor [...], int64

        Examples
        --------
        >>> import torch
        >>> seg = segments_from_labels(torch.tensor([1, 0, 1]))
        >>> seg.to_sorted(torch.tensor([2, -1, 0])).tolist()
        [2, -1, 1]
        """
        return _gather_valid(self.inverse, index, name)

    def to_original(self, index: torch.Tensor) -> torch.Tensor:
        """Sorted positions -> original row indices; ``-1`` padding stays ``-1``.

        Parameters
        ----------
        index : Tensor [...], integer (e.g. the indices an op returned)

        Returns
        -------
        Tensor [...], int64

        Examples
        --------
        >>> import torch
        >>> seg = segments_from_labels(torch.tensor([1, 0, 1]))
        >>> seg.to_original(torch.tensor([[0, 2, -1]])).tolist()
        [[1, 2, -1]]
        """
        return _gather_valid(self.order, index, "index")


def _gather_valid(table: torch.Tensor, index: torch.Tensor, name: str) -> torch.Tensor:
    if (not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dtype.is_complex
            or index.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {_describe(index)}")
    if index.device != table.device:
        raise ValueError(f"{name} is on {index.device} but the segments on {table.device}; move it with .to(device)")
    index = index.to(torch.int64)
    size = table.shape[0]
    if size == 0:
        return index.clone()
    valid = (index >= 0) & (index < size)
    return torch.where(valid, table[index.clamp(0, size - 1)], index)


def segments_from_labels(labels: torch.Tensor, num_segments: int | None = None, *,
                         length: int | None = None, device=None, name: str = "labels") -> Segments:
    """Group rows by an integer label (e.g. camera id), stably, for offsets-based ops.

    Parameters
    ----------
    labels : Tensor [N], integer, non-negative, any order
        The label of every row.
    num_segments : int, optional
        ``None`` (default): labels are compacted, so label values may be arbitrarily large
        (2**40 costs nothing). The ``G`` distinct labels, in increasing order, become
        segments ``0 .. G-1`` (``segment_labels[g]`` is the label of segment ``g``),
        followed by empty segments: one in eager mode (``S = G + 1``, reading ``G`` costs
        one host sync), ``N + 1 - G`` under ``torch.compile`` and for meta tensors
        (``S = N + 1``, a shape that depends on ``N`` alone, which is what keeps this
        traceable). Either way segment ``S - 1`` is empty. Otherwise
        segment ``s`` is label ``s``: labels must lie in ``[0, num_segments)``, ``S =
        num_segments`` (at most :data:`MAX_DENSE_SEGMENTS`), and empty labels are empty
        segments.
    length : int, optional
        Required length of ``labels`` (ops pass their row count).
    device : torch.device, optional
        Required device of ``labels`` (ops pass their features' device).
    name : str
        Argument name used in error messages (ops pass their own, e.g. ``"anchor_segments"``).

    Returns
    -------
    Segments
        ``order`` [N], ``inverse`` [N], ``offsets`` [S+1], ``sorted_labels`` [N],
        ``segment_labels`` [S], all int64 on ``labels``' device, and ``compact``.

    Raises
    ------
    TypeError
        ``labels`` is not an integer tensor, ``num_segments`` not an int.
    ValueError
        ``labels`` is not 1-D, has the wrong length, holds a negative label (or one
        ``>= num_segments``), or ``num_segments`` is too large. Value checks run in eager
        mode only (see the module docstring).

    Examples
    --------
    >>> import torch
    >>> seg = segments_from_labels(torch.tensor([5, 2, 5, 2**40, 2]))
    >>> seg.order.tolist()              # rows of label 2, then 5, then 2**40
    [1, 4, 0, 2, 3]
    >>> seg.offsets.tolist()            # 3 labels, then one empty segment
    [0, 2, 4, 5, 5]
    >>> seg.segment_labels[:3].tolist() == [2, 5, 2**40]
    True
    >>> seg.inverse.tolist()            # where each original row went
    [2, 0, 3, 4, 1]
    >>> segments_from_labels(torch.tensor([2, 0, 2]), num_segments=4).offsets.tolist()
    [0, 1, 1, 3, 3]
    """
    labels = _int_vector(name, labels, length=length, device=device)
    num_rows = labels.shape[0]
    device = labels.device
    if num_segments is not None:
        num_segments = _count("num_segments", num_segments, maximum=MAX_DENSE_SEGMENTS)
        _in_range(name, labels, 0, num_segments)
    else:
        _in_range(name, labels, 0, None)
    sorted_labels, order = torch.sort(labels, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(num_rows, dtype=torch.int64, device=device)
    if num_segments is not None:
        segment = sorted_labels
        num_out = num_segments
        segment_labels = torch.arange(num_segments, dtype=torch.int64, device=device)
    else:
        # Dense rank of every sorted row's label: a new segment starts where the label changes.
        starts = torch.ones_like(sorted_labels, dtype=torch.bool)
        starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
        segment = starts.to(torch.int64).cumsum(0) - 1
        if _checking() and not labels.is_meta:
            # Eager: the G used segments and one empty one. Padding to N + 1 would cost the ops
            # (the reference loss ran 1.8x slower with 8,000 mostly empty class segments).
            num_out = (int(segment[-1]) + 1 if num_rows else 0) + 1
        else:
            num_out = num_rows + 1     # G is unknown while tracing: pad to the largest G + 1
        segment_labels = torch.full((num_out,), -1, dtype=torch.int64, device=device)
        segment_labels.scatter_(0, segment, sorted_labels)
    counts = torch.zeros(num_out, dtype=torch.int64, device=device)
    counts.scatter_add_(0, segment, torch.ones_like(segment))
    offsets = torch.zeros(num_out + 1, dtype=torch.int64, device=device)
    offsets[1:] = counts.cumsum(0)
    return Segments(order, inverse, offsets, sorted_labels, segment_labels, num_segments is None)


# -- camera layout ----------------------------------------------------------------------------------

@dataclass
class CameraLayout:
    """Rows (e.g. training tracklets) sorted by camera, as the per-camera ops want them.

    Per-camera ops (``topk_anchors`` segments, ``segmented_cross_entropy`` class segments)
    need each camera's rows contiguous. ``order[r]`` is the row at camera-sorted position
    ``r`` (stable: rows keep their order within a camera), ``position[i]`` the sorted
    position of row ``i``; ``offsets`` delimits the cameras' rows, one segment per camera id
    (camera ``c`` is segment ``c``, also when it has no rows).

    Attributes
    ----------
    cameras : Tensor [T], int64, camera of each row (original order)
    order : Tensor [T], int64
    position : Tensor [T], int64
    offsets : Tensor [C+1], int64, C = ``num_cameras``
    sorted_cameras : Tensor [T], int64, camera of each camera-sorted row

    Examples
    --------
    >>> import torch
    >>> layout = CameraLayout.from_cameras(torch.tensor([2, 0, 2, 1]))
    >>> layout.order.tolist(), layout.offsets.tolist(), layout.num_cameras
    ([1, 3, 0, 2], [0, 1, 2, 4], 3)
    >>> layout.position.tolist()
    [2, 0, 3, 1]
    """

    cameras: torch.Tensor
    order: torch.Tensor
    position: torch.Tensor
    offsets: torch.Tensor
    sorted_cameras: torch.Tensor

    @classmethod
    def from_cameras(cls, cameras, num_cameras: int | None = None) -> "CameraLayout":
        """The layout of rows with camera ids ``cameras``.

        Parameters
        ----------
        cameras : Tensor or array-like [T], non-negative integers
            Camera id of every row (kept on the CPU, like the trainers' layouts; move the
            result with :meth:`to`).
        num_cameras : int, optional
            Number of cameras ``C`` (> every id). Default: 1 + the largest id. Camera ids
            index segments directly, so ``C`` is limited to :data:`MAX_DENSE_SEGMENTS`; use
            :func:`segments_from_labels` for sparse, huge ids.

        Returns
        -------
        CameraLayout
        """
        if not isinstance(cameras, torch.Tensor):
            try:
                cameras = torch.as_tensor(cameras)
            except (TypeError, ValueError, RuntimeError) as error:
                raise TypeError(f"cameras must be a 1-D tensor of integers, got {_describe(cameras)}") from error
        cameras = _int_vector("cameras", cameras)
        if cameras.is_meta:
            raise ValueError("cameras is a meta tensor: a CameraLayout needs the camera ids' values")
        cameras = cameras.cpu()
        _in_range("cameras", cameras, 0, None)
        largest = int(cameras.max()) if cameras.numel() else -1
        if num_cameras is None:
            if largest + 1 > MAX_DENSE_SEGMENTS:
                raise ValueError(f"cameras holds the id {largest}: CameraLayout keeps one segment per camera id, at "
                                 f"most {MAX_DENSE_SEGMENTS} (fastassoc.segments.MAX_DENSE_SEGMENTS); renumber the "
                                 f"cameras or use fastassoc.segments_from_labels, which compacts ids")
            num_cameras = largest + 1
        else:
            num_cameras = _count("num_cameras", num_cameras, maximum=MAX_DENSE_SEGMENTS)
            if largest >= num_cameras:
                raise ValueError(f"cameras values must be < num_cameras ({num_cameras}), found {largest}")
        seg = segments_from_labels(cameras, num_segments=num_cameras, name="cameras")
        return cls(cameras, seg.order, seg.inverse, seg.offsets, seg.sorted_labels)

    @property
    def num_cameras(self) -> int:
        return len(self.offsets) - 1

    def to(self, device) -> "CameraLayout":
        """The same layout with every tensor on ``device``."""
        return CameraLayout(*(t.to(device) for t in (self.cameras, self.order, self.position, self.offsets,
                                                        self.sorted_cameras)))


# -- sparse CSR helpers -----------------------------------------------------------------------------

def _sparse_csr(crow, col, values, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _components(name: str, matrix) -> tuple[CSRMatrix, bool]:
    """``matrix`` as a validated CSRMatrix, and whether it came as a torch sparse tensor."""
    if isinstance(matrix, CSRMatrix):
        sparse = False
    elif isinstance(matrix, torch.Tensor) and matrix.layout == torch.sparse_csr:
        if matrix.dim() != 2:
            raise ValueError(f"{name} must be a 2-D sparse CSR matrix, got shape {tuple(matrix.shape)}")
        matrix = CSRMatrix.from_sparse_csr(matrix)
        sparse = True
    else:
        layout = matrix.layout if isinstance(matrix, torch.Tensor) else None
        raise TypeError(f"{name} must be a torch sparse CSR tensor (tensor.to_sparse_csr()) or a "
                        f"fastassoc CSRMatrix, got {layout if layout is not None else _describe(matrix)}")
    num_rows, num_columns = (int(s) for s in matrix.size)
    crow = _int_vector(f"{name} crow_indices", matrix.crow_indices, length=num_rows + 1)
    col = _int_vector(f"{name} col_indices", matrix.col_indices, device=crow.device)
    values = matrix.values
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.shape[0] != col.shape[0]:
        raise ValueError(f"{name} values must be a 1-D tensor with one entry per column index ({col.shape[0]}), "
                         f"got {_describe(values)}")
    if values.device != crow.device:
        raise ValueError(f"{name} values are on {values.device} but its indices on {crow.device}")
    if _checking() and not crow.is_meta:
        nnz = col.shape[0]
        if int(crow[0]) != 0 or int(crow[-1]) != nnz:
            raise ValueError(f"{name} crow_indices must start at 0 and end at nnz ({nnz}), "
                             f"got {int(crow[0])} and {int(crow[-1])}")
        if bool((crow[1:] < crow[:-1]).any()):
            raise ValueError(f"{name} crow_indices must be non-decreasing")
        _in_range(f"{name} col_indices", col, 0, num_columns)
    return CSRMatrix(crow, col, values, (num_rows, num_columns)), sparse


def _entry_rows(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    """Row of every stored entry; fixed shape [nnz] (no data-dependent size)."""
    return torch.searchsorted(crow, torch.arange(nnz, dtype=torch.int64, device=crow.device), right=True) - 1


def renumber_csr_columns(matrix, columns: torch.Tensor, num_columns: int | None = None, *, name: str = "matrix"):
    """The CSR ``matrix`` with column ``j`` moved to ``columns[j]``, columns re-sorted per row.

    The column permutation that goes with a row permutation of the classes: with
    ``seg = segments_from_labels(class_labels)``, ``renumber_csr_columns(targets,
    seg.inverse)`` are the targets of the sorted classes ``weight[seg.order]``. Shapes
    depend only on the input's, so this traces under ``torch.compile`` with a
    :class:`~fastassoc.ops._sparse.CSRMatrix`.

    Parameters
    ----------
    matrix : torch sparse CSR tensor or CSRMatrix [R, M]
    columns : Tensor [M], integer in ``[0, num_columns)``
        New index of every column (need not be a permutation; entries that land on one
        column are kept as separate entries).
    num_columns : int, optional
        Width of the result (default ``M``).
    name : str
        Name of ``matrix`` in error messages (ops pass their own, e.g. ``"targets"``).

    Returns
    -------
    Same form as ``matrix`` [R, num_columns]; values in ``matrix``'s dtype.

    Examples
    --------
    >>> import torch
    >>> m = torch.tensor([[1., 0., 2.], [0., 3., 0.]]).to_sparse_csr()
    >>> renumber_csr_columns(m, torch.tensor([2, 0, 1])).to_dense()
    tensor([[0., 2., 1.],
            [3., 0., 0.]])
    """
    csr, sparse = _components(name, matrix)
    num_rows, width = csr.size
    if isinstance(columns, torch.Tensor) and columns.dim() == 1 and columns.shape[0] != width:
        raise ValueError(f"columns must have one entry per column of {name} ({width}), got {columns.shape[0]}")
    columns = _int_vector("columns", columns, length=width, device=csr.crow_indices.device)
    num_columns = width if num_columns is None else _count("num_columns", num_columns)
    _in_range("columns", columns, 0, num_columns)
    nnz = csr.col_indices.shape[0]
    new_col = columns[csr.col_indices]
    # Two stable sorts give (row, column) order without a row * width key that could overflow.
    by_column = torch.argsort(new_col, stable=True)
    rows = _entry_rows(csr.crow_indices, nnz)[by_column]
    order = by_column[torch.argsort(rows, stable=True)]
    result = CSRMatrix(csr.crow_indices.clone(), new_col[order], csr.values[order], (num_rows, num_columns))
    return result.to_sparse_csr() if sparse else result


def csr_rows(matrix, rows: torch.Tensor, columns: torch.Tensor | None = None, num_columns: int | None = None):
    """Rows ``rows`` of a CSR ``matrix`` as a new CSR matrix (vectorised), columns optionally renumbered.

    Selects a batch's targets from a [N, M] label or graph matrix: row ``b`` of the result is
    row ``rows[b]`` of ``matrix``.

    Parameters
    ----------
    matrix : torch sparse CSR tensor or CSRMatrix [N, M]
    rows : Tensor [B], integer in ``[0, N)`` (repeats allowed)
    columns : Tensor [M], integer, optional
        Renumber the column indices through this map (e.g. tracklet -> camera-sorted class
        row, :attr:`CameraLayout.position`); columns are re-sorted within each row.
    num_columns : int, optional
        Width of the result (default ``M``); renumbered columns must be below it.

    Returns
    -------
    Same form as ``matrix`` [B, num_columns]
        Values keep ``matrix``'s dtype. The number of stored entries depends on the data,
        so this is an eager-mode helper (it reads one size from the tensors).

    Examples
    --------
    >>> import torch
    >>> m = torch.tensor([[1., 0., 2.], [0., 3., 0.]]).to_sparse_csr()
    >>> csr_rows(m, torch.tensor([1, 0, 1])).to_dense()
    tensor([[0., 3., 0.],
            [1., 0., 2.],
            [0., 3., 0.]])
    >>> csr_rows(m, torch.tensor([0]), columns=torch.tensor([1, 2, 0])).to_dense()
    tensor([[2., 1., 0.]])
    """
    csr, sparse = _components("matrix", matrix)
    num_rows, width = csr.size
    device = csr.crow_indices.device
    rows = _int_vector("rows", rows, device=device)
    _in_range("rows", rows, 0, num_rows)
    if columns is not None:
        columns = _int_vector("columns", columns, length=width, device=device)
    out_width = width if num_columns is None else _count("num_columns", num_columns)
    if columns is None:
        if out_width != width:
            raise ValueError(f"num_columns ({out_width}) differs from the matrix width ({width}) but no "
                             f"columns map is given")
    else:
        _in_range("columns", columns, 0, out_width)
    if device.type == "meta":
        raise ValueError("csr_rows needs the values of matrix's crow_indices (the result's size depends on them); "
                         "got meta tensors")
    crow, col, val = csr.crow_indices, csr.col_indices, csr.values
    starts, ends = crow[rows], crow[rows + 1]
    lengths = ends - starts
    new_crow = torch.zeros(rows.shape[0] + 1, dtype=torch.int64, device=device)
    new_crow[1:] = lengths.cumsum(0)
    total = int(new_crow[-1])
    # Position of every output entry inside the input's col/values arrays.
    owner = torch.repeat_interleave(torch.arange(rows.shape[0], device=device), lengths, output_size=total)
    source = starts[owner] + torch.arange(total, device=device) - new_crow[:-1][owner]
    result = CSRMatrix(new_crow, col[source], val[source], (rows.shape[0], width))
    if columns is not None:
        result = renumber_csr_columns(result, columns, out_width)
    return result.to_sparse_csr() if sparse else result


def one_hot_csr(columns: torch.Tensor, num_columns: int, values: torch.Tensor | None = None, *,
                as_tuple: bool = False):
    """One entry per row: ``values[b]`` (1 by default) at ``(b, columns[b])``.

    Hard targets for :func:`fastassoc.segmented_cross_entropy`. Shapes depend only on the
    inputs' shapes, so with ``as_tuple=True`` this traces under ``torch.compile``.

    Parameters
    ----------
    columns : Tensor [B], integer in ``[0, num_columns)``
    num_columns : int >= 0
    values : Tensor [B], float, optional
        Entry values (cast to float32); default 1.
    as_tuple : bool
        Return a :class:`~fastassoc.ops._sparse.CSRMatrix` instead of a torch sparse CSR tensor.

    Returns
    -------
    torch sparse CSR tensor or CSRMatrix [B, num_columns], float32 values

    Examples
    --------
    >>> import torch
    >>> one_hot_csr(torch.tensor([2, 0]), 3).to_dense()
    tensor([[0., 0., 1.],
            [1., 0., 0.]])
    >>> one_hot_csr(torch.tensor([1]), 2, torch.tensor([0.5]), as_tuple=True).col_indices.tolist()
    [1]
    """
    columns = _int_vector("columns", columns)
    num_columns = _count("num_columns", num_columns)
    _in_range("columns", columns, 0, num_columns)
    rows = columns.shape[0]
    device = columns.device
    if values is None:
        values = torch.ones(rows, device=device)
    else:
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.shape[0] != rows:
            raise ValueError(f"values must be a 1-D tensor with one entry per column ({rows}), got {_describe(values)}")
        if values.device != device:
            raise ValueError(f"values is on {values.device} but columns on {device}; move it with .to(device)")
        values = values.float()
    crow = torch.arange(rows + 1, device=device, dtype=torch.int64)
    result = CSRMatrix(crow, columns, values, (rows, num_columns))
    return result if as_tuple else _sparse_csr(crow, columns, values, (rows, num_columns))
