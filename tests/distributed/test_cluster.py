"""Sharded agglomerative_merge (every linkage) equals the single-process op on the concatenated samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastassoc
import fastassoc.distributed as fd
import fastassoc.distributed.cluster as fd_cluster

from ._harness import block, case_results, case_values, results_fixture, split_sizes


def _samples(seed: int, num_rows: int, num_labels: int):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(2, num_rows // 4), 5, generator=generator)
    x = centres[torch.randint(0, centres.shape[0], (num_rows,), generator=generator)] + \
        0.3 * torch.randn(num_rows, 5, generator=generator)
    # Copies on different ranks: exact ties between cluster pairs, broken by (i, j).
    x[num_rows - 1] = x[0]
    x[num_rows - 2] = x[1]
    x[num_rows // 2] = x[1]
    labels = torch.arange(num_rows) * 3 + 5 if num_labels == 0 else \
        torch.randint(0, num_labels, (num_rows,), generator=generator) * 7
    return x, labels


SPECS = {
    "tssl_singletons": (29, 0, "uneven", dict(num_merges=9, linkage="tssl")),
    "tssl_spanning": (34, 12, "even", dict(num_merges=5, linkage="tssl", neighbours=2)),
    "centroid_singletons": (26, 0, "first", dict(num_merges=20, linkage="centroid")),
    "centroid_spanning": (31, 9, "uneven", dict(num_merges=4, linkage="centroid")),
    "no_merge": (11, 5, "uneven", dict(num_merges=0, linkage="tssl")),
    "typeset_singletons": (29, 0, "uneven", dict(num_merges=11, linkage="tssl_typeset")),
    "typeset_spanning": (34, 12, "first", dict(num_merges=6, linkage="tssl_typeset", neighbours=3)),
    "buc_singletons": (27, 0, "first", dict(num_merges=15, linkage="buc")),
    "buc_spanning": (33, 10, "uneven", dict(num_merges=6, linkage="buc", size_penalty=0.05)),
    "buc_l2_singletons": (25, 0, "uneven", dict(num_merges=20, linkage="buc_l2", size_penalty=0.01)),
    "buc_l2_spanning": (30, 8, "even", dict(num_merges=5, linkage="buc_l2", size_penalty=0.3)),
    # A first batch of 2 pairs per rank: pass 1 doubles it until it holds a forest, and the
    # forest's bound U is then loose, so pass 2 gathers (and the walk skips) pairs above the walk.
    "buc_small_batch": (26, 9, "uneven", dict(num_merges=7, linkage="buc", size_penalty=0.02, first_pairs=2)),
    "buc_l2_small_batch": (23, 0, "even", dict(num_merges=14, linkage="buc_l2", first_pairs=2)),
    "typeset_small_batch": (24, 0, "first", dict(num_merges=12, linkage="tssl_typeset", first_pairs=2)),
}


def _case(name):
    def case(world, rank):
        rows, num_labels, split, options = SPECS[name]
        x, labels = _samples(rows, rows, num_labels)
        sizes = split_sizes(rows, world, split)
        options = dict(options)
        first_pairs = options.pop("first_pairs", None)
        if first_pairs is not None:
            kept = fd_cluster._FIRST_PAIRS, fd_cluster._PAIRS_PER_MERGE
            fd_cluster._FIRST_PAIRS, fd_cluster._PAIRS_PER_MERGE = first_pairs, 0
        try:
            return (fd.agglomerative_merge(block(x, sizes, rank), block(labels, sizes, rank), query_chunk=4,
                                           **options),)
        finally:
            if first_pairs is not None:
                fd_cluster._FIRST_PAIRS, fd_cluster._PAIRS_PER_MERGE = kept
    return case


def _refusal(world, rank):
    """One rank alone passes a negative size_penalty: every rank raises, none waits in a collective."""
    x, labels = _samples(12, 12, 0)
    sizes = split_sizes(12, world, "even")
    try:
        fd.agglomerative_merge(block(x, sizes, rank), block(labels, sizes, rank), 2, linkage="buc",
                               size_penalty=-1.0 if rank == world - 1 else 0.5)
    except ValueError as error:
        return str(error)
    return "no error"


CASES = [(name, _case(name)) for name in SPECS] + [("refusal", _refusal)]


results = results_fixture(list(SPECS) + ["refusal"])


def test_one_rank_refusing_size_penalty_stops_every_rank(results):
    world, per_rank = results
    messages = case_values(per_rank, "refusal")
    assert "size_penalty" in messages[-1], messages
    assert all(f"rank(s) [{world - 1}]" in message for message in messages[:-1]), messages


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", list(SPECS))
def test_agglomerative_merge_equals_single_process(results, name, backend):
    _, per_rank = results
    rows, num_labels, _, options = SPECS[name]
    x, labels = _samples(rows, rows, num_labels)
    options = dict(options)
    num_merges = options.pop("num_merges")
    options.pop("first_pairs", None)
    expected = fastassoc.agglomerative_merge(x, labels, num_merges, backend=backend, **options)
    got = torch.cat([value[0] for value in case_values(per_rank, name)])
    assert torch.equal(got, expected), (got, expected)
    assert int(expected.max()) + 1 == torch.unique(labels).numel() - num_merges


@pytest.mark.parametrize("name", ["buc_singletons", "buc_spanning", "buc_l2_singletons", "buc_l2_spanning"])
def test_buc_bytes_sent_as_documented(results, name):
    # The docstring's formula: checks and labels, cluster sizes, two passes of gathered sample
    # chunks (one pass-1 try: the first batch of 1024 pairs holds every pair of these banks),
    # two walks, first appearances. A walk's P_r is data dependent: pass 1 sends every cluster
    # pair the rank scores (counted here), pass 2 between ceil(num_merges / W) and as many.
    world, per_rank = results
    rows, num_labels, split, options = SPECS[name]
    x, labels = _samples(rows, rows, num_labels)
    sizes = split_sizes(rows, world, split)
    outputs = case_results(per_rank, name)
    cluster = np.unique(labels.numpy(), return_inverse=True)[1]
    scored = []
    for rank in range(world):
        start = sum(sizes[:rank])
        pairs = {(min(cluster[s], cluster[t]), max(cluster[s], cluster[t]))
                 for t in range(start, start + sizes[rank]) for s in range(t) if cluster[s] != cluster[t]}
        scored.append(len(pairs))
    distinct = max(np.unique(block(labels, sizes, rank).numpy()).size for rank in range(world))
    merged = max(np.unique(value[0].numpy()).size for value, _ in outputs)
    chunk = min(4, max(sizes))
    chunks = -(-max(sizes) // chunk)
    dim = x.shape[1]
    fixed = (world - 1) * (32 + 8 * distinct + 8 * distinct + 2 * chunks * chunk * (dim * 4 + 16) + 2 * 8
                           + 24 * max(scored) + 8 + 16 * merged)
    least = fixed + 24 * (world - 1) * -(-options["num_merges"] // world)
    for rank, (_, sent) in enumerate(outputs):
        assert least <= sent <= fixed + 24 * (world - 1) * max(scored), (rank, sent, least, fixed)
