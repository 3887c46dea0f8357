"""GPU benchmark W-ce: segmented soft cross-entropy, forward + backward.

Workload (issue 4): B = 384 rows, C = 8,298 classes in 6 camera segments of 1,383,
D = 2,048, UTAL-style soft targets (each row: itself and 4 neighbours, all in its own
camera segment), float32 and bfloat16. ``FASTASSOC_BENCH_SCALE=small`` divides B and C by 8
and D by 4, as for every benchmark (bench/conftest.py); the scale is in each name.

Providers
---------
* ``triton``  fastassoc.segmented_cross_entropy(backend="triton")
* ``torch``   the usual code: ``F @ W.T * scale``, per-segment ``log_softmax``,
  gather at the target entries (torch autograd for the backward)
* ``gemm``    one bare ``F @ W.T`` plus its two backward GEMMs: the compute floor

Target: triton forward + backward >= 1.5x faster than torch, with at most half its
peak memory. Peak memory is reported two ways in ``extra_info``: ``peak_bytes``
(``torch.cuda.max_memory_allocated`` during one forward + backward, minus what was
allocated before) and ``workspace_bytes`` (the same minus the two gradients, which
every provider must return): the loss op cannot shrink W and dW, only its workspace.

Providers are checked to agree (loss and both gradients) before timing; every timed
call synchronises the GPU. Skips without a GPU. Run:
``pytest bench/bench_gpu_loss.py --benchmark-only`` (or ``python bench/bench_gpu_loss.py``
for a plain table).
"""
from __future__ import annotations

import pytest
import torch
from conftest import SCALE as BENCH_SCALE
from conftest import dim, rows

import fastassoc

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="W-ce needs a CUDA GPU")]

NUM_ROWS, NUM_CLASSES, DIM, NUM_SEGMENTS, NEIGHBOURS = rows(384), rows(8298), dim(2048), 6, 4
LOGIT_SCALE = 1.0 / 0.1


def make_workload(dtype: torch.dtype, device: str = "cuda", seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(NUM_ROWS, DIM, generator=generator), dim=1)
    weight = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, DIM, generator=generator), dim=1)
    sizes = [NUM_CLASSES // NUM_SEGMENTS] * NUM_SEGMENTS
    sizes[-1] += NUM_CLASSES - sum(sizes)
    offsets = torch.tensor([0] + sizes).cumsum(0)
    camera = torch.randint(0, NUM_SEGMENTS, (NUM_ROWS,), generator=generator)
    rows, cols, vals = [], [], []
    for row in range(NUM_ROWS):
        start, stop = int(offsets[camera[row]]), int(offsets[camera[row] + 1])
        chosen = torch.randperm(stop - start, generator=generator)[:NEIGHBOURS + 1] + start
        weights = torch.rand(NEIGHBOURS + 1, generator=generator)
        weights[0] = 1.0
        for col, value in sorted(zip(chosen.tolist(), (weights / weights.sum()).tolist())):
            rows.append(row)
            cols.append(col)
            vals.append(value)
    targets = torch.sparse_coo_tensor(torch.tensor([rows, cols]), torch.tensor(vals),
                                      (NUM_ROWS, NUM_CLASSES), check_invariants=True).coalesce().to_sparse_csr()
    return (features.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype),
            targets.to(device), offsets.to(device))


def loss_triton(features, weight, targets, offsets):
    return fastassoc.segmented_cross_entropy(features, weight, targets, class_offsets=offsets, scale=LOGIT_SCALE,
                                             backend="triton")


def loss_torch(features, weight, targets, offsets):
    logits = (features @ weight.T) * LOGIT_SCALE
    bounds = offsets.tolist()
    log_probs = torch.cat([torch.log_softmax(logits[:, a:b], dim=1) for a, b in zip(bounds[:-1], bounds[1:])], 1)
    crow = targets.crow_indices()
    rows = torch.repeat_interleave(torch.arange(features.shape[0], device=features.device), crow[1:] - crow[:-1])
    picked = log_probs[rows, targets.col_indices()]
    return -(picked * targets.values().to(picked.dtype)).sum() / features.shape[0]


def loss_gemm(features, weight, targets, offsets):
    # The floor: the forward GEMM, and a backward with exactly the two GEMMs.
    return (features @ weight.T).sum()


PROVIDERS = {"triton": loss_triton, "torch": loss_torch, "gemm": loss_gemm}


def forward_backward(provider, features, weight, targets, offsets):
    features.grad = weight.grad = None
    loss = PROVIDERS[provider](features, weight, targets, offsets)
    loss.backward()
    torch.cuda.synchronize()
    return loss


def peak_memory(provider, features, weight, targets, offsets) -> dict[str, int]:
    features.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward(provider, features, weight, targets, offsets)
    peak = torch.cuda.max_memory_allocated() - before
    gradients = sum(t.grad.numel() * t.grad.element_size() for t in (features, weight))
    return {"peak_bytes": peak, "workspace_bytes": peak - gradients}


def check_agreement(dtype):
    tensors = make_workload(dtype)
    results = {}
    for provider in ("triton", "torch"):
        features = tensors[0].clone().requires_grad_()
        weight = tensors[1].clone().requires_grad_()
        loss = forward_backward(provider, features, weight, tensors[2], tensors[3])
        results[provider] = (loss.detach().float(), features.grad.float(), weight.grad.float())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("loss", "d features", "d weight"), results["triton"], results["torch"]):
        error = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        assert error <= tolerance, f"{dtype} {name}: triton and torch differ by {error:.3g} (relative to max)"


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def workload(request):
    check_agreement(request.param)
    features, weight, targets, offsets = make_workload(request.param)
    return request.param, features.requires_grad_(), weight.requires_grad_(), targets, offsets


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_w_ce(benchmark, workload, provider):
    dtype, features, weight, targets, offsets = workload
    forward_backward(provider, features, weight, targets, offsets)  # warm-up / autotune
    benchmark.group = f"W-ce {dtype}"
    benchmark.extra_info.update(peak_memory(provider, features, weight, targets, offsets))
    benchmark.extra_info.update(gpu=torch.cuda.get_device_name(), scale=BENCH_SCALE, rows=NUM_ROWS,
                                classes=NUM_CLASSES, dim=DIM)
    benchmark(forward_backward, provider, features, weight, targets, offsets)


def main() -> None:
    """Plain table: median forward+backward time, ratio to torch and to the GEMM floor, memory."""
    import statistics
    import time

    print(f"W-ce on {torch.cuda.get_device_name()}: B={NUM_ROWS} C={NUM_CLASSES} ({NUM_SEGMENTS} segments) D={DIM} "
          f"(scale {BENCH_SCALE})")
    for dtype in (torch.bfloat16, torch.float32):
        check_agreement(dtype)
        features, weight, targets, offsets = make_workload(dtype)
        features.requires_grad_()
        weight.requires_grad_()
        timings, memory = {}, {}
        for provider in PROVIDERS:
            for _ in range(3):
                forward_backward(provider, features, weight, targets, offsets)
            samples = []
            for _ in range(20):
                start = time.perf_counter()
                forward_backward(provider, features, weight, targets, offsets)
                samples.append(time.perf_counter() - start)
            timings[provider] = statistics.median(samples)
            memory[provider] = peak_memory(provider, features, weight, targets, offsets)
        for provider in PROVIDERS:
            print(f"  {str(dtype):15s} {provider:7s} {timings[provider] * 1e3:8.3f} ms  "
                  f"torch/this {timings['torch'] / timings[provider]:5.2f}x  "
                  f"this/gemm {timings[provider] / timings['gemm']:5.2f}x  "
                  f"peak {memory[provider]['peak_bytes'] / 2**20:8.1f} MiB  "
                  f"workspace {memory[provider]['workspace_bytes'] / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
