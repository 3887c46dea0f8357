"""The compiled core carries the CUDA kernels exactly when the build machine has nvcc.

CI machines have the CUDA toolkit but no GPU: these checks are the evidence that
csrc/cuda/*.cu compiled and registered their entry points. (The build and the test
run on the same machine; a module built elsewhere should be rebuilt first.)
``FASTASSOC_EXTENSION`` points the loader at a development build, as everywhere.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from fastassoc import _backend

CUDA_ENTRY_POINTS = ("cuda_device_count", "cuda_ema_update", "cuda_greedy_union")


@pytest.fixture(scope="module")
def core():
    module = _backend.compiled_core()
    if module is None:
        pytest.fail("fastassoc._C is not built; run `pip install --no-build-isolation -e .`")
    return module


def test_has_cuda_iff_nvcc_is_present(core):
    nvcc = shutil.which("nvcc")
    assert core.has_cuda() == (nvcc is not None), (
        f"nvcc is {'at ' + nvcc if nvcc else 'absent'} but fastassoc._C.has_cuda() is {core.has_cuda()}; "
        "rebuild the core on this machine")


def test_cuda_entry_points_exist_when_built_with_cuda(core):
    if not core.has_cuda():
        for name in CUDA_ENTRY_POINTS:
            assert not hasattr(core, name), f"{name} is exported by a core built without CUDA"
        pytest.skip("fastassoc._C was built without CUDA (no nvcc)")
    missing = [name for name in CUDA_ENTRY_POINTS if not callable(getattr(core, name, None))]
    assert not missing, f"CUDA entry points missing from fastassoc._C: {missing}"
    for name in CUDA_ENTRY_POINTS:
        assert getattr(core, name).__doc__, f"{name} has no docstring"


def test_cuda_backend_is_reported_built_and_implements_ema(core):
    report = _backend.available_backends("ema_update_")["ema_update_"]["cuda"]
    if not core.has_cuda():
        assert report is not True
        pytest.skip("fastassoc._C was built without CUDA (no nvcc)")
    assert report is True, f"cuda backend of ema_update_ unavailable: {report}"


def test_cuda_device_count_matches_torch(core):
    if not core.has_cuda():
        pytest.skip("fastassoc._C was built without CUDA (no nvcc)")
    # Without a driver both see 0 devices; with one, the core and torch agree.
    assert core.cuda_device_count() == torch.cuda.device_count()


def test_cuda_entry_points_validate_arguments_without_a_gpu(core):
    """Argument checks run on the host before any CUDA call, so they work on GPU-less CI."""
    if not core.has_cuda():
        pytest.skip("fastassoc._C was built without CUDA (no nvcc)")
    with pytest.raises(ValueError, match="reduce must be"):
        core.cuda_ema_update(1, 1, 1, 1, 4, 8, 0.5, True, "median", "float32", 0, 0)
    with pytest.raises(ValueError, match="dtype must be"):
        core.cuda_ema_update(1, 1, 1, 1, 4, 8, 0.5, True, "mean", "int8", 0, 0)
    with pytest.raises(ValueError, match="scratch"):
        core.cuda_ema_update(1, 1, 1, 1, 4, 4096, 0.5, True, "mean", "float32", 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        core.cuda_greedy_union(0, 0, -1, 0, 0, 0, 0, 1, 0)
    # Empty work launches nothing and succeeds even without a device.
    core.cuda_ema_update(0, 0, 0, 0, 0, 8, 0.5, True, "mean", "float32", 0, 0)
