"""One cluster-contrast style clustering step on fastassoc's synthetic world.

What cluster-contrast (and SpCL, and the methods built on them) run at the start of every
epoch, here on fastassoc's ops:

    features -> k-reciprocal Jaccard distance -> DBSCAN -> pseudo labels -> cluster centres
    (the centres, L2-normalised, initialise the cluster memory the contrastive loss uses)

The features stand in for a re-id network's: every training frame of the synthetic world,
standardised per camera (which removes most of each camera's colour cast), projected to
``--dim`` dimensions by a fixed random matrix and L2-normalised. Put a trained model's
features there in a real step. The same clustering is then done the drop-in way
(``fastassoc.compat.compute_jaccard_distance(..., sparse=True)`` into scikit-learn's
``DBSCAN(metric="precomputed")``, as a cluster-contrast script would after its two-line
change) and the two label vectors are compared.

Run ``python examples/cluster_contrast_step.py`` (about 10 s on two cores); ``--help``
lists the sizes and parameters (defaults: cluster-contrast's k1 = 30, k2 = 6,
min_samples = 4; eps 0.5, since raw-pixel stand-in features are looser than a trained
network's, for which cluster-contrast uses 0.6).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.cluster import DBSCAN

import fastassoc
from fastassoc.compat import compute_jaccard_distance
from fastassoc.data.synthetic import SyntheticTracklets


def frame_features(world: SyntheticTracklets, dim: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """[F, dim] float32 L2-normalised stand-in features of every training frame, and their identities."""
    frames = [(frame, tracklet.camera, tracklet.pid) for tracklet in world.train for frame in tracklet.frames]
    pixels = np.stack([world.frame_array(frame) for frame, _, _ in frames]).astype(np.float32) / 255.0
    cameras = np.array([camera for _, camera, _ in frames])
    identities = np.array([pid for _, _, pid in frames])
    x = torch.from_numpy(pixels.reshape(len(frames), -1))
    for camera in np.unique(cameras):
        # Per-camera standardisation: the camera's scene and colour response dominate raw pixels.
        rows = torch.from_numpy(cameras == camera)
        x[rows] = (x[rows] - x[rows].mean(0)) / (x[rows].std(0) + 1e-3)
    projection = torch.randn(x.shape[1], dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x @ projection, dim=1), identities


def purity(labels: np.ndarray, identities: np.ndarray) -> tuple[float, int]:
    """Fraction of clustered samples whose identity is their cluster's majority, and the
    number of distinct identities that are some cluster's majority."""
    clustered = labels >= 0
    if not clustered.any():
        return float("nan"), 0
    majorities = [np.bincount(identities[labels == c]).argmax() for c in range(labels.max() + 1)]
    hits = sum(int((identities[labels == c] == m).sum()) for c, m in enumerate(majorities))
    return hits / int(clustered.sum()), len(set(majorities))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=40, help="training identities of the synthetic world")
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256, help="feature dimension")
    parser.add_argument("--k1", type=int, default=30)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--min-samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    world = SyntheticTracklets(num_train_ids=args.ids, num_test_ids=2, num_cameras=args.cameras,
                               camera_strength=0.5, seed=args.seed)
    features, identities = frame_features(world, args.dim, args.seed)
    print(f"synthetic world: {len(features)} training frames of {len(np.unique(identities))} identities, "
          f"{args.cameras} cameras; features [{features.shape[0]}, {features.shape[1]}] "
          f"({time.perf_counter() - start:.1f} s)")

    start = time.perf_counter()
    distances = fastassoc.jaccard_distance(features, k1=args.k1, k2=args.k2, max_distance=args.eps)
    labels = fastassoc.dbscan(distances, eps=args.eps, min_samples=args.min_samples)
    num_clusters = int(labels.max()) + 1
    centres, counts = fastassoc.cluster_centres(features, labels, num_clusters=num_clusters)
    memory = torch.nn.functional.normalize(centres, dim=1)      # the cluster memory's initial rows
    elapsed = time.perf_counter() - start
    labels_np = labels.numpy()
    cluster_purity, recovered = purity(labels_np, identities)
    print(f"jaccard_distance (k1={args.k1}, k2={args.k2}, max_distance={args.eps}): "
          f"{distances.values().numel()} stored pairs")
    print(f"dbscan (eps={args.eps}, min_samples={args.min_samples}): {num_clusters} clusters, "
          f"noise fraction {float((labels_np < 0).mean()):.3f}, purity {cluster_purity:.3f}, "
          f"{recovered} of {len(np.unique(identities))} identities are some cluster's majority")
    print(f"cluster_centres: memory [{memory.shape[0]}, {memory.shape[1]}], cluster sizes "
          f"{int(counts.min()) if num_clusters else 0}..{int(counts.max()) if num_clusters else 0} "
          f"({elapsed:.1f} s for the whole step)")

    # The drop-in way: SpCL's signature, a scipy CSR matrix, scikit-learn's DBSCAN.
    matrix = compute_jaccard_distance(features, k1=args.k1, k2=args.k2, print_flag=False, sparse=True)
    sklearn_labels = DBSCAN(eps=args.eps, min_samples=args.min_samples, metric="precomputed").fit_predict(matrix)
    same = bool(np.array_equal(sklearn_labels, labels_np))
    print(f"drop-in (compat.compute_jaccard_distance(sparse=True) + sklearn DBSCAN): same labels: {same}")
    return dict(num_clusters=num_clusters, noise_fraction=float((labels_np < 0).mean()), purity=cluster_purity,
                labels=labels_np, identities=identities, features=features, centres=memory, counts=counts,
                same_as_sklearn=same)


if __name__ == "__main__":
    main()
