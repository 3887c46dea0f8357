"""NumPy, CuPy and DLPack arrays in, the same array type out.

Every public op is wrapped by :func:`accepts_arrays`. What a call returns follows
from the kinds of its array arguments (positional or keyword):

* **torch tensors only** (or no array at all): the op is called unchanged. Under
  ``torch.compile`` the wrapper reduces to the bare call, so it adds no graph break.
* **NumPy** (``numpy.ndarray``, and ``scipy.sparse`` matrices or arrays where an op
  takes a CSR matrix): arrays enter through ``torch.from_numpy``, sharing memory.
  Read-only, non-native byte order and negative-stride arrays are copied first
  (torch cannot share them), except an argument the op updates in place
  (``ema_update_``'s ``bank``), which must be shareable and otherwise raises. Outputs
  come back as NumPy arrays sharing the result tensors' memory; sparse CSR results as
  ``scipy.sparse.csr_array``, a :class:`~fastassoc.ops._sparse.CSRMatrix` as one of NumPy
  components, :class:`~fastassoc.ops.evaluation.RankingResult` with a NumPy ``cmc``, and
  the in-place op returns the caller's own array. ``segmented_cross_entropy`` returns
  its loss as a 0-d NumPy array: NumPy inputs carry no gradient.
* **CuPy** (``cupy.ndarray``, ``cupyx.scipy.sparse`` matrices): arrays enter through
  ``torch.from_dlpack`` (same device, no copy) and results leave through
  ``cupy.from_dlpack``; sparse CSR results as ``cupyx.scipy.sparse.csr_matrix``
  (int32 indices, as CuPy requires).
* **any other object with** ``__dlpack__`` (JAX, TensorFlow, ...): it enters through
  ``torch.from_dlpack`` and results stay torch tensors, since there is no general way
  to build the caller's type back. Such objects may be immutable, so they are refused
  as an argument the op updates in place.

NumPy and CuPy arrays cannot be mixed with each other or with torch tensors in one
call: the result type would be ambiguous (and a torch tensor may carry a gradient a
NumPy result cannot), so such a call raises a ``TypeError`` saying which argument is
which. Python scalars, strings and NumPy scalars pass through untouched; anything
else (a list, say) reaches the op, which names the argument in its own error.
Under ``torch.compile`` a call with torch tensors is the bare op call (no graph break);
dense NumPy arrays work there too, since dynamo traces them as tensors: results come back
as NumPy arrays and an in-place argument is updated in the caller's array. Sparse results
then need ``as_tuple=True`` (torch.compile cannot build sparse tensors), and SciPy, CuPy
and other DLPack objects are not traceable: convert them before the compiled region.
The eager path adds about 1 microsecond to a call made of tensors and plain values.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from typing import Any, Callable

import numpy as np
import torch

from .ops._sparse import CSRMatrix

__all__ = ["accepts_arrays"]

_PLAIN = (int, float, complex, str, bytes, bool, type(None))
# Exact types that are never foreign arrays: a call made only of these skips all inspection.
_TRIVIAL_TYPES = frozenset((torch.Tensor, torch.nn.Parameter) + _PLAIN)


def _module_of(value) -> str:
    return type(value).__module__ or ""


def _kind(value) -> str | None:
    """``"torch"``, ``"numpy"``, ``"cupy"``, ``"dlpack"`` or None (not an array).

    Array libraries are looked up in ``sys.modules``: an array of a library exists only
    once that library is imported, so nothing is imported here.
    """
    if isinstance(value, torch.Tensor):
        return "torch"
    if isinstance(value, _PLAIN):
        return None
    if isinstance(value, CSRMatrix):
        kinds = {_kind(part) for part in value[:3]} - {None}
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        return "numpy"
    scipy_sparse = sys.modules.get("scipy.sparse")
    if scipy_sparse is not None and scipy_sparse.issparse(value):
        return "numpy"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(value, cupy.ndarray):
        return "cupy"
    cupy_sparse = sys.modules.get("cupyx.scipy.sparse")
    if cupy_sparse is not None and cupy_sparse.issparse(value):
        return "cupy"
    if numpy is not None and isinstance(value, numpy.generic):
        # NumPy scalars (np.float32(0.5), np.int64(3)) are numbers to the ops, and carry __dlpack__.
        return None
    if hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__"):
        return "dlpack"
    return None


def _describe(value) -> str:
    return f"{_module_of(value)}.{type(value).__qualname__}"


# ---------------------------------------------------------------------------------------------
# Into torch


def _numpy_to_torch(name: str, array, in_place: bool) -> torch.Tensor:
    np = sys.modules["numpy"]
    if isinstance(array, np.ma.MaskedArray):
        raise TypeError(f"{name} is a NumPy masked array; its mask would be ignored. Pass "
                        f"{name}.filled(fill_value) or {name}.data explicitly")
    shareable = (array.flags.writeable and array.dtype.isnative
                 and all(stride >= 0 for stride in array.strides))
    if not shareable:
        if in_place:
            reason = ("read-only" if not array.flags.writeable else
                      "in non-native byte order" if not array.dtype.isnative else "laid out with negative strides")
            raise ValueError(f"{name} is updated in place, but the NumPy array given is {reason}, so torch "
                             f"cannot write to its memory; pass a writable native array (np.array({name}) "
                             f"copies one) and use the returned array")
        # torch.from_numpy cannot share these (and warns on read-only arrays): copy once.
        array = np.array(array, dtype=array.dtype.newbyteorder("="), order="C", copy=True)
    try:
        return torch.from_numpy(array)
    except TypeError as error:
        raise TypeError(f"{name} is a NumPy array of dtype {array.dtype}, which torch cannot hold ({error})") from None


def _scipy_to_torch(name: str, matrix) -> torch.Tensor:
    csr = matrix.tocsr()
    if not csr.has_canonical_format:
        # scipy's own meaning of duplicates (they add up); sorted columns are what the ops require.
        csr = csr.copy()
        csr.sum_duplicates()
    values = _numpy_to_torch(f"{name}.data", csr.data, False)
    return torch.sparse_csr_tensor(torch.from_numpy(csr.indptr).to(torch.int64),
                                   torch.from_numpy(csr.indices).to(torch.int64), values,
                                   size=tuple(int(n) for n in csr.shape), check_invariants=False)


def _cupy_sparse_to_torch(matrix) -> torch.Tensor:
    csr = matrix.tocsr()
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    return torch.sparse_csr_tensor(torch.from_dlpack(csr.indptr).to(torch.int64),
                                   torch.from_dlpack(csr.indices).to(torch.int64), torch.from_dlpack(csr.data),
                                   size=tuple(int(n) for n in csr.shape), check_invariants=False)


def _to_torch(name: str, value, in_place: bool):
    if isinstance(value, CSRMatrix):
        parts = [_to_torch(f"{name}.{field}", part, False)
                 for field, part in zip(CSRMatrix._fields[:3], value[:3])]
        return CSRMatrix(*parts, value.size)
    kind = _kind(value)
    if kind == "numpy":
        if isinstance(value, sys.modules["numpy"].ndarray):
            return _numpy_to_torch(name, value, in_place)
        return _scipy_to_torch(name, value)
    if kind == "cupy":
        if isinstance(value, sys.modules["cupy"].ndarray):
            return torch.from_dlpack(value)
        return _cupy_sparse_to_torch(value)
    if kind == "dlpack":
        if in_place:
            raise TypeError(f"{name} is updated in place, which a {_describe(value)} given through DLPack may not "
                            f"allow (it can be immutable); pass a torch tensor, NumPy or CuPy array")
        try:
            return torch.from_dlpack(value)
        except Exception as error:  # noqa: BLE001 - libraries raise anything from __dlpack__
            raise TypeError(f"{name}: a {_describe(value)} could not be imported through DLPack ({error})") from None
    return value


# ---------------------------------------------------------------------------------------------
# Back out


def _tensor_to_numpy(t: torch.Tensor):
    if t.layout == torch.sparse_csr:
        return _csr_to_scipy(t.crow_indices(), t.col_indices(), t.values(), tuple(t.shape))
    return t.detach().numpy()


def _csr_to_scipy(crow, col, values, size):
    try:
        import scipy.sparse
    except ImportError:
        raise ImportError("a sparse result for NumPy inputs is returned as scipy.sparse.csr_array, but scipy is "
                          "not installed; install scipy or pass as_tuple=True for NumPy components") from None
    return scipy.sparse.csr_array((_tensor_to_numpy(values), _tensor_to_numpy(col), _tensor_to_numpy(crow)),
                                  shape=tuple(int(n) for n in size))


def _tensor_to_cupy(t: torch.Tensor):
    cupy = sys.modules["cupy"]
    if t.layout == torch.sparse_csr:
        return _csr_to_cupy(t.crow_indices(), t.col_indices(), t.values(), tuple(t.shape))
    t = t.detach()
    if t.device.type == "cpu":
        return cupy.asarray(t.numpy())
    return cupy.from_dlpack(t)


def _csr_to_cupy(crow, col, values, size):
    import cupyx.scipy.sparse

    # cupyx.scipy.sparse holds int32 indices only.
    if values.numel() >= 2**31:
        raise ValueError(f"the sparse result has {values.numel()} entries, more than a cupyx.scipy.sparse matrix "
                         f"(int32 indices) can hold; pass as_tuple=True for CuPy components")
    return cupyx.scipy.sparse.csr_matrix(
        (_tensor_to_cupy(values), _tensor_to_cupy(col.to(torch.int32)), _tensor_to_cupy(crow.to(torch.int32))),
        shape=tuple(int(n) for n in size))


def _from_torch(value, kind: str):
    if isinstance(value, torch.Tensor):
        return _tensor_to_numpy(value) if kind == "numpy" else _tensor_to_cupy(value)
    if isinstance(value, CSRMatrix):
        parts = [_from_torch(part, kind) for part in value[:3]]
        return CSRMatrix(*parts, value.size)
    if isinstance(value, tuple):
        converted = [_from_torch(part, kind) for part in value]
        return type(value)(*converted) if hasattr(value, "_fields") else tuple(converted)
    if isinstance(value, list):
        return [_from_torch(part, kind) for part in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {field.name: _from_torch(getattr(value, field.name), kind) for field in dataclasses.fields(value)
                   if isinstance(getattr(value, field.name), torch.Tensor)}
        return dataclasses.replace(value, **changes) if changes else value
    return value


# ---------------------------------------------------------------------------------------------
# The decorator


def _call_kind(op_name: str, named: list[tuple[str, Any]]) -> str | None:
    """The kind of array the caller speaks: None (torch only), "numpy", "cupy" or "dlpack"."""
    seen: dict[str, list[str]] = {}
    for name, value in named:
        kind = _kind(value)
        if kind is not None:
            seen.setdefault(kind, []).append(name)
    if "mixed" in seen:
        raise TypeError(f"{op_name}: the components of {', '.join(seen['mixed'])} are of different array "
                        f"types; use one kind for all three")
    foreign = [kind for kind in ("numpy", "cupy") if kind in seen]
    if len(foreign) > 1 or (foreign and "torch" in seen):
        labels = {"numpy": "NumPy arrays", "cupy": "CuPy arrays", "torch": "torch tensors",
                  "dlpack": "DLPack objects"}
        described = "; ".join(f"{labels[kind]}: {', '.join(names)}" for kind, names in seen.items())
        raise TypeError(f"{op_name} got arrays of different kinds in one call ({described}); the result "
                        f"type would be ambiguous: pass all as one kind (torch.from_numpy / "
                        f"torch.from_dlpack, tensor.numpy() / cupy.from_dlpack)")
    if foreign:
        return foreign[0]
    return "dlpack" if "dlpack" in seen else None


def _traced_call(op: Callable, op_name: str, in_place: str | None, parameters: list[str], args, kwargs):
    """The call as dynamo traces it: tensors pass straight through, NumPy arrays convert.

    Dynamo holds NumPy arrays as tensors, so ``torch.from_numpy`` and ``.numpy()`` cost
    nothing in the graph. SciPy and CuPy objects cannot be traced and are left to the op.
    Plain loops, not the eager path's helpers, keep what dynamo inlines small.
    """
    numpy_names, torch_names = [], []
    for position, value in enumerate(args):
        name = parameters[position] if position < len(parameters) else f"argument {position}"
        if isinstance(value, np.ndarray):
            numpy_names.append(name)
        elif isinstance(value, torch.Tensor):
            torch_names.append(name)
    for name, value in kwargs.items():
        if isinstance(value, np.ndarray):
            numpy_names.append(name)
        elif isinstance(value, torch.Tensor):
            torch_names.append(name)
    if not numpy_names:
        return op(*args, **kwargs)
    if torch_names:
        raise TypeError(f"{op_name} got NumPy arrays ({', '.join(numpy_names)}) and torch tensors "
                        f"({', '.join(torch_names)}) in one call; pass all as one kind")
    converted_args = [torch.from_numpy(value) if isinstance(value, np.ndarray) else value for value in args]
    converted_kwargs = {name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
                        for name, value in kwargs.items()}
    out = op(*converted_args, **converted_kwargs)
    if in_place is not None and in_place in numpy_names:
        position = parameters.index(in_place)
        return kwargs[in_place] if in_place in kwargs else args[position]
    return _from_torch(out, "numpy")


def accepts_arrays(op: Callable | None = None, *, in_place: str | None = None) -> Callable:
    """Let ``op`` take NumPy, CuPy and DLPack arrays and return the caller's array type.

    Parameters
    ----------
    op : callable
        A public op taking and returning torch tensors (also ``CSRMatrix``, named
        tuples, tuples and dataclasses of tensors).
    in_place : str, optional
        The parameter ``op`` updates in place and returns (``"bank"`` for
        ``ema_update_``): a foreign array there is shared, never copied, and the
        caller's own object is returned.

    Returns
    -------
    The wrapped op, with ``op``'s name, docstring and signature (``functools.wraps``).

    Examples
    --------
    >>> import numpy as np, torch
    >>> double = accepts_arrays(lambda x: x * 2)
    >>> double(np.arange(3.0))
    array([0., 2., 4.])
    >>> double(torch.arange(3.0))
    tensor([0., 2., 4.])
    """
    if op is None:
        return functools.partial(accepts_arrays, in_place=in_place)
    parameters = list(inspect.signature(op).parameters)
    op_name = getattr(op, "__name__", "op")

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return _traced_call(op, op_name, in_place, parameters, args, kwargs)
        if _TRIVIAL_TYPES.issuperset(map(type, args)) and _TRIVIAL_TYPES.issuperset(map(type, kwargs.values())):
            return op(*args, **kwargs)
        named = [(parameters[i] if i < len(parameters) else f"argument {i}", value) for i, value in enumerate(args)]
        named += list(kwargs.items())
        kind = _call_kind(op_name, named)
        if kind is None:
            return op(*args, **kwargs)
        converted = [_to_torch(name, value, name == in_place) for name, value in named]
        out = op(*converted[:len(args)], **dict(zip(kwargs, converted[len(args):])))
        if in_place is not None:
            original = dict(named).get(in_place)
            if original is not None and _kind(original) not in (None, "torch", "dlpack"):
                return original
        return out if kind == "dlpack" else _from_torch(out, kind)

    return wrapper
