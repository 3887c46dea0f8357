"""Thread control of the compiled CPU core (issue 11, "a shared CPU").

The core's OpenMP regions use torch's thread count for the calling thread
(``torch.get_num_threads()``) unless ``fastassoc._C.set_num_threads(n)`` overrides it;
the override never changes torch's own count, and ``set_num_threads(None)`` returns to
following torch. ``parallel_region_threads()`` opens a region the way the kernels do and
reports how many threads actually ran it, so these tests observe the team, not a setting.
Results must not depend on the thread count. No timing here: bench/bench_shared_cpu.py
measures the shared-CPU behaviour.
"""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import fastassoc
from fastassoc import _backend
from fastassoc.kernels.cpu import _core

pytestmark = pytest.mark.skipif(_backend.compiled_core() is None, reason="the compiled core is not built")


@pytest.fixture
def core():
    """The compiled core; torch's thread count and the core's override restored afterwards."""
    module = _backend.compiled_core()
    torch_threads = torch.get_num_threads()
    override = module.num_threads_override()
    yield module
    torch.set_num_threads(torch_threads)
    module.set_num_threads(override)


def small_topk():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    return fastassoc.topk_anchors(x, x, k=3, backend="cpu")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_core_follows_torch_thread_count(core, threads):
    core.set_num_threads(None)
    torch.set_num_threads(threads)
    small_topk()      # a launcher call reports torch's count to the core
    assert core.num_threads_override() is None
    assert core.get_num_threads() == threads
    assert core.parallel_region_threads() == threads


def test_core_follows_torch_in_another_python_thread(core):
    core.set_num_threads(None)
    torch.set_num_threads(1)
    seen = {}

    def worker():
        small_topk()
        seen["torch"] = torch.get_num_threads()
        seen["core"] = core.get_num_threads()
        seen["region"] = core.parallel_region_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["core"] == seen["torch"], seen
    assert seen["region"] == seen["torch"], seen


def test_override_wins_and_leaves_torch_alone(core):
    torch.set_num_threads(2)
    core.set_num_threads(1)
    small_topk()
    assert core.num_threads_override() == 1
    assert core.get_num_threads() == 1
    assert core.parallel_region_threads() == 1
    assert torch.get_num_threads() == 2, "the core's override changed torch's thread count"

    torch.set_num_threads(1)
    core.set_num_threads(2)
    small_topk()
    assert core.parallel_region_threads() == 2
    assert torch.get_num_threads() == 1

    core.set_num_threads(None)
    small_topk()
    assert core.num_threads_override() is None
    assert core.parallel_region_threads() == 1, "set_num_threads(None) did not return to torch's count"


def test_override_applies_to_every_python_thread(core):
    torch.set_num_threads(2)
    core.set_num_threads(1)
    seen = {}

    def worker():
        small_topk()
        seen["region"] = core.parallel_region_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["region"] == 1


@pytest.mark.parametrize("bad", [0, -1, 1 << 17, 1.5, True, "2"])
def test_set_num_threads_rejects_bad_counts(core, bad):
    with pytest.raises((ValueError, TypeError), match="num_threads"):
        core.set_num_threads(bad)
    assert core.num_threads_override() is None or core.num_threads_override() >= 1


def test_launcher_hook_reports_torch_count(core):
    core.set_num_threads(None)
    torch.set_num_threads(1)
    _core.core()
    assert core.get_num_threads() == 1
    torch.set_num_threads(2)
    _core.core()
    assert core.get_num_threads() == 2


# ------------------------------------------------------------------ results do not depend on threads

def tied_features(n: int, dim: int, seed: int) -> torch.Tensor:
    """Small integers: many exactly equal distances, so tie-breaking is exercised."""
    return torch.randint(-2, 3, (n, dim), generator=torch.Generator().manual_seed(seed)).float()


def run_ops():
    """Every compiled distance op at sizes above the kernels' parallel thresholds."""
    x = tied_features(700, 12, 1)
    y = tied_features(500, 12, 2)
    cameras = torch.randint(0, 4, (4200,), generator=torch.Generator().manual_seed(3))
    graph_x = tied_features(4200, 6, 4)
    labels = torch.arange(800)
    pids_q = torch.randint(0, 30, (300,), generator=torch.Generator().manual_seed(5))
    pids_g = torch.randint(0, 30, (700,), generator=torch.Generator().manual_seed(6))
    cams_q = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(7))
    cams_g = torch.randint(0, 4, (700,), generator=torch.Generator().manual_seed(8))
    q = tied_features(300, 12, 9)
    g = tied_features(700, 12, 10)
    results = {
        "topk_anchors": fastassoc.topk_anchors(y, x, k=5, backend="cpu"),
        "topk_anchors self": fastassoc.topk_anchors(x, x, k=5, exclude=torch.arange(700), backend="cpu"),
        "mutual_knn": fastassoc.mutual_knn(x, y, k=4, backend="cpu"),
        "cross_camera_graph": tuple(fastassoc.cross_camera_graph(graph_x, cameras, k=2, backend="cpu",
                                                                 as_tuple=True)),
        "knn_soft_labels": tuple(fastassoc.knn_soft_labels(graph_x, cameras, k=3, backend="cpu", as_tuple=True)),
        "agglomerative_merge": fastassoc.agglomerative_merge(tied_features(800, 12, 11), labels, 60,
                                                             linkage="centroid", backend="cpu"),
        "evaluate_ranking": fastassoc.evaluate_ranking(q, g, pids_q, pids_g, cams_q, cams_g, max_rank=10,
                                                       backend="cpu"),
    }
    return results


def flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flatten(item)]
    if dataclasses.is_dataclass(value):
        return [t for field in dataclasses.fields(value) for t in flatten(getattr(value, field.name))]
    return [torch.as_tensor(value)]


@pytest.mark.parametrize("how", ["override", "torch"])
def test_results_identical_with_one_and_two_threads(core, how):
    outputs = {}
    for threads in (1, 2):
        if how == "override":
            core.set_num_threads(threads)
        else:
            core.set_num_threads(None)
            torch.set_num_threads(threads)
        outputs[threads] = run_ops()
        assert core.parallel_region_threads() == threads
    for name, one in outputs[1].items():
        two = outputs[2][name]
        for position, (a, b) in enumerate(zip(flatten(one), flatten(two), strict=True)):
            assert a.shape == b.shape and a.dtype == b.dtype, f"{name}[{position}]: {a.shape} vs {b.shape}"
            same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
            if not bool(same.all()):
                first = tuple(torch.nonzero(~same)[0].tolist())
                raise AssertionError(f"{name}[{position}] differs with 2 threads at {first}: "
                                     f"{a[first].item()!r} (1 thread) vs {b[first].item()!r}")
