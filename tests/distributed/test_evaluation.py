"""Sharded evaluate_ranking (gallery split by rows) equals the single-process op: CMC, and mAP / mINP
to the bit, for the compiled CPU backend's and the reference's summation orders."""
from __future__ import annotations

import pytest
import torch

import fastassoc
import fastassoc.distributed as fd
from fastassoc import _backend

from ._harness import block, case_values, results_fixture, split_sizes


def _world(seed: int, num_gallery: int, num_query: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    gallery = torch.randn(num_gallery, 8, generator=generator, dtype=torch.float64).to(dtype)
    gallery_pids = torch.randint(0, 6, (num_gallery,), generator=generator)
    gallery_pids[::7] = -1  # distractors: junk
    gallery_cameras = torch.randint(0, 3, (num_gallery,), generator=generator)
    query = torch.randn(num_query, 8, generator=generator, dtype=torch.float64).to(dtype)
    query_pids = torch.randint(0, 7, (num_query,), generator=generator)  # identity 6: no match
    query_pids[1] = -1
    query_cameras = torch.randint(0, 3, (num_query,), generator=generator)
    # Ties across blocks: gallery copies far apart, queries equal to gallery rows, a copy of a match.
    gallery[num_gallery - 1] = gallery[0]
    gallery[num_gallery // 2] = gallery[3]
    query[0] = gallery[3]
    query[2] = gallery[num_gallery - 2]
    gallery_pids[num_gallery - 1] = gallery_pids[0]
    query_pids[0] = gallery_pids[3] if gallery_pids[3] >= 0 else 2
    return gallery, gallery_pids, gallery_cameras, query, query_pids, query_cameras


SPECS = {
    "euclidean": (41, 13, "uneven", "even", "euclidean", 5, torch.float32, 4),
    "cosine_first": (37, 11, "first", "uneven", "cosine", 10, torch.float32, 3),
    "sq_queries_on_one": (30, 9, "even", "first", "sqeuclidean", 3, torch.float32, 20),
    "float64": (29, 10, "uneven", "even", "euclidean", 4, torch.float64, 3),
}
BACKENDS = ["reference"] + (["cpu"] if _backend._built("cpu")[0] else [])


def _case(name, backend):
    def case(world, rank):
        num_gallery, num_query, g_split, q_split, metric, max_rank, dtype, chunk = SPECS[name]
        gallery, gallery_pids, gallery_cameras, query, query_pids, query_cameras = _world(num_gallery, num_gallery,
                                                                                           num_query, dtype)
        gs, qs = split_sizes(num_gallery, world, g_split), split_sizes(num_query, world, q_split)
        result = fd.evaluate_ranking(block(query, qs, rank), block(gallery, gs, rank), block(query_pids, qs, rank),
                                     block(gallery_pids, gs, rank), block(query_cameras, qs, rank),
                                     block(gallery_cameras, gs, rank), metric=metric, max_rank=max_rank,
                                     backend=backend, query_chunk=chunk)
        return result.cmc, result.mAP, result.mINP, result.num_valid_queries
    return case


CASES = [(f"{name}-{backend}", _case(name, backend)) for name in SPECS for backend in BACKENDS]


results = results_fixture([name for name, _ in CASES])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_evaluate_ranking_equals_single_process(results, name, backend):
    _, per_rank = results
    num_gallery, num_query, _, _, metric, max_rank, dtype, _ = SPECS[name]
    gallery, gallery_pids, gallery_cameras, query, query_pids, query_cameras = _world(num_gallery, num_gallery,
                                                                                       num_query, dtype)
    expected = fastassoc.evaluate_ranking(query, gallery, query_pids, gallery_pids, query_cameras, gallery_cameras,
                                          metric=metric, max_rank=max_rank, backend=backend)
    assert 0 < expected.num_valid_queries < num_query
    for cmc, mean_ap, mean_inp, num_valid in case_values(per_rank, f"{name}-{backend}"):
        assert torch.equal(cmc, expected.cmc), (cmc, expected.cmc)
        assert (mean_ap, mean_inp, num_valid) == (expected.mAP, expected.mINP, expected.num_valid_queries)
