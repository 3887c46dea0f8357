"""Helpers shared by the compiled-CPU kernel tests (test_cpu_kernels.py, test_cpu_agg_kernels.py)."""
from __future__ import annotations

import pytest
import torch

from fastassoc import _backend


@pytest.fixture
def core():
    """The compiled core, with its thread-count override restored after the test (None: follow torch)."""
    module = _backend.compiled_core()
    before = module.num_threads_override()
    yield module
    module.set_num_threads(before)


def assert_equal_tensors(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same shape, dtype and values (infinities included), naming the first mismatch."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    same = got == expected
    if not bool(same.all()):
        first = tuple(torch.nonzero(~same)[0].tolist())
        raise AssertionError(f"{what}: first mismatch at {first}: got {got[first].item()!r}, "
                             f"expected {expected[first].item()!r} ({int((~same).sum())} mismatches)")
