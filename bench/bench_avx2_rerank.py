"""Self-joins on a CPU without bf16 or VNNI: float32 against int8 proposals (W-jaccard and others).

On such CPUs (AVX2-only EPYCs, Zen2 / Zen3) the self-join of ``jaccard_distance``,
``topk_anchors`` (every anchor querying its own segment), ``knn_soft_labels`` and
``agglomerative_merge`` (``fastassoc.kernels.cpu.knn.topk_self_join``) proposes its lists with the float32
GEMM: bf16 is emulated there (8x slower than float32) and oneDNN's int8 GEMM multiplies with
vpmaddubsw, exact only for columns in [-64, 64] (``_screen.int8_column_levels``) but about 2x
the float32 GEMM's speed. This script weighs an int8-screened self-join (64-level columns,
then the usual exact rescoring, certification and float32 fallback for rows the error bound
cannot certify) against the float32 proposals, on the same features, in one process:

* ``f32``   ``knn.self_join_screen`` says None (what it says on such CPUs): float32 GEMM
  proposals, refined exactly;
* ``int8``  it says "int8": int8 GEMM proposals (``_screen.QRows``), rescored exactly,
  uncertified rows searched again with the float32 GEMM.

Workloads (bench/conftest.py, bench_rerank.py): W-jaccard (k1 = 30, k2 = 6, every pair),
W-rank with k = 1 and 10, W-soft (k = 4), W-merge (tssl). All providers must return the same
result bit for bit (checked before timing). Recorded per provider: the median and minimum
of ``--rounds`` interleaved calls, and from the last call the time inside ``topk_self_join``,
the rows the bound did not certify (searched again with the float32 GEMM) and the time of
that fallback.

``--emulate-avx2`` makes an AVX-512 machine run what an AVX2-only one runs: it sets
``DNNL_MAX_CPU_ISA=AVX2`` before torch loads (oneDNN's int8 and bf16 kernels become the
AVX2 ones; the float32 GEMM is MKL's and keeps its speed) and hides the bf16 / VNNI / AMX
flags from ``_screen._cpu_flags``. On a real AVX2-only CPU run it without the option.

Run: ``nice -n 19 .venv/bin/python bench/bench_avx2_rerank.py --emulate-avx2 [--rounds 3]``
(``FASTASSOC_BENCH_SCALE=small`` for a quick pass).

Figures (2026-12-06, AMD EPYC family 25 model 17, 2 threads, the box shared with another
job, ``--emulate-avx2 --rounds 3``; seconds, minimum of 3 rounds):

==============  ======  ======  ==================  ===========
workload        f32     int8    int8 uncertified    int8 / f32
==============  ======  ======  ==================  ===========
W-jaccard       3.15    6.27    99.5 %              1.99
W-rank k = 1    0.128   0.117   6.9 %               0.91
W-rank k = 10   0.149   0.339   99.6 %              2.28
W-soft          0.139   0.237   65.3 %              1.71
W-merge (tssl)  2.44    2.80    35.7 %              1.15
==============  ======  ======  ==================  ===========

At W-jaccard the int8 self-join itself (proposals, rescoring) took 1.55 s against the
float32 one's 2.52 s, and the fallback of the uncertified rows 4.20 s on top.
Only W-rank k = 1 keeps its lists inside the identities, away from the bulk of the
distances where the int8 bound is wider than the bulk; a 64-row pilot choosing int8 only
where it certified >= 85 % gave 0.99x there and 1.13-1.15x where it declined. So the library
does not screen self-joins with int8 (``knn.self_join_screen``).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

_HIDDEN_FLAGS = {"avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_fp16", "amx_tile"}


WORKLOADS = ("W-jaccard", "W-rank-k1", "W-rank-k10", "W-soft", "W-merge-tssl")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="DNNL_MAX_CPU_ISA=AVX2 and no bf16/VNNI/AMX flags (see the module docstring)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per provider, interleaved")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--json", type=pathlib.Path, help="also write the figures here")
    return parser.parse_args(argv)


def workload_call(name: str):
    """A function running the op of workload ``name`` on the cpu backend (bench workloads)."""
    import fastassoc
    from conftest import _workload

    if name == "W-jaccard":
        from bench_rerank import K1, K2, jaccard_workload
        x = jaccard_workload("W-jaccard")
        return x.shape, lambda: fastassoc.jaccard_distance(x, K1, K2, backend="cpu")
    if name.startswith("W-rank"):
        w, k = _workload("W-rank"), int(name.rsplit("k", 1)[1])
        return w["x"].shape, lambda: fastassoc.topk_anchors(w["x"], w["x"], k, metric="sqeuclidean",
                                                            anchor_offsets=w["offsets"],
                                                            query_segments=w["segments"], exclude=w["exclude"],
                                                            backend="cpu")
    if name == "W-soft":
        from bench_graph import SOFT_K
        w = _workload("W-soft")
        return w["x"].shape, lambda: fastassoc.knn_soft_labels(w["x"], w["cameras"], SOFT_K, backend="cpu")
    from bench_cluster import NEIGHBOURS, SIZE_PENALTY
    w = _workload("W-merge")
    return w["x"].shape, lambda: fastassoc.agglomerative_merge(w["x"], w["labels"], w["num_merges"], linkage="tssl",
                                                               neighbours=NEIGHBOURS, size_penalty=SIZE_PENALTY,
                                                               backend="cpu")


def same(a, b) -> bool:
    """Bit-identical results: tensors, sparse CSR tensors or tuples of them."""
    import torch
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if a.layout == torch.sparse_csr:
        return same((a.crow_indices(), a.col_indices(), a.values()), (b.crow_indices(), b.col_indices(), b.values()))
    return torch.equal(a, b)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.emulate_avx2:
        # Read by oneDNN at its first use, so set before torch loads.
        os.environ.pop("ONEDNN_MAX_CPU_ISA", None)
        os.environ["DNNL_MAX_CPU_ISA"] = "AVX2"
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import torch

    from fastassoc.kernels.cpu import _screen, knn

    if args.emulate_avx2:
        flags = _screen._cpu_flags() - _HIDDEN_FLAGS
        _screen._cpu_flags = lambda: flags
    counters = {"fallback_rows": 0, "fallback_s": 0.0, "self_join_s": 0.0}
    original_fall_back, original_self_join = knn._fall_back, knn.topk_self_join

    def counting_fall_back(*a, **k):
        start = time.perf_counter()
        counters["fallback_rows"] += int(a[5].numel())
        result = original_fall_back(*a, **k)
        counters["fallback_s"] += time.perf_counter() - start
        return result

    def timed_self_join(*a, **k):
        start = time.perf_counter()
        result = original_self_join(*a, **k)
        counters["self_join_s"] += time.perf_counter() - start
        return result

    # Patched where the ops look them up: cluster and rerank call knn.topk_self_join, graph
    # imported the name.
    from fastassoc.kernels.cpu import graph
    knn._fall_back = counting_fall_back
    knn.topk_self_join = graph.topk_self_join = timed_self_join
    kinds = {"f32": None, "int8": "int8"}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "emulate_avx2": args.emulate_avx2, "DNNL_MAX_CPU_ISA": os.environ.get("DNNL_MAX_CPU_ISA"),
        "int8_column_levels": _screen.int8_column_levels(),
        "fast_gemm": {kind: _screen.fast_gemm(kind) for kind in ("int8", "bf16")},
    }
    for name in args.workloads:
        shape, run = workload_call(name)

        def call(provider: str):
            knn.self_join_screen = lambda rows, n, width: kinds[provider]
            for key in counters:
                counters[key] = 0 if key == "fallback_rows" else 0.0
            start = time.perf_counter()
            result = run()
            return result, time.perf_counter() - start, dict(counters)

        results = {provider: call(provider)[0] for provider in kinds}      # also the warm-up
        for provider, result in results.items():
            assert same(result, results["f32"]), f"{name} {provider}: the result differs from the float32 path's"
        del results
        times = {provider: [] for provider in kinds}
        parts = {}
        for _ in range(args.rounds):
            for provider in kinds:
                _, seconds, counts = call(provider)
                times[provider].append(seconds)
                parts[provider] = counts
        entry = {"rows": shape[0], "dim": shape[1], "bit_identical": True}
        for provider in kinds:
            entry[provider] = dict(median_s=statistics.median(times[provider]), min_s=min(times[provider]),
                                   self_join_s=parts[provider]["self_join_s"],
                                   fallback_rows=parts[provider]["fallback_rows"],
                                   uncertified_fraction=parts[provider]["fallback_rows"] / shape[0],
                                   fallback_s=parts[provider]["fallback_s"])
        entry["int8_over_f32_min"] = entry["int8"]["min_s"] / entry["f32"]["min_s"]
        report[name] = entry
        print(json.dumps({name: entry}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
