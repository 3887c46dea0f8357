"""Benchmarks of the evaluation family: evaluate_ranking at W-eval.

Workload: 3,368 queries x 15,913 gallery (Market-1501 test), D = 2048, 6 cameras, about
15 % of the gallery with identity -1 (junk / distractors), squared Euclidean distances
(what torchreid's ``compute_distance_matrix`` ranks by), max_rank 50.

Providers
---------
* ``reference``  fastassoc, pure-torch reference backend (chunked stable argsort)
* ``cpu``        fastassoc, compiled C++/OpenMP backend as ``auto`` picks it (float32 GEMM
  tiles + per-query counting of negatives between the sorted true matches, no gallery sort)
* ``cpu-int8``   the same with int8 screening forced (``FASTASSOC_CPU_SCREEN=always``): the
  exact ranking of exactly rounded distances, which may swap a negative and a true match
  closer than the float32 GEMM's rounding, hence not the default (see
  ``fastassoc/kernels/cpu/evaluation.py``); shown for what it would gain
* ``torchreid``  the public re-id toolkits' way, written here: the full Q x G distance
  matrix from torch (the shared expression, so rankings are comparable bit for bit),
  ``.numpy()``, then torchreid's ``eval_market1501``: one full ``np.argsort`` of the
  matrix, the match matrix, and a per-query loop removing junk and accumulating CMC, AP
  and INP (stable argsort so ties rank by gallery index, as the contract says).

Agreement before timing: CMC identical, mAP / mINP within 1e-12 of the reference
(``cpu-int8``: within 1e-5, the rounding swaps above).
Besides time, each provider records its peak extra memory (peak resident set size during
the call minus the resident size before it, from ``/proc/self/status`` VmHWM after
resetting it through ``/proc/self/clear_refs``) and that peak as a fraction of one Q x G
float32 matrix. GEMM floor: the bare ``[Q, D] x [D, G]`` float32 GEMM.
Targets (issue 3): cpu >= 5x faster than the full-argsort evaluation, identical
CMC / mAP / mINP, peak extra memory < 1/4 of a Q x G float32 matrix. Run
``pytest bench/bench_evaluation.py --benchmark-only`` (``FASTASSOC_BENCH_SCALE=small`` for
a smoke run).
"""
from __future__ import annotations

import ctypes
import functools
import gc

import numpy as np
import pytest
import torch

import fastassoc
from conftest import fastassoc_provider
from fastassoc.kernels.cpu._core import release_scratch

METRIC, MAX_RANK = "sqeuclidean", 50
PROVIDERS = ("reference", "cpu", "cpu-int8", "torchreid")
# Every fastassoc path ranks true matches by the exact pair distance (a function of the two
# rows); torchreid ranks its float32 GEMM values, so a negative and a true match closer than
# that GEMM's rounding may swap.
ROUNDING_SWAP_TOLERANCE = {"torchreid": 1e-5}


# ----------------------------------------------------------------------------- peer

def eval_market1501(distmat: np.ndarray, q_pids, g_pids, q_camids, g_camids, max_rank: int):
    """torchreid.metrics.rank.eval_market1501 (plus mINP), stable argsort."""
    num_q, num_g = distmat.shape
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = ((g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])) | (g_pids[order] == -1)
        raw_cmc = matches[q_idx][~remove]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        positions = np.flatnonzero(raw_cmc == 1)
        all_inp.append(cmc[positions[-1]] / (positions[-1] + 1.0))
        cmc[cmc > 1] = 1
        padded = np.full(max_rank, cmc[-1], dtype=np.float64)
        padded[:min(max_rank, cmc.size)] = cmc[:max_rank]
        all_cmc.append(padded)
        num_rel = raw_cmc.sum()
        precision = raw_cmc.cumsum() / (np.arange(raw_cmc.size) + 1.0)
        all_ap.append((precision * raw_cmc).sum() / num_rel)
    return np.asarray(all_cmc).mean(0), float(np.mean(all_ap)), float(np.mean(all_inp)), len(all_ap)


def torchreid_evaluate(query, gallery, qpids, gpids, qcams, gcams):
    query_norms, gallery_norms = (query * query).sum(1), (gallery * gallery).sum(1)
    distmat = ((query_norms[:, None] + gallery_norms[None, :]) - 2.0 * (query @ gallery.T)).clamp_min_(0.0)
    return eval_market1501(distmat.numpy(), qpids, gpids, qcams, gcams, MAX_RANK)


# ----------------------------------------------------------------------------- memory

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _trim_heap() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: freed blocks may still count as resident
        pass


def peak_extra_bytes(function) -> int | None:
    """Peak resident memory of ``function()`` above the resident size before it (Linux).

    The CPU backend's cached tile buffer is dropped first and the C heap's free pages are
    handed back to the system (glibc ``malloc_trim``), so that memory the call allocates
    counts even where an earlier provider's freed blocks would otherwise be reused resident.
    """
    try:
        release_scratch()
        gc.collect()
        _trim_heap()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")                      # resets VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        function()
        return (_status_kib("VmHWM") - before) * 1024
    except (OSError, KeyError):
        return None


# ----------------------------------------------------------------------------- W-eval

def eval_runner(provider: str, w: dict):
    args = (w["query"], w["gallery"], w["qpids"], w["gpids"], w["qcams"], w["gcams"])
    if provider == "torchreid":
        numpy_ids = [t.numpy() for t in args[2:]]
        return lambda: torchreid_evaluate(w["query"], w["gallery"], *numpy_ids)
    return fastassoc_provider(fastassoc.evaluate_ranking, *args, metric=METRIC, max_rank=MAX_RANK, provider=provider)


def as_tuple(result):
    if isinstance(result, tuple):
        return np.asarray(result[0]), result[1], result[2], result[3]
    return result.cmc.numpy(), result.mAP, result.mINP, result.num_valid_queries


@functools.lru_cache(maxsize=None)
def _eval_expected(workload_fn):
    return as_tuple(eval_runner("reference", workload_fn("W-eval"))())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_evaluate_ranking_w_eval(benchmark, workload, gemm_floor, report, timed, provider):
    w = workload("W-eval")
    run = eval_runner(provider, w)
    cmc, mean_ap, mean_inp, valid = as_tuple(run())
    expected_cmc, expected_ap, expected_inp, expected_valid = _eval_expected(workload)
    what = f"W-eval {provider} vs reference"
    assert valid == expected_valid, f"{what}: {valid} valid queries, expected {expected_valid}"
    tolerance = ROUNDING_SWAP_TOLERANCE.get(provider, 0.0)
    differ = np.flatnonzero(np.abs(cmc - expected_cmc) > tolerance)
    assert differ.size == 0, f"{what}: CMC differs first at rank {differ[0] + 1}: {cmc[differ[0]]} vs " \
                             f"{expected_cmc[differ[0]]}"
    assert abs(mean_ap - expected_ap) <= max(tolerance, 1e-12) and \
        abs(mean_inp - expected_inp) <= max(tolerance, 1e-12), \
        f"{what}: mAP {mean_ap} vs {expected_ap}, mINP {mean_inp} vs {expected_inp}"
    peak = peak_extra_bytes(run)
    num_query, dim = w["query"].shape
    num_gallery = w["gallery"].shape[0]
    floor = gemm_floor([(num_query, num_gallery, dim)])
    timed(benchmark, run)
    matrix_bytes = num_query * num_gallery * 4
    report(workload="W-eval", provider=provider, floor=floor, params={"metric": METRIC},
           mAP=expected_ap, rank1=float(expected_cmc[0]),
           peak_extra_mb=None if peak is None else peak / 2**20,
           peak_extra_fraction_of_qxg=None if peak is None else peak / matrix_bytes)
