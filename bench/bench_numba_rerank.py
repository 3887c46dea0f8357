"""numba against the compiled core on the two irregular passes of ``jaccard_distance`` (issue 12).

The design card lists numba for irregular sparse work; fastassoc's cpu backend does these
passes in C++/OpenMP (csrc/cpu/rerank.cpp, ``rerank_encode`` and ``rerank_jaccard``). This
file writes both passes again with ``@numba.njit(parallel=True)`` the natural numba way and
times the two side by side, so the choice rests on figures, not on an argument.

Passes (the module docstring of fastassoc/kernels/cpu/rerank.py describes the algorithm):

* ``encode``   from the cpu backend's exact k1-nearest lists (``_nearest_lists``, computed
  once, outside the timing): reciprocal sets, the 2/3 expansion, SpCL's softmax weights
  (the fixed-order float64 dot, ``screen_dot``'s bits) and query expansion, to ``V`` as CSR.
  numba: ``prange`` over row lanes, per-lane dense buffers, each row written into a slot of
  an upper-bound size, then compacted. SpCL weights on float32 only (the workload's; the C++
  also has Zhong's weights and a float64 instantiation, counted in its lines below).
* ``jaccard``  ``V`` to the symmetric CSR of J = max(1 - m / (2 - m), 0), m_ij = sum_k
  min(V_ik, V_jk) summed in ascending k, pairs with float32 J < 1 plus the diagonal zero:
  the compiled core's unbounded path (``kept_budget`` 0, the default without
  ``max_distance``): a counting pass over the upper triangle, then a writing pass that
  recomputes full rows. numba: the same two passes, a dense per-lane row buffer with a
  bitmap of touched columns (numba's internal ``trailing_zeros`` intrinsic for the C++'s
  ``__builtin_ctzll``: scanning the dense buffer instead took ~40 % longer), mirrored counts
  in per-lane arrays.

Tried and left out (numba 0.68.1, AVX-512 CPU): the fixed-order float64 dot is not
vectorised by numba's LLVM in any form tried (lane array, 16 scalar accumulators, unsigned
indices, ``NUMBA_SLP_VECTORIZE=1``): ~1.15 us per D = 2048 dot, where the C++ one runs on
8-lane float64 vectors; ``fastmath`` would vectorise it but reorders the sums, losing the
reference's bits. ``error_model="numpy"`` drops the division-by-zero checks.

Agreement before timing: numba's ``V`` has the compiled ``V``'s structure and values within
1e-6; numba's Jaccard of the compiled ``V`` and the full numba pipeline both give the
structure of ``fastassoc.jaccard_distance(..., backend="cpu")`` with values within 1e-5
(``bit_equal`` records whether they are identical).

Timing: same inputs, same process, same thread count (``--threads``, default 2: torch, the
core's OpenMP and numba's pool). numba's first call (the JIT compile, on a 64-row input) is
timed apart; ``--jit-processes`` also times it in fresh processes without and with
``cache=True`` (a cold cache that compiles and writes, then a warm one that loads).
Warm calls: median (and minimum) of ``--rounds`` (5) rounds
that interleave the two providers (load from other processes weighs on both alike). On a
shared machine the minimum is the steadier figure: calls that fault in fresh pages (the
~500 MB result) stall there now and then for seconds (a bare 496 MB ``np.ones`` took 0.06 s
or 3.4 s on the loaded 2-core dev box), whichever provider they hit. Peak extra memory: resident high-water mark of one
warm call above the resident size before it (bench_evaluation.peak_extra_bytes; it sees
numba's and C++'s allocations, tracemalloc would not).

Run ``.venv/bin/python bench/bench_numba_rerank.py [--markdown] [--jit-processes]`` for the
table, or ``pytest bench/bench_numba_rerank.py --benchmark-only`` (``FASTASSOC_BENCH_SCALE=small``
for a quick run). numba is not a fastassoc dependency: without it the module is skipped.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

if __name__ == "__main__":
    import numba
else:
    numba = pytest.importorskip("numba", reason="numba is not installed (not a fastassoc dependency): "
                                "`pip install numba` to compare it with the compiled core")
from numba import prange
# numba's own count-trailing-zeros (cttz) intrinsic, as the C++ uses __builtin_ctzll.
from numba.cpython.unsafe.numbers import trailing_zeros

import fastassoc
from bench_evaluation import peak_extra_bytes
from bench_rerank import K1, K2, jaccard_workload
from conftest import SCALE
from fastassoc.kernels.cpu import _core
from fastassoc.kernels.cpu import rerank as cpu_rerank

WORKLOAD = "W-jaccard"
# cache=True (FASTASSOC_NUMBA_CACHE=1) writes the compiled code to NUMBA_CACHE_DIR / __pycache__.
CACHE = os.environ.get("FASTASSOC_NUMBA_CACHE", "0") == "1"
# Rows go to lanes i % lanes; a lane owns its dense buffers and is scheduled dynamically
# (parallel_chunksize 1), so a thread that keeps its core takes more lanes.
LANES_PER_THREAD = 8
V_TOLERANCE, J_TOLERANCE = 1e-6, 1e-5
REPO = pathlib.Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- numba: encoding

@numba.njit(cache=CACHE, error_model="numpy")
def _exact_dot(x, a, b, lanes):
    """x[a] . x[b] in float64: lane l sums the products of the indices = l (mod 16) in order,
    then lanes += lanes[width:] for width 8, 4, 2, 1 (screen_dot's and exact_dots' bits)."""
    lanes[:] = 0.0
    dim = x.shape[1]
    blocked = dim - dim % 16
    for block in range(0, blocked, 16):
        for lane in range(16):
            lanes[lane] += np.float64(x[a, block + lane]) * np.float64(x[b, block + lane])
    for d in range(blocked, dim):
        lanes[d - blocked] += np.float64(x[a, d]) * np.float64(x[b, d])
    width = 8
    while width > 0:
        for lane in range(width):
            lanes[lane] += lanes[lane + width]
        width //= 2
    return lanes[0]


@numba.njit(parallel=True, cache=CACHE, error_model="numpy")
def _reciprocal_sets(ranks, w):
    """R(i, w) [N, w] (ascending in the first sizes[i] slots), sizes [N]."""
    n = ranks.shape[0]
    members = np.empty((n, w), np.int64)
    sizes = np.zeros(n, np.int64)
    for i in prange(n):
        count = 0
        for s in range(w):
            j = ranks[i, s]
            for u in range(w):
                if ranks[j, u] == i:
                    members[i, count] = j
                    count += 1
                    break
        members[i, :count].sort()
        sizes[i] = count
    return members, sizes


@numba.njit(parallel=True, cache=CACHE, error_model="numpy")
def _compact(bounds, cols, values, sizes):
    """Rows written at bounds[i] with sizes[i] entries -> CSR (crow, cols, values)."""
    n = sizes.shape[0]
    crow = np.zeros(n + 1, np.int64)
    for i in range(n):
        crow[i + 1] = crow[i] + sizes[i]
    out_cols = np.empty(crow[n], np.int64)
    out_values = np.empty(crow[n], values.dtype)
    for i in prange(n):
        out_cols[crow[i]:crow[i + 1]] = cols[bounds[i]:bounds[i] + sizes[i]]
        out_values[crow[i]:crow[i + 1]] = values[bounds[i]:bounds[i] + sizes[i]]
    return crow, out_cols, out_values


@numba.njit(parallel=True, cache=CACHE, error_model="numpy")
def _weighted_sets(x, full, full_sizes, halves, half_sizes, lanes):
    """E(i) (R(i, K) plus every R(c, h), c in R(i, K), with > 2/3 of it in R(i, K)) with
    SpCL's softmax weights of -(2 - 2 x_i.x_m), float32, as CSR."""
    n = x.shape[0]
    bounds = np.zeros(n + 1, np.int64)
    for i in range(n):
        room = full_sizes[i]
        for s in range(full_sizes[i]):
            room += half_sizes[full[i, s]]
        bounds[i + 1] = bounds[i] + room
    cols = np.empty(bounds[n], np.int64)
    values = np.empty(bounds[n], np.float32)
    sizes = np.zeros(n, np.int64)
    two = np.float32(2)
    for lane in prange(lanes):
        mark = np.full(n, -1, np.int64)
        scratch = np.empty(16, np.float64)
        for i in range(lane, n, lanes):
            start, size = bounds[i], 0
            for s in range(full_sizes[i]):
                mark[full[i, s]] = i
                cols[start + size] = full[i, s]
                size += 1
            for s in range(full_sizes[i]):
                c = full[i, s]
                overlap = 0
                for u in range(half_sizes[c]):
                    overlap += mark[halves[c, u]] == i
                # SpCL's "> 2/3 * len", exact in integers.
                if 3 * overlap > 2 * half_sizes[c]:
                    for u in range(half_sizes[c]):
                        cols[start + size] = halves[c, u]
                        size += 1
            members = cols[start:start + size]
            members.sort()
            unique = 0
            for s in range(size):
                if unique == 0 or members[s] != members[unique - 1]:
                    members[unique] = members[s]
                    unique += 1
            shift = np.float32(-np.inf)
            for s in range(unique):
                dot = np.float32(_exact_dot(x, i, members[s], scratch))
                logit = -(two - two * dot)
                values[start + s] = logit
                shift = max(shift, logit)
            total = np.float32(0)
            for s in range(unique):
                weight = np.exp(values[start + s] - shift)
                values[start + s] = weight
                total += weight
            for s in range(unique):
                values[start + s] = values[start + s] / total
            sizes[i] = unique
    return _compact(bounds, cols, values, sizes)


@numba.njit(parallel=True, cache=CACHE, error_model="numpy")
def _query_expansion(ranks, width, crow, cols, values, lanes):
    """Mean of the V rows of ranks[i, :width] (summed in list order, zero means dropped), as CSR."""
    n = crow.shape[0] - 1
    bounds = np.zeros(n + 1, np.int64)
    for i in range(n):
        room = 0
        for s in range(width):
            room += crow[ranks[i, s] + 1] - crow[ranks[i, s]]
        bounds[i + 1] = bounds[i] + room
    out_cols = np.empty(bounds[n], np.int64)
    out_values = np.empty(bounds[n], np.float32)
    sizes = np.zeros(n, np.int64)
    divisor = np.float32(width)
    for lane in prange(lanes):
        sums = np.zeros(n, np.float32)
        seen = np.full(n, -1, np.int64)
        for i in range(lane, n, lanes):
            start, touched = bounds[i], 0
            for s in range(width):
                neighbour = ranks[i, s]
                for e in range(crow[neighbour], crow[neighbour + 1]):
                    col = cols[e]
                    if seen[col] != i:
                        seen[col] = i
                        out_cols[start + touched] = col
                        touched += 1
                    sums[col] += values[e]
            row = out_cols[start:start + touched]
            row.sort()
            kept = 0
            for s in range(touched):
                col = row[s]
                mean = sums[col] / divisor
                sums[col] = 0
                if mean != 0:
                    row[kept] = col
                    out_values[start + kept] = mean
                    kept += 1
            sizes[i] = kept
    return _compact(bounds, out_cols, out_values, sizes)


def numba_encode(x: np.ndarray, ranks: np.ndarray, k1: int, k2: int, threads: int):
    """V (crow int64, cols int64, values float32) of SpCL's encoding from the lists ``ranks`` [N, k1]."""
    if x.dtype != np.float32:
        raise ValueError(f"x: numba_encode is written for float32, got {x.dtype}")
    width = ranks.shape[1]
    half = min(round(k1 / 2) + 1, width)
    lanes = LANES_PER_THREAD * threads
    with numba.parallel_chunksize(1):
        full, full_sizes = _reciprocal_sets(ranks, width)
        halves, half_sizes = _reciprocal_sets(ranks, half)
        v = _weighted_sets(x, full, full_sizes, halves, half_sizes, lanes)
        if k2 == 1:
            return v
        return _query_expansion(ranks, min(k2, width), *v, lanes)


# ----------------------------------------------------------------------------- numba: Jaccard

@numba.njit(cache=CACHE, error_model="numpy")
def _transpose(crow, cols, values):
    """V's column lists: rows holding each column, ascending, with their values."""
    n = crow.shape[0] - 1
    offsets = np.zeros(n + 1, np.int64)
    for e in range(crow[n]):
        offsets[cols[e] + 1] += 1
    for k in range(n):
        offsets[k + 1] += offsets[k]
    holders = np.empty(crow[n], np.int64)
    held = np.empty(crow[n], values.dtype)
    cursor = offsets[:n].copy()
    for i in range(n):
        for e in range(crow[i], crow[i + 1]):
            at = cursor[cols[e]]
            cursor[cols[e]] += 1
            holders[at] = i
            held[at] = values[e]
    return offsets, holders, held


@numba.njit(cache=CACHE, error_model="numpy")
def _accumulate(i, upper, crow, cols, values, offsets, holders, held, sums, touched):
    """sums[j] += min(V_ik, V_jk) over ascending k for j > i (upper) or every j, marking j in
    the bitmap ``touched``; returns the range of touched words."""
    lo, hi = sums.shape[0], -1
    for e in range(crow[i], crow[i + 1]):
        k = cols[e]
        mine = values[e]
        start, end = offsets[k], offsets[k + 1]
        p = start + np.searchsorted(holders[start:end], i, side="right") if upper else start
        if p >= end:
            continue
        lo = min(lo, holders[p])
        hi = max(hi, holders[end - 1])
        for q in range(p, end):
            j = holders[q]
            theirs = held[q]
            sums[j] += mine if mine < theirs else theirs
            touched[j >> 6] |= np.uint64(1) << np.uint64(j & 63)
    return lo >> 6, hi >> 6


@numba.njit(cache=CACHE, error_model="numpy")
def _drain(i, first_word, last_word, sums, touched, partners, distances):
    """The touched j != i in ascending order with their float32 J < 1, into partners /
    distances (returns how many); clears sums and touched."""
    count = 0
    for word in range(first_word, last_word + 1):
        bits = touched[word]
        touched[word] = 0
        while bits:
            j = (word << 6) + trailing_zeros(bits)
            bits &= bits - np.uint64(1)
            shared = sums[j]
            sums[j] = 0
            if j == i or shared == 0:
                continue
            distance = _distance(shared)
            if distance < 1:
                partners[count] = j
                distances[count] = distance
                count += 1
    return count


@numba.njit(cache=CACHE, error_model="numpy")
def _distance(shared):
    """float32 J of a float32 overlap m (J < 1 is stored)."""
    one = np.float32(1)
    distance = one - shared / (np.float32(2) - shared)
    return distance if distance > 0 else np.float32(0)


@numba.njit(parallel=True, cache=CACHE, error_model="numpy")
def _jaccard(crow, cols, values, lanes):
    n = crow.shape[0] - 1
    offsets, holders, held = _transpose(crow, cols, values)
    # Counting pass over the upper triangle: a lane counts its rows' pairs and their mirrors.
    counts = np.zeros((lanes, n), np.int64)
    for lane in prange(lanes):
        sums = np.zeros(n, np.float32)
        touched = np.zeros((n + 63) // 64, np.uint64)
        partners = np.empty(n, np.int64)
        distances = np.empty(n, np.float32)
        mine = counts[lane]
        for i in range(lane, n, lanes):
            first, last = _accumulate(i, True, crow, cols, values, offsets, holders, held, sums, touched)
            upper = _drain(i, first, last, sums, touched, partners, distances)
            for s in range(upper):
                mine[partners[s]] += 1
            mine[i] += upper
    out_crow = np.zeros(n + 1, np.int64)
    for i in range(n):
        total = 1   # the diagonal
        for lane in range(lanes):
            total += counts[lane, i]
        out_crow[i + 1] = out_crow[i] + total
    out_cols = np.empty(out_crow[n], np.int64)
    out_values = np.empty(out_crow[n], np.float32)
    consistent = np.ones(lanes, np.bool_)
    # Writing pass: every full row again, in column order, the diagonal zero in its place.
    for lane in prange(lanes):
        sums = np.zeros(n, np.float32)
        touched = np.zeros((n + 63) // 64, np.uint64)
        partners = np.empty(n, np.int64)
        distances = np.empty(n, np.float32)
        for i in range(lane, n, lanes):
            first, last = _accumulate(i, False, crow, cols, values, offsets, holders, held, sums, touched)
            count = _drain(i, first, last, sums, touched, partners, distances)
            at, end = out_crow[i], out_crow[i + 1]
            if at + count + 1 != end:
                consistent[lane] = False
                continue
            below = np.searchsorted(partners[:count], i)
            out_cols[at:at + below] = partners[:below]
            out_values[at:at + below] = distances[:below]
            out_cols[at + below] = i
            out_values[at + below] = 0
            out_cols[at + below + 1:end] = partners[below:count]
            out_values[at + below + 1:end] = distances[below:count]
    return out_crow, out_cols, out_values, consistent.all()


def numba_jaccard(crow: np.ndarray, cols: np.ndarray, values: np.ndarray, threads: int):
    """The compiled ``rerank_jaccard(..., bounded=False, kept_budget=0)``: (crow, cols, values float32)."""
    if values.dtype != np.float32:
        raise ValueError(f"values: numba_jaccard is written for float32, got {values.dtype}")
    with numba.parallel_chunksize(1):
        out_crow, out_cols, out_values, consistent = _jaccard(crow, cols, values, LANES_PER_THREAD * threads)
    if not consistent:
        raise RuntimeError("numba_jaccard: the counting and writing passes disagree")
    return out_crow, out_cols, out_values


NUMBA_FUNCTIONS = {
    "encode": (_exact_dot, _reciprocal_sets, _compact, _weighted_sets, _query_expansion, numba_encode),
    "jaccard": (_transpose, _accumulate, _drain, _distance, _jaccard, numba_jaccard),
}


# ----------------------------------------------------------------------------- compiled core

@functools.lru_cache(maxsize=None)
def encode_inputs(name: str):
    """(x [N, D] float32, ranks [N, k1] int64, norms [N]): the cpu backend's prepared rows and
    exact lists (what jaccard_distance_cpu hands ``rerank_encode``, screen as it picks)."""
    x = _core.prepare(jaccard_workload(name), "sqeuclidean")
    norms = cpu_rerank.exact_squared_norms(x)
    ranks = cpu_rerank._nearest_lists(x, min(K1, x.shape[0]), "sqeuclidean", norms, screen=True)
    _core.release_scratch()
    return x, ranks.contiguous(), norms


def compiled_encode(x: torch.Tensor, ranks: torch.Tensor, norms: torch.Tensor, k1: int, k2: int):
    """``_C.rerank_encode`` as ``cpu_rerank._encode`` calls it for SpCL weights."""
    n, width = ranks.shape
    half = min(round(k1 / 2) + 1, width)
    return _core.kernel("rerank_encode")(
        _core.ptr(ranks), n, width, half, 0 if k2 == 1 else min(k2, width), _core.ptr(x), False, x.shape[1],
        _core.ptr(norms), 0, 0, 0)


def compiled_jaccard(crow: np.ndarray, cols: np.ndarray, values: np.ndarray):
    """``_C.rerank_jaccard`` unbounded, as ``jaccard_distance_cpu`` calls it without max_distance."""
    return _core.kernel("rerank_jaccard")(crow.ctypes.data, cols.ctypes.data, values.ctypes.data, False,
                                          len(crow) - 1, False, 0.0, 0)


# ----------------------------------------------------------------------------- agreement

def compare_csr(got, expected, tolerance: float, what: str) -> dict:
    """Same structure, values within ``tolerance``; returns max |difference| and bit equality."""
    for part, a, b in zip(("crow", "cols"), got[:2], expected[:2]):
        assert np.array_equal(a, b), f"{what}: {part} differ"
    difference = np.abs(got[2].astype(np.float64) - expected[2].astype(np.float64))
    worst = float(difference.max()) if difference.size else 0.0
    assert worst <= tolerance, f"{what}: values differ by {worst:.3g} > {tolerance}"
    return dict(max_abs_difference=worst, bit_equal=bool(np.array_equal(got[2].view(np.uint32),
                                                                       expected[2].view(np.uint32))))


@functools.lru_cache(maxsize=None)
def agreement(name: str, threads: int) -> dict:
    x, ranks, norms = encode_inputs(name)
    v_compiled = compiled_encode(x, ranks, norms, K1, K2)
    v_numba = numba_encode(x.numpy(), ranks.numpy(), K1, K2, threads)
    result = {"encode": compare_csr(v_numba, v_compiled, V_TOLERANCE, "numba V vs compiled V")}
    backend = fastassoc.jaccard_distance(jaccard_workload(name), K1, K2, backend="cpu")
    expected = tuple(t.numpy() for t in (backend.crow_indices(), backend.col_indices(), backend.values()))
    result["jaccard"] = compare_csr(numba_jaccard(*v_compiled, threads), expected, J_TOLERANCE,
                                    "numba Jaccard of the compiled V vs jaccard_distance(backend='cpu')")
    result["pipeline"] = compare_csr(numba_jaccard(*v_numba, threads), expected, J_TOLERANCE,
                                     "numba encode + Jaccard vs jaccard_distance(backend='cpu')")
    result["stored_pairs"] = len(expected[1])
    result["v_nnz"] = len(v_compiled[1])
    return result


# ----------------------------------------------------------------------------- measurement

def set_threads(threads: int) -> int:
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    return threads


def jit_seconds() -> dict:
    """Seconds of each pass's first call in this process, on a 64-row input (compile or cache
    load, plus a negligible run)."""
    generator = torch.Generator().manual_seed(0)
    small_x = torch.nn.functional.normalize(torch.randn(64, 32, generator=generator), dim=1)
    small_ranks = cpu_rerank._nearest_lists(small_x, K1, "sqeuclidean", cpu_rerank.exact_squared_norms(small_x))
    start = time.perf_counter()
    v = numba_encode(small_x.numpy(), small_ranks.numpy(), K1, K2, numba.get_num_threads())
    middle = time.perf_counter()
    numba_jaccard(*v, numba.get_num_threads())
    return {"encode": middle - start, "jaccard": time.perf_counter() - middle}


def jit_in_fresh_processes(threads: int) -> dict:
    """First-call seconds in fresh processes: no cache, cold cache=True (compile + write),
    warm cache=True (load)."""
    def child(environment):
        env = dict(os.environ, **environment)
        output = subprocess.run([sys.executable, __file__, "--jit-only", "--threads", str(threads)], env=env,
                                check=True, capture_output=True, text=True).stdout
        return json.loads(output.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as cache_dir:
        cached = {"FASTASSOC_NUMBA_CACHE": "1", "NUMBA_CACHE_DIR": cache_dir}
        return {"no cache": child({"FASTASSOC_NUMBA_CACHE": "0"}), "cache=True, cold": child(cached),
                "cache=True, warm": child(cached)}


def pass_runners(name: str, threads: int) -> dict:
    """{(pass, provider): callable} on the workload's inputs (V: the compiled one, for both)."""
    x, ranks, norms = encode_inputs(name)
    v = compiled_encode(x, ranks, norms, K1, K2)
    x_np, ranks_np = x.numpy(), ranks.numpy()
    return {("encode", "cpu"): lambda: compiled_encode(x, ranks, norms, K1, K2),
            ("encode", "numba"): lambda: numba_encode(x_np, ranks_np, K1, K2, threads),
            ("jaccard", "cpu"): lambda: compiled_jaccard(*v),
            ("jaccard", "numba"): lambda: numba_jaccard(*v, threads)}


def code_lines(source: str, comment: str) -> int:
    """Lines of code: not blank, not only a comment (docstrings count as comments for Python)."""
    if comment == "#":
        source = re.sub(r'"""[\s\S]*?"""', "", source)
    return sum(1 for line in source.splitlines() if line.strip() and not line.strip().startswith(comment))


def cpp_lines() -> dict:
    """Lines of code of csrc/cpu/rerank.cpp's passes: its "2. encoding" section (encode and its
    helpers, to_numpy excluded) and its "3. Jaccard" section (transpose, RowOverlaps, the kept
    pairs and jaccard), without the shared error and heap helpers or the bindings."""
    text = (REPO / "csrc" / "cpu" / "rerank.cpp").read_text()
    encode = text.split("// " + "-" * 66 + " 2. encoding")[1].split("template <typename T>\npy::array_t<T> to_numpy")[0]
    jaccard = text.split("// " + "-" * 66 + " 3. Jaccard")[1].split("// " + "-" * 66 + " DBSCAN")[0]
    return {"encode": code_lines(encode, "//"), "jaccard": code_lines(jaccard, "//")}


def numba_lines() -> dict:
    return {name: sum(code_lines(inspect.getsource(getattr(f, "py_func", f)), "#") for f in functions)
            for name, functions in NUMBA_FUNCTIONS.items()}


def measure(threads: int, rounds: int, jit_processes: bool) -> dict:
    threads = set_threads(threads)
    jit = jit_seconds()   # first numba calls of this process
    checks = agreement(WORKLOAD, threads)
    runners = pass_runners(WORKLOAD, threads)
    times = {key: [] for key in runners}
    for run in runners.values():
        run()   # warm: pages, pools
    # Rounds interleave the providers, so that load from other processes drifting over the
    # run weighs on both alike.
    for _ in range(rounds):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    rows = {}
    for key, run in runners.items():
        peak = peak_extra_bytes(run)
        rows[key] = dict(seconds=statistics.median(times[key]), fastest=min(times[key]),
                         peak_mb=None if peak is None else peak / 2**20)
    return dict(threads=threads, rounds=rounds, jit=jit, agreement=checks, rows=rows, cpp_lines=cpp_lines(),
                numba_lines=numba_lines(), fresh=jit_in_fresh_processes(threads) if jit_processes else None,
                threading_layer=numba.threading_layer(), n=encode_inputs(WORKLOAD)[0].shape[0],
                d=encode_inputs(WORKLOAD)[0].shape[1])


def table(result: dict, markdown: bool) -> str:
    header = ["pass", "cpu warm s (median, min)", "numba warm s (median, min)", "numba / cpu (medians, mins)",
              "numba first call s", "cpu peak MB", "numba peak MB", "C++ lines", "numba lines", "agreement"]
    lines = []
    for name in ("encode", "jaccard"):
        cpu, nb = result["rows"][(name, "cpu")], result["rows"][(name, "numba")]
        check = result["agreement"][name]
        peak = [f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "n/a" for row in (cpu, nb)]
        lines.append([name, f"{cpu['seconds']:.3f}, {cpu['fastest']:.3f}", f"{nb['seconds']:.3f}, {nb['fastest']:.3f}",
                      f"{nb['seconds'] / cpu['seconds']:.2f}, {nb['fastest'] / cpu['fastest']:.2f}",
                      f"{result['jit'][name]:.1f}", *peak, str(result["cpp_lines"][name]),
                      str(result["numba_lines"][name]),
                      f"max abs diff {check['max_abs_difference']:.1e}, "
                      f"{'bit-equal' if check['bit_equal'] else 'not bit-equal'}"])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
    else:
        widths = [max(len(h), *(len(line[c]) for line in lines)) for c, h in enumerate(header)]
        out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        out += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines]
    pipeline = result["agreement"]["pipeline"]
    out.append("")
    out.append(f"{WORKLOAD} ({SCALE}): N = {result['n']}, D = {result['d']}, k1 = {K1}, k2 = {K2}, "
               f"{result['threads']} threads, numba {numba.__version__} ({result['threading_layer']} layer), "
               f"{result['rounds']} interleaved rounds; nnz(V) = {result['agreement']['v_nnz']}, "
               f"stored pairs = {result['agreement']['stored_pairs']}; numba encode + Jaccard vs "
               f"jaccard_distance(backend='cpu'): max abs diff {pipeline['max_abs_difference']:.1e}, "
               f"{'bit-equal' if pipeline['bit_equal'] else 'not bit-equal'}")
    if result["fresh"]:
        for mode, seconds in result["fresh"].items():
            out.append(f"first call in a fresh process, {mode}: encode {seconds['encode']:.2f} s, "
                       f"jaccard {seconds['jaccard']:.2f} s")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--jit-processes", action="store_true",
                        help="also time the first call in fresh processes, without and with cache=True")
    parser.add_argument("--jit-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jit_only:
        set_threads(args.threads)
        print(json.dumps(jit_seconds()))
        return
    print(table(measure(args.threads, args.rounds, args.jit_processes), args.markdown))


# ----------------------------------------------------------------------------- pytest-benchmark

@functools.lru_cache(maxsize=None)
def _first_calls() -> dict:
    return jit_seconds()


@pytest.mark.parametrize("provider", ["cpu", "numba"])
@pytest.mark.parametrize("rerank_pass", ["encode", "jaccard"])
def test_numba_rerank_pass(benchmark, report, timed, rerank_pass, provider):
    threads = set_threads(2)
    first = _first_calls()   # before any other numba call of the session: the JIT compile
    checks = agreement(WORKLOAD, threads)
    run = pass_runners(WORKLOAD, threads)[(rerank_pass, provider)]
    run()
    peak = peak_extra_bytes(run)
    timed(benchmark, run)
    extra = dict(peak_extra_mb=None if peak is None else peak / 2**20,
                 lines_of_code=(cpp_lines() if provider == "cpu" else numba_lines())[rerank_pass],
                 **{f"agreement_{key}": value for key, value in checks[rerank_pass].items()})
    if provider == "numba":
        extra["first_call_s"] = first[rerank_pass]
    report(workload=WORKLOAD, provider=provider, params={"pass": rerank_pass}, **extra)


if __name__ == "__main__":
    main()
