"""Scaling of the sharded ops (fastassoc.distributed) with gloo processes on one machine.

Cases
-----
* strong scaling (the problem fixed, split over W ranks):
  - ``topk_anchors`` on W-rank (every tracklet queries its own camera segment, itself
    excluded, k = 10; segments cross the rank boundaries);
  - ``mutual_knn`` on W-mutual (k = 1).
  Efficiency = T_1 / (W T_W).
* weak scaling (each rank holds a bank block of the same size, so per-rank work is fixed):
  - ``topk_anchors``: a global batch of 2,048 queries (split over the ranks) against W x 8,192
    bank rows (D = 1024, k = 10), against T_1 of the same batch on 8,192 rows;
  - ``mutual_knn``: W x 4,096 rows per side against T_1 on 4,096 + 4,096 rows (per-rank work
    grows as W here: each rank's a-rows meet every b-row, so its efficiency reads T_1 W / T_W).
  Efficiency = T_1 / T_W (mutual: T_1 W / T_W).

T_1 is the single-process op (``backend="cpu"`` as ``auto`` picks it) with the same
threads as one rank; each rank runs ``threads`` torch/OpenMP threads
(``--threads``, default 1, so 2 ranks use the box's 2 cores). T_W is the slowest rank's
time between two barriers, median over ``--rounds``. Bytes are those each rank sends
(``fastassoc.distributed.BYTES_SENT``, the docstrings' formulas), the largest over ranks.
Every sharded result is first checked equal to the single-process op.

Run (on an idle machine; figures from a loaded box mean nothing):
``.venv/bin/python bench/bench_distributed.py`` (``--scale small`` for a smoke run,
``--json out.json`` to keep the numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _scale(scale: str):
    os.environ["FASTASSOC_BENCH_SCALE"] = scale
    import conftest  # the named workloads, shrunk by FASTASSOC_BENCH_SCALE
    return conftest


def _features(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    identities = torch.randint(0, max(2, rows // 8), (rows,), generator=generator)
    centres = torch.nn.functional.normalize(torch.randn(max(2, rows // 8), dim, generator=generator), dim=1)
    return (centres[identities] + torch.randn(rows, dim, generator=generator) * (0.3 / dim) ** 0.5).contiguous()


def cases(scale: str, world: int) -> dict:
    """Name -> (single-process call, sharded call for (rank, world), description); data built per process."""
    conftest = _scale(scale)
    import fastassoc
    import fastassoc.distributed as fd

    divisor = 1 if scale == "full" else 8
    dim = 1024 if scale == "full" else 256
    rank_workload = conftest._workload("W-rank")
    mutual_workload = conftest._workload("W-mutual")
    weak_rows, weak_queries = 8192 // divisor, 2048 // divisor
    weak_bank = _features(weak_rows * world, dim, 11)
    weak_batch = _features(weak_queries, dim, 12)
    weak_a = _features(4096 // divisor * world, dim, 13)
    weak_b = _features(4096 // divisor * world, dim, 14)

    def split(x: torch.Tensor, rank: int, parts: int) -> torch.Tensor:
        size = x.shape[0]
        return x[size * rank // parts: size * (rank + 1) // parts]

    def strong_topk(rank=None):
        w = rank_workload
        kwargs = dict(k=10, anchor_offsets=w["offsets"])
        if rank is None:
            return fastassoc.topk_anchors(w["x"], w["x"], query_segments=w["segments"], exclude=w["exclude"], **kwargs)
        return fd.topk_anchors(split(w["x"], rank, world), split(w["x"], rank, world),
                               query_segments=split(w["segments"], rank, world),
                               exclude=split(w["exclude"], rank, world), **kwargs)

    def strong_mutual(rank=None):
        w = mutual_workload
        if rank is None:
            return fastassoc.mutual_knn(w["a"], w["b"], 1)
        return fd.mutual_knn(split(w["a"], rank, world), split(w["b"], rank, world), 1)

    def weak_topk(rank=None):
        if rank is None:
            return fastassoc.topk_anchors(weak_batch, weak_bank[:weak_rows], 10)
        return fd.topk_anchors(split(weak_batch, rank, world), split(weak_bank, rank, world), 10)

    def weak_mutual(rank=None):
        per = weak_a.shape[0] // world
        if rank is None:
            return fastassoc.mutual_knn(weak_a[:per], weak_b[:per], 1)
        return fd.mutual_knn(split(weak_a, rank, world), split(weak_b, rank, world), 1)

    def weak_topk_check():
        return fastassoc.topk_anchors(weak_batch, weak_bank, 10)

    def weak_mutual_check():
        return fastassoc.mutual_knn(weak_a, weak_b, 1)

    return {
        "strong topk_anchors W-rank k=10": (strong_topk, strong_topk, "strong"),
        "strong mutual_knn W-mutual k=1": (strong_mutual, strong_mutual, "strong"),
        f"weak topk_anchors {weak_queries} q x {weak_rows}/rank k=10": (weak_topk, weak_topk_check, "weak"),
        f"weak mutual_knn {4096 // divisor}/rank per side k=1": (weak_mutual, weak_mutual_check, "weak-mutual"),
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str, scale: str, threads: int, rounds: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from fastassoc.distributed import BYTES_SENT
    results = {}
    for name, (call, _, _) in cases(scale, world).items():
        output = call(rank)  # warm-up, and the result checked against the single process
        times = []
        for _ in range(rounds):
            BYTES_SENT[0] = 0
            dist.barrier()
            start = time.perf_counter()
            call(rank)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
            times.append(float(elapsed))
        results[name] = {"output": output, "seconds": statistics.median(times), "bytes_sent": BYTES_SENT[0]}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _same(sharded_parts, single) -> bool:
    """The ranks' outputs concatenated equal the single-process output (every tensor)."""
    return all(torch.equal(torch.cat([part[i] for part in sharded_parts]), single[i]) for i in range(len(single)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=("full", "small"), default="full")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank and for T_1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(args.world, os.path.join(out_dir, "init"), out_dir, args.scale,
                                          args.threads, args.rounds), nprocs=args.world, start_method="spawn")
        per_rank = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(args.world)]
    torch.set_num_threads(args.threads)
    rows = []
    for name, (call, check, kind) in cases(args.scale, args.world).items():
        expected = check() if kind != "strong" else call()
        outputs = [results[name]["output"] for results in per_rank]
        if not _same(outputs, expected):
            raise AssertionError(f"{name}: the sharded result differs from the single-process op")
        single = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            call()
            single.append(time.perf_counter() - start)
        t1, tw = statistics.median(single), per_rank[0][name]["seconds"]
        efficiency = t1 / (args.world * tw) if kind == "strong" else (t1 / tw if kind == "weak" else
                                                                       t1 * args.world / tw)
        sent = max(results[name]["bytes_sent"] for results in per_rank)
        rows.append({"case": name, "world": args.world, "threads_per_rank": args.threads, "t1_s": t1, "tw_s": tw,
                     "efficiency": efficiency, "max_bytes_sent_per_rank": sent})
    print("| case | W | T_1 (s) | T_W (s) | efficiency | bytes sent / rank (max) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['world']} | {row['t1_s']:.3f} | {row['tw_s']:.3f} | {row['efficiency']:.2f} "
              f"| {row['max_bytes_sent_per_rank'] / 1e6:.2f} MB |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
