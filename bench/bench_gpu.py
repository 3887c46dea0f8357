"""GPU benchmarks of the distance-family ops (issue 4): W-rank-1M, W-mutual-100k, W-merge-100k, W-eval-MSMT.

Workloads (re-id-like features: unit identity centre + Gaussian noise, fixed seeds):

* ``W-rank-1M``    1,000,000 anchors in 15 segments, D = 2048, 8,192 queries (anchors of
  random segments, each excluding itself), k = 10  -> ``topk_anchors``
* ``W-mutual-100k`` 100k x 100k, D = 1024, k = 1                -> ``mutual_knn``
* ``W-merge-100k``  100k singletons, D = 2048, 5% merges (tssl) -> ``agglomerative_merge``
* ``W-eval-MSMT``   11,659 queries x 82,161 gallery, D = 2048    -> ``evaluate_ranking``

(W-ce, the loss workload, is in ``bench_gpu_loss.py``.)

Precisions: ``fp32`` (``precision="highest"``, TF32 off everywhere), ``tf32`` and ``bf16``
inputs. Providers:

* ``triton``  fastassoc with ``backend="triton"`` (fused distance + selection kernels)
* ``torch``   torch.cdist + topk per segment / row chunk (what the fused op replaces);
  ``reference`` (fastassoc's pure-torch backend on the GPU) for merge and evaluation
* ``gemm``    bare cuBLAS ``torch.mm`` of the same shapes and precision into preallocated
  outputs: the compute floor (targets: fused ops <= 1.25x this)
* ``faiss``   ``faiss.knn_gpu`` brute force when a GPU build of faiss is importable

Every provider is checked against triton before timing (indices up to rare near ties,
identical pairs / labels / CMC); every timed call ends with ``torch.cuda.synchronize()``.
``extra_info`` carries the GPU name, the GEMM floor and the ratio to it. Skips without a
GPU. ``FASTASSOC_BENCH_SCALE=small`` shrinks rows by 8 and D by 4 for a smoke run.
Run ``pytest bench/bench_gpu.py --benchmark-only`` or ``python bench/bench_gpu.py`` for a
plain table.
"""
from __future__ import annotations

import functools
import os
import statistics
import time

import pytest
import torch

import fastassoc

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need a CUDA GPU")]

SMALL = os.environ.get("FASTASSOC_BENCH_SCALE", "full") == "small"
PRECISIONS = ("fp32", "tf32", "bf16")
ROUNDS = 3     # repeats of the untimed GEMM-floor median and of main()'s table


def rows(n: int) -> int:
    return max(16, n // 8) if SMALL else n


def dim(d: int) -> int:
    return max(16, d // 4) if SMALL else d


def sync_call(function, *args, **kwargs):
    result = function(*args, **kwargs)
    torch.cuda.synchronize()
    return result


def median_seconds(function, repeats: int = ROUNDS) -> float:
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


class precision_mode:
    """Context: cuBLAS TF32 on for ``tf32`` only; the op's ``precision`` argument and input dtype."""

    def __init__(self, precision: str):
        self.precision = precision

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.precision == "tf32"
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved

    @property
    def op_precision(self) -> str:
        return "tf32" if self.precision == "tf32" else "highest"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def identity_features(num: int, dimension: int, num_identities: int, seed: int, noise: float = 0.3):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    centres = torch.nn.functional.normalize(
        torch.randn(num_identities, dimension, generator=generator, device="cuda"), dim=1)
    ids = torch.randint(0, num_identities, (num,), generator=generator, device="cuda")
    x = centres[ids]
    x += torch.randn(num, dimension, generator=generator, device="cuda") * (noise / dimension) ** 0.5
    return x, ids


# ----------------------------------------------------------------------------- workloads

@functools.lru_cache(maxsize=None)
def w_rank():
    num_anchors, num_segments, num_queries = rows(1_000_000), 15, rows(8192)
    anchors, _ = identity_features(num_anchors, dim(2048), rows(50_000), seed=1)
    generator = torch.Generator(device="cuda").manual_seed(2)
    offsets = torch.linspace(0, num_anchors, num_segments + 1, device="cuda").round().long()
    chosen = torch.randperm(num_anchors, generator=generator, device="cuda")[:num_queries].sort().values
    segments = torch.bucketize(chosen, offsets, right=True) - 1
    return dict(anchors=anchors, queries=anchors[chosen].contiguous(), offsets=offsets, segments=segments,
                exclude=chosen, k=10)


@functools.lru_cache(maxsize=None)
def w_mutual():
    n = rows(100_000)
    x, _ = identity_features(2 * n, dim(1024), n, seed=3)
    return dict(a=x[:n].contiguous(), b=x[n:].contiguous(), k=1)


@functools.lru_cache(maxsize=None)
def w_merge():
    n = rows(100_000)
    x, _ = identity_features(n, dim(2048), rows(20_000), seed=5)
    return dict(x=x, labels=torch.arange(n, device="cuda"), num_merges=n * 5 // 100)


@functools.lru_cache(maxsize=None)
def w_eval():
    nq, ng, d = rows(11_659), rows(82_161), dim(2048)
    ids = rows(4_101)
    x, pids = identity_features(nq + ng, d, ids, seed=7, noise=0.6)
    generator = torch.Generator(device="cuda").manual_seed(8)
    cams = torch.randint(0, 15, (nq + ng,), generator=generator, device="cuda")
    gpids = pids[nq:].clone()
    gpids[torch.rand(ng, generator=generator, device="cuda") < 0.1] = -1
    return dict(query=x[:nq].contiguous(), gallery=x[nq:].contiguous(), qpids=pids[:nq].contiguous(),
                gpids=gpids, qcams=cams[:nq].contiguous(), gcams=cams[nq:].contiguous())


# ----------------------------------------------------------------------------- providers

def _faiss_gpu():
    try:
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (faiss.knn_gpu on torch CUDA tensors)
    except ImportError:
        return None
    return faiss if hasattr(faiss, "StandardGpuResources") else None


def gemm_chunks(left: torch.Tensor, right: torch.Tensor, row_chunk: int = 8192, upper: bool = False):
    """Bare cuBLAS GEMMs ``left @ right.T`` in row chunks into one preallocated output."""
    out = torch.empty(min(row_chunk, left.shape[0]), right.shape[0], dtype=left.dtype, device=left.device)

    def run():
        for start in range(0, left.shape[0], row_chunk):
            stop = min(start + row_chunk, left.shape[0])
            first = start if upper else 0
            torch.mm(left[start:stop], right[first:].T, out=out[:stop - start, :right.shape[0] - first])
        torch.cuda.synchronize()
    return run


def rank_providers(w: dict, mode: precision_mode) -> dict:
    queries, anchors = w["queries"].to(mode.dtype), w["anchors"].to(mode.dtype)
    offsets, segments, exclude, k = w["offsets"], w["segments"], w["exclude"], w["k"]
    bounds = offsets.tolist()
    members = [torch.nonzero(segments == s).squeeze(1) for s in range(len(bounds) - 1)]

    def triton():
        return sync_call(fastassoc.topk_anchors, queries, anchors, k, anchor_offsets=offsets,
                         query_segments=segments, exclude=exclude, precision=mode.op_precision, backend="triton")

    def torch_cdist():
        distances = torch.full((queries.shape[0], k), float("inf"), device="cuda")
        indices = torch.full((queries.shape[0], k), -1, dtype=torch.int64, device="cuda")
        for s, rows_s in enumerate(members):
            low, high = bounds[s], bounds[s + 1]
            tile = torch.cdist(queries[rows_s].float(), anchors[low:high].float()).square_()
            local = exclude[rows_s] - low
            inside = (local >= 0) & (local < high - low)
            tile[torch.nonzero(inside).squeeze(1), local[inside]] = float("inf")
            values, columns = torch.topk(tile, k, dim=1, largest=False)
            distances[rows_s], indices[rows_s] = values, columns + low
        torch.cuda.synchronize()
        return distances, indices

    segment_queries = [queries[m] for m in members]
    outputs = [torch.empty(m.numel(), bounds[s + 1] - bounds[s], dtype=mode.dtype, device="cuda")
               for s, m in enumerate(members)]

    def gemm():
        for s, q in enumerate(segment_queries):
            torch.mm(q, anchors[bounds[s]:bounds[s + 1]].T, out=outputs[s])
        torch.cuda.synchronize()

    providers = dict(triton=triton, torch=torch_cdist, gemm=gemm)
    faiss = _faiss_gpu()
    if faiss is not None and mode.precision != "bf16":
        resources = faiss.StandardGpuResources()

        def faiss_knn():
            distances = torch.empty(queries.shape[0], k + 1, device="cuda")
            indices = torch.empty(queries.shape[0], k + 1, dtype=torch.int64, device="cuda")
            for s, rows_s in enumerate(members):
                low, high = bounds[s], bounds[s + 1]
                d, i = faiss.knn_gpu(resources, queries[rows_s].float(), anchors[low:high].float(), k + 1)
                distances[rows_s], indices[rows_s] = d, i + low
            keep = indices != exclude[:, None]
            order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k]
            torch.cuda.synchronize()
            return distances.gather(1, order), indices.gather(1, order)
        providers["faiss"] = faiss_knn
    return providers


def mutual_providers(w: dict, mode: precision_mode) -> dict:
    a, b, k = w["a"].to(mode.dtype), w["b"].to(mode.dtype), w["k"]

    def triton():
        return sync_call(fastassoc.mutual_knn, a, b, k, precision=mode.op_precision, backend="triton")

    def nearest(x, y, chunk=8192):
        best = torch.empty(x.shape[0], dtype=torch.int64, device="cuda")
        for start in range(0, x.shape[0], chunk):
            best[start:start + chunk] = torch.cdist(x[start:start + chunk].float(), y.float()).argmin(1)
        return best

    def torch_cdist():
        ab, ba = nearest(a, b), nearest(b, a)
        ia = torch.arange(a.shape[0], device="cuda")
        keep = ba[ab] == ia
        torch.cuda.synchronize()
        return ia[keep], ab[keep]

    providers = dict(triton=triton, torch=torch_cdist, gemm=gemm_chunks(a, b))
    return providers


def merge_providers(w: dict, mode: precision_mode) -> dict:
    x = w["x"].to(mode.dtype)

    def run(backend):
        return lambda: sync_call(fastassoc.agglomerative_merge, x, w["labels"], w["num_merges"], linkage="tssl",
                                 precision=mode.op_precision, backend=backend)
    # tssl needs the full C x C pass (a_i) plus the upper triangle: floor = 1.5 GEMMs.
    full, upper = gemm_chunks(x, x), gemm_chunks(x, x, upper=True)

    def gemm():
        full()
        upper()
    return dict(triton=run("triton"), reference=run("reference"), gemm=gemm)


def eval_providers(w: dict, mode: precision_mode) -> dict:
    query, gallery = w["query"].to(mode.dtype), w["gallery"].to(mode.dtype)
    labels = (w["qpids"], w["gpids"], w["qcams"], w["gcams"])

    def run(backend):
        return lambda: sync_call(fastassoc.evaluate_ranking, query, gallery, *labels, precision=mode.op_precision,
                                 backend=backend)
    return dict(triton=run("triton"), reference=run("reference"), gemm=gemm_chunks(query, gallery))


WORKLOADS = {
    "W-rank-1M": (w_rank, rank_providers),
    "W-mutual-100k": (w_mutual, mutual_providers),
    "W-merge-100k": (w_merge, merge_providers),
    "W-eval-MSMT": (w_eval, eval_providers),
}


# ----------------------------------------------------------------------------- agreement

def check_agreement(name: str, provider: str, got, expected) -> None:
    """``got`` from ``provider`` against triton's ``expected`` (no check for the GEMM floor)."""
    if provider in ("triton", "gemm"):
        return
    if name == "W-rank-1M":
        same = (got[1] == expected[1]).float().mean().item()
        assert same > 0.999, f"{name} {provider}: only {same:.4%} of indices equal triton's"
        assert torch.allclose(got[0].float(), expected[0], rtol=1e-2, atol=1e-2), f"{name} {provider}: distances"
    elif name == "W-mutual-100k":
        got_pairs = set(zip(got[0].tolist(), got[1].tolist()))
        expected_pairs = set(zip(expected[0].tolist(), expected[1].tolist()))
        assert len(got_pairs ^ expected_pairs) <= 1e-3 * max(len(expected_pairs), 1), f"{name} {provider}: pairs"
    elif name == "W-merge-100k":
        assert torch.equal(got, expected), f"{name} {provider}: labels differ from triton's"
    elif name == "W-eval-MSMT":
        assert torch.allclose(got.cmc, expected.cmc, atol=1e-4) and abs(got.mAP - expected.mAP) < 1e-4, \
            f"{name} {provider}: cmc/mAP differ from triton's"


CASES = [(name, precision, provider) for name in WORKLOADS for precision in PRECISIONS
         for provider in ("triton", "torch", "reference", "gemm", "faiss")]


@pytest.mark.parametrize("name, precision, provider", CASES,
                         ids=[f"{n}-{p}-{q}" for n, p, q in CASES])
def test_gpu_workload(benchmark, name, precision, provider):
    build, make_providers = WORKLOADS[name]
    w = build()
    with precision_mode(precision) as mode:
        providers = make_providers(w, mode)
        if provider not in providers:
            pytest.skip(f"{provider} is not a provider of {name} at {precision}")
        expected = providers["triton"]()            # also warms up / autotunes
        check_agreement(name, provider, providers[provider](), expected)
        floor = median_seconds(providers["gemm"])
        benchmark.group = f"{name} {precision}"
        # pytest-benchmark's own rounds (--benchmark-min-rounds / --benchmark-max-time); the
        # triton call above was the warm-up.
        benchmark(providers[provider])
        benchmark.extra_info.update(gpu=torch.cuda.get_device_name(), workload=name, precision=precision,
                                    provider=provider, gemm_floor_s=floor, scale="small" if SMALL else "full")
        if getattr(benchmark, "stats", None) is not None:
            benchmark.extra_info["ratio_to_gemm"] = benchmark.stats.stats.median / floor


def main() -> None:
    """Plain table: median seconds per provider, ratio to the GEMM floor and to triton."""
    print(f"GPU: {torch.cuda.get_device_name()}  scale: {'small' if SMALL else 'full'}")
    for name, (build, make_providers) in WORKLOADS.items():
        w = build()
        for precision in PRECISIONS:
            with precision_mode(precision) as mode:
                providers = make_providers(w, mode)
                expected = providers["triton"]()
                times = {}
                for provider, function in providers.items():
                    check_agreement(name, provider, function(), expected)
                    times[provider] = median_seconds(function)
                for provider, seconds in times.items():
                    print(f"{name:14s} {precision:5s} {provider:9s} {seconds * 1e3:10.2f} ms  "
                          f"/gemm {seconds / times['gemm']:6.2f}x  /triton {seconds / times['triton']:6.2f}x")


if __name__ == "__main__":
    main()
