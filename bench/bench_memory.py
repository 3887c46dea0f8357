"""Benchmarks of the memory family: ema_update_ (in-place EMA of memory-bank rows).

Workload ``W-ema``: a memory of 8,298 tracklet features (MARS training tracklets),
D = 2048, updated from a batch of 512 L2-normalised features whose rows are drawn with
replacement (duplicates are common, as with several clips of one tracklet per batch);
momentum 0.5, normalisation on; reductions ``mean`` (UTAL/TSSL-style) and
``sequential`` (one update per value in batch order).

Providers
---------
* ``reference``  fastassoc, pure-torch reference backend (vectorised by occurrence rank)
* ``cpu``        fastassoc, compiled C++/OpenMP backend (counting sort by row, one thread
  per distinct row)
* ``loop``       the naive update in the public trainers' style: a Python loop over the
  batch (``mean``: one masked mean per distinct row), torch row operations

Agreement before timing: updated banks within float32 tolerance of the reference. No
GEMM floor (there is no GEMM); ``extra_info`` records the bytes the update must move at
least (touched bank rows read and written, values read). Run
``pytest bench/bench_memory.py --benchmark-only`` (``FASTASSOC_BENCH_SCALE=small`` for a
smoke run).
"""
from __future__ import annotations

import functools

import pytest
import torch

import fastassoc
from conftest import dim, rows

MOMENTUM = 0.5
REDUCTIONS = ("mean", "sequential")
PROVIDERS = ("reference", "cpu", "loop")


@functools.lru_cache(maxsize=None)
def ema_workload() -> dict:
    num_rows, batch, d = rows(8298), rows(512), dim(2048)
    generator = torch.Generator().manual_seed(12)
    bank = torch.nn.functional.normalize(torch.randn(num_rows, d, generator=generator), dim=1)
    index = torch.randint(0, num_rows, (batch,), generator=generator)
    index[batch // 2:] = index[: batch - batch // 2]          # every other row appears twice
    values = torch.randn(batch, d, generator=generator)
    return dict(bank=bank, index=index, values=values)


@torch.no_grad()
def loop_update(bank, index, values, momentum, reduce):
    values = torch.nn.functional.normalize(values, dim=1)
    if reduce == "sequential":
        for b, i in enumerate(index.tolist()):
            row = momentum * bank[i] + (1 - momentum) * values[b]
            bank[i] = row / row.norm().clamp_min(1e-12)
        return bank
    for i in torch.unique(index).tolist():
        row = momentum * bank[i] + (1 - momentum) * values[index == i].mean(0)
        bank[i] = row / row.norm().clamp_min(1e-12)
    return bank


def ema_runner(provider: str, w: dict, reduce: str):
    bank = w["bank"].clone()   # the first call (the agreement check) starts from the workload's bank

    def run():
        if provider == "loop":
            return loop_update(bank, w["index"], w["values"], MOMENTUM, reduce)
        return fastassoc.ema_update_(bank, w["index"], w["values"], MOMENTUM, normalize=True, reduce=reduce,
                                     backend=provider)
    return run


@functools.lru_cache(maxsize=None)
def _ema_expected(reduce: str):
    return ema_runner("reference", ema_workload(), reduce)().clone()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_ema_update_w_ema(benchmark, report, timed, provider, reduce):
    w = ema_workload()
    run = ema_runner(provider, w, reduce)
    got, expected = run(), _ema_expected(reduce)
    close = torch.isclose(got, expected, rtol=1e-5, atol=1e-6)
    assert bool(close.all()), (f"W-ema {reduce} {provider} vs reference: first mismatch at "
                               f"{tuple(torch.nonzero(~close)[0].tolist())}")
    timed(benchmark, run)
    touched = int(torch.unique(w["index"]).numel())
    d = w["bank"].shape[1]
    report(workload="W-ema", provider=provider, params={"reduce": reduce},
           min_bytes=(2 * touched + w["index"].numel()) * d * 4)
