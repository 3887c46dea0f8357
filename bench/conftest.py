"""Shared benchmark fixtures: the named workloads, the GEMM floor and result reporting.

Workloads (issue 3), generated from fixed seeds so figures compare over time:

* ``W-rank``   8,298 tracklets in six camera segments (1816, 1957, 1321, 750, 1880, 574;
  MARS training tracklets per camera), D = 1024; every tracklet queries its own segment,
  excluding itself.
* ``W-mutual`` 8,192 x 8,192, D = 1024.
* ``W-graph`` / ``W-soft``  W-rank's tracklets with cameras = segments.
* ``W-merge``  12,936 samples (Market-1501 training size), D = 2048.
* ``W-eval``   3,368 queries x 15,913 gallery (Market-1501 test), D = 2048, Market-like
  difficulty (:func:`ranking_features`).

Features are re-id-like: each tracklet is its identity's unit centre plus Gaussian noise
(cosine about 0.77 between two tracklets of one identity, about 0 across identities), so
neighbours are well separated and providers can be compared exactly on indices.

``FASTASSOC_BENCH_SCALE=small`` shrinks every workload (rows / 8, D / 4) for a quick
smoke run; the default ``full`` is the named workload. The scale is the first parameter of
every benchmark here, so it is part of its name (``test_topk_anchors_w_rank[small-10-cpu]``)
and ``--benchmark-compare`` never pairs a small run with a full one; ``extra_info`` records
it too. Benchmarks use the fixtures ``workload`` (a callable: ``workload("W-rank")``),
``gemm_floor`` (seconds of the bare float32 GEMMs of given shapes), ``report`` (stores
provider, workload, floor and the ratio to it in ``benchmark.extra_info``) and ``timed``.

Rounds and time budgets are pytest-benchmark's own options: ``timed`` calls
``benchmark(function)``, so ``--benchmark-min-rounds``, ``--benchmark-max-time``,
``--benchmark-min-time``, ``--benchmark-warmup`` and ``--benchmark-disable`` all apply and the
saved JSON's ``rounds`` are the rounds that ran (see bench/COMPARE.md).
"""
from __future__ import annotations

import functools
import os
import statistics
import time

import numpy as np
import pytest
import torch

SCALE = os.environ.get("FASTASSOC_BENCH_SCALE", "full")
if SCALE not in ("full", "small"):
    raise ValueError(f"FASTASSOC_BENCH_SCALE must be 'full' or 'small', got {SCALE!r}")
_ROW_DIVISOR, _DIM_DIVISOR = (1, 1) if SCALE == "full" else (8, 4)

MARS_SEGMENTS = (1816, 1957, 1321, 750, 1880, 574)
MARS_IDENTITIES = 625
MARKET_TRAIN, MARKET_TRAIN_IDENTITIES = 12936, 751
MARKET_QUERIES, MARKET_GALLERY, MARKET_TEST_IDENTITIES = 3368, 15913, 750
NUM_CAMERAS_MARKET = 6

# Repeats of the untimed helpers (the GEMM floor's median); benchmarks themselves run the
# rounds pytest-benchmark's options ask for.
ROUNDS = {"full": 5, "small": 3}[SCALE]


SCREEN_PROVIDERS = {"cpu-fp32": "off", "cpu-int8": "always"}


def fastassoc_provider(op, *args, provider: str, **kwargs):
    """A call of the fastassoc ``op`` for benchmark ``provider``: a backend name, or the cpu
    backend with screening switched: ``cpu-fp32`` off (plain float32 GEMM tiles, which shows
    what screening adds), ``cpu-int8`` forced on (where ``auto`` does not screen)."""
    if provider not in SCREEN_PROVIDERS:
        return functools.partial(op, *args, backend=provider, **kwargs)
    from fastassoc.kernels.cpu import _screen

    def run():
        with _screen.forced(SCREEN_PROVIDERS[provider]):
            return op(*args, backend="cpu", **kwargs)
    return run


def rows(n: int) -> int:
    return max(2, n // _ROW_DIVISOR)


def dim(d: int) -> int:
    return max(8, d // _DIM_DIVISOR)


def identity_features(identities: torch.Tensor, num_identities: int, dimension: int, seed: int,
                      noise: float = 0.3) -> torch.Tensor:
    """float32 [len(identities), dimension]: unit identity centre + noise (|noise|^2 ~ ``noise``)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_identities, dimension, generator=generator), dim=1)
    scatter = torch.randn(identities.numel(), dimension, generator=generator) * (noise / dimension) ** 0.5
    return (centres[identities] + scatter).contiguous()


def ranking_features(identities: torch.Tensor, cameras: torch.Tensor, num_identities: int, num_cameras: int,
                     dimension: int, seed: int, shared: float = 0.7, camera_bias: float = 0.6,
                     noise: float = 2.0) -> torch.Tensor:
    """Features of Market-like difficulty for W-eval: identity centres that share a common
    direction (cosine about ``shared ** 2`` between identities), a per-camera offset of norm
    ``camera_bias`` and Gaussian noise (``|noise|^2 ~ noise``). Rank-1 is about 0.87 and mAP
    about 0.6, so true matches sit inside the bulk of the distances, as on real data
    (identity centre + noise alone gives mAP 1.0, which no evaluation code finds hard)."""
    generator = torch.Generator().manual_seed(seed)
    normalize = torch.nn.functional.normalize
    common = normalize(torch.randn(1, dimension, generator=generator), dim=1)
    own = normalize(torch.randn(num_identities, dimension, generator=generator), dim=1)
    centres = normalize(shared * common + (1 - shared ** 2) ** 0.5 * own, dim=1)
    offsets = normalize(torch.randn(num_cameras, dimension, generator=generator), dim=1) * camera_bias
    scatter = torch.randn(identities.numel(), dimension, generator=generator) * (noise / dimension) ** 0.5
    return (centres[identities] + offsets[cameras] + scatter).contiguous()


@functools.lru_cache(maxsize=None)
def _workload(name: str) -> dict:
    if name in ("W-rank", "W-graph", "W-soft"):
        sizes = [rows(n) for n in MARS_SEGMENTS]
        total = sum(sizes)
        generator = torch.Generator().manual_seed(1)
        identities = torch.randint(0, max(2, rows(MARS_IDENTITIES)), (total,), generator=generator)
        x = identity_features(identities, max(2, rows(MARS_IDENTITIES)), dim(1024), seed=2)
        offsets = torch.tensor([0] + sizes).cumsum(0)
        segments = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        return dict(x=x, sizes=sizes, offsets=offsets, segments=segments, cameras=segments,
                    exclude=torch.arange(total), identities=identities)
    if name == "W-mutual":
        n, d = rows(8192), dim(1024)
        generator = torch.Generator().manual_seed(3)
        # Half of b are re-observations of a's identities: a realistic number of mutual pairs.
        a_ids = torch.randint(0, n, (n,), generator=generator)
        b_ids = torch.where(torch.rand(n, generator=generator) < 0.5, a_ids[torch.randperm(n, generator=generator)],
                            torch.randint(n, 2 * n, (n,), generator=generator))
        features = identity_features(torch.cat([a_ids, b_ids]), 2 * n, d, seed=4)
        return dict(a=features[:n].contiguous(), b=features[n:].contiguous())
    if name == "W-merge":
        n, d = rows(MARKET_TRAIN), dim(2048)
        generator = torch.Generator().manual_seed(5)
        identities = torch.randint(0, rows(MARKET_TRAIN_IDENTITIES), (n,), generator=generator)
        x = identity_features(identities, rows(MARKET_TRAIN_IDENTITIES), d, seed=6)
        return dict(x=x, labels=torch.arange(n), num_merges=max(1, round(n * 0.05)), identities=identities)
    if name == "W-eval":
        nq, ng, d = rows(MARKET_QUERIES), rows(MARKET_GALLERY), dim(2048)
        ids = rows(MARKET_TEST_IDENTITIES)
        generator = torch.Generator().manual_seed(7)
        qpids = torch.randint(0, ids, (nq,), generator=generator)
        gpids = torch.randint(0, ids, (ng,), generator=generator)
        gpids[torch.rand(ng, generator=generator) < 0.15] = -1       # junk / distractors
        qcams = torch.randint(0, NUM_CAMERAS_MARKET, (nq,), generator=generator)
        gcams = torch.randint(0, NUM_CAMERAS_MARKET, (ng,), generator=generator)
        features = ranking_features(torch.cat([qpids, gpids.clamp_min(0)]), torch.cat([qcams, gcams]), ids,
                                    NUM_CAMERAS_MARKET, d, seed=8)
        return dict(query=features[:nq].contiguous(), gallery=features[nq:].contiguous(), qpids=qpids,
                    gpids=gpids, qcams=qcams, gcams=gcams)
    raise KeyError(f"unknown workload {name!r}")


@pytest.fixture(autouse=True)
def bench_scale(request):
    """The workload scale (``full`` or ``small``): a parameter of every benchmark, so that it is
    part of the benchmark's name (see :func:`pytest_generate_tests`)."""
    return request.param


def pytest_generate_tests(metafunc):
    if "bench_scale" in metafunc.fixturenames:
        metafunc.parametrize("bench_scale", [SCALE], ids=[SCALE], indirect=True)


@pytest.fixture(scope="session")
def workload():
    """``workload(name)`` -> dict of tensors for a named workload (cached per session)."""
    return _workload


def _median_seconds(function, repeats: int) -> float:
    function()   # warm-up: thread pools, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def _gemm_floor(shapes: tuple[tuple[int, int, int], ...], repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    operands = [(torch.randn(m, d, generator=generator), torch.randn(n, d, generator=generator))
                for m, n, d in shapes]
    outputs = [torch.empty(m, n) for m, n, _ in shapes]

    def run():
        for (left, right), out in zip(operands, outputs):
            torch.mm(left, right.T, out=out)
    return _median_seconds(run, repeats)


@pytest.fixture(scope="session")
def gemm_floor():
    """``gemm_floor([(m, n, d), ...])`` -> median seconds of the bare float32 GEMMs
    ``[m, d] @ [d, n]`` (torch.mm into preallocated outputs), cached per shape list."""
    def floor(shapes, repeats: int = ROUNDS) -> float:
        return _gemm_floor(tuple(tuple(int(v) for v in shape) for shape in shapes), repeats)
    return floor


@pytest.fixture
def report(benchmark):
    """``report(workload=..., provider=..., floor=seconds, params={...}, **extra)`` after the
    timed call: records them and ``ratio_to_floor`` (median / floor) in ``benchmark.extra_info``.
    ``params`` (e.g. ``{"k": 10}``) names the variant; rows with equal workload and params are
    compared with the ``cpu`` provider in the summary table."""
    def record(*, workload: str, provider: str, floor: float | None = None, params: dict | None = None,
               **extra):
        params_text = " ".join(f"{name}={value}" for name, value in (params or {}).items())
        benchmark.extra_info.update(workload=workload, provider=provider, params=params_text, scale=SCALE,
                                    row_divisor=_ROW_DIVISOR, dim_divisor=_DIM_DIVISOR,
                                    threads=torch.get_num_threads(), **extra)
        if floor is not None:
            benchmark.extra_info["gemm_floor_s"] = floor
            stats = getattr(benchmark, "stats", None)
            if stats is not None:     # None under --benchmark-disable
                benchmark.extra_info["ratio_to_floor"] = stats.stats.median / floor
    return record


def run_timed(benchmark, function):
    """Time ``function`` with pytest-benchmark's own calibration: its first (calibration) call
    is the warm-up, then ``max(--benchmark-min-rounds, --benchmark-max-time / duration)``
    rounds of one call each for anything slower than ``--benchmark-min-time``. A slow provider
    gets ``--benchmark-min-rounds`` rounds because its duration exceeds the time budget; pass
    ``--benchmark-min-rounds=3`` for a quicker full-scale run."""
    return benchmark(function)


@pytest.fixture(scope="session")
def timed():
    """``timed(benchmark, function)``: ``benchmark(function)``, honouring pytest-benchmark's
    round and time options."""
    return run_timed


# --------------------------------------------------------------------- agreement checks

def assert_rankings_agree(got_distances, got_indices, expected_distances, expected_indices, what: str,
                          rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Two top-k rankings agree: same distances within tolerance, and identical indices
    except where the two distances at that rank are tied within the tolerance."""
    got_distances = np.asarray(got_distances, np.float64)
    expected_distances = np.asarray(expected_distances, np.float64)
    got_indices, expected_indices = np.asarray(got_indices), np.asarray(expected_indices)
    assert got_indices.shape == expected_indices.shape, f"{what}: shapes {got_indices.shape} vs {expected_indices.shape}"
    close = np.isclose(got_distances, expected_distances, rtol=rtol, atol=atol) | (
        np.isinf(got_distances) & np.isinf(expected_distances))
    if not close.all():
        first = tuple(np.argwhere(~close)[0])
        raise AssertionError(f"{what}: distance mismatch at {first}: {got_distances[first]} vs "
                             f"{expected_distances[first]}")
    differ = got_indices != expected_indices
    if differ.any():
        # A different index is only acceptable as a near tie at that rank.
        first = tuple(np.argwhere(differ)[0])
        fraction = differ.mean()
        assert fraction < 1e-3, (f"{what}: {differ.sum()} indices differ ({fraction:.2%}), first at {first}: "
                                 f"{got_indices[first]} vs {expected_indices[first]}")


def assert_pairs_agree(got, expected, what: str, max_fraction: float = 1e-3) -> None:
    """Two pair sets (ia, ib) agree up to a tiny fraction of near ties."""
    got_set = set(zip(np.asarray(got[0]).tolist(), np.asarray(got[1]).tolist()))
    expected_set = set(zip(np.asarray(expected[0]).tolist(), np.asarray(expected[1]).tolist()))
    differ = len(got_set ^ expected_set)
    assert expected_set, f"{what}: the reference found no pairs"
    assert differ <= max_fraction * len(expected_set), (
        f"{what}: {differ} of {len(expected_set)} pairs differ; first missing "
        f"{sorted(expected_set - got_set)[:1]}, first extra {sorted(got_set - expected_set)[:1]}")


def assert_csr_agree(got, expected, what: str, rtol: float = 1e-4, atol: float = 1e-5,
                     max_fraction: float = 1e-3) -> None:
    """Two sparse matrices (torch CSR or scipy) agree: patterns up to a tiny fraction of
    near ties, values within tolerance on the shared entries."""
    def entries(matrix):
        if isinstance(matrix, torch.Tensor):
            coo = matrix.to_sparse_coo().coalesce()
            (r, c), v = coo.indices().numpy(), coo.values().numpy()
        else:
            coo = matrix.tocoo()
            r, c, v = coo.row, coo.col, coo.data
        return dict(zip(zip(r.tolist(), c.tolist()), v.tolist()))
    got_entries, expected_entries = entries(got), entries(expected)
    differ = set(got_entries) ^ set(expected_entries)
    assert expected_entries, f"{what}: the reference matrix is empty"
    assert len(differ) <= max_fraction * len(expected_entries), (
        f"{what}: {len(differ)} of {len(expected_entries)} entries differ in position; first "
        f"{sorted(differ)[:1]}")
    for key in sorted(set(got_entries) & set(expected_entries)):
        assert np.isclose(got_entries[key], expected_entries[key], rtol=rtol, atol=atol), \
            f"{what}: value mismatch at {key}: {got_entries[key]} vs {expected_entries[key]}"


@pytest.fixture(scope="session")
def agree():
    """Namespace of agreement checks: ``agree.rankings``, ``agree.pairs``, ``agree.csr``."""
    class Agree:
        rankings = staticmethod(assert_rankings_agree)
        pairs = staticmethod(assert_pairs_agree)
        csr = staticmethod(assert_csr_agree)
    return Agree


# --------------------------------------------------------------------- summary table

def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After pytest-benchmark's own table: one row per benchmark with the floor ratio and
    the speed-up of ``cpu`` over each peer on the same workload (bench/README.md format)."""
    session = getattr(config, "_benchmarksession", None)
    results = [b for b in getattr(session, "benchmarks", []) if b and "workload" in b.extra_info]
    if not results:
        return
    cpu_median = {}
    for b in results:
        if b.extra_info["provider"] == "cpu":
            cpu_median[(b.extra_info["workload"], b.extra_info["params"])] = b.stats.median
    terminalreporter.write_sep("-", f"fastassoc benchmarks (scale={SCALE}, torch threads={torch.get_num_threads()})")
    terminalreporter.write_line(f"{'workload':<10} {'params':<14} {'provider':<10} {'median s':>10} "
                                f"{'floor s':>9} {'x floor':>8} {'cpu speed-up':>12}")
    for b in sorted(results, key=lambda b: (b.extra_info["workload"], b.extra_info["params"],
                                            b.extra_info["provider"])):
        info = b.extra_info
        key = (info["workload"], info["params"])
        params = info["params"]
        floor = info.get("gemm_floor_s")
        ratio = f"{b.stats.median / floor:8.2f}" if floor else f"{'':>8}"
        floor_text = f"{floor:9.4f}" if floor else f"{'':>9}"
        speedup = (f"{b.stats.median / cpu_median[key]:11.2f}x" if key in cpu_median
                   and info["provider"] != "cpu" else f"{'':>12}")
        terminalreporter.write_line(f"{info['workload']:<10} {params:<14} {info['provider']:<10} "
                                    f"{b.stats.median:10.4f} {floor_text} {ratio} {speedup}")
