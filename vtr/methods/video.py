"""Video primitives shared by the video methods (FastVID, DyCoke, FrameFusion, ...): a video's tokens as a frame
table, frame-level temporal segmentation, per-location temporal similarity (frame pairs; chains of one location
over time), the anchor merge and the run merge into a chain's predecessor. Pure functions on one
video's tokens; DPC-KNN lives in ``clustering``. Specification: ``shared/research/methods_video.md`` section 4.

A "frame" is what the token layout calls one (``VisualSpan.frame``): a video frame on LLaVA-OneVision, a temporal
slice of ``temporal_patch_size`` frames on Qwen-VL. An image is a video of one frame.
"""
from __future__ import annotations

import torch

# The model classes with video inputs, for the methods that prune videos only (EVS, VidCom2).
VIDEO_MODELS = ("LlavaOnevisionForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                "Qwen3VLMoeForConditionalGeneration", "Qwen3_5ForConditionalGeneration",
                "Qwen3_5MoeForConditionalGeneration", "Glm4vForConditionalGeneration",
                "Glm4vMoeForConditionalGeneration")
NO_VIDEO = "it prunes videos only (images pass whole), and this model takes no video input."


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


def cosine(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cosine similarity along the last dim, in ``dtype``: fp32 by this formula (zero vectors give 0); another
    dtype (``score_dtype="model"``) with torch's ``cosine_similarity`` in that dtype, as the official code calls
    it."""
    if dtype != torch.float32:
        return torch.nn.functional.cosine_similarity(a.to(dtype), b.to(dtype), dim=-1)
    a, b = a.float(), b.float()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[M, C]``: cosine similarity of every row of ``a`` ``[M, D]`` with every row of ``b`` ``[C, D]``, as one
    matrix product of the normalised rows (no ``[M, C, D]`` intermediate), in ``dtype``; zero vectors give 0."""
    a, b = a.to(dtype), b.to(dtype)
    a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return a @ b.T


def adjacent_similarity(g: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[F - 1]``: cosine similarity of consecutive frame descriptors ``g`` ``[F, C]``, in ``dtype``."""
    return cosine(g[:-1], g[1:], dtype)


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


def location_similarity(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., N]``: cosine similarity of the tokens at the same spatial location of two frames ``[N, D]`` (DyCoke's
    temporal comparison), or of two stacks of frames ``[F, N, D]`` frame by frame (HoliTom's consecutive frames:
    ``location_similarity(E[:-1], E[1:])``, ``[F - 1, N]``), in ``dtype``."""
    return cosine(a, b, dtype)


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


def embedding_signals(E: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback frame signals of FastVID and HoliTom, from the frames' language-model input embeddings ``E``
    ``[F, N, D]``: ``(G [F, D], A [F, N])``, ``G_f`` the frame's mean embedding and ``A_f`` the softmax over the
    frame's tokens of ``<G_f, E_f,n> / sqrt(D)`` (the Qwen2.5-VL mean-query attention rule applied to the language
    model's inputs, standing in for vision-tower attention vtr cannot read for video frames). In ``dtype`` (the
    softmax itself in fp32, as eager attention, then cast)."""
    E = E.to(dtype)
    G = E.mean(1)
    A = torch.softmax(torch.einsum("fd,fnd->fn", G, E) / E.shape[-1] ** 0.5, -1, dtype=torch.float32).to(dtype)
    return G, A


def static_windows(static: torch.Tensor, max_window: int = 1024) -> tuple[list[tuple[int, int]], int]:
    """HoliTom's temporal segmentation by dynamic programming (``select_static_windows``).

    static: ``[F - 1, N]`` bool, True where location ``n`` is similar enough between frames ``t`` and ``t + 1``
    (similarity above the threshold). A window of frames ``[s, e]`` saves ``|Omega| * (e - s)`` tokens, ``Omega``
    the locations static across every pair of the window (merged into one token each). ``dp[i]`` = the most tokens
    saved over frames ``0..i``: frame ``i`` alone (``dp[i - 1]``) or a window of ``w = 2..min(i + 1, max_window)``
    frames ending at ``i`` (``dp[i - w] + saved``), options in that order and replaced only when strictly larger
    (ties keep the shorter window). Returns (windows ``[(start, end)]`` inclusive, in frame order; total saved)."""
    n_frames = static.shape[0] + 1
    best = [0] * (n_frames + 1)  # best[i + 1] = dp[i]; best[0] = dp[-1] = 0
    choice = [1] * n_frames
    for i in range(n_frames):
        best[i + 1], choice[i] = best[i], 1
        common = torch.ones(static.shape[1], dtype=torch.bool, device=static.device)
        for w in range(2, min(i + 1, max_window) + 1):
            common = common & static[i - w + 1]  # pairs (i - w + 1, i - w + 2) ... (i - 1, i)
            saved = int(common.sum()) * (w - 1)
            if best[i + 1 - w] + saved > best[i + 1]:
                best[i + 1], choice[i] = best[i + 1 - w] + saved, w
    windows, i = [], n_frames - 1
    while i >= 0:
        windows.append((i - choice[i] + 1, i))
        i -= choice[i]
    return windows[::-1], best[n_frames]


def center_merge(centers: torch.Tensor, members: torch.Tensor, assign: torch.Tensor, beta: float | None
                 ) -> torch.Tensor:
    """HoliTom's static-token merge: ``beta * center + (1 - beta) * mean(members)``; ``beta=None`` (the official
    ``NO_BETA``): the plain mean of the center and its members. A center without members is unchanged.

    centers: ``[C, D]``; members: ``[M, D]`` the non-center tokens; assign: ``[M]`` index into centers. fp32."""
    centers, members = centers.float(), members.float()
    sums = torch.zeros_like(centers).index_add_(0, assign, members)
    n = torch.bincount(assign, minlength=len(centers)).to(centers)[:, None]
    if beta is None:
        return (centers + sums) / (n + 1)
    return torch.where(n > 0, beta * centers + (1 - beta) * sums / n.clamp(min=1), centers)


def runs(labels) -> list[tuple[int, int]]:
    """Maximal runs of equal consecutive labels ``[(start, end)]`` (end exclusive)."""
    labels = [int(x) for x in labels]
    out, start = [], 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or labels[t] != labels[start]:
            out.append((start, t))
            start = t
    return out


def refine_clusters(labels) -> list[int]:
    """PruneVid's contiguity repair of frame cluster labels (``refine_clusters``; ``[T]`` ints, returns a list).

    Per cluster, every run of the longest length is kept (ties: all of them) and its other runs are freed; a
    cluster whose longest run is a single frame is freed whole. Then, left to right, each maximal stretch of freed
    frames takes the label of the longer of its two neighbouring runs in the labels as repaired so far (a run
    repaired earlier counts with its new label; equal lengths: the left one; one side missing: the other; none:
    label 0). Example: ``[0,0,1,0,0,2,2,2] -> [0,0,0,0,0,2,2,2]``."""
    labels = [int(x) for x in labels]
    n, out = len(labels), list(labels)
    for label in set(labels):
        spans = [(a, b) for a, b in runs(labels) if labels[a] == label]
        longest = max(b - a for a, b in spans)
        for a, b in spans:
            if longest == 1 or b - a != longest:
                out[a:b] = [-1] * (b - a)
    t = 0
    while t < n:
        if out[t] != -1:
            t += 1
            continue
        start = t
        while t < n and out[t] == -1:
            t += 1
        left = right = None
        left_len = right_len = 0
        if start > 0:
            left, j = out[start - 1], start - 1
            while j >= 0 and out[j] == left:
                j -= 1
            left_len = start - 1 - j
        if t < n:
            right, j = out[t], t
            while j < n and out[j] == right:
                j += 1
            right_len = j - t
        if left_len > right_len:
            new = left
        elif right_len > left_len:
            new = right
        else:
            new = left if left is not None else right
        out[start:t] = [0 if new is None else new] * (t - start)
    return out


def window_similarity(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N]``: PruneVid's per-location similarity of a window ``frames`` ``[W, N, D]``: the mean over ordered
    pairs of distinct frames of the cosine similarity at that location, as ``(sum over all pairs - W) / (W (W-1))``
    (the official formula: it takes every self-similarity as exactly 1). NaN for ``W = 1`` (no pair), which the
    static test ``> tau`` reads as dynamic. In ``dtype``."""
    W = frames.shape[0]
    x = torch.nn.functional.normalize(frames.to(dtype), dim=-1)
    total = torch.einsum("wnd,vnd->n", x, x)
    return (total - W) / (W * (W - 1)) if W > 1 else torch.full_like(total, float("nan"))


def chain_ids(span, ids: torch.Tensor) -> torch.Tensor:
    """``[c]`` the chain of each candidate (``ids``: a video's present tokens, indices within ``span``): its spatial
    location (row, column) in its frame (Qwen-VL: temporal slice)."""
    ids = ids.cpu()
    row, col = span.row.cpu()[ids], span.col.cpu()[ids]
    return row * (int(col.max()) + 1) + col


def chain_similarity(hidden: torch.Tensor, chain: torch.Tensor | None, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sim ``[c]``, prev ``[c]``): each token's cosine similarity with the previous token of its chain and that
    token's index (``-2`` and ``-1`` for a chain's first token). ``hidden``: ``[c, D]`` in sequence (frame) order;
    ``chain``: ``[c]`` chain ids (``chain_ids``; None: every token its own chain). Similarities in ``dtype``."""
    c = hidden.shape[0]
    sims = torch.full((c,), -2.0, dtype=dtype, device=hidden.device)
    prev = torch.full((c,), -1, dtype=torch.long, device=hidden.device)
    if chain is None or c < 2:
        return sims, prev
    chain = chain.to(hidden.device)
    order = torch.argsort(chain * c + torch.arange(c, device=hidden.device))
    follows = chain[order][1:] == chain[order][:-1]
    after, before = order[1:][follows], order[:-1][follows]
    prev[after] = before
    sims[after] = cosine(hidden[after], hidden[before], dtype)
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
