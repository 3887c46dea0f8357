"""Argument validation shared by every public op.

Each check names the offending argument and says what was wrong; nothing is
silently truncated, cast across devices or guessed. Checks return the argument
normalised (int64 index tensors, contiguous features, a :class:`CSRMatrix` with
int64 indices) so backends can rely on it: a backend never reads an index it has
not been promised is in range, so no input makes a kernel read or write out of
bounds.

What is checked, and where
--------------------------
* Metadata (types, dims, dtypes, shapes, devices, meta tensors, sizes that
  cannot be allocated) is checked on the host, on every device, before any
  allocation.
* Values (finiteness, squared norms that would overflow the compute dtype,
  index ranges, offsets, CSR structure, the loss scale against the operands)
  are read by one reduction per tensor (``torch.aminmax`` for features, which
  costs what a ``sum`` does and allocates nothing), and each tensor once per
  call: the loss scale check is handed the ``max|x|`` the features check found, the
  camera count the range check's maximum (every pass over a large CPU tensor is a
  parallel region of torch's; on a shared CPU each costs, issue 11). On CPU tensors a failure
  raises ``ValueError`` at once, with the first offending position where it is
  cheap to find.
* **Deferred on CUDA.** Reading a value on the host forces a device sync, so on
  CUDA tensors the same conditions are queued with ``torch._assert_async(cond,
  message)``: the op launches no extra sync and a violated check surfaces as a
  device-side assertion carrying the message (fatal to the CUDA context, as any
  device assert is; run on CPU or with ``CUDA_LAUNCH_BLOCKING=1`` to get the exact
  error with positions). Two checks are *more conservative* on CUDA because the
  exact fallback would need the host to decide whether to run it: the squared-norm
  check asserts ``max|x|^2 * D * 4 <= finfo.max`` (CPU falls back to exact row
  norms), and the logit bound asserts ``|scale| * D * max|f| * max|w| * 2 <=
  finfo.max`` (CPU falls back to exact row norms). Both reject only features whose
  largest entry is around 1e17 (float32, D = 512) or more.
* Under ``torch.compile`` these checks run inside the custom ops' real
  implementations (opaque to dynamo), never in the traced graph; fake
  implementations check metadata only.

Duplicate columns in a CSR row are allowed and summed, as ``to_dense()`` does:
every backend treats each stored entry as one term of the loss and of its
gradient (tests/ops/test_bad_inputs.py checks this against a dense oracle).
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from ._sparse import CSRMatrix

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
METRICS = ("sqeuclidean", "euclidean", "cosine")
PRECISIONS = ("highest", "tf32")
INT64_MAX = 2**63 - 1
# Rows per float64 chunk of the exact (rare) row-norm checks: bounds their scratch memory.
_NORM_CHUNK_ROWS = 1 << 14

def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


def _deferred(t: torch.Tensor) -> bool:
    """Whether value checks on ``t`` are queued on the device instead of read on the host."""
    return t.device.type == "cuda"


def _require(cond: torch.Tensor, message: str, exact=None) -> None:
    """Fail with ``message`` unless the 0-d bool ``cond`` holds.

    On CUDA the check is queued (``torch._assert_async``, no host sync). Elsewhere
    it raises ``ValueError`` with ``exact()`` (the message with positions) when given.
    """
    if _deferred(cond):
        torch._assert_async(cond, message)
    elif not bool(cond):
        raise ValueError(exact() if exact is not None else message)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute distances and logits in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def memory_bytes(device) -> int | None:
    """Memory an allocation on ``device`` can at most get: physical RAM, or the GPU's total."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "meta":
        return None
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def allocation(name: str, num_elements: int, element_size: int, *, device=None, what: str = "its output",
               hint: str | None = None) -> None:
    """Refuse, before allocating, ``num_elements`` of ``element_size`` bytes that cannot exist.

    ``name`` is the argument that asked for them (``"k"``, ``"max_rank"``, ``"x"``); ``what``
    says what would be allocated. Raises ``ValueError`` when the count or the byte size is
    beyond int64, or the bytes exceed the device's memory (:func:`memory_bytes`).
    """
    num_elements, element_size = int(num_elements), int(element_size)
    total = num_elements * element_size
    fix = f"; {hint}" if hint else ""
    if num_elements > INT64_MAX or total > INT64_MAX:
        raise ValueError(f"{name} asks for {what} of {num_elements} elements ({total} bytes), beyond the int64 "
                         f"range of tensor sizes{fix}")
    limit = memory_bytes(device)
    if limit is not None and total > limit:
        where = torch.device(device) if device is not None else torch.device("cpu")
        raise ValueError(f"{name} asks for {what} of {num_elements} elements ({_bytes(total)}), more than the "
                         f"{_bytes(limit)} of memory on {where}{fix}")


def not_meta(name: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: fastassoc ops need data; call the op on real tensors, or "
                         f"trace it under torch.compile / FakeTensorMode, where its fake implementation "
                         f"computes output shapes")


def _scaled_row_norms(x: torch.Tensor, amax: float) -> torch.Tensor:
    """Row norms of 2-D ``x`` divided by ``amax`` (its largest |entry|), float64 [N].

    Dividing first keeps them exact and finite even for float64 inputs near finfo.max;
    chunks bound the float64 scratch. Only the rare inputs near overflow get here.
    """
    x = x.detach()
    return torch.cat([torch.linalg.vector_norm(x[start:start + _NORM_CHUNK_ROWS].to(torch.float64) / amax, dim=1)
                      for start in range(0, x.shape[0], _NORM_CHUNK_ROWS)])


def _max_row_norm_log(x: torch.Tensor, amax: float) -> float:
    """log of the largest row norm of 2-D ``x`` (``amax`` = max|x| > 0), overflow-free."""
    return math.log(float(_scaled_row_norms(x, amax).max())) + math.log(amax)


def _abs_max(name: str, x: torch.Tensor) -> torch.Tensor:
    """max|x| as a 0-d compute-dtype tensor; NaN/inf rejected (exactly on CPU, queued on CUDA).

    One ``aminmax`` pass: NaN propagates into it and inf shows in it, so a finite
    pair proves every entry finite without an ``isfinite`` mask.
    """
    low, high = torch.aminmax(x.detach().reshape(-1))
    amax = torch.maximum(-low, high).to(compute_dtype(x.dtype))

    def first_bad() -> str:
        bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
        return f"{name} contains NaN or inf (first at index {tuple(bad)})"

    _require(torch.isfinite(amax), f"{name} contains NaN or inf", first_bad)
    return amax


def _squared_norms_fit(name: str, x: torch.Tensor, amax: torch.Tensor) -> None:
    """Reject rows whose squared norm would overflow the compute dtype.

    Distance kernels form |q|^2 + |a|^2 - 2 q.a; every term is at most 4 max_row |x|^2,
    so the bound is finfo.max / 4 on each row's squared norm.
    """
    dtype = compute_dtype(x.dtype)
    limit = torch.finfo(dtype).max
    dim = x.shape[-1]
    message = (f"{name} is too large: its squared row norms overflow {str(dtype).replace('torch.', '')} "
               f"(distances need |x|^2 <= {limit / 4:.3g}); rescale the features (e.g. L2-normalise them)")
    if _deferred(x):
        # Conservative bound, decidable without a sync: |x_i|^2 <= D max|x|^2.
        bound = amax.to(torch.float64) ** 2 * (dim * 4)
        torch._assert_async(bound <= limit, message)
        return
    peak = float(amax)
    if peak * peak * dim * 4 <= limit:
        return
    norms = _scaled_row_norms(x.reshape(-1, dim), peak)
    # |x_i| <= sqrt(limit / 4), compared as |x_i| / peak to stay finite for float64.
    too_large = torch.nonzero(norms > math.sqrt(limit / 4) / peak)
    if too_large.numel():
        row = int(too_large[0])
        raise ValueError(f"{message} (row {row} has norm {float(norms[row]) * peak:.3g})")


def features(name: str, x, *, ndim: int = 2, allow_empty: bool = True) -> torch.Tensor:
    """A finite floating-point tensor with ``ndim`` dimensions, returned contiguous.

    Rejects NaN/inf (naming the first bad index) and rows whose squared norms would
    overflow the compute dtype (:func:`compute_dtype`), with one ``aminmax`` pass in the
    common case. A non-contiguous input (an expanded view) is refused before its
    contiguous copy is allocated when that copy cannot fit in memory.
    """
    return features_with_peak(name, x, ndim=ndim, allow_empty=allow_empty)[0]


def features_with_peak(name: str, x, *, ndim: int = 2,
                       allow_empty: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`features` and the ``max|x|`` it read (0-d, compute dtype; None when empty), for
    a later check of the same tensor (:func:`logit_scale`) that need not read it again: each
    pass over a large tensor is a parallel region of torch's (issue 11)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(x)}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    not_meta(name, x)
    if not x.is_contiguous():
        allocation(name, x.numel(), x.element_size(), device=x.device,
                   what=f"a contiguous copy of its shape {tuple(x.shape)} view",
                   hint="pass fewer rows, or materialise only the rows you need")
    x = x.contiguous()
    amax = None
    if x.numel():
        amax = _abs_max(name, x)
        _squared_norms_fit(name, x, amax)
    return x, amax


def logit_scale(scale, features: torch.Tensor, weight: torch.Tensor, *,
                peaks: tuple[torch.Tensor | None, torch.Tensor | None] | None = None) -> float:
    """The loss scale ``s`` as a float, refused when ``s * f.w`` can overflow the compute dtype.

    ``features`` [B, D] and ``weight`` [C, D] are already checked by :func:`features`;
    ``peaks``: their ``max|x|`` from :func:`features_with_peak` (read again when None).
    The logits ``z = s f_b.w_j`` and the loss terms ``lse - z`` (at most ``2 max|z|`` apart)
    must stay finite: ``2 |s| max_b |f_b| max_j |w_j| <= finfo.max`` (Cauchy-Schwarz).
    The common case is decided from ``max|f|`` and ``max|w|`` (``|f_b| <= sqrt(D) max|f|``).
    """
    scale = real("scale", scale)
    dtype = compute_dtype(features.dtype)
    limit = torch.finfo(dtype).max
    type_name = str(dtype).replace("torch.", "")
    if abs(scale) > limit:
        raise ValueError(f"scale must be finite in {type_name} (the loss computes in it), got {scale!r}")
    if features.numel() == 0 or weight.numel() == 0:
        return scale
    dim = features.shape[1]
    message = (f"scale={scale!r} makes the logits scale * features . weight overflow {type_name} for these "
               f"features and weight; lower scale or rescale the features (e.g. L2-normalise them)")
    f_known, w_known = peaks if peaks is not None else (None, None)
    f_amax = (f_known if f_known is not None else _peak(features)).to(torch.float64)
    w_amax = (w_known if w_known is not None else _peak(weight)).to(torch.float64)
    gain = max(abs(scale), 1.0)  # the kernels form f.w before scaling it
    if _deferred(features):
        torch._assert_async(f_amax * w_amax * (gain * dim * 2) <= limit, message)
        return scale
    f_peak, w_peak = float(f_amax), float(w_amax)
    if f_peak == 0 or w_peak == 0 or f_peak * w_peak * gain * dim * 2 <= limit:
        return scale
    log_bound = (math.log(gain) + math.log(2) + _max_row_norm_log(features, f_peak)
                 + _max_row_norm_log(weight, w_peak))
    if log_bound > math.log(limit):
        raise ValueError(message)
    return scale


def _peak(x: torch.Tensor) -> torch.Tensor:
    """max|x| (0-d), one ``aminmax`` pass."""
    low, high = torch.aminmax(x.detach().reshape(-1))
    return torch.maximum(-low, high)


def same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        described = ", ".join(f"{name} is {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"feature tensors must share one dtype, got {described}; cast with .to(dtype)")


def same_feature_dim(**tensors: torch.Tensor) -> None:
    dims = {name: t.shape[-1] for name, t in tensors.items() if t is not None}
    if len(set(dims.values())) > 1:
        described = ", ".join(f"{name} has {dim}" for name, dim in dims.items())
        raise ValueError(f"feature dimensions must match, got {described}")


def same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        described = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {described}; move them with .to(device)")


def non_negative_int(name: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def real(name: str, value, *, low: float | None = None, high: float | None = None,
         allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def _integer_tensor(name: str, t, *, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {_describe(t)}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    not_meta(name, t)
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but the features are on {device}; move it with .to(device)")


def _int64_copy(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous int64, refused before a copy that cannot be allocated (expanded views)."""
    if t.dtype != torch.int64 or not t.is_contiguous():
        allocation(name, t.numel(), 8, device=t.device, what=f"an int64 contiguous copy of its shape {tuple(t.shape)}",
                   hint="pass fewer rows, or materialise only the rows you need")
    return t.to(torch.int64).contiguous()


def _in_range(name: str, t: torch.Tensor, low: int, high: int) -> torch.Tensor | None:
    """Every entry of int64 ``t`` lies in ``[low, high)``; exact first offender on CPU.

    Returns the largest entry (0-d, on ``t``'s device; None when ``t`` is empty), a by-product
    of the one ``aminmax`` pass.
    """
    if not t.numel():
        return None
    lo, hi = torch.aminmax(t)
    message = f"{name} values must lie in [{low}, {high})"

    def exact() -> str:
        position = int(torch.nonzero((t < low) | (t >= high))[0])
        return f"{message}, found {int(t[position])} at position {position}"

    _require((lo >= low) & (hi < high), message, exact)
    return hi


def index_vector(name: str, t, *, length: int | None, low: int, high: int, device=None) -> torch.Tensor:
    """A 1-D integer tensor with values in ``[low, high)``, returned as int64."""
    return _index_vector_and_max(name, t, length=length, low=low, high=high, device=device)[0]


def _index_vector_and_max(name: str, t, *, length: int | None, low: int, high: int, device=None):
    """:func:`index_vector` and its largest entry (0-d tensor, None when empty)."""
    _integer_tensor(name, t, device=device)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {t.shape[0]}")
    t = _int64_copy(name, t)
    return t, _in_range(name, t, low, high)


def _monotone(name: str, t: torch.Tensor, *, total: int, total_name: str) -> None:
    """int64 ``t`` starts at 0, never decreases and ends at ``total``."""
    message = f"{name} must start at 0, be non-decreasing and end at {total_name} ({total})"

    def exact() -> str:
        first, last = int(t[0]), int(t[-1])
        if first != 0:
            return f"{name} must start at 0, got {first}"
        drops = torch.nonzero(t[1:] < t[:-1])
        if drops.numel():
            position = int(drops[0]) + 1
            return (f"{name} must be non-decreasing, but entry {position} ({int(t[position])}) "
                    f"is below entry {position - 1} ({int(t[position - 1])})")
        return f"{name} must end at {total_name} ({total}), got {last}"

    ok = (t[0] == 0) & (t[-1] == total)
    if t.shape[0] > 1:
        ok = ok & (t[1:] >= t[:-1]).all()
    _require(ok, message, exact)


def offsets(name: str, t, *, total: int, device=None) -> torch.Tensor:
    """Segment offsets: int64 [S+1], starting at 0, non-decreasing, ending at ``total``."""
    _integer_tensor(name, t, device=device)
    if t.dim() != 1 or t.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries (S+1 for S segments), got shape {tuple(t.shape)}")
    t = _int64_copy(name, t)
    _monotone(name, t, total=total, total_name="the number of rows it splits")
    return t


def camera_ids(name: str, cameras, *, num_rows: int, num_cameras: int | None = None,
               device=None) -> tuple[torch.Tensor, int]:
    """Camera labels as int64 ids and the number of cameras the kernels iterate over.

    Labels are any non-negative integers (below ``num_cameras`` when it is given).
    Kernels allocate per-camera arrays and loop over camera pairs, so when the camera
    count (``num_cameras``, or ``max + 1``) exceeds ``num_rows`` the labels are replaced
    by their ranks among the distinct labels (``torch.unique``): only which rows share a
    camera matters to every op, empty cameras contribute nothing, and the rank order
    keeps the cameras' order. Returns ``(ids [N] int64, count)`` with ``count <= max(N, 1)``
    after compaction. Reading ``max + 1`` syncs on CUDA (the count sizes host-side loops).
    """
    if num_cameras is not None:
        num_cameras = non_negative_int("num_cameras", num_cameras, minimum=1)
    high = num_cameras if num_cameras is not None else 2**62
    cameras, largest = _index_vector_and_max(name, cameras, length=num_rows, low=0, high=high, device=device)
    if num_cameras is None:
        num_cameras = int(largest) + 1 if largest is not None else 0
    if num_cameras > max(num_rows, 1):
        distinct, cameras = torch.unique(cameras, sorted=True, return_inverse=True)
        cameras = cameras.to(torch.int64).contiguous()
        num_cameras = max(int(distinct.shape[0]), 1)
    return cameras, num_cameras


def csr_components(name: str, t) -> CSRMatrix:
    """The components of a torch sparse CSR tensor or :class:`CSRMatrix`, nothing read.

    What a public wrapper may call before handing the three tensors to a custom op: it
    checks only the form (no values, no devices, meta and fake tensors pass), so dynamo
    can trace it. :func:`csr` does the full validation inside the op.
    """
    if isinstance(t, CSRMatrix):
        return t
    if isinstance(t, torch.Tensor) and t.layout == torch.sparse_csr:
        if t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D sparse CSR matrix, got shape {tuple(t.shape)}")
        return CSRMatrix(t.crow_indices(), t.col_indices(), t.values(), (t.shape[0], t.shape[1]))
    got = f"layout {t.layout}" if isinstance(t, torch.Tensor) else _describe(t)
    raise TypeError(f"{name} must be a torch sparse CSR tensor (tensor.to_sparse_csr()) or a "
                    f"fastassoc CSRMatrix, got {got}")


def csr(name: str, t, *, shape: tuple[int, int], device=None) -> CSRMatrix:
    """A CSR matrix of ``shape`` with finite, non-negative values, structure validated.

    Accepts a torch sparse CSR tensor or a :class:`CSRMatrix`. ``crow_indices`` must be
    1-D integer [R+1], start at 0, never decrease and end at nnz; ``col_indices`` 1-D
    integer [nnz] in ``[0, C)``; ``values`` 1-D floating [nnz], finite and >= 0; all on
    ``device``. Duplicate columns in a row are allowed and mean their sum (as
    ``to_dense()``). Returns a :class:`CSRMatrix` with int64 contiguous indices and
    contiguous values, so kernels may index with them without further checks.
    """
    crow, cols, values, size = csr_components(name, t)
    rows, cols_count = (int(s) for s in shape)
    try:
        size = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise TypeError(f"{name}.size must be a pair of ints, got {size!r}") from None
    if size != (rows, cols_count):
        raise ValueError(f"{name} must have shape {(rows, cols_count)}, got {size}")
    for part, tensor in (("crow_indices", crow), ("col_indices", cols)):
        _integer_tensor(f"{name}.{part}", tensor, device=device)
        if tensor.dim() != 1:
            raise ValueError(f"{name}.{part} must be 1-D, got shape {tuple(tensor.shape)}")
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name}.values must be a torch.Tensor, got {_describe(values)}")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} values must be floating point (float32, float16, bfloat16 or float64), "
                        f"got {values.dtype}")
    not_meta(f"{name}.values", values)
    if device is not None and values.device != torch.device(device):
        raise ValueError(f"{name}.values is on {values.device} but the features are on {device}; "
                         f"move it with .to(device)")
    if values.dim() != 1:
        raise ValueError(f"{name}.values must be 1-D (no batched or hybrid CSR), got shape {tuple(values.shape)}")
    if crow.shape[0] != rows + 1:
        raise ValueError(f"{name}.crow_indices must have length rows + 1 = {rows + 1}, got {crow.shape[0]}")
    nnz = cols.shape[0]
    if values.shape[0] != nnz:
        raise ValueError(f"{name} has {nnz} col_indices but {values.shape[0]} values; they must match")
    crow = _int64_copy(f"{name}.crow_indices", crow)
    cols = _int64_copy(f"{name}.col_indices", cols)
    if not values.is_contiguous():
        allocation(f"{name}.values", values.numel(), values.element_size(), device=values.device,
                   what="a contiguous copy")
    values = values.contiguous()
    _monotone(f"{name}.crow_indices", crow, total=nnz, total_name="nnz")
    _in_range(f"{name}.col_indices", cols, 0, cols_count)
    if nnz:
        low, high = torch.aminmax(values.detach())
        # NaN propagates into aminmax, so low >= 0 and a finite high prove all entries finite, >= 0.
        ok = (low >= 0) & torch.isfinite(high)
        message = f"{name} values must be finite and non-negative"

        def exact() -> str:
            position = int(torch.nonzero(~(torch.isfinite(values) & (values >= 0)))[0])
            return f"{message}, found {float(values[position])} at entry {position}"

        _require(ok, message, exact)
    return CSRMatrix(crow, cols, values, (rows, cols_count))
