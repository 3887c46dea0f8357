"""Sharded jaccard_distance equals the single-process op (reference backend) row for row."""
from __future__ import annotations

import pytest
import torch

import fastassoc
import fastassoc.distributed as fd

from ._harness import block, case_values, results_fixture, split_sizes


def _features(seed: int, num_rows: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    x = centres[torch.randint(0, 4, (num_rows,), generator=generator)] + \
        0.4 * torch.randn(num_rows, 6, generator=generator, dtype=torch.float64)
    x[num_rows - 1] = x[0]  # copies on different ranks: ties by global index
    x[num_rows // 2] = x[1]
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


SPECS = {
    "spcl": (31, "uneven", dict(k1=6, k2=3)),
    "spcl_no_expansion_max": (24, "even", dict(k1=5, k2=1, max_distance=0.8)),
    "zhong_euclidean": (27, "uneven", dict(k1=5, k2=2, weighting="zhong", metric="euclidean")),
    "zhong_cosine_first": (19, "first", dict(k1=4, k2=2, weighting="zhong", metric="cosine")),
    "rows_below_k1": (7, "uneven", dict(k1=20, k2=6)),
}


def _case(name):
    def case(world, rank):
        rows, split, options = SPECS[name]
        x = _features(rows, rows)
        return tuple(fd.jaccard_distance(block(x, split_sizes(rows, world, split), rank), query_chunk=5, **options))
    return case


CASES = [(name, _case(name)) for name in SPECS]


results = results_fixture(list(SPECS))


@pytest.mark.parametrize("name", list(SPECS))
def test_jaccard_distance_equals_single_process(results, name):
    _, per_rank = results
    rows, _, options = SPECS[name]
    expected = fastassoc.jaccard_distance(_features(rows, rows), as_tuple=True, backend="reference", **options)
    parts = case_values(per_rank, name)
    base = 0
    crow = [parts[0][0][:1]]
    for part in parts:
        crow.append(part[0][1:] + base)
        base += int(part[0][-1])
    assert torch.equal(torch.cat(crow), expected.crow_indices)
    assert torch.equal(torch.cat([p[1] for p in parts]), expected.col_indices)
    values = torch.cat([p[2] for p in parts])
    assert torch.equal(values, expected.values), (values - expected.values).abs().max()
    assert int((expected.values > 0).sum()) > rows  # pairs besides the diagonal
