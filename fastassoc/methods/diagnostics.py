"""Association diagnostics against the ground truth (never used for training): how many pairs
a step found and how many are right, soft-label quality, cluster purity."""
from __future__ import annotations

import torch

def pair_diagnostics(ia: torch.Tensor, ib: torch.Tensor, pids: torch.Tensor, prefix: str = "pairs") -> dict:
    """Count and precision of discovered pairs of training tracklets.

    Parameters
    ----------
    ia, ib : Tensor [P], integer
        Tracklet indices (rows of ``pids``) of each discovered pair.
    pids : Tensor [T], integer ground-truth identities (negative: unknown, counted as wrong).

    Returns
    -------
    dict
        ``{prefix}``: P, ``{prefix}_precision``: fraction of pairs with one identity (nan when P = 0).
    """
    pids = pids.cpu()
    ia, ib = ia.cpu().long(), ib.cpu().long()
    count = int(ia.numel())
    if count == 0:
        return {prefix: 0, f"{prefix}_precision": float("nan")}
    same = (pids[ia] == pids[ib]) & (pids[ia] >= 0)
    return {prefix: count, f"{prefix}_precision": float(same.double().mean())}


def graph_diagnostics(graph: torch.Tensor, pids: torch.Tensor, cameras: torch.Tensor | None = None,
                      prefix: str = "pairs") -> dict:
    """:func:`pair_diagnostics` of the off-diagonal edges of a symmetric sparse graph, each
    unordered pair counted once; with ``cameras`` only cross-camera edges count.

    Parameters
    ----------
    graph : Tensor [T, T], sparse CSR (or COO)
    pids : Tensor [T]
    cameras : Tensor [T], optional
    """
    coo = graph.to_sparse_coo().coalesce().cpu()
    rows, cols = coo.indices()
    keep = rows < cols
    if cameras is not None:
        cameras = cameras.cpu()
        keep &= cameras[rows] != cameras[cols]
    return pair_diagnostics(rows[keep], cols[keep], pids, prefix)


def soft_label_diagnostics(soft: torch.Tensor, pids: torch.Tensor, cameras: torch.Tensor) -> dict:
    """How well per-camera soft labels (UTAL Eqs. 4-6) group same-identity tracklets.

    Parameters
    ----------
    soft : Tensor [T, T], sparse CSR, rows = soft labels (block-diagonal per camera)
    pids, cameras : Tensor [T]

    Returns
    -------
    dict
        ``soft_same_id_similarity``: mean cosine similarity of the soft-label vectors of
        same-identity tracklet pairs of one camera (the only pairs whose block-diagonal
        labels can overlap; nan when a camera never sees one identity twice);
        ``soft_label_precision``: mean over rows of the weight a row puts on other tracklets
        of its own identity, divided by the weight it puts on other tracklets.
    """
    coo = soft.to_sparse_coo().coalesce().cpu().double()
    rows, cols = coo.indices()
    values = coo.values()
    pids, cameras = pids.cpu(), cameras.cpu()
    num = soft.shape[0]
    off = rows != cols
    off_weight = torch.zeros(num, dtype=torch.float64).index_add_(0, rows[off], values[off])
    same = off & (pids[rows] == pids[cols]) & (pids[rows] >= 0)
    same_weight = torch.zeros(num, dtype=torch.float64).index_add_(0, rows[same], values[same])
    has_off = off_weight > 0
    precision = float((same_weight[has_off] / off_weight[has_off]).mean()) if has_off.any() else float("nan")

    # Ordered same-(identity, camera) pairs i != j; their similarity comes from the sparse Gram matrix.
    group = pids * (int(cameras.max()) + 1 if num else 1) + cameras
    valid = pids >= 0
    _, counts = torch.unique(group[valid], return_counts=True)
    num_pairs = int((counts * (counts - 1)).sum())
    if num_pairs == 0:
        return {"soft_same_id_similarity": float("nan"), "soft_label_precision": precision}
    norms = torch.zeros(num, dtype=torch.float64).index_add_(0, rows, values * values).sqrt()
    gram = torch.sparse.mm(coo, coo.t()).coalesce()
    gi, gj = gram.indices()
    gv = gram.values()
    keep = (gi != gj) & (group[gi] == group[gj]) & valid[gi]
    cosine = gv[keep] / (norms[gi[keep]] * norms[gj[keep]]).clamp_min(1e-12)
    return {"soft_same_id_similarity": float(cosine.sum() / num_pairs), "soft_label_precision": precision}


def cluster_diagnostics(labels: torch.Tensor, pids: torch.Tensor) -> dict:
    """Cluster count and purity of a clustering of the training tracklets.

    Returns
    -------
    dict
        ``clusters``: number of clusters; ``purity``: fraction of tracklets whose identity is
        their cluster's majority identity; ``ids``: number of true identities.
    """
    labels, pids = labels.cpu().long(), pids.cpu().long()
    if labels.numel() == 0:
        return {"clusters": 0, "purity": float("nan"), "ids": 0}
    _, cluster = torch.unique(labels, return_inverse=True)
    _, identity = torch.unique(pids, return_inverse=True)
    num_ids = int(identity.max()) + 1
    _, counts = torch.unique(cluster * num_ids + identity, return_counts=True, sorted=True)
    pair_cluster = torch.unique(cluster * num_ids + identity, sorted=True) // num_ids
    majority = torch.zeros(int(cluster.max()) + 1, dtype=torch.int64).scatter_reduce_(
        0, pair_cluster, counts, reduce="amax")
    return {"clusters": int(cluster.max()) + 1, "purity": float(majority.sum()) / labels.numel(), "ids": num_ids}

