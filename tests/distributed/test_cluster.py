"""Sharded agglomerative_merge (tssl, centroid) equals the single-process op on the concatenated samples."""
from __future__ import annotations

import pytest
import torch

import fastassoc
import fastassoc.distributed as fd

from ._harness import block, case_values, results_fixture, split_sizes


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
}


def _case(name):
    def case(world, rank):
        rows, num_labels, split, options = SPECS[name]
        x, labels = _samples(rows, rows, num_labels)
        sizes = split_sizes(rows, world, split)
        return (fd.agglomerative_merge(block(x, sizes, rank), block(labels, sizes, rank), query_chunk=4, **options),)
    return case


CASES = [(name, _case(name)) for name in SPECS]


results = results_fixture(list(SPECS))


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", list(SPECS))
def test_agglomerative_merge_equals_single_process(results, name, backend):
    _, per_rank = results
    rows, num_labels, _, options = SPECS[name]
    x, labels = _samples(rows, rows, num_labels)
    options = dict(options)
    num_merges = options.pop("num_merges")
    expected = fastassoc.agglomerative_merge(x, labels, num_merges, backend=backend, **options)
    got = torch.cat([value[0] for value in case_values(per_rank, name)])
    assert torch.equal(got, expected), (got, expected)
    assert int(expected.max()) + 1 == torch.unique(labels).numel() - num_merges
