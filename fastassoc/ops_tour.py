"""A tour of the eight ops on random tracklet-like data: runs each once on every
available backend for the tensors' device, checks the backends agree, and prints
what it did and how long it took. ``fastassoc ops-tour`` runs it."""
from __future__ import annotations

import time

import torch

import fastassoc
from fastassoc import _backend


def _clustered(num_ids: int, per_id: int, dim: int, cameras: int, generator: torch.Generator):
    centres = torch.randn(num_ids, dim, generator=generator)
    pids = torch.arange(num_ids).repeat_interleave(per_id)
    x = centres[pids] + 0.35 * torch.randn(len(pids), dim, generator=generator)
    cams = torch.randint(0, cameras, (len(pids),), generator=generator)
    return x, pids, cams


def _backends(op: str) -> list[str]:
    report = _backend.available_backends(op)[op]
    return [name for name in ("reference", "cpu") if report[name] is True]


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, (time.perf_counter() - start) * 1e3


def run(seed: int = 0, num_ids: int = 300, per_id: int = 4, dim: int = 256, cameras: int = 6) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, pids, cams = _clustered(num_ids, per_id, dim, cameras, generator)
    order = torch.argsort(cams, stable=True)
    x_sorted, cams_sorted = x[order], cams[order]
    offsets = torch.zeros(cameras + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(cams_sorted, minlength=cameras).cumsum(0)
    n = len(x)
    print(f"fastassoc {fastassoc.__version__}: {n} tracklet features, D={dim}, {cameras} cameras, "
          f"{num_ids} identities")

    def show(op: str, calls: dict, describe) -> None:
        results = {}
        for backend in _backends(op):
            results[backend], ms = _timed(lambda b=backend: calls(b))
            print(f"  {op:<24} backend={backend:<9} {ms:8.1f} ms  {describe(results[backend])}")

    show("topk_anchors", lambda b: fastassoc.topk_anchors(
        x_sorted, x_sorted, 1, anchor_offsets=offsets, query_segments=cams_sorted,
        exclude=torch.arange(n), backend=b),
        lambda r: f"rank-1 anchor in own camera; mean distance {float(r[0].mean()):.3f}")
    half = n // 2
    show("mutual_knn", lambda b: fastassoc.mutual_knn(x[:half], x[half:], 1, backend=b),
         lambda r: f"{len(r[0])} mutual nearest pairs between two halves")
    show("cross_camera_graph", lambda b: fastassoc.cross_camera_graph(
        x, cams, 1, min_similarity=0.5, backend=b),
        lambda g: f"{g.values().numel() - n} cross-camera edges (+{n} self loops)")
    show("knn_soft_labels", lambda b: fastassoc.knn_soft_labels(x, cams, 4, backend=b),
         lambda s: f"{s.values().numel()} soft-label entries, rows sum to {float(s.to_dense().sum(1).mean()):.3f}")
    labels = torch.arange(n)
    show("agglomerative_merge", lambda b: fastassoc.agglomerative_merge(x, labels, n // 10, backend=b),
         lambda r: f"{n} clusters -> {int(r.max()) + 1} after {n // 10} merges")
    bank = torch.nn.functional.normalize(x.clone(), dim=1)
    show("ema_update_", lambda b: fastassoc.ema_update_(bank.clone(), torch.arange(0, n, 3),
                                                     x[::3] + 0.1, 0.5, backend=b),
         lambda r: f"updated {len(range(0, n, 3))} memory rows")
    weight = torch.randn(n, dim, generator=generator) * 0.05
    targets_sorted = fastassoc.knn_soft_labels(x_sorted, cams_sorted, 4, backend="reference")
    show("segmented_cross_entropy", lambda b: fastassoc.segmented_cross_entropy(
        x_sorted[:64], weight, fastassoc.csr_rows(targets_sorted, torch.arange(64)),
        class_offsets=offsets, scale=1.0, backend=b),
        lambda loss: f"loss {float(loss):.4f} over 64 rows, {cameras} class segments")
    query = torch.arange(0, n, 5)
    gallery_mask = torch.ones(n, dtype=torch.bool)
    gallery_mask[query] = False
    show("evaluate_ranking", lambda b: fastassoc.evaluate_ranking(
        x[query], x[gallery_mask], pids[query], pids[gallery_mask], cams[query], cams[gallery_mask], backend=b),
        lambda r: f"rank-1 {100 * r.rank1:.1f}%  mAP {100 * r.mAP:.1f}%  ({r.num_valid_queries} queries)")
