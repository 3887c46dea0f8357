"""Triton re-id ranking evaluation: ``evaluate_ranking_triton`` (CMC, mAP, mINP; Market/MARS).

Algorithm
---------
Queries are processed in row chunks of at most ``tile_elements() / 4`` query-gallery
entries (the sort and its int64 workspace take several words per distance, as in the
reference). For each chunk:

1. ``_common._distance_tile_kernel`` computes the chunk's distances with ``tl.dot``
   (shared formulas: ``|q|^2 + |g|^2 - 2 q.g`` clamped at 0, ``sqrt_rn`` for
   ``euclidean``, ``1 - q_hat.g_hat`` for ``cosine``) and, fused in the same kernel,
   sets every junk entry (same identity *and* camera as the query, or gallery identity
   -1) to +inf. Real distances are finite, so junk sorts after every kept entry and
   the kept rank of an entry is simply its sorted position + 1: no junk compaction or
   kept-rank cumsum is needed.
2. per-query selection is a stable ``torch.sort`` of each row (ties by gallery index);
   true matches are the kept entries with the query's identity; CMC / AP / INP follow
   from one cumsum of the match indicator, in float64.

This is the "fused distance tile + bounded torch.sort" first version: the distance tile
does go through global memory once (the sort needs it); the sort dominates at
W-eval-MSMT scale. A counting variant (rank of each true match = number of kept
entries before it, computed tile by tile without a sort) would avoid it.

Must equal ``fastassoc.kernels.reference.evaluation.evaluate_ranking_reference``:
identical rankings on well-separated or exactly representable data; per-query AP/INP
summed once at the end in float64 so the result does not depend on the chunking.
"""
from __future__ import annotations

import torch

from ... import _backend
from ...ops.evaluation import RankingResult
from ..reference.evaluation import RankingScores
from . import _common

# Sort + gathered identities + cumsum hold several words per distance (as the reference).
_WORKSPACE_FACTOR = 4


def evaluate_ranking_triton(query: torch.Tensor, gallery: torch.Tensor, query_pids: torch.Tensor,
                            gallery_pids: torch.Tensor, query_cameras: torch.Tensor,
                            gallery_cameras: torch.Tensor, metric: str, max_rank: int,
                            precision: str) -> RankingResult:
    """CMC, mAP and mINP of ranking ``gallery`` for every query (see the module docstring).

    Parameters and result as ``evaluate_ranking_reference``; ``precision`` in
    {"highest", "tf32"} selects the ``tl.dot`` input precision of fp32 features.
    """
    device = query.device
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    scores = RankingScores(num_query, max_rank, device)
    if num_gallery > 0 and num_query > 0:
        rows = _common.prepare(query, metric)
        cols = _common.prepare(gallery, metric)
        rows_per_tile = max(1, _backend.tile_elements() // (num_gallery * _WORKSPACE_FACTOR))
        junk = (query_pids, query_cameras, gallery_pids, gallery_cameras)
        positions = torch.arange(num_query, device=device)
        ranks = torch.arange(1, num_gallery + 1, device=device)
        for start, stop, tile in _common.distance_tiles(rows, cols, positions, precision=precision, junk=junk,
                                                        rows_per_tile=rows_per_tile, op="evaluate_ranking"):
            values, order = torch.sort(tile, dim=1, stable=True)
            del tile
            matches = (gallery_pids[order] == query_pids[start:stop, None]) & ~torch.isinf(values)
            del values, order
            scores.add(matches, ranks, start, stop)
    return scores.result(num_gallery)
