"""GPU benchmark of the re-ranking family (issue 12): W-jaccard on one GPU, target < 1 s.

Workload: bench_rerank.py's W-jaccard features (12,936 re-id-like rows of 751 identities,
D = 2048, L2-normalised, the same seed), moved to the GPU once; k1 = 30, k2 = 6.

Cases (``W-jaccard-gpu-<max_distance>-<provider>``):

* ``triton``         ``fastassoc.jaccard_distance(x, 30, 6, backend="triton")`` on CUDA tensors
* ``triton-cluster`` the whole clustering step on the GPU: Jaccard, ``dbscan(eps=0.6,
  min_samples=4)`` and ``cluster_centres``, as a cluster-contrast epoch runs it
* ``gemm``           the floor: bare cuBLAS float32 ``torch.mm`` of [N, D] x [D, N] in row blocks
  of ``tile_elements()`` entries into one reused tile

Before timing, triton's matrix is checked against fastassoc's pure-torch reference run on the
same GPU: the nearest lists are the same exact ones, but both sum with atomic ``index_add_``,
so a pair within float32 rounding of J = 1 may be stored by one only (allowed: 1e-3 of the
entries); shared values within 1e-5; identical DBSCAN labels. Every timed call ends with
``torch.cuda.synchronize()``. ``extra_info`` carries the GPU name, the GEMM floor, the ratio
to it and the reference's single-call time. Skips without a GPU;
``FASTASSOC_BENCH_SCALE=small`` shrinks rows by 8 and D by 4.

Run: ``pytest bench/bench_gpu_rerank.py --benchmark-only`` or ``python bench/bench_gpu_rerank.py``.
"""
from __future__ import annotations

import functools
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import median_seconds  # noqa: E402
from conftest import dim, identity_features, rows  # noqa: E402

import fastassoc  # noqa: E402
from fastassoc import _backend  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need a CUDA GPU")]

K1, K2 = 30, 6
EPS, MIN_SAMPLES = 0.6, 4
VALUE_TOLERANCE = 1e-5
NUM_ROWS, NUM_IDENTITIES, SEED = 12936, 751, 21     # bench_rerank.WORKLOADS["W-jaccard"]


@functools.lru_cache(maxsize=None)
def workload() -> torch.Tensor:
    n, num_ids = rows(NUM_ROWS), max(2, rows(NUM_IDENTITIES))
    labels = torch.randint(0, num_ids, (n,), generator=torch.Generator().manual_seed(SEED))
    x = identity_features(labels, num_ids, dim(2048), seed=SEED + 1, noise=1.0)
    return torch.nn.functional.normalize(x, dim=1).contiguous().cuda()


def synchronised(function):
    def run():
        result = function()
        torch.cuda.synchronize()
        return result
    return run


def jaccard(backend: str, max_distance: float | None):
    x = workload()
    return synchronised(lambda: fastassoc.jaccard_distance(x, K1, K2, max_distance=max_distance, backend=backend))


def clustering(max_distance: float | None):
    x = workload()

    def run():
        matrix = fastassoc.jaccard_distance(x, K1, K2, max_distance=max_distance, backend="triton")
        labels = fastassoc.dbscan(matrix, EPS, MIN_SAMPLES, backend="triton")
        return fastassoc.cluster_centres(x, labels, backend="triton")
    return synchronised(run)


def gemm_floor():
    x = workload()
    n = x.shape[0]
    step = max(1, min(n, _backend.tile_elements() // max(n, 1)))
    tile = torch.empty(step, n, device=x.device)
    transposed = x.T

    def run():
        for start in range(0, n, step):
            stop = min(start + step, n)
            torch.mm(x[start:stop], transposed, out=tile[:stop - start])
    return synchronised(run)




@functools.lru_cache(maxsize=None)
def reference(max_distance: float | None) -> tuple[torch.Tensor, float]:
    """The reference's matrix on the same GPU and the seconds of that one call."""
    start = time.perf_counter()
    matrix = jaccard("reference", max_distance)()
    return matrix, time.perf_counter() - start


def check_agreement(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    n = expected.shape[0]
    got_keys = torch.repeat_interleave(torch.arange(n, device=got.device), got.crow_indices().diff()) * n \
        + got.col_indices()
    keys = torch.repeat_interleave(torch.arange(n, device=expected.device), expected.crow_indices().diff()) * n \
        + expected.col_indices()
    inside = torch.isin(got_keys, keys)
    differing = int((~inside).sum()) + int((~torch.isin(keys, got_keys)).sum())
    assert differing <= 1e-3 * keys.numel(), f"{what}: {differing} of {keys.numel()} entries differ in position"
    # Both are sorted by key, so the shared entries line up.
    off = (got.values()[inside].double() - expected.values()[torch.isin(keys, got_keys)].double()).abs()
    assert not off.numel() or float(off.max()) <= VALUE_TOLERANCE, f"{what}: value mismatch {float(off.max()):.3g}"
    same = torch.equal(fastassoc.dbscan(got, EPS, MIN_SAMPLES, backend="triton"),
                       fastassoc.dbscan(expected, EPS, MIN_SAMPLES, backend="reference"))
    assert same, f"{what}: DBSCAN labels differ"


def providers(max_distance: float | None) -> dict:
    return {"triton": jaccard("triton", max_distance), "triton-cluster": clustering(max_distance),
            "gemm": gemm_floor()}


CASES = [(max_distance, provider) for max_distance in (None, EPS) for provider in ("triton", "triton-cluster", "gemm")]


def case_id(case) -> str:
    max_distance, provider = case
    return f"W-jaccard-gpu-{'all' if max_distance is None else f'max{max_distance}'}-{provider}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gpu_jaccard(benchmark, case):
    max_distance, provider = case
    run = providers(max_distance)[provider]
    expected, reference_seconds = reference(max_distance)
    if provider == "triton":
        check_agreement(run(), expected, case_id(case))
    floor = median_seconds(gemm_floor())
    benchmark.group = f"W-jaccard-gpu max_distance={max_distance}"
    benchmark(run)
    benchmark.extra_info.update(gpu=torch.cuda.get_device_name(), workload="W-jaccard-gpu", provider=provider,
                                n=workload().shape[0], d=workload().shape[1], k1=K1, k2=K2,
                                max_distance="none" if max_distance is None else max_distance,
                                gemm_floor_s=floor, reference_single_call_s=reference_seconds,
                                stored_pairs=expected.values().numel())
    if getattr(benchmark, "stats", None) is not None:
        benchmark.extra_info["ratio_to_gemm"] = benchmark.stats.stats.median / floor


def main() -> None:
    """Plain table: median seconds per provider and the ratio to the GEMM floor."""
    print(f"GPU: {torch.cuda.get_device_name()}  N = {workload().shape[0]}  D = {workload().shape[1]}")
    for max_distance in (None, EPS):
        expected, reference_seconds = reference(max_distance)
        functions = providers(max_distance)
        check_agreement(functions["triton"](), expected, f"max_distance={max_distance}")
        floor = median_seconds(functions["gemm"])
        for provider, function in functions.items():
            seconds = median_seconds(function)
            print(f"W-jaccard-gpu max_distance={max_distance!s:5s} {provider:15s} {seconds * 1e3:10.1f} ms "
                  f"{seconds / floor:7.2f}x gemm")
        print(f"W-jaccard-gpu max_distance={max_distance!s:5s} {'reference (1 call)':15s} "
              f"{reference_seconds * 1e3:10.1f} ms")


if __name__ == "__main__":
    main()
