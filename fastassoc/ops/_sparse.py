"""CSR matrices as plain tensors: what ``torch.compile`` can trace.

torch.compile cannot create or consume torch sparse tensors (dynamo: "Sparse tensor
creation not supported"), so every op that returns or takes a sparse CSR matrix also
speaks :class:`CSRMatrix`, a named tuple of three dense tensors and the shape. Ops
return it with ``as_tuple=True``; ops that take a CSR matrix accept either form.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class CSRMatrix(NamedTuple):
    """A compressed-sparse-row matrix held as dense tensors.

    Attributes
    ----------
    crow_indices : Tensor [R+1], int64
        Row ``r`` holds entries ``crow_indices[r] : crow_indices[r+1]``.
    col_indices : Tensor [nnz], int64
        Column of every entry, sorted inside each row.
    values : Tensor [nnz], float
    size : tuple of int
        ``(R, C)``.

    Examples
    --------
    >>> import torch
    >>> m = CSRMatrix.from_sparse_csr(torch.eye(2).to_sparse_csr())
    >>> m.crow_indices.tolist(), m.col_indices.tolist(), m.size
    ([0, 1, 2], [0, 1], (2, 2))
    >>> torch.equal(m.to_sparse_csr().to_dense(), torch.eye(2))
    True
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    size: tuple[int, int]

    @classmethod
    def from_sparse_csr(cls, t: torch.Tensor) -> "CSRMatrix":
        """The components of a torch sparse CSR tensor (no copy)."""
        # detach(): the component accessors return views whose base is the sparse tensor, and
        # dynamo's automatic-dynamic bookkeeping crashes on such views given to a compiled function.
        return cls(t.crow_indices().detach(), t.col_indices().detach(), t.values().detach(),
                   (int(t.shape[0]), int(t.shape[1])))

    def to_sparse_csr(self) -> torch.Tensor:
        """The torch sparse CSR tensor with these components (no copy)."""
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, size=self.size,
                                       check_invariants=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.size
