"""Video primitives shared by the video methods (FastVID, DyCoke, FrameFusion, ...): a video's tokens as a frame
table, frame-level temporal segmentation, per-location temporal similarity (frame pairs; chains of one location
over time), the anchor merge and the run merge into a chain's predecessor. Pure functions on one
video's tokens; DPC-KNN lives in ``clustering``. Specification: ``shared/research/methods_video.md`` section 4.

A "frame" is what the token layout calls one (``VisualSpan.frame``): a video frame on LLaVA-OneVision, a temporal
slice of ``temporal_patch_size`` frames on Qwen-VL. An image is a video of one frame.
"""
from __future__ import annotations

import torch


def frame_table(span, ids: torch.Tensor, method: str) -> torch.Tensor:
    """``[F, N]``: the candidates of one video (or image) laid out by frame, each frame's tokens in raster order.

    span: the ``VisualSpan``; ids: ``[c]`` the candidates' indices within the span (``SpanCandidates.ids``).
    Entries are indices into ``ids``. An image is one frame of all its candidates. Raises ``ValueError`` naming
    ``method`` when the frames hold different numbers of candidates (a layout the frame-based rules cannot use)."""
    ids = ids.cpu()
    if span.kind != "video":
        return torch.argsort(ids)[None]
    frames = span.frame.cpu()[ids]
    order = torch.argsort(frames * (int(ids.max()) + 1) + ids)
    counts = torch.bincount(frames)
    counts = counts[counts > 0]
    if len(counts.unique()) != 1:
        raise ValueError(f"vtr: {method} needs the same number of candidate tokens in every frame of a video, got "
                         f"{counts.tolist()} (frames of different sizes, or tokens already removed)")
    return order.view(len(counts), int(counts[0]))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dim, fp32 (zero vectors give 0)."""
    a, b = a.float(), b.float()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)


def adjacent_similarity(g: torch.Tensor) -> torch.Tensor:
    """``[F - 1]``: cosine similarity of consecutive frame descriptors ``g`` ``[F, C]``."""
    return cosine(g[:-1], g[1:])


def segments_from_cuts(n_frames: int, cuts) -> list[tuple[int, int]]:
    """Consecutive runs ``[(start, end)]`` (end exclusive); a cut at ``f`` ends a run at frame ``f``."""
    bounds = [0] + [int(c) + 1 for c in sorted(set(int(c) for c in cuts))] + [n_frames]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def dynamic_segments(sims: torch.Tensor, min_segments: int, threshold: float) -> list[tuple[int, int]]:
    """FastVID's DySeg: cut after frame ``f`` where ``sims[f]`` (similarity of frames f and f+1) is one of the
    ``min_segments - 1`` smallest, or below ``threshold``. ``sims``: ``[F - 1]``. A video with fewer frames than
    ``min_segments`` gets every cut (one frame per segment; the official code needs F >= c). Ties among the
    smallest go to the earlier frame. Returns ``[(start, end)]`` covering the frames in order."""
    n = len(sims) + 1
    forced = min(min_segments - 1, len(sims))
    order = torch.argsort(sims.double(), stable=True)[:max(forced, 0)]
    cuts = set(order.tolist()) | set((sims < threshold).nonzero().flatten().tolist())
    return segments_from_cuts(n, cuts)


def location_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N]``: cosine similarity of the tokens at the same spatial location of two frames ``[N, D]`` (DyCoke's
    temporal comparison)."""
    return cosine(a, b)


def anchor_merge(targets: torch.Tensor, members: torch.Tensor, assign: torch.Tensor, beta: float) -> torch.Tensor:
    """FastVID's density-based token merge: ``out_t = w_t * target_t + (1 - w_t) * mean(members of t)`` with
    ``w_t = max(1 / (n_t + 1), beta)`` and ``n_t`` the members assigned to ``t``; a target with no
    member is returned unchanged (``w = 1``).

    targets: ``[C, D]``; members: ``[M, D]``; assign: ``[M]`` index into targets of each member. fp32."""
    targets, members = targets.float(), members.float()
    sums = torch.zeros_like(targets).index_add_(0, assign, members)
    n = torch.bincount(assign, minlength=len(targets)).to(targets)
    w = torch.maximum(1.0 / (n + 1), torch.full_like(n, beta))
    mean = sums / n.clamp(min=1)[:, None]
    return torch.where((n > 0)[:, None], w[:, None] * targets + (1 - w[:, None]) * mean, targets)


def chain_ids(span, ids: torch.Tensor) -> torch.Tensor:
    """``[c]`` the chain of each candidate (``ids``: a video's present tokens, indices within ``span``): its spatial
    location (row, column) in its frame (Qwen-VL: temporal slice)."""
    ids = ids.cpu()
    row, col = span.row.cpu()[ids], span.col.cpu()[ids]
    return row * (int(col.max()) + 1) + col


def chain_similarity(hidden: torch.Tensor, chain: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sim ``[c]``, prev ``[c]``): each token's cosine similarity with the previous token of its chain and that
    token's index (``-2`` and ``-1`` for a chain's first token). ``hidden``: ``[c, D]`` in sequence (frame) order;
    ``chain``: ``[c]`` chain ids (``chain_ids``; None: every token its own chain). fp32 similarities."""
    c = hidden.shape[0]
    sims = torch.full((c,), -2.0, dtype=torch.float32, device=hidden.device)
    prev = torch.full((c,), -1, dtype=torch.long, device=hidden.device)
    if chain is None or c < 2:
        return sims, prev
    chain = chain.to(hidden.device)
    order = torch.argsort(chain * c + torch.arange(c, device=hidden.device))
    follows = chain[order][1:] == chain[order][:-1]
    after, before = order[1:][follows], order[:-1][follows]
    prev[after] = before
    sims[after] = cosine(hidden[after], hidden[before]).float()
    return sims, prev


def merge_runs(hidden: torch.Tensor, prev: torch.Tensor, members: torch.Tensor):
    """Average every maximal run of ``members`` along a chain into the chain token just before the run, equal
    weights. hidden: ``[c, D]``; prev: ``[c]`` (``chain_similarity``); members: ``[c]`` bool, never a chain's first
    token. Returns (kept ``[c - |M|]``, anchors ``[a]`` (a subset of kept), their states ``[a, D]`` fp32, and per
    anchor the merged tokens, itself included, ascending), indices into the candidates."""
    c = hidden.shape[0]
    # a member points to its predecessor, others to themselves; pointer doubling reaches each run's anchor
    anchor = torch.where(members, prev.to(members.device), torch.arange(c, device=members.device))
    while True:
        jumped = anchor[anchor]
        if torch.equal(jumped, anchor):
            break
        anchor = jumped
    merged = members.nonzero().flatten()
    targets = anchor[merged]
    anchors = targets.unique()
    sums = hidden.float()[anchors].clone()
    where = torch.searchsorted(anchors, targets)
    sums.index_add_(0, where, hidden.float()[merged])
    counts = 1 + torch.bincount(where, minlength=len(anchors)).to(sums)
    sources = [torch.cat([a.view(1), merged[targets == a]]).sort().values for a in anchors]
    kept = (~members).nonzero().flatten()
    return kept, anchors, sums / counts[:, None], sources
