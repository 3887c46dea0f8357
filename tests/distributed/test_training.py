"""Multi-process training helpers: the rank split of camera-balanced batches, the replicated
memory update, row-sharded checkpoints that reload under another world size, rank-0 writes."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

import fastassoc
from fastassoc.data.sampling import CameraBalancedSampler
from fastassoc.distributed import training

from ._harness import case_values, run_cases

CAMERAS = torch.tensor([0, 1, 2, 0, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0, 1, 1])


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_split_sampler_partitions_camera_balanced_batches(world_size):
    per_camera = 6
    full = list(CameraBalancedSampler(CAMERAS, per_camera, num_batches=4, seed=3))
    shares = [list(training.RankSplitSampler(CameraBalancedSampler(CAMERAS, per_camera, num_batches=4, seed=3),
                                             rank, world_size)) for rank in range(world_size)]
    for step, batch in enumerate(full):
        together = Counter()
        for rank in range(world_size):
            share = shares[rank][step]
            together.update(share)
            assert Counter(CAMERAS[share].tolist()) == {0: per_camera // world_size, 1: per_camera // world_size,
                                                        2: per_camera // world_size}
        assert together == Counter(batch)


def test_rank_split_sampler_refuses_an_unbalanced_split():
    with pytest.raises(ValueError, match="multiple of the world size"):
        training.RankSplitSampler(CameraBalancedSampler(CAMERAS, 4), 0, 3)


def test_shard_range_covers_the_rows_once():
    for world_size in (1, 2, 3, 7):
        ranges = [training.shard_range(10, rank, world_size) for rank in range(world_size)]
        assert [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]] and ranges[-1][1] == 10


def _bank_and_batches(world_size):
    generator = torch.Generator().manual_seed(5)
    bank = torch.randn(12, 4, generator=generator)
    batches = [(torch.randint(0, 12, (5 + r,), generator=generator), torch.randn(5 + r, 4, generator=generator))
               for r in range(world_size)]
    return bank, batches


def _replicated(world_size, rank):
    bank, batches = _bank_and_batches(world_size)
    training.replicated_ema_update_(bank, *batches[rank], 0.6, reduce="sequential")
    return (bank,)


def _checkpoint(world_size, rank):
    directory = os.environ["FASTASSOC_TEST_DIR"]
    full = torch.arange(22 * 3, dtype=torch.float32).view(22, 3)
    start, stop = training.shard_range(22, rank, world_size)
    training.save_row_shards(full[start:stop], os.path.join(directory, f"w{world_size}"), "bank", num_rows=22)
    counter = os.path.join(directory, f"written-{world_size}.txt")
    training.on_rank_zero(lambda: open(counter, "a").write("x"))
    return (torch.tensor(training.is_rank_zero()),)


def _model_and_batch():
    generator = torch.Generator().manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model, torch.randn(12, 4, generator=generator, dtype=torch.float64).float()


def _gradients(world_size, rank):
    model, batch = _model_and_batch()
    start, stop = training.shard_range(batch.shape[0], rank, world_size)
    model(batch[start:stop]).square().mean().backward()
    training.average_gradients(model, None)
    return tuple(p.grad for p in model.parameters())


CASES = [("replicated", _replicated), ("checkpoint", _checkpoint), ("gradients", _gradients)]


@pytest.fixture(scope="module", params=[2, 3])
def results(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    os.environ["FASTASSOC_TEST_DIR"] = str(directory)
    return request.param, directory, run_cases(__name__, [name for name, _ in CASES], request.param)


def test_replicated_ema_update_equals_one_process(results):
    world_size, _, per_rank = results
    bank, batches = _bank_and_batches(world_size)
    fastassoc.ema_update_(bank, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), 0.6,
                          reduce="sequential")
    for value in case_values(per_rank, "replicated"):
        assert torch.equal(value[0], bank)


def test_row_shards_reload_under_any_world_size(results):
    world_size, directory, per_rank = results
    assert [bool(value[0]) for value in case_values(per_rank, "checkpoint")] == [True] + [False] * (world_size - 1)
    assert (directory / f"written-{world_size}.txt").read_text() == "x"
    full = torch.arange(22 * 3, dtype=torch.float32).view(22, 3)
    for new_world in (1, 2, 3, 5):
        for rank in range(new_world):
            start, stop = training.shard_range(22, rank, new_world)
            assert torch.equal(training.load_row_range(directory / f"w{world_size}", "bank", start, stop),
                               full[start:stop])
    with pytest.raises(ValueError, match="rows 3:40"):
        training.load_row_range(directory / f"w{world_size}", "bank", 3, 40)


def test_average_gradients_give_the_global_batch_gradient(results):
    world_size, _, per_rank = results
    model, batch = _model_and_batch()
    model(batch).square().mean().backward()
    expected = [p.grad for p in model.parameters()]
    for value in case_values(per_rank, "gradients"):
        for got, want in zip(value, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
