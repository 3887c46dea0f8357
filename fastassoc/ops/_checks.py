"""Argument validation shared by every public op.

Each check names the offending argument and says what was wrong; nothing is
silently truncated, cast across devices or guessed. Checks return the argument
normalised (int64 index tensors, contiguous features) so backends can rely on it.
"""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
METRICS = ("sqeuclidean", "euclidean", "cosine")
PRECISIONS = ("highest", "tf32")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


def features(name: str, x, *, ndim: int = 2, allow_empty: bool = True) -> torch.Tensor:
    """A finite floating-point tensor with ``ndim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(x)}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    # A finite sum proves every entry finite at the cost of one reduction; only an
    # inf/NaN sum (which overflow of large finite values can also give) pays the exact check.
    if x.numel() and not bool(torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))):
        if not bool(torch.isfinite(x).all()):
            bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
            raise ValueError(f"{name} contains NaN or inf (first at index {tuple(bad)})")
    return x.contiguous()


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


def index_vector(name: str, t, *, length: int | None, low: int, high: int, device=None) -> torch.Tensor:
    """A 1-D integer tensor with values in ``[low, high)``, returned as int64."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {_describe(t)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {t.shape[0]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}; move it with .to(device)")
    t = t.to(torch.int64).contiguous()
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi >= high:
            bad = lo if lo < low else hi
            raise ValueError(f"{name} values must lie in [{low}, {high}), found {bad}")
    return t


def offsets(name: str, t, *, total: int, device=None) -> torch.Tensor:
    """Segment offsets: int64 [S+1], starting at 0, non-decreasing, ending at ``total``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {_describe(t)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries (S+1 for S segments), got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}; move it with .to(device)")
    t = t.to(torch.int64).contiguous()
    first, last = int(t[0]), int(t[-1])
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {first}")
    if last != total:
        raise ValueError(f"{name} must end at the number of rows it splits ({total}), got {last}")
    if bool((t[1:] < t[:-1]).any()):
        position = int(torch.nonzero(t[1:] < t[:-1])[0]) + 1
        raise ValueError(f"{name} must be non-decreasing, but entry {position} ({int(t[position])}) "
                         f"is below entry {position - 1} ({int(t[position - 1])})")
    return t


def csr(name: str, t, *, shape: tuple[int, int], device=None) -> torch.Tensor:
    """A sparse CSR matrix of the given shape with finite, non-negative values."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.sparse_csr:
        raise TypeError(f"{name} must be a torch sparse CSR tensor (tensor.to_sparse_csr()), got "
                        f"{_describe(t) if not isinstance(t, torch.Tensor) else t.layout}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}; move it with .to(device)")
    values = t.values()
    if not values.dtype.is_floating_point:
        raise TypeError(f"{name} values must be floating point, got {values.dtype}")
    if values.numel():
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} contains NaN or inf values")
        if bool((values < 0).any()):
            raise ValueError(f"{name} values must be non-negative, found {float(values.min())}")
    return t
