"""Run many sharded-op cases inside one spawned gloo process group.

Spawning a group costs about a second, so each test module spawns one group per world
size and runs its whole list of cases in it; every rank writes its results (or the
error it raised) to a file that the tests read. A case is ``(name, function)``; the
function takes ``(world_size, rank)`` and returns a tuple of tensors/numbers.

The collectives are wrapped by an independent byte counter (:func:`_count_collectives`):
``all_gather`` counts ``(W - 1)`` times its input, ``all_to_all_single`` the input splits
addressed to the other ranks, as the ops' docstrings define bytes sent.
"""
from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_SENT = [0]


def _count_collectives() -> None:
    original_gather, original_a2a = dist.all_gather, dist.all_to_all_single

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        _SENT[0] += (dist.get_world_size(group) - 1) * tensor.numel() * tensor.element_size()
        return original_gather(tensor_list, tensor, group=group, async_op=async_op)

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        splits = input_split_sizes or [input.numel() // world] * world
        row = input.element_size() * (input[0].numel() if input.ndim > 1 else 1)
        _SENT[0] += sum(s for r, s in enumerate(splits) if r != rank) * row
        return original_a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    original_reduce = dist.all_reduce

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        # Ring all-reduce: 2 (W - 1) / W of the tensor's bytes.
        world = dist.get_world_size(group)
        _SENT[0] += 2 * (world - 1) * tensor.numel() * tensor.element_size() // world
        return original_reduce(tensor, op=op, group=group, async_op=async_op)

    dist.all_gather, dist.all_to_all_single, dist.all_reduce = all_gather, all_to_all_single, all_reduce
    forbidden = ("broadcast", "all_gather_into_tensor", "gather", "scatter", "all_to_all",
                 "reduce_scatter", "send", "recv", "all_gather_object", "broadcast_object_list")
    for name in forbidden:
        # Every collective the ops use must be counted: an uncounted one fails the case.
        setattr(dist, name, _refuse(name))


def _refuse(name):
    def refused(*args, **kwargs):
        raise AssertionError(f"torch.distributed.{name} is not counted by the test harness")
    return refused


def _worker(rank: int, world: int, init_file: str, out_dir: str, module: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _count_collectives()
    cases = dict(__import__(module, fromlist=["CASES"]).CASES)
    results = {}
    for name in names:
        _SENT[0] = 0
        try:
            results[name] = ("ok", cases[name](world, rank), _SENT[0])
        except Exception as error:  # reported by the test that owns the case
            results[name] = ("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}", _SENT[0])
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_cases(module: str, names: list[str], world: int) -> list[dict]:
    """Spawn ``world`` gloo processes that run ``module.CASES[name]`` for each name; per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        # fork: the children inherit the imported torch and fastassoc (a spawned child spends
        # seconds importing them); they run single-threaded, so no OpenMP pool crosses the fork.
        mp.start_processes(_worker, args=(world, init_file, out_dir, module, names), nprocs=world, join=True,
                           start_method="fork")
        return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False) for rank in range(world)]


def results_fixture(names: list[str]):
    """A module-scoped fixture ``(world, per-rank results)``: the calling module's cases ``names`` on 2 and 3 ranks."""
    @pytest.fixture(scope="module", params=[2, 3])
    def results(request):
        return request.param, run_cases(request.module.__name__, names, request.param)
    return results


def case_results(per_rank: list[dict], name: str) -> list[tuple]:
    """Each rank's ``(value, bytes sent)`` for case ``name``; a rank's error fails the test with its message."""
    outputs = []
    for rank_results in per_rank:
        status, value, sent = rank_results[name]
        assert status == "ok", value
        outputs.append((value, sent))
    return outputs


def case_values(per_rank: list[dict], name: str) -> list:
    """Each rank's value for case ``name`` (see :func:`case_results`)."""
    return [value for value, _ in case_results(per_rank, name)]


def split_sizes(total: int, world: int, pattern: str) -> list[int]:
    """Block sizes of ``total`` rows over ``world`` ranks: "even", "uneven" (one rank empty) or "first"."""
    if pattern == "first":
        return [total] + [0] * (world - 1)
    if pattern == "uneven":
        if world == 2:
            return [total // 3, total - total // 3]
        rest = total - total // 4
        return [total // 4, 0] + [rest // (world - 2)] * (world - 3) + [rest - rest // (world - 2) * (world - 3)]
    base = total // world
    return [base] * (world - 1) + [total - base * (world - 1)]


def block(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous block of ``x`` under ``sizes``."""
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]
