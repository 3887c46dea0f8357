"""fastassoc: fused, memory-bounded kernels for the association steps of unsupervised
tracklet re-id (nearest-anchor ranking, mutual kNN, sparse affinity graphs, soft labels,
agglomerative merging, memory EMA, CMC/mAP), with trainers for DAL, UTAL, UGA, EEA, TSSL.
"""
from ._backend import BACKENDS, available_backends, tile_limit
from .ops import (RankingResult, agglomerative_merge, cluster_centres, cross_camera_graph, dbscan, ema_update_,
                  evaluate_ranking, jaccard_distance, knn_soft_labels, mutual_knn, segmented_cross_entropy,
                  topk_anchors)
from .ops._sparse import CSRMatrix
from .segments import CameraLayout, Segments, csr_rows, one_hot_csr, renumber_csr_columns, segments_from_labels

__version__ = "0.1.0"

__all__ = [
    "topk_anchors", "mutual_knn", "cross_camera_graph", "knn_soft_labels", "segmented_cross_entropy",
    "agglomerative_merge", "ema_update_", "evaluate_ranking", "RankingResult", "CSRMatrix",
    "jaccard_distance", "dbscan", "cluster_centres",
    "segments_from_labels", "Segments", "CameraLayout", "csr_rows", "one_hot_csr", "renumber_csr_columns",
    "available_backends", "tile_limit", "BACKENDS", "__version__",
]
