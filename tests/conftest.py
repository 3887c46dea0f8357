"""Shared test fixtures.

Backends are a parameter of the op tests: ``reference`` and ``cpu`` on CPU tensors,
``triton`` on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set
here before triton is imported when no GPU is present), and ``cuda``/``triton`` on
CUDA tensors when a GPU is present (skipped otherwise).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastassoc import _backend  # noqa: E402

HAS_GPU = torch.cuda.is_available()

# (backend, device) pairs every op test runs over.
BACKEND_DEVICES = [
    ("reference", "cpu"),
    ("cpu", "cpu"),
    # The CPU backend with int8/bf16 screening forced on every op that has it (small test
    # shapes would not screen on their own): the same exact results are required.
    ("cpu-screened", "cpu"),
    ("triton", "cpu" if not HAS_GPU else "cuda"),
    pytest.param(("cuda", "cuda"), marks=pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")),
    pytest.param(("reference", "cuda"), marks=pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")),
]
FAST_BACKENDS = ("cpu", "triton", "cuda")


def require_backend(op: str, backend: str) -> None:
    """Skip when ``backend`` does not implement ``op`` in this build.

    ``tests/test_backend.py::test_every_backend_implements_every_op`` fails when a
    built backend lacks an op, so these skips cannot hide a missing kernel.
    """
    report = _backend.available_backends(op)[op][backend]
    if report is not True:
        pytest.skip(f"{backend} backend unavailable for {op}: {report}")


@pytest.fixture(params=BACKEND_DEVICES, ids=lambda p: f"{p[0]}-{p[1]}")
def backend_device(request):
    """(backend, device) for op tests; call require_backend(op, backend) in the test.

    ``cpu-screened`` runs the test as backend ``cpu`` with screening forced
    (``fastassoc.kernels.cpu._screen.forced("always")``).
    """
    backend, device = request.param
    if backend != "cpu-screened":
        yield request.param
        return
    from fastassoc.kernels.cpu import _screen

    with _screen.forced("always"):
        yield "cpu", device
