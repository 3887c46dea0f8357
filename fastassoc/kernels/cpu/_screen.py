"""Exact int8 screening for the CPU distance kernels.

The distance ops are GEMM-bound. An int8 GEMM with int32 accumulation (``torch._int_mm``,
oneDNN VNNI/AMX kernels) runs 4-5x faster than the float32 one on CPUs with int8 dot-product
instructions, and its integer result is exact for the quantised rows. Screening uses it to
*propose* and exact arithmetic to *decide*, so results stay those of the exact op:

1. Each row is quantised symmetrically, ``x_hat = s * q`` with ``q = round(x / s)`` in
   [-L, L] and ``s = max|x| / L`` (:class:`QRows`). Its norms ``|x|``, ``|x_hat|`` and
   the error norm ``|x - x_hat|`` are kept in float64. ``L`` is 127 where the int8 GEMM
   is exact for full-range operands, 64 for the column operand where it is exact only
   for that (oneDNN's AVX2 / AVX-512 kernels without VNNI saturate int16 pair sums), and
   where neither holds there is no int8 screening: a once-per-process probe decides
   (:func:`int8_column_levels`).
2. Tiles of ``q_rows @ q_cols.T`` come from ``torch._int_mm`` and are turned into approximate
   inner products in place (``fastassoc._C.screen_int_tile_to_float``); the ordinary tile
   kernels then select on them with a wider list (``k + SLACK`` entries).
3. For each pair, ``|x.y - x_hat.y_hat| <= |x_hat| |y - y_hat| + |x - x_hat| |y|`` (Cauchy-
   Schwarz), so a row's approximate distances are within a bound ``B_r`` of the exact ones
   for every column (:func:`row_bounds`, with a float32 rounding margin on top).
4. The candidates are rescored exactly (``fastassoc._C.screen_rescore``: float32 rows,
   float64 accumulation, the kernels' own distance formula) and re-sorted by
   (distance, index). A row is *certified* when its list holds every candidate, or when
   the widest kept approximate distance minus ``B_r`` still exceeds the exact k-th
   distance: then no column outside the list can reach the top k. Rows that are not
   certified are recomputed with the float32 GEMM path, so the answer is exact either way.

"Exact" means: the reference's distances (``fastassoc.kernels.reference._tiles``: the
fixed-order inner product of ``screen_dot``, a function of the two rows only), so indices,
ties (by the smaller index) and values equal the reference's bit for bit. The float32 paths
use the same machinery with :class:`FRows` bounds (``knn.refine_lists``).
Screening is used where it pays (``mode()``): float32 inputs, finite
values, dimension >= 32, enough columns per row that the GEMM dominates the rescoring.
``FASTASSOC_CPU_SCREEN=off|auto|always`` (or :func:`forced`) chooses; tests run both paths.
``evaluate_ranking`` screens with int8 only under ``always`` (its error band is too wide to
pay at W-eval); its default path ranks float32 GEMM tiles with the same exact rescoring
(``fastassoc/kernels/cpu/evaluation.py``). "auto" counts a GEMM as fast only where the CPU
has the instructions and oneDNN may use them (``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``
can cap it: :func:`fast_gemm`).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

from ..reference import _tiles
from . import _core

# Extra list entries kept while screening; certification fails (and the row falls back to
# the float32 path) only when more than this many columns sit within the error band.
SLACK = 16


def slack(k: int) -> int:
    """Extra entries a screened list of ``k`` keeps: ``max(SLACK, k)``.

    A deeper k-th neighbour sits further into the bulk of the distances, where more columns
    fall within the bf16 error band of it. Measured on W-jaccard (k = 30, bench/bench_rerank.py):
    16 extra entries left 12.3 % of the rows uncertified (searched again with the float32 GEMM,
    0.6 s of 3.4 s), 30 leave 0.03 % for 0.08 s more rescoring. For k <= 16 this is SLACK.
    """
    return max(SLACK, k)


# Screening needs at least this many columns per kept list entry to pay for the rescoring.
MIN_COLUMNS_PER_ENTRY = 8
MIN_DIM = 32
MODES = ("off", "auto", "always")
# Inner dimensions below this are zero-padded before torch._int_mm (see QRows.quantize).
_MIN_INT_MM_DEPTH = 4

_local = threading.local()


def mode() -> str:
    """"off", "auto" (default: screen where it pays) or "always" (tests)."""
    forced_mode = getattr(_local, "mode", None)
    if forced_mode is not None:
        return forced_mode
    value = os.environ.get("FASTASSOC_CPU_SCREEN", "auto").strip().lower()
    if value not in MODES:
        raise ValueError(f"FASTASSOC_CPU_SCREEN must be one of {MODES}, got {value!r}")
    return value


@contextlib.contextmanager
def forced(value: str):
    """Use screening mode ``value`` in this thread inside the block."""
    if value not in MODES:
        raise ValueError(f"screening mode must be one of {MODES}, got {value!r}")
    previous = getattr(_local, "mode", None)
    _local.mode = value
    try:
        yield
    finally:
        _local.mode = previous


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# CPU features that make each screening GEMM faster than float32 (oneDNN kernels), each with
# the oneDNN ISA (dnnl_cpu_isa_t bit mask, below) whose kernels use it.
_FAST_GEMM_FLAGS = {"int8": {"avx512_vnni": 0x67, "avx_vnni": 0xF, "amx_int8": 0xFEF},
                    "bf16": {"avx512_bf16": 0xE7, "amx_bf16": 0xFEF}}
# oneDNN's documented values of ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA (CPU dispatcher control)
# as dnnl_cpu_isa_t bit masks: an ISA's kernels run under a cap only when its bits are a
# subset of the cap's (the ISAs are partially ordered: AVX2_VNNI is not below AVX512_CORE).
_ONEDNN_ISA_MASKS = {
    "SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7, "AVX2_VNNI": 0xF, "AVX2_VNNI_2": 0x1F, "AVX512_CORE": 0x27,
    "AVX512_CORE_VNNI": 0x67, "AVX512_CORE_BF16": 0xE7, "AVX10_1_512": 0x1EF, "AVX512_CORE_FP16": 0x1EF,
    "AVX10_1_512_AMX": 0xFEF, "AVX512_CORE_AMX": 0xFEF, "AVX10_1_512_AMX_FP16": 0x1FEF,
    "AVX512_CORE_AMX_FP16": 0x1FEF,
}


def onednn_isa_cap() -> int | None:
    """The ISA cap oneDNN runs under (a ``dnnl_cpu_isa_t`` mask), None when uncapped.

    oneDNN reads ``ONEDNN_MAX_CPU_ISA``, else (unset or empty) ``DNNL_MAX_CPU_ISA``, once,
    case-insensitively; ``ALL``, ``DEFAULT`` and names it does not know leave it uncapped
    (names newer than this table are newer ISAs, above every one it lists). Capped below
    AVX512_CORE_BF16 on a bf16 CPU, torch's bf16 GEMM runs emulated, 8x slower than float32.
    """
    value = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip() or os.environ.get("DNNL_MAX_CPU_ISA", "").strip()
    return _ONEDNN_ISA_MASKS.get(value.upper())


def fast_gemm(kind: str) -> bool:
    """Whether this CPU runs ``kind`` ("int8" or "bf16") GEMMs faster than float32: one of
    the instructions in ``_FAST_GEMM_FLAGS``, with oneDNN allowed to use it."""
    cap, flags = onednn_isa_cap(), _cpu_flags()
    return any(flag in flags and (cap is None or mask & cap == mask) for flag, mask in _FAST_GEMM_FLAGS[kind].items())


def worthwhile(x: torch.Tensor, num_cols: int, width: int, kind: str = "int8") -> bool:
    """Whether to screen rows ``x`` (prepared, compute dtype) against ``num_cols`` columns
    with lists of ``width`` entries, using ``kind`` ("int8" or "bf16") GEMMs.

    int8 needs an exact ``torch._int_mm`` (:func:`int8_column_levels`), even under "always",
    and int32 sums that cannot overflow.
    """
    chosen = mode()
    if chosen == "off" or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] == 0:
        return False
    if chosen == "auto" and (x.shape[1] < MIN_DIM or num_cols < MIN_COLUMNS_PER_ENTRY * max(width, 1)
                             or not fast_gemm(kind)):
        return False
    return kind != "int8" or 0 < x.shape[1] * 127 * int8_column_levels() < 2 ** 31


# (rows, depth, columns) of the probe's products: single rows and columns (oneDNN's GEMV
# kernels), depths off every vector width, a blocked GEMM.
_PROBE_SHAPES = ((1, 260, 33), (33, 260, 1), (7, 37, 5), (67, 1030, 48), (128, 2048, 64))


def probe_int_mm(int_mm=torch._int_mm, shapes=_PROBE_SHAPES) -> int:
    """The widest column range ``L`` (127 or 64; 0: neither) for which ``int_mm(a, b)`` of
    int8 ``a`` [m, k] in [-127, 127] and ``b`` [k, n] in [-L, L] gave the exact product on
    every probe.

    oneDNN's int8 GEMM on CPUs without VNNI (AVX2, AVX-512 without VNNI) shifts ``a`` to
    unsigned and adds adjacent u8 x s8 products in int16 with saturation (vpmaddubsw):
    255 * 127 * 2 overflows int16, 255 * 64 * 2 does not. The probes put the extreme
    operands (both signs, equal and alternating along k, so every pair of products is
    extreme) and random ones through the kernels this process uses on each of ``shapes``
    ((m, k, n) triples), with ``b`` row-major and column-major (as :meth:`QRows.gram_into`
    passes it); the int32 results must equal float64 products (exact: every sum is an
    integer below 2^31). A kernel that raises counts as inexact.
    """
    generator = torch.Generator().manual_seed(0)
    try:
        for levels in (127, 64):
            if all(_exact_products(int_mm, levels, shape, generator) for shape in shapes):
                return levels
    except (RuntimeError, NotImplementedError):
        pass
    return 0


def _exact_products(int_mm, levels: int, shape: tuple[int, int, int], generator: torch.Generator) -> bool:
    """Whether ``int_mm`` gave exact products of every probe pattern of ``shape`` (see
    :func:`probe_int_mm`), stopping at the first that it did not."""
    m, depth, n = shape
    signs = 1 - 2 * (torch.arange(depth) % 2)
    a_patterns = [torch.full((m, depth), 127), torch.full((m, depth), -127), (127 * signs).expand(m, depth),
                  torch.randint(-127, 128, (m, depth), generator=generator)]
    b_patterns = [torch.full((depth, n), levels), torch.full((depth, n), -levels),
                  (levels * signs).unsqueeze(1).expand(depth, n), (-levels * signs).unsqueeze(1).expand(depth, n),
                  torch.randint(-levels, levels + 1, (depth, n), generator=generator)]
    for a in a_patterns:
        a = a.to(torch.int8).contiguous()
        for b in b_patterns:
            b = b.to(torch.int8).contiguous()
            # Row-major b, and b as the screening passes it (the transpose of row-major columns).
            for layout in (b, b.T.contiguous().T):
                if not torch.equal(int_mm(a, layout).double(), a.double() @ b.double()):
                    return False
    return True


@functools.lru_cache(maxsize=None)
def int8_column_levels() -> int:
    """Levels ``L`` of the column (second) operand that make ``torch._int_mm`` exact here:
    127, 64, or 0 (no int8 screening). Probed once per process, at the first int8 use
    (:func:`probe_int_mm`, about 60 ms); the row operand always uses [-127, 127]."""
    return probe_int_mm()


class QRows:
    """Rows quantised to int8 with what the error bound needs (see the module docstring).

    Slicing (``rows[a:b]``) gives the quantised rows ``a..b``; ``shape``, ``dtype`` and
    ``element_size()`` describe the float32 tiles they produce, so the tile loops of
    :mod:`fastassoc.kernels.cpu.knn` take them in place of float32 rows.
    """

    dtype = torch.float32

    def __init__(self, q, scale, norm, norm_hat, err, levels: int = 127):
        self.q, self.scale, self.norm, self.norm_hat, self.err = q, scale, norm, norm_hat, err
        self.levels = levels
        self.shape = (q.shape[0], q.shape[1])

    @classmethod
    def quantize(cls, x: torch.Tensor, levels: int | None = None) -> "QRows | None":
        """Quantise float32 rows ``x`` [n, D] (contiguous) to ``q`` in [-levels, levels]; None
        if ``x`` is not finite.

        ``levels`` defaults to :func:`int8_column_levels`, which makes the rows exact as
        either operand of this process's int8 GEMM; 127 suits rows used only as the first.
        The error norms are those of the actual levels, so the bounds need nothing else.
        """
        if levels is None:
            levels = int8_column_levels()
        if not 1 <= levels <= 127:
            raise RuntimeError(f"int8 screening with levels={levels}: torch._int_mm is not exact on this CPU "
                               "(see _screen.int8_column_levels); screen only where worthwhile() says so")
        n, dim = x.shape
        q = torch.empty(n, dim, dtype=torch.int8)
        scale = torch.empty(n, dtype=torch.float32)
        norm, norm_hat, err = (torch.empty(n, dtype=torch.float64) for _ in range(3))
        # Finiteness is checked in the kernel's pass: torch.isfinite(x) held 1.7x x in temporaries.
        # 127 is implied (also by a core built before ``levels`` existed).
        extra = (levels,) if levels != 127 else ()
        quantize = _core.kernel("screen_quantize")
        if extra and "levels" not in (quantize.__doc__ or ""):
            raise RuntimeError(f"the compiled core's screen_quantize has no levels argument (levels={levels} "
                               "needed here): it was built from older sources; rebuild it (`make build`) or use "
                               "FASTASSOC_CPU_SCREEN=off")
        if n and not quantize(_core.ptr(x), n, dim, _core.ptr(q), _core.ptr(scale), _core.ptr(norm),
                              _core.ptr(norm_hat), _core.ptr(err), *extra):
            return None
        if dim < _MIN_INT_MM_DEPTH:
            # torch._int_mm on CPU returns wrong sums for an inner dimension of 1 (torch 2.14);
            # zero columns change no inner product.
            q = torch.nn.functional.pad(q, (0, _MIN_INT_MM_DEPTH - dim)).contiguous()
        result = cls(q, scale, norm, norm_hat, err, levels)
        result.shape = (n, dim)
        return result

    def __getitem__(self, item: slice) -> "QRows":
        part = QRows(self.q[item], self.scale[item], self.norm[item], self.norm_hat[item], self.err[item],
                     self.levels)
        part.shape = (part.q.shape[0], self.shape[1])
        return part

    def element_size(self) -> int:
        return 4

    def gram_into(self, cols: "QRows", out: torch.Tensor) -> torch.Tensor:
        """Approximate ``x_hat @ y_hat.T`` (float32) written into ``out`` [rows, cols].

        Refuses columns wider than the GEMM is exact for (:func:`int8_column_levels`).
        """
        if not 0 < cols.levels <= int8_column_levels():
            raise RuntimeError(f"int8 screening: columns quantised to [-{cols.levels}, {cols.levels}], but "
                               f"torch._int_mm is exact here only for [-{int8_column_levels()}, "
                               f"{int8_column_levels()}] (_screen.int8_column_levels)")
        counts = out.view(torch.int32)
        torch._int_mm(self.q, cols.q.T, out=counts)
        _core.kernel("screen_int_tile_to_float")(out.data_ptr(), out.shape[0], out.shape[1], out.shape[1],
                                                 _core.ptr(self.scale), _core.ptr(cols.scale))
        return out


class BRows:
    """Rows rounded to bfloat16, for screening where int8's error band is too wide.

    bf16 keeps 8 significant bits per element (error <= 2^-8 |x_i|, about 5x smaller than
    int8's for typical rows), and its GEMM (oneDNN, float32 accumulation) runs 2.5-3x
    faster than float32 on CPUs with AVX512-BF16 / AMX. The GEMM rounds its output to
    bf16, so the error bound has a term relative to the inner product itself
    (:func:`lower_outside`). Same interface as :class:`QRows`.
    """

    dtype = torch.float32
    FLOAT_ACCUMULATION = True
    # Relative error of the bf16 output rounding, with slack.
    OUTPUT_ROUNDING = 2.0 ** -8 * 1.01

    def __init__(self, q, norm, norm_hat, err):
        self.q, self.norm, self.norm_hat, self.err = q, norm, norm_hat, err
        self.shape = (q.shape[0], q.shape[1])

    @classmethod
    def quantize(cls, x: torch.Tensor) -> "BRows | None":
        """Round float32 rows ``x`` [n, D] (contiguous) to bf16; None if ``x`` is not finite."""
        n, dim = x.shape
        q = torch.empty(n, dim, dtype=torch.bfloat16)
        norm, norm_hat, err = (torch.empty(n, dtype=torch.float64) for _ in range(3))
        if n and not _core.kernel("screen_quantize_bf16")(_core.ptr(x), n, dim, _core.ptr(q), _core.ptr(norm),
                                                          _core.ptr(norm_hat), _core.ptr(err)):
            return None
        return cls(q, norm, norm_hat, err)

    def __getitem__(self, item: slice) -> "BRows":
        return BRows(self.q[item], self.norm[item], self.norm_hat[item], self.err[item])

    def element_size(self) -> int:
        return 4

    def gram_into(self, cols: "BRows", out: torch.Tensor) -> torch.Tensor:
        """Approximate ``x_hat @ y_hat.T`` (bf16 GEMM, float32 accumulation) into ``out``."""
        staging = _core.scratch_buffer(out.numel(), torch.bfloat16)[: out.numel()].view(out.shape)
        torch.mm(self.q, cols.q.T, out=staging)
        out.copy_(staging)
        return out


def lower_outside(rows, cols, metric: str, last: torch.Tensor, row_sq: torch.Tensor | None = None,
                  col_sq: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [R]: a lower bound on the exact distance of any column of ``cols`` whose
    approximate distance to row r is at least ``last[r]`` (the widest one a list kept).

    ``rows``/``cols`` are both :class:`QRows` or both :class:`BRows`; ``metric`` is the
    ranking metric ("sqeuclidean", squared norms ``row_sq``/``col_sq`` as the kernels use
    them, or "cosine" on normalised rows). With ``v`` the exact and ``w`` the approximate
    inner product, ``|v - w| <= C_r + rho |w|`` where ``C_r`` bounds the input rounding
    (Cauchy-Schwarz with the rows' actual error norms) plus accumulation and ``rho`` is
    the output rounding (0 for int8, whose int32 result is exact). A column with
    ``w >= 0`` has ``w`` at most what ``last`` allows; one with ``w < 0`` has ``v < C_r``.
    """
    last = last.to(torch.float64)
    if cols.shape[0] == 0:
        return torch.full_like(last, float("inf"))
    dim = rows.shape[1]
    col_err, col_norm, col_norm_hat = cols.err.max(), cols.norm.max(), cols.norm_hat.max()
    magnitude = rows.norm_hat * col_norm_hat + rows.norm * col_norm
    rho = getattr(rows, "OUTPUT_ROUNDING", 0.0)
    # float32 sums (bf16 and float32 GEMMs; int8 sums are exact int32), any order.
    accumulation = dim * 2.0 ** -24 * 1.01 if getattr(rows, "FLOAT_ACCUMULATION", False) else 0.0
    inputs = (rows.norm_hat * col_err + rows.err * col_norm) * (1 + 1e-4)
    dot_bound = inputs + (accumulation + 2.0 ** -18) * magnitude + 1e-30 * dim
    if metric == "sqeuclidean":
        squares_row = row_sq.to(torch.float64) if row_sq is not None else rows.norm ** 2
        squares_col = col_sq.to(torch.float64) if col_sq is not None else cols.norm ** 2
        margin = 2.0 ** -18 * (squares_row + squares_col.max())
        largest_dot = ((squares_row + squares_col.max() - last) / 2).clamp_min(0)
        positive = last - 2 * dot_bound - 2 * rho * largest_dot
        negative = squares_row + squares_col.min() - 2 * dot_bound
    else:
        margin = torch.full_like(last, 2.0 ** -18)
        positive = last - dot_bound - rho * (1 - last).clamp_min(0)
        negative = 1 - dot_bound
    if not rho:
        return positive - margin
    return torch.minimum(positive, negative) - margin


class FRows:
    """Float32 rows as the float32 GEMM sees them (no input rounding), for certifying lists
    taken from float32 tiles: their error is the GEMM's accumulation alone."""

    dtype = torch.float32
    FLOAT_ACCUMULATION = True

    def __init__(self, x: torch.Tensor, sq_norms: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
        # From the squared norms when the caller has them (Euclidean), widened by their rounding;
        # else from x.norm(dim=1), or ``lengths`` when the caller computed it already (_core.RowStats).
        if sq_norms is not None:
            self.norm = sq_norms.double().sqrt() * (1 + (x.shape[1] + 2) * 2.0 ** -23)
        else:
            self.norm = (lengths if lengths is not None else x.norm(dim=1)).double() * (1 + 1e-6)
        self.norm_hat = self.norm
        self.err = torch.zeros_like(self.norm)
        self.shape = tuple(x.shape)


def row_bounds(rows: QRows, cols: QRows, metric: str, row_sq: torch.Tensor | None = None,
               col_sq: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [R]: for each row, a bound on |approximate - exact distance| over all ``cols``.

    ``metric`` is the ranking metric ("sqeuclidean" or "cosine"); the bound covers the
    inner-product error (Cauchy-Schwarz, actual error norms), float32 rounding of the
    approximate tile, of the distance formula and of the exact rescoring, with margin.
    """
    if cols.shape[0] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.float64)
    col_err, col_norm, col_norm_hat = cols.err.max(), cols.norm.max(), cols.norm_hat.max()
    dot_bound = rows.norm_hat * col_err + rows.err * col_norm
    magnitude = rows.norm_hat * col_norm_hat + rows.norm * col_norm
    rounding = 2.0 ** -18 * magnitude
    if metric == "sqeuclidean":
        squares = (row_sq.to(torch.float64) if row_sq is not None else rows.norm ** 2) + (
            col_sq.to(torch.float64).max() if col_sq is not None else col_norm ** 2)
        return 2.0 * (dot_bound + rounding) + 2.0 ** -18 * squares + 1e-30
    return dot_bound + rounding + 2.0 ** -18 + 1e-30


def rescore(rows: torch.Tensor, cols: torch.Tensor, indices: torch.Tensor, metric: str, *, col_base: int = 0,
            row_norms: torch.Tensor | None = None, col_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Exact distances [R, W] of ``rows[r]`` to ``cols[indices[r, s] - col_base]`` (inf for -1).

    float32 rows: ``fastassoc._C.screen_rescore``; float64 rows: the reference's
    ``_tiles.exact_distances`` (the same fixed-order definition, in torch).
    """
    if rows.dtype == torch.float64:
        return _exact_torch(rows, cols, torch.arange(rows.shape[0]).unsqueeze(1).expand(indices.shape),
                            indices - col_base, indices >= 0, metric, row_norms, col_norms)
    out = torch.empty(indices.shape, dtype=torch.float32)
    if indices.numel():
        _core.kernel("screen_rescore")(
            _core.ptr(rows), _core.ptr(cols), rows.shape[1], rows.shape[0], cols.shape[0], _core.ptr(indices),
            indices.shape[1], col_base, _core.METRIC_CODES[metric], _core.ptr(row_norms), _core.ptr(col_norms),
            _core.ptr(out))
    return out


# Candidates rescored first, past the k a list returns; the rest only where the error
# bound cannot rule them out (see rescore_pruned).
PRUNE_EXTRA = 4


def rescore_pruned(rows: torch.Tensor, cols: torch.Tensor, candidates: torch.Tensor, approx_values: torch.Tensor,
                   approx_rows, approx_cols, metric: str, k: int, *, col_base: int = 0,
                   row_norms: torch.Tensor | None = None, col_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Exact distances [R, W] of the screened ``candidates`` (sorted by ``approx_values``),
    ``inf`` where a candidate provably cannot be among the row's exact k nearest.

    The first ``k + PRUNE_EXTRA`` candidates of every row are rescored. A candidate further
    down has an approximate distance >= the first one left out, so its exact distance is
    >= :func:`lower_outside` of that value; where that bound exceeds the k-th smallest
    exact distance already found, k rescored candidates are strictly closer and the rest
    are skipped. Other rows rescore their remaining candidates. The k smallest
    (exact distance, index) pairs, and so the k-th exact distance that :func:`certify`
    reads, are those of the full rescoring: the rescoring is bound by memory traffic
    (one candidate row per distance), and on re-id features about 2/3 of it is saved.
    """
    width = candidates.shape[1]
    head = min(width, k + PRUNE_EXTRA)
    if head == width:
        return rescore(rows, cols, candidates, metric, col_base=col_base, row_norms=row_norms, col_norms=col_norms)
    exact = torch.full(candidates.shape, float("inf"), dtype=torch.float32)
    exact[:, :head] = rescore(rows, cols, candidates[:, :head].contiguous(), metric, col_base=col_base,
                              row_norms=row_norms, col_norms=col_norms)
    kth = exact[:, :head].kthvalue(k, dim=1).values.to(torch.float64)
    lower = lower_outside(approx_rows, approx_cols, metric, approx_values[:, head], row_norms, col_norms)
    closed = lower > kth
    if not bool(closed.all()):
        # Closed rows' tails become list padding (-1: inf, skipped) rather than a copy of the
        # open rows: on W-jaccard 84 % of the rows are open, and their copy was 89 MB.
        tail = candidates[:, head:].clone()
        tail[closed] = -1
        exact[:, head:] = rescore(rows, cols, tail, metric, col_base=col_base, row_norms=row_norms,
                                  col_norms=col_norms)
    return exact


def exact_distances(rows: torch.Tensor, cols: torch.Tensor, row_index: torch.Tensor, col_index: torch.Tensor,
                    metric: str, *, row_norms: torch.Tensor | None = None,
                    col_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Exact distances [E] of the pairs ``(rows[row_index[e]], cols[col_index[e]])`` (as :func:`rescore`)."""
    row_index, col_index = row_index.contiguous(), col_index.contiguous()
    if rows.dtype == torch.float64:
        return _exact_torch(rows, cols, row_index, col_index, torch.ones_like(row_index, dtype=torch.bool), metric,
                            row_norms, col_norms)
    out = torch.empty(row_index.shape[0], dtype=torch.float32)
    if out.numel():
        _core.kernel("screen_exact_distance")(
            _core.ptr(rows), _core.ptr(cols), rows.shape[1], _core.ptr(row_index), _core.ptr(col_index),
            out.shape[0], _core.METRIC_CODES[metric], _core.ptr(row_norms), _core.ptr(col_norms), _core.ptr(out))
    return out


def _exact_torch(rows, cols, row_index, col_index, present, metric, row_norms, col_norms) -> torch.Tensor:
    """Exact distances of ``(rows[row_index], cols[col_index])`` where ``present`` (inf elsewhere), in torch."""
    out = torch.full(row_index.shape, float("inf"), dtype=rows.dtype)
    r, c = row_index[present], col_index[present]
    out[present] = _tiles.exact_distances(rows[r], cols[c], metric, row_norms[r] if row_norms is not None else None,
                                          col_norms[c] if col_norms is not None else None)
    return out


def certify(approx_values: torch.Tensor, exact_kth: torch.Tensor, lower: torch.Tensor,
            available: torch.Tensor | int) -> torch.Tensor:
    """bool [R]: rows whose exact top k is certainly inside their screened list.

    ``approx_values`` [R, W] sorted ascending (approximate distances the list kept),
    ``exact_kth`` [R] the exact k-th smallest distance among them, ``lower`` [R] from
    :func:`lower_outside` for ``approx_values[:, -1]``, ``available`` the number of
    candidate columns of each row (a list holding all of them is certified). A column
    outside the list has an approximate distance >= the last kept one, so its exact
    distance is >= ``lower``; strictly above the k-th it cannot enter the top k.
    """
    width = approx_values.shape[1]
    holds_all = torch.as_tensor(available) <= width
    return holds_all | (lower > exact_kth.to(torch.float64))
