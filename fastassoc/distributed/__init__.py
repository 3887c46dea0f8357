"""Exact sharded association over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

A bank is split by rows over a process group: each rank holds one contiguous block
(global row = the rows of the lower ranks + local row; a block may be empty). Every op
here has the semantics of its single-process counterpart on the concatenated bank
(indices, pairs, graphs, labels; ties to the smaller global index) for any number of
ranks, takes this rank's block plus ``group``, and is collective: every rank of the group
calls it. Each op's docstring states the bytes each rank sends; nothing ``B x N`` or
``N x N`` crosses the wire.

Launch one process per GPU (``torchrun --nproc_per_node 8 script.py``; NCCL) or per CPU
socket (gloo), initialise the group, give each rank its block, call the op.

Examples
--------
A one-process group (every rank of a larger one runs the same lines on its own block):

>>> import torch, torch.distributed as dist, fastassoc, fastassoc.distributed as fd
>>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
>>> bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
>>> distances, indices = fd.topk_anchors(bank[:2], bank, 2, exclude=torch.tensor([0, 1]))
>>> indices.tolist(), distances.tolist()
([[1, 2], [0, 2]], [[1.0, 4.0], [1.0, 5.0]])
>>> torch.equal(indices, fastassoc.topk_anchors(bank[:2], bank, 2, exclude=torch.tensor([0, 1]))[1])
True
>>> dist.destroy_process_group()
"""
from .cluster import agglomerative_merge
from .evaluation import evaluate_ranking
from .graph import cross_camera_graph, knn_soft_labels
from .rerank import jaccard_distance
from .knn import mutual_knn, topk_anchors
from .memory import ema_update_
from ._comm import BYTES_SENT, ShardLayout

__all__ = ["topk_anchors", "mutual_knn", "cross_camera_graph", "knn_soft_labels", "jaccard_distance",
           "agglomerative_merge", "evaluate_ranking", "ema_update_", "ShardLayout", "BYTES_SENT"]
