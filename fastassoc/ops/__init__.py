"""Public ops: each validates its arguments, picks a backend in fastassoc._backend, and calls it.

Every op here also takes NumPy and CuPy arrays (and other DLPack objects) and returns the
caller's array type; see :mod:`fastassoc._arrays`.
"""
from .._arrays import accepts_arrays
from .cluster import agglomerative_merge
from .evaluation import RankingResult, evaluate_ranking
from .graph import cross_camera_graph, knn_soft_labels
from .knn import mutual_knn, topk_anchors
from .loss import segmented_cross_entropy
from .memory import ema_update_
from .rerank import cluster_centres, dbscan, jaccard_distance

topk_anchors = accepts_arrays(topk_anchors)
mutual_knn = accepts_arrays(mutual_knn)
cross_camera_graph = accepts_arrays(cross_camera_graph)
knn_soft_labels = accepts_arrays(knn_soft_labels)
segmented_cross_entropy = accepts_arrays(segmented_cross_entropy)
agglomerative_merge = accepts_arrays(agglomerative_merge)
ema_update_ = accepts_arrays(ema_update_, in_place="bank")
evaluate_ranking = accepts_arrays(evaluate_ranking)
jaccard_distance = accepts_arrays(jaccard_distance)
dbscan = accepts_arrays(dbscan)
cluster_centres = accepts_arrays(cluster_centres)

__all__ = [
    "topk_anchors", "mutual_knn", "cross_camera_graph", "knn_soft_labels", "segmented_cross_entropy",
    "agglomerative_merge", "ema_update_", "evaluate_ranking", "RankingResult",
    "jaccard_distance", "dbscan", "cluster_centres",
]
