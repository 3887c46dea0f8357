"""Sharded topk_anchors and mutual_knn equal the single-process ops on the concatenated bank.

One gloo group of 2 and one of 3 processes run every case (see ``_harness``); blocks are
uneven or empty, segments cross block boundaries, and copies of rows sit on different
ranks so that ties must go to the smaller global index.
"""
from __future__ import annotations

import pytest
import torch

import fastassoc
import fastassoc.distributed as fd

from ._harness import block, case_results, results_fixture, split_sizes

DIM = 6


def _bank(seed: int, num_rows: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, DIM, generator=generator, dtype=torch.float64).to(dtype)
    # Copies on both sides of every block boundary: exact ties across ranks.
    x[num_rows - 1] = x[0]
    x[num_rows // 2] = x[1]
    x[num_rows - 2] = x[1]
    return x


def _queries(seed: int, bank: torch.Tensor, num: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(num, bank.shape[1], generator=generator, dtype=torch.float64).to(bank.dtype)
    q[: min(num, 3)] = bank[:3][: min(num, 3)]  # queries that equal bank rows (distance 0, ties)
    return q


# Each spec: bank rows, queries, bank split, query split, options, k, dtype, query_chunk.
TOPK_SPECS = {
    "plain": (23, 9, "uneven", "even", {}, 5, torch.float32, 4),
    "exclude": (19, 19, "even", "uneven", {"exclude": "self"}, 4, torch.float32, 3),
    "offsets": (21, 12, "uneven", "first", {"anchor_offsets": [0, 5, 5, 13, 21]}, 6, torch.float32, 5),
    "labels_cosine": (20, 10, "even", "even", {"anchor_segments": True, "metric": "cosine"}, 3, torch.float32, 2),
    "euclidean64": (17, 8, "uneven", "uneven", {"metric": "euclidean", "exclude": "some"}, 7, torch.float64, 3),
    "k_past_bank": (5, 4, "uneven", "even", {}, 9, torch.float32, 4),
    "empty_queries": (11, 0, "even", "even", {}, 2, torch.float32, 4),
}


def _topk_inputs(spec):
    rows, num_queries, _, _, options, k, dtype, _ = spec
    bank = _bank(len(options) * 7 + rows, rows, dtype)
    queries = _queries(rows, bank, num_queries)
    kwargs = {"metric": options.get("metric", "sqeuclidean")}
    if "anchor_offsets" in options:
        offsets = torch.tensor(options["anchor_offsets"])
        kwargs["anchor_offsets"] = offsets
        kwargs["query_segments"] = torch.arange(num_queries) % (offsets.numel() - 1)
    if options.get("anchor_segments"):
        kwargs["anchor_segments"] = (torch.arange(rows) * 7) % 3 + 10
        kwargs["query_segments"] = torch.arange(num_queries) % 4 + 10  # label 13 exists nowhere
    if options.get("exclude") == "self":
        kwargs["exclude"] = torch.arange(num_queries)
    elif options.get("exclude") == "some":
        kwargs["exclude"] = torch.where(torch.arange(num_queries) % 2 == 0, torch.arange(num_queries) * 2, -1)
    return bank, queries, kwargs, k


def _sharded_topk(name):
    def case(world, rank):
        spec = TOPK_SPECS[name]
        bank, queries, kwargs, k = _topk_inputs(spec)
        bank_sizes = split_sizes(bank.shape[0], world, spec[2])
        query_sizes = split_sizes(queries.shape[0], world, spec[3])
        local = dict(kwargs)
        for key in ("query_segments", "exclude"):
            if key in local:
                local[key] = block(local[key], query_sizes, rank)
        if "anchor_segments" in local:
            local["anchor_segments"] = block(local["anchor_segments"], bank_sizes, rank)
        return fd.topk_anchors(block(queries, query_sizes, rank), block(bank, bank_sizes, rank), k,
                               query_chunk=spec[7], **local)
    return case


def _bank_pair(seed, na, nb):
    a = _bank(seed, na)
    b = _bank(seed + 1, nb)
    b[0] = a[na - 1]  # a copy across the two sets
    b[nb - 1] = a[na // 2]
    return a, b


MUTUAL_SPECS = {
    "mutual": (14, 17, "uneven", "even", 3, None),
    "mutual_max": (13, 11, "even", "first", 4, 6.0),
}


def _sharded_mutual(name):
    def case(world, rank):
        na, nb, split_a, split_b, k, max_distance = MUTUAL_SPECS[name]
        a, b = _bank_pair(na, na, nb)
        sizes_a, sizes_b = split_sizes(na, world, split_a), split_sizes(nb, world, split_b)
        return fd.mutual_knn(block(a, sizes_a, rank), block(b, sizes_b, rank), k, max_distance=max_distance,
                             query_chunk=3)
    return case


def _bad_exclude(world, rank):
    # Only the last rank passes an out-of-range global exclude: every rank must raise, none hang.
    bank = _bank(3, 8)
    exclude = torch.tensor([8 if rank == world - 1 else -1])
    try:
        fd.topk_anchors(bank[:1], block(bank, split_sizes(8, world, "even"), rank), 2, exclude=exclude)
    except ValueError as error:
        return (str(error),)
    return ("no error",)


def _bad_dimension(world, rank):
    # One rank's features are one column wider: every rank must refuse, naming the dimension.
    bank = torch.zeros(3, DIM + (rank == 1))
    try:
        fd.mutual_knn(bank, bank, 1)
    except ValueError as error:
        return (str(error),)
    return ("no error",)


CASES = [(f"topk_{name}", _sharded_topk(name)) for name in TOPK_SPECS] + \
        [(name, _sharded_mutual(name)) for name in MUTUAL_SPECS] + [("bad_exclude", _bad_exclude),
                                                                    ("bad_dimension", _bad_dimension)]


results = results_fixture([name for name, _ in CASES])


def _assert_equal(name, got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape, (name, got.shape, expected.shape)
    if not torch.equal(got, expected):
        bad = (got != expected).nonzero()[0].tolist()
        raise AssertionError(f"{name}: first mismatch at {bad}: got {got[tuple(bad)]}, expected {expected[tuple(bad)]}")


@pytest.mark.parametrize("name", list(TOPK_SPECS))
def test_topk_anchors_equals_single_process(results, name):
    world, per_rank = results
    outputs = case_results(per_rank, f"topk_{name}")
    spec = TOPK_SPECS[name]
    bank, queries, kwargs, k = _topk_inputs(spec)
    expected = fastassoc.topk_anchors(queries, bank, k, **kwargs)
    for part, (label, want) in enumerate(zip(("distances", "indices"), expected)):
        _assert_equal(f"{name} {label}", torch.cat([value[part] for value, _ in outputs]), want)
    # Bytes sent, as the docstring states them: the size exchange and the agreement, the gathered
    # query chunks, the candidates returned to the other ranks.
    query_sizes = split_sizes(queries.shape[0], world, spec[3])
    most = max(query_sizes)
    chunk = min(spec[7], most) if most else 0
    steps = -(-most // chunk) if chunk else 0
    element = bank.element_size()
    value_bytes = 8 if spec[6] == torch.float64 else 4
    for rank, (_, sent) in enumerate(outputs):
        returned = sum(query_sizes[r] for r in range(world) if r != rank) * k * (value_bytes + 8)
        formula = 8 * (world - 1) * (4 + 1) + steps * (world - 1) * chunk * (DIM * element + 16) + returned
        assert sent == formula, (rank, sent, formula)


def _numpy_topk_oracle(queries, bank, k):
    """Brute force in float64 with ties by index (independent of fastassoc), for one sanity case."""
    import numpy as np
    q, b = queries.double().numpy(), bank.double().numpy()
    d = ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.stack([np.lexsort((np.arange(b.shape[0]), row))[:k] for row in d])


def test_topk_plain_matches_brute_force_order(results):
    # The single-process op is the oracle above; here the indices are also checked against NumPy
    # (rows whose k-th distance is not within float32 rounding of the next one).
    _, per_rank = results
    bank, queries, kwargs, k = _topk_inputs(TOPK_SPECS["plain"])
    got = torch.cat([value[1] for value, _ in case_results(per_rank, "topk_plain")]).numpy()
    want = _numpy_topk_oracle(queries, bank, k)
    assert (got == want).all(), (got, want)


@pytest.mark.parametrize("name", list(MUTUAL_SPECS))
def test_mutual_knn_equals_single_process(results, name):
    _, per_rank = results
    outputs = case_results(per_rank, name)
    na, nb, _, _, k, max_distance = MUTUAL_SPECS[name]
    a, b = _bank_pair(na, na, nb)
    expected = fastassoc.mutual_knn(a, b, k, max_distance=max_distance)
    assert expected[0].numel() > 0
    for part, label in enumerate(("ia", "ib", "distances")):
        _assert_equal(f"{name} {label}", torch.cat([value[part] for value, _ in outputs]), expected[part])
    # Bytes sent, as the docstring states them: the check, both searches (query chunks of 3 rows),
    # the counts and the reverse pairs whose a-row lives on another rank.
    world = len(per_rank)
    sizes_a, sizes_b = split_sizes(na, world, MUTUAL_SPECS[name][2]), split_sizes(nb, world, MUTUAL_SPECS[name][3])
    owner_a = torch.repeat_interleave(torch.arange(world), torch.tensor(sizes_a))
    owner_b = torch.repeat_interleave(torch.arange(world), torch.tensor(sizes_b))
    back = fastassoc.topk_anchors(b, a, k)[1]

    def search_bytes(sizes, rank):
        chunk = min(3, max(sizes))
        steps = -(-max(sizes) // chunk)
        returned = sum(sizes[r] for r in range(world) if r != rank) * k * 12
        return steps * (world - 1) * chunk * (DIM * 4 + 16) + returned

    for rank, (_, sent) in enumerate(outputs):
        mine = back[owner_b == rank]
        remote = int(((mine >= 0) & (owner_a[mine.clamp_min(0)] != rank)).sum())
        formula = 32 * (world - 1) + search_bytes(sizes_a, rank) + search_bytes(sizes_b, rank) + \
            8 * (world - 1) + 16 * remote
        assert sent == formula, (rank, sent, formula)


def test_bad_argument_on_one_rank_raises_everywhere(results):
    world, per_rank = results
    messages = [value[0] for value, _ in case_results(per_rank, "bad_exclude")]
    assert "exclude must be in [-1, 8)" in messages[world - 1]
    assert all("refused" in message for message in messages[:world - 1]), messages


def test_different_feature_dimensions_raise_on_every_rank(results):
    _, per_rank = results
    messages = [value[0] for value, _ in case_results(per_rank, "bad_dimension")]
    assert all("feature dimension must be the same on every rank" in message for message in messages), messages


def test_without_a_process_group_the_error_says_what_to_do():
    bank = torch.zeros(2, DIM)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.topk_anchors(bank, bank, 1)
