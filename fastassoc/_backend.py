"""The only dispatch code in fastassoc: what is built, what is chosen, and why.

Every public op calls :func:`resolve` with the op name, the requested backend and
the tensors it will touch. ``"auto"`` follows the tensors' device and never moves
data: CPU tensors use the compiled C++/OpenMP core when it implements the op,
CUDA tensors use the Triton or CUDA kernels; the pure-torch ``"reference"``
backend is the fallback everywhere. An explicit backend that is not built, not
implemented for the op, or not usable on the tensors' device raises an error that
says what to do.

Backend implementations live in ``fastassoc.kernels.<backend>.<family>`` and are
named ``<op>_<backend>`` (``ema_update_`` becomes ``ema_update_<backend>``). They
receive arguments that the public op has already validated and normalised.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import warnings
from typing import Callable, Iterable

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

# op name -> family module name (one file per family in every backend).
FAMILIES = {
    "topk_anchors": "knn",
    "mutual_knn": "knn",
    "cross_camera_graph": "graph",
    "knn_soft_labels": "graph",
    "segmented_cross_entropy": "loss",
    "agglomerative_merge": "cluster",
    "ema_update_": "memory",
    "evaluate_ranking": "evaluation",
    "jaccard_distance": "rerank",
    "dbscan": "rerank",
    "cluster_centres": "rerank",
}

# Fast kernels an open issue still owes: (op, backend) -> the issue. available_backends()
# reports them as "not implemented yet (...)"; tests/test_backend.py fails both when a built
# backend lacks an op not listed here and when a listed kernel exists (then drop the entry).
PENDING: dict[tuple[str, str], str] = {}

# Which backends can run on which device type, and the order "auto" tries them.
_AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

# Default bound on the number of elements of any distance/logit tile an op may
# hold at once (float32: 64 MiB). Backends read it through tile_elements().
_DEFAULT_TILE_ELEMENTS = 1 << 24
_tile_elements = _DEFAULT_TILE_ELEMENTS


def tile_elements() -> int:
    """Largest number of elements of a B-by-N tile an op may hold at once."""
    return _tile_elements


@contextlib.contextmanager
def tile_limit(max_elements: int):
    """Temporarily bound every op's tiles to ``max_elements`` elements.

    Results never depend on the tile size (tests check this); the limit only
    trades memory for the number of passes.
    """
    global _tile_elements
    if not isinstance(max_elements, int) or max_elements < 1:
        raise ValueError(f"max_elements must be a positive int, got {max_elements!r}")
    previous = _tile_elements
    _tile_elements = max_elements
    try:
        yield
    finally:
        _tile_elements = previous


@functools.lru_cache(maxsize=None)
def compiled_core():
    """The compiled extension ``fastassoc._C``, or ``None`` when it is not built.

    ``FASTASSOC_EXTENSION=/path/to/_C.so`` loads a development build instead of
    the installed one (used while iterating on csrc/ without reinstalling).
    """
    override = os.environ.get("FASTASSOC_EXTENSION")
    if override:
        spec = importlib.util.spec_from_file_location("fastassoc._C", override)
        if spec is None or spec.loader is None:
            raise ImportError(f"FASTASSOC_EXTENSION={override!r} is not a loadable extension module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["fastassoc._C"] = module
        return _with_wait_policy(module)
    try:
        return _with_wait_policy(importlib.import_module("fastassoc._C"))
    except ImportError as error:
        # Once per process (this function is cached): a pure-Python install, made where no
        # C++ compiler worked, or a core that no longer loads. `auto` then runs the slow
        # reference on CPU tensors, which a user should not find out from the timings.
        warnings.warn(
            f"fastassoc: the compiled core fastassoc._C is not available ({error}); only the reference and "
            "triton backends run, so backend='auto' on CPU tensors uses the slow reference. Install CMake >= 3.18 "
            "and a C++17 compiler, then `pip install --force-reinstall --no-deps --no-cache-dir fastassoc` "
            "(`python -m fastassoc` shows what is built).", RuntimeWarning, stacklevel=2)
        return None


WAIT_POLICIES = ("auto", "active", "passive")


def wait_policy_from_env() -> str | None:
    """``FASTASSOC_WAIT_POLICY`` normalised (see ``fastassoc._C.set_wait_policy``); None when unset,
    ValueError naming the variable when it holds no known policy."""
    value = os.environ.get("FASTASSOC_WAIT_POLICY")
    if value is None:
        return None
    policy = value.strip().lower()
    if policy not in WAIT_POLICIES:
        raise ValueError(f"FASTASSOC_WAIT_POLICY must be one of {', '.join(WAIT_POLICIES)}; got {value!r}")
    return policy


def _with_wait_policy(module):
    """Apply ``FASTASSOC_WAIT_POLICY`` to a freshly loaded core."""
    if hasattr(module, "set_wait_policy"):
        policy = wait_policy_from_env()
        if policy is not None:
            module.set_wait_policy(policy)
    return module


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _built(backend: str) -> tuple[bool, str]:
    """Is ``backend`` built in this installation? Returns (ok, reason if not)."""
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        if compiled_core() is None:
            return False, "the compiled core fastassoc._C is not built; reinstall with `pip install .`"
        return True, ""
    if backend == "cuda":
        core = compiled_core()
        if core is None:
            return False, "the compiled core fastassoc._C is not built; reinstall with `pip install .`"
        if not core.has_cuda():
            return False, ("fastassoc._C was built without CUDA (no nvcc found at install time); "
                           "reinstall on a machine with the CUDA toolkit")
        return True, ""
    if backend == "triton":
        if not _triton_importable():
            return False, "triton is not installed; `pip install triton` (it comes with CUDA builds of torch)"
        return True, ""
    raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def _device_ok(backend: str, device_type: str) -> tuple[bool, str]:
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        return (device_type == "cpu",
                f"backend='cpu' needs CPU tensors, got {device_type} tensors; use backend='auto'")
    if backend == "cuda":
        return (device_type == "cuda",
                f"backend='cuda' needs CUDA tensors, got {device_type} tensors; use backend='auto'")
    if backend == "triton":
        if device_type == "cuda":
            return True, ""
        if device_type == "cpu" and triton_interpret():
            return True, ""
        return False, (f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                       f"got {device_type} tensors")
    return False, f"unknown backend {backend!r}"


@functools.lru_cache(maxsize=None)
def _implementation(op: str, backend: str) -> Callable | None:
    family = FAMILIES[op]
    name = f"{op.rstrip('_')}_{backend}"
    module_name = f"fastassoc.kernels.{backend}.{family}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise
    return getattr(module, name, None)


def _device_type(tensors: Iterable[torch.Tensor | None], names: Iterable[str]) -> str:
    seen: dict[str, str] = {}
    for name, tensor in zip(names, tensors):
        if tensor is None:
            continue
        seen.setdefault(str(tensor.device), name)
    if len(seen) > 1:
        described = ", ".join(f"{name} on {device}" for device, name in seen.items())
        raise ValueError(f"all tensors must be on one device, got {described}; move them with .to(device)")
    if not seen:
        return "cpu"
    return torch.device(next(iter(seen))).type


def resolve(op: str, backend: str, tensors: dict[str, torch.Tensor | None]) -> tuple[str, Callable]:
    """Choose the implementation of ``op`` for ``tensors``.

    Parameters
    ----------
    op : str
        Public op name (a key of ``FAMILIES``).
    backend : str
        ``"auto"`` or one of ``BACKENDS``.
    tensors : dict
        Argument name -> tensor (``None`` entries are ignored); used to check that
        every tensor is on one device and to pick the device's backends.

    Returns
    -------
    (backend_name, function)
    """
    if op not in FAMILIES:
        raise KeyError(f"unknown op {op!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    device_type = _device_type(tensors.values(), tensors.keys())
    if backend == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            if _built(candidate)[0] and _device_ok(candidate, device_type)[0]:
                function = _implementation(op, candidate)
                if function is not None:
                    return candidate, function
        raise RuntimeError(f"no backend implements {op} on {device_type}")  # reference always does
    ok, reason = _built(backend)  # also rejects unknown backend names
    device_ok, device_reason = _device_ok(backend, device_type)
    if not device_ok:
        raise ValueError(f"{op}: {device_reason}")
    if not ok:
        raise RuntimeError(f"{op}: backend={backend!r} is not available: {reason}")
    function = _implementation(op, backend)
    if function is None:
        raise NotImplementedError(f"{op} has no {backend!r} implementation yet; use backend='auto' or 'reference'")
    return backend, function


def available_backends(op: str | None = None) -> dict[str, dict[str, bool | str]]:
    """Report, per op, which backends are built and implemented (and why not).

    Returns a mapping ``op -> backend -> True | reason string``.
    """
    ops = [op] if op is not None else list(FAMILIES)
    report: dict[str, dict[str, bool | str]] = {}
    for name in ops:
        entry: dict[str, bool | str] = {}
        for backend in BACKENDS:
            ok, reason = _built(backend)
            if ok and _implementation(name, backend) is None:
                pending = PENDING.get((name, backend))
                ok, reason = False, f"not implemented yet ({pending})" if pending else "not implemented"
            entry[backend] = True if ok else reason
        report[name] = entry
    return report
