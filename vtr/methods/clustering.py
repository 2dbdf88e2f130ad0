"""Clustering primitives shared by merging methods (pure functions on one image's tokens)."""
from __future__ import annotations

import torch


def dpc_scores(x: torch.Tensor, k: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peaks scores (DPC-KNN, TCFormer's variant, as SparseVLM, FastVID, PruneVid and HoliTom use it).

    x: ``[n, D]`` token features. Distances are Euclidean divided by ``sqrt(D)``; density_i =
    ``exp(-mean of the squared distances to its k nearest tokens, itself included)`` plus ``U(0, 1) * 1e-6`` noise
    drawn from ``generator`` (ties broken reproducibly when it is seeded); delta_i = the distance to the nearest
    denser token (the largest distance overall for the densest). Returns ``(score [n] = delta * density,
    dist [n, n])``, fp64: densities of nearby tokens differ in the 7th digit, where the tie-breaking noise lives,
    so fp32 rounding alone would reorder them."""
    x = x.double()
    n, dim = x.shape
    dist = torch.cdist(x[None], x[None])[0] / dim ** 0.5
    nearest = torch.topk(dist, min(k, n), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(-1)).exp()
    density = density + torch.rand(n, generator=generator).to(density) * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).amin(-1)
    return delta * density, dist


def dpc_knn(x: torch.Tensor, n_clusters: int, k: int, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peaks clustering with k-nearest-neighbour density (DPC-KNN, as in SparseVLM's
    ``utils.cluster_and_merge`` and TCFormer): the ``n_clusters`` tokens with the largest ``dpc_scores`` are the
    centres; every token joins its nearest centre (a centre joins itself).

    Returns ``(centres [n_clusters], assignment [n])``: centre indices into ``x`` in score order, and each token's
    cluster (an index into ``centres``)."""
    n_clusters = min(n_clusters, x.shape[0])
    score, dist = dpc_scores(x, k, generator)
    centres = torch.topk(score, n_clusters).indices
    assignment = dist[:, centres].argmin(-1)
    assignment[centres] = torch.arange(n_clusters, device=x.device)
    return centres, assignment
