"""Sharded cross_camera_graph, knn_soft_labels and ema_update_ equal the single-process ops.

One gloo group of 2 and one of 3 processes run every case; blocks are uneven or empty,
cameras are interleaved across blocks, and copies of rows sit on different ranks (ties).
"""
from __future__ import annotations

import pytest
import torch

import fastassoc
import fastassoc.distributed as fd
from fastassoc.ops._sparse import CSRMatrix

from ._harness import block, case_values, results_fixture, split_sizes


def _tracklets(seed: int, num_rows: int, num_cameras: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, 5, generator=generator, dtype=torch.float64).to(dtype)
    cameras = torch.randint(0, num_cameras, (num_rows,), generator=generator) * 3 + 1  # sparse labels
    x[num_rows - 1] = x[0]
    x[num_rows // 2] = x[2]
    x[num_rows - 3] = x[2]
    return x, cameras


GRAPH_SPECS = {
    "pairwise": (25, 3, "uneven", {"k": 2}),
    "pairwise_min": (22, 4, "even", {"k": 3, "min_similarity": 0.1, "self_loops": False}),
    "pooled": (21, 3, "uneven", {"k": 2, "mode": "pooled"}),
    "pooled64": (18, 2, "first", {"k": 4, "mode": "pooled", "dtype": torch.float64}),
    "one_camera": (9, 1, "uneven", {"k": 2}),
}
SOFT_SPECS = {
    "soft": (26, 3, "uneven", 3),
    "soft_small_camera": (13, 5, "even", 4),
    "soft64": (17, 2, "first", 2),
    "soft_k0": (9, 2, "uneven", 0),
}
EMA_SPECS = {
    "ema_mean": (15, "uneven", {"reduce": "mean"}),
    "ema_sum": (16, "even", {"reduce": "sum", "normalize": False}),
    "ema_sequential": (14, "uneven", {"reduce": "sequential"}),
}


def _graph_options(options):
    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    return dtype, options


def _graph_case(name):
    def case(world, rank):
        rows, cams, split, options = GRAPH_SPECS[name]
        dtype, options = _graph_options(options)
        x, cameras = _tracklets(rows, rows, cams, dtype)
        sizes = split_sizes(rows, world, split)
        return tuple(fd.cross_camera_graph(block(x, sizes, rank), block(cameras, sizes, rank), query_chunk=4,
                                           **options))
    return case


def _soft_case(name):
    def case(world, rank):
        rows, cams, split, k = SOFT_SPECS[name]
        x, cameras = _tracklets(rows + 100, rows, cams, torch.float64 if name.endswith("64") else torch.float32)
        sizes = split_sizes(rows, world, split)
        return tuple(fd.knn_soft_labels(block(x, sizes, rank), block(cameras, sizes, rank), k, query_chunk=3))
    return case


def _ema_inputs(name, world):
    rows, split, options = EMA_SPECS[name]
    generator = torch.Generator().manual_seed(rows)
    bank = torch.randn(rows, 4, generator=generator)
    batches = []
    for rank in range(world):
        index = torch.randint(0, rows, (7 + rank,), generator=generator)
        index[0] = rows - 1  # every rank updates the last row: duplicates across ranks
        batches.append((index, torch.randn(index.numel(), 4, generator=generator)))
    return bank, split_sizes(rows, world, split), batches, options


def _ema_case(name):
    def case(world, rank):
        bank, sizes, batches, options = _ema_inputs(name, world)
        local = block(bank, sizes, rank).clone()
        fd.ema_update_(local, batches[rank][0], batches[rank][1], 0.7, **options)
        return (local,)
    return case


def _refusals(world, rank):
    """Each rank's error message from the row-sharded ops when one rank's rows are one column wider,
    and when one rank alone passes a bad argument: every rank must raise, none wait in a collective."""
    x = torch.zeros(3, 4 + (rank == world - 1))
    cameras = torch.arange(3)
    calls = [lambda: fd.cross_camera_graph(x, cameras, 1), lambda: fd.agglomerative_merge(x, cameras, 1),
             lambda: fd.jaccard_distance(x, 2, 1),
             lambda: fd.cross_camera_graph(x[:, :4], cameras, -1 if rank == 0 else 1)]
    messages = []
    for call in calls:
        try:
            call()
            messages.append("no error")
        except ValueError as error:
            messages.append(str(error))
    return tuple(messages)


CASES = [(f"graph_{n}", _graph_case(n)) for n in GRAPH_SPECS] + [(f"soft_{n}", _soft_case(n)) for n in SOFT_SPECS] \
    + [(n, _ema_case(n)) for n in EMA_SPECS] + [("refusals", _refusals)]


results = results_fixture([name for name, _ in CASES])


def _stack_rows(parts, num_cols) -> torch.Tensor:
    """Dense [N, N] from the ranks' row blocks (the tests' graphs are small)."""
    blocks = [CSRMatrix(*part).to_sparse_csr().to_dense() for part in parts]
    for b in blocks:
        assert b.shape[1] == num_cols
    return torch.cat(blocks)


def _assert_csr_equal(name, parts, expected: CSRMatrix):
    crow = torch.cat([parts[0][0]] + [p[0][1:] + sum(q[0][-1] for q in parts[:i]) for i, p in enumerate(parts)
                                      if i > 0])
    cols = torch.cat([p[1] for p in parts])
    values = torch.cat([p[2] for p in parts])
    assert torch.equal(crow, expected.crow_indices), (name, crow, expected.crow_indices)
    assert torch.equal(cols, expected.col_indices), name
    if not torch.equal(values, expected.values):
        bad = int((values != expected.values).nonzero()[0])
        raise AssertionError(f"{name}: value {bad} differs: {values[bad]} vs {expected.values[bad]}")


@pytest.mark.parametrize("name", list(GRAPH_SPECS))
def test_cross_camera_graph_equals_single_process(results, name):
    _, per_rank = results
    rows, cams, _, options = GRAPH_SPECS[name]
    dtype, options = _graph_options(options)
    x, cameras = _tracklets(rows, rows, cams, dtype)
    expected = fastassoc.cross_camera_graph(x, cameras, as_tuple=True, **options)
    parts = case_values(per_rank, f"graph_{name}")
    _assert_csr_equal(name, parts, expected)
    if cams > 1:
        assert expected.col_indices.numel() > rows * (0 if options.get("self_loops") is False else 1)


@pytest.mark.parametrize("name", list(SOFT_SPECS))
def test_knn_soft_labels_equals_single_process(results, name):
    _, per_rank = results
    rows, cams, _, k = SOFT_SPECS[name]
    x, cameras = _tracklets(rows + 100, rows, cams, torch.float64 if name.endswith("64") else torch.float32)
    expected = fastassoc.knn_soft_labels(x, cameras, k, as_tuple=True)
    _assert_csr_equal(name, case_values(per_rank, f"soft_{name}"), expected)


@pytest.mark.parametrize("name", list(EMA_SPECS))
def test_ema_update_equals_single_process(results, name):
    world, per_rank = results
    bank, _, batches, options = _ema_inputs(name, world)
    expected = bank.clone()
    fastassoc.ema_update_(expected, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), 0.7,
                          **options)
    got = torch.cat([value[0] for value in case_values(per_rank, name)])
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert not torch.equal(got, bank)
    # Bytes sent, as the docstring states them: the checks, the counts, every entry owned elsewhere.
    sizes = split_sizes(bank.shape[0], world, EMA_SPECS[name][1])
    starts = torch.tensor(sizes).cumsum(0)
    for rank, rank_results in enumerate(per_rank):
        owners = torch.searchsorted(starts, batches[rank][0], right=True)
        remote = int((owners != rank).sum())
        assert rank_results[name][2] == 24 * (world - 1) + 8 * (world - 1) + remote * (4 * 4 + 8)


def test_a_wider_or_refused_rank_stops_every_rank(results):
    world, per_rank = results
    for rank, (graph, merge, jaccard, bad_k) in enumerate(case_values(per_rank, "refusals")):
        widths = [4] * (world - 1) + [5]
        assert graph == merge == f"x must have the same feature dimension on every rank; got {widths}"
        assert jaccard == f"features must have the same feature dimension on every rank; got {widths}"
        refused_elsewhere = "the arguments of rank(s) [0] were refused there"
        assert (bad_k.startswith("k must be") if rank == 0 else bad_k.startswith(refused_elsewhere)), bad_k
