"""The compiled core carries the CUDA kernels exactly when the build machine has nvcc.

CI machines have the CUDA toolkit but no GPU: these checks are the evidence that
csrc/cuda/*.cu compiled and registered their entry points. The last tests check the
GPU readiness script (``bench/gpu_check.sh``, its ``--dry-run`` and its summary writer) on CPU. (The build and the test
run on the same machine; a module built elsewhere should be rebuilt first.)
``FASTASSOC_EXTENSION`` points the loader at a development build, as everywhere.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

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


def test_visible_gpus_are_covered_by_the_cuda_architectures(core):
    """Every visible GPU runs the CUDA kernels: the module has SASS for its major version at or
    below its minor (sm_80 code runs on sm_86), or PTX at or below it that the driver can
    JIT-compile (per the build record CMakeLists.txt writes)."""
    from fastassoc.__main__ import core_build_info
    if not core.has_cuda() or not torch.cuda.is_available():
        pytest.skip("needs a core built with CUDA and a visible GPU")
    build = core_build_info(core)
    if build is None:
        pytest.skip("the core has no _build_info.json (built before it was recorded)")
    sass, ptx = set(), set()
    for entry in build["cuda_architectures"].split():
        number, _, kind = entry.partition("-")
        if kind in ("", "real"):
            sass.add(int(number))
        if kind in ("", "virtual"):
            ptx.add(int(number))
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        capability = 10 * major + minor
        assert any(s // 10 == major and s <= capability for s in sass) or any(p <= capability for p in ptx), (
            f"GPU {index} ({torch.cuda.get_device_name(index)}, sm_{capability}) is not covered by "
            f"{build['cuda_architectures']!r}")


# --------------------------------------------------------------------------- bench/gpu_check.sh

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_check_summary", _ROOT / "bench" / "gpu_check_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_summary_counts_outcomes_timeouts_and_ratios(tmp_path):
    """The summary writer on hand-written stage files: a timed-out stage, a failure, two benchmark forms."""
    summary_writer = _summary_module()
    (tmp_path / "stages.tsv").write_text(
        "stage\trc\tseconds\tlimit_s\tlog\n"
        "tests\t1\t30\t150\ttests.log\n"
        "tests-cuda\t124\t150\t150\ttests-cuda.log\n"
        "bench W-ce\t0\t20\t45\tbench-W-ce.log\n"
        "bench W-merge-100k-bf16\t-1\t0\t0\tbench-W-merge-100k-bf16.log\n")
    (tmp_path / "environment.json").write_text(json.dumps({"device_name": "NVIDIA H100 80GB HBM3",
                                                           "torch": "2.x", "triton": "3.x"}))
    (tmp_path / "tests.log").write_text(
        "tests/ops/test_knn.py::test_a[triton-cuda] PASSED                      [ 10%]\n"
        "tests/ops/test_knn.py::test_b[triton-cuda] FAILED                      [ 20%]\n"
        "tests/ops/test_knn.py::test_c[cuda-cuda] SKIPPED (needs x)             [ 30%]\n"
        "SKIPPED [1] tests/ops/test_knn.py:12: needs x\n"
        "FAILED tests/ops/test_knn.py::test_b[triton-cuda] - AssertionError\n")
    # A stage stopped by its timeout: only the lines printed before the kill exist.
    (tmp_path / "tests-cuda.log").write_text("tests/test_x.py::test_y[reference-cuda] PASSED [ 1%]\n")
    (tmp_path / "bench-W-ce.json").write_text(json.dumps({"benchmarks": [
        {"name": "test_w_ce[bf16-triton]", "group": "W-ce bf16", "params": {"provider": "triton"},
         "extra_info": {"gpu": "H100"}, "stats": {"median": 0.003, "rounds": 5}},
        {"name": "test_w_ce[bf16-gemm]", "group": "W-ce bf16", "params": {"provider": "gemm"},
         "extra_info": {"gpu": "H100"}, "stats": {"median": 0.002, "rounds": 5}}]}))
    (tmp_path / "bench-W-rank-1M-fp32.json").write_text(json.dumps({"benchmarks": [
        {"name": "test_gpu_workload[W-rank-1M-fp32-triton]", "group": "W-rank-1M fp32",
         "extra_info": {"provider": "triton", "ratio_to_gemm": 1.2, "gemm_floor_s": 0.1},
         "stats": {"median": 0.12, "rounds": 3}}]}))
    summary = summary_writer.summarize(str(tmp_path))
    assert summary["tests"]["tests.log"]["counts"] == dict(passed=1, failed=1, error=0, skipped=1, xfailed=0,
                                                           xpassed=0)
    assert summary["tests"]["tests.log"]["failed"] == ["tests/ops/test_knn.py::test_b[triton-cuda]"]
    assert summary["tests"]["tests-cuda.log"]["counts"]["passed"] == 1
    assert [s["status"] for s in summary["stages"]] == ["failed", "timeout", "ok", "skipped"]
    ratios = {row["name"]: row["ratio_to_gemm"] for row in summary["benchmarks"]}
    assert ratios["test_w_ce[bf16-triton]"] == pytest.approx(1.5)
    assert ratios["test_gpu_workload[W-rank-1M-fp32-triton]"] == 1.2
    assert summary["ok"] is False
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["test_totals"]["failed"] == 1
    markdown = (tmp_path / "summary.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in markdown and "| tests-cuda | timeout | 124 |" in markdown
    assert "1.50x" in markdown and "FAILED (tests.log): `tests/ops/test_knn.py::test_b[triton-cuda]`" in markdown


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_writes_a_summary(tmp_path):
    """`bench/gpu_check.sh --dry-run` runs its stages on CPU and writes both summary files."""
    result = subprocess.run(["bash", str(_ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                            cwd=_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["environment", "tests", "bench W-rank-1M-fp32"]
    assert summary["tests"]["tests.log"]["total"] == 2
    assert summary["environment"]["torch"] == torch.__version__
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_total_budget_skips_stages_and_fails_the_check(tmp_path):
    """With no time left every stage is recorded as skipped, a summary is still written, and
    the check fails (its tests did not run)."""
    result = subprocess.run(["bash", str(_ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                            cwd=_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_TOTAL_S": "15"})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [
        ("environment", "skipped"), ("tests", "skipped"), ("bench W-rank-1M-fp32", "skipped")]
    assert summary["ok"] is False
    assert "| tests | skipped | -1 |" in (tmp_path / "summary.md").read_text()
