"""Clustering primitives shared by merging methods (pure functions on one image's or one frame's tokens)."""
from __future__ import annotations

import torch

from ..kernels.reference import MIN_GEMM_ROWS, fits, row_blocks


def _distance_blocks(x: torch.Tensor, max_matrix_bytes: int | None = None):
    """A function yielding ``(start, stop, dist [stop - start, n])`` over row blocks of the scaled Euclidean
    distances of ``x`` ([n, D], fp64). While the ``n x n`` matrix fits ``max_matrix_bytes`` (default
    ``vtr.kernels.reference.MATRIX_BYTES``) it is computed once and replayed as one block; above, each pass
    recomputes its blocks (O(n) memory), each entry the float the dense ``torch.cdist`` gives (blocks of at least
    ``MIN_GEMM_ROWS`` rows: see ``vtr.kernels.reference.row_products``)."""
    n, dim = x.shape

    def distances(start: int, stop: int) -> torch.Tensor:
        rows = x[start:stop]
        if len(rows) < MIN_GEMM_ROWS:
            rows = torch.cat([rows, rows[-1:].expand(MIN_GEMM_ROWS - len(rows), -1)])
        return torch.cdist(rows[None], x[None])[0, :stop - start] / dim ** 0.5

    cached = distances(0, n) if fits(n, x.dtype, max_matrix_bytes) else None

    def blocks():
        if cached is not None:
            yield 0, n, cached
        else:
            for start, stop in row_blocks(n):
                yield start, stop, distances(start, stop)
    return blocks


def _dpc(x: torch.Tensor, k: int, generator: torch.Generator | None, max_matrix_bytes: int | None = None):
    x = x.double()
    n = x.shape[0]
    k = min(k, n)
    blocks = _distance_blocks(x, max_matrix_bytes)
    mean_sq = torch.empty(n, dtype=x.dtype, device=x.device)
    largest = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    for start, stop, dist in blocks():
        nearest = torch.topk(dist, k, dim=-1, largest=False).values
        mean_sq[start:stop] = (nearest ** 2).mean(-1)
        largest = torch.maximum(largest, dist.max())
    density = (-mean_sq).exp()
    density = density + torch.rand(n, generator=generator).to(density) * 1e-6
    delta = torch.empty(n, dtype=x.dtype, device=x.device)
    for start, stop, dist in blocks():
        denser = density[None, :] > density[start:stop, None]  # [i, j]: j is denser than i
        delta[start:stop] = torch.where(denser, dist, largest).amin(-1)
    return delta * density, blocks


def dpc_scores(x: torch.Tensor, k: int, generator: torch.Generator | None = None,
               max_matrix_bytes: int | None = None) -> torch.Tensor:
    """Density-peaks scores (DPC-KNN, TCFormer's variant, as SparseVLM, FastVID, PruneVid and HoliTom use it).

    x: ``[n, D]`` token features. Distances are Euclidean divided by ``sqrt(D)``; density_i =
    ``exp(-mean of the squared distances to its k nearest tokens, itself included)`` plus ``U(0, 1) * 1e-6`` noise
    drawn from ``generator`` (ties broken reproducibly when it is seeded); delta_i = the distance to the nearest
    denser token (the largest distance overall for the densest). Returns ``score [n] = delta * density`` in fp64:
    densities of nearby tokens differ in the 7th digit, where the tie-breaking noise lives, so fp32 rounding alone
    would reorder them.

    Memory: the ``n x n`` distances (fp64), computed once, while they fit ``max_matrix_bytes`` (default
    ``MATRIX_BYTES``: 1 GiB, 11,585 tokens; the official code holds the matrix and several of its masks); above,
    O(n) beyond ``x`` (``BLOCK_ROWS x n`` distances at a time), the distances computed twice, each entry the dense
    formula's float, so the scores are the same."""
    return _dpc(x, k, generator, max_matrix_bytes)[0]


def dpc_knn(x: torch.Tensor, n_clusters: int, k: int, generator: torch.Generator | None = None,
            max_matrix_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peaks clustering with k-nearest-neighbour density (DPC-KNN, as in SparseVLM's
    ``utils.cluster_and_merge`` and TCFormer): the ``n_clusters`` tokens with the largest ``dpc_scores`` are the
    centres; every token joins its nearest centre (a centre joins itself).

    Returns ``(centres [n_clusters], assignment [n])``: centre indices into ``x`` in score order, and each token's
    cluster (an index into ``centres``). Memory as ``dpc_scores`` (above the budget a third pass over the distance
    blocks assigns the tokens)."""
    n_clusters = min(n_clusters, x.shape[0])
    score, blocks = _dpc(x, k, generator, max_matrix_bytes)
    centres = torch.topk(score, n_clusters).indices
    assignment = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start, stop, dist in blocks():
        assignment[start:stop] = dist[:, centres].argmin(-1)
    assignment[centres] = torch.arange(n_clusters, device=x.device)
    return centres, assignment


def cluster_merge(x: torch.Tensor, n_clusters: int, k: int, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """PruneVid's ``spatial_merge_tokens``: DPC-KNN centres (``dpc_knn``), every token averaged into its
    cluster. x: ``[n, D]``. Returns ``(centres [n_clusters], means [n_clusters, D] fp32, members)``: clusters in
    centre order (descending DPC score, as the official code emits them, not spatial order), each one's centre and
    member indices into ``x`` (ascending; a centre is its own member, so none is empty)."""
    centres, assignment = dpc_knn(x, n_clusters, k, generator)
    members = [(assignment == c).nonzero().flatten() for c in range(len(centres))]
    means = torch.stack([x[m].float().mean(0) for m in members])
    return centres, means, members
