"""Public ops: each validates its arguments, picks a backend in fastassoc._backend, and calls it."""
from .cluster import agglomerative_merge
from .evaluation import RankingResult, evaluate_ranking
from .graph import cross_camera_graph, knn_soft_labels
from .knn import mutual_knn, topk_anchors
from .loss import segmented_cross_entropy
from .memory import ema_update_

__all__ = [
    "topk_anchors", "mutual_knn", "cross_camera_graph", "knn_soft_labels", "segmented_cross_entropy",
    "agglomerative_merge", "ema_update_", "evaluate_ranking", "RankingResult",
]
