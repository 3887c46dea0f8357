"""Benchmarks of the loss family: segmented_cross_entropy forward + backward.

Workload ``W-loss``: a batch of B = 384 tracklet features against C = 8,298 class weights
(MARS training tracklets) in six camera segments (1816, 1957, 1321, 750, 1880, 574),
D = 2048, scale 10 (temperature 0.1); each row's soft target is UTAL-style: its own
class and 4 neighbours of the same camera, weights summing to 1 (sparse CSR).

Providers
---------
* ``reference``  fastassoc, pure-torch reference backend (checkpointed row chunks)
* ``cpu``        fastassoc, compiled backend (GEMM tiles + fused online logsumexp forward,
  recomputed tiles + fused softmax gradient backward; the B x C logits never exist)
* ``torch``      plain PyTorch: ``scale * f @ w.T``, ``log_softmax`` per segment, gather the
  target entries, weighted sum; autograd backward (holds the full B x C logits and their
  gradient)

Timed: loss and both gradients (``torch.autograd.grad``). Agreement before timing: loss
and gradients within float32 tolerance of the reference. GEMM floor: the three bare
float32 GEMMs of one forward + backward ([B, D] x [D, C]; [B, C] x [C, D]; [C, B] x [B, D]).
The cpu backend recomputes the forward GEMM in backward instead of storing B x C logits,
so its floor ratio is at least about 4/3. Run ``pytest bench/bench_loss.py --benchmark-only``
(``FASTASSOC_BENCH_SCALE=small`` for a smoke run).
"""
from __future__ import annotations

import functools

import pytest
import torch

import fastassoc
from conftest import MARS_SEGMENTS, dim, rows

SCALE, NEIGHBOURS = 10.0, 4
PROVIDERS = ("reference", "cpu", "torch")


@functools.lru_cache(maxsize=None)
def loss_workload() -> dict:
    sizes = [rows(n) for n in MARS_SEGMENTS]
    num_rows, num_classes, d = rows(384), sum(sizes), dim(2048)
    generator = torch.Generator().manual_seed(11)
    features = torch.nn.functional.normalize(torch.randn(num_rows, d, generator=generator), dim=1)
    weight = torch.nn.functional.normalize(torch.randn(num_classes, d, generator=generator), dim=1)
    offsets = torch.tensor([0] + sizes).cumsum(0)
    # Row b: a class of a random camera and NEIGHBOURS other classes of that camera.
    camera = torch.randint(0, len(sizes), (num_rows,), generator=generator)
    size = torch.tensor(sizes)[camera]
    picks = (torch.rand(num_rows, NEIGHBOURS + 1, generator=generator) * size[:, None]).long()
    columns = offsets[camera][:, None] + picks
    values = torch.rand(num_rows, NEIGHBOURS + 1, generator=generator) + 0.1
    values[:, 0] += 1.0
    values /= values.sum(1, keepdim=True)
    dense = torch.zeros(num_rows, num_classes)
    dense.scatter_add_(1, columns, values)
    return dict(features=features, weight=weight, targets=dense.to_sparse_csr(), offsets=offsets)


def torch_loss(features, weight, targets, offsets, scale):
    logits = scale * (features @ weight.T)
    bounds = offsets.tolist()
    log_probs = torch.cat([torch.log_softmax(logits[:, lo:hi], dim=1) for lo, hi in zip(bounds[:-1], bounds[1:])],
                          dim=1)
    crow, cols, vals = targets.crow_indices(), targets.col_indices(), targets.values()
    row_of = torch.repeat_interleave(torch.arange(features.shape[0]), crow[1:] - crow[:-1])
    return -(vals * log_probs[row_of, cols]).sum() / features.shape[0]


def loss_runner(provider: str, w: dict):
    features = w["features"].clone().requires_grad_(True)
    weight = w["weight"].clone().requires_grad_(True)

    def run():
        if provider == "torch":
            loss = torch_loss(features, weight, w["targets"], w["offsets"], SCALE)
        else:
            loss = fastassoc.segmented_cross_entropy(features, weight, w["targets"], class_offsets=w["offsets"],
                                                     scale=SCALE, backend=provider)
        grads = torch.autograd.grad(loss, (features, weight))
        return (loss.detach(),) + grads
    return run


@functools.lru_cache(maxsize=None)
def _loss_expected():
    return loss_runner("reference", loss_workload())()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_segmented_cross_entropy_w_loss(benchmark, gemm_floor, report, timed, provider):
    w = loss_workload()
    run = loss_runner(provider, w)
    got, expected = run(), _loss_expected()
    for name, g, e in zip(("loss", "grad features", "grad weight"), got, expected):
        close = torch.isclose(g, e, rtol=1e-4, atol=1e-6)
        assert bool(close.all()), (f"W-loss {provider} vs reference: {name} differs first at "
                                   f"{tuple(torch.nonzero(~close)[0].tolist()) if g.dim() else ()}")
    num_rows, d = w["features"].shape
    num_classes = w["weight"].shape[0]
    floor = gemm_floor([(num_rows, num_classes, d), (num_rows, d, num_classes), (num_classes, d, num_rows)])
    timed(benchmark, run)
    report(workload="W-loss", provider=provider, floor=floor, params={"S": len(MARS_SEGMENTS)})
