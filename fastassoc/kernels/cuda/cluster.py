"""CUDA C++ greedy union step for agglomerative merging: ``greedy_union_cuda``.

Not the ``agglomerative_merge`` op itself (this module defines no
``agglomerative_merge_cuda``, so the dispatcher does not pick it): a building block
for the GPU merge path, which selects the smallest cluster pairs on the GPU, sorts
them by (linkage, i, j) and then walks them greedily. The walk
(csrc/cuda/cluster.cu) runs on the device so the selected pairs never travel to the
host; union by smallest index makes every set's root its smallest member.
"""
from __future__ import annotations

import torch

from ... import _backend


def greedy_union_cuda(first: torch.Tensor, second: torch.Tensor, parent: torch.Tensor, num_merges: int,
                      *, roots: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Greedily merge sorted candidate pairs with a union-find forest on the GPU.

    Parameters
    ----------
    first, second : Tensor [P], int64, CUDA
        Candidate pairs in walk order (smallest linkage first, ties by (i, j)); entries
        in ``[0, N)``.
    parent : Tensor [N], int64, CUDA, contiguous
        Union-find forest, updated in place; start from ``torch.arange(N)``. Passing the
        same forest again continues the walk with a further batch of pairs.
    num_merges : int
        Stop after this many successful merges.
    roots : bool
        Also return each node's root (the smallest member of its set).

    Returns
    -------
    roots : Tensor [N] int64 or None
    progress : Tensor [2] int64 on the device
        (merges done, pairs consumed); reading it synchronises.
    """
    if first.shape != second.shape or first.dim() != 1:
        raise ValueError(f"first and second must be 1-D of one length, got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    for name, tensor in (("first", first), ("second", second), ("parent", parent)):
        if tensor.dtype != torch.int64 or tensor.device.type != "cuda" or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int64 CUDA tensor, got {tensor.dtype} on {tensor.device}")
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    num_nodes = parent.shape[0]
    if first.numel():
        low = torch.minimum(first.min(), second.min())
        high = torch.maximum(first.max(), second.max())
        if int(low) < 0 or int(high) >= num_nodes:
            raise ValueError(f"pair entries must lie in [0, {num_nodes}), found {int(low)}..{int(high)}")
    core = _backend.compiled_core()
    progress = torch.zeros(2, dtype=torch.int64, device=parent.device)
    root_of = torch.empty(num_nodes, dtype=torch.int64, device=parent.device) if roots else None
    stream = torch.cuda.current_stream(parent.device).cuda_stream
    with torch.cuda.device(parent.device):
        core.cuda_greedy_union(first.data_ptr(), second.data_ptr(), first.shape[0], parent.data_ptr(), num_nodes,
                               int(num_merges), 0 if root_of is None else root_of.data_ptr(), progress.data_ptr(),
                               stream)
    return root_of, progress
