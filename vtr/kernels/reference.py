"""Pure-PyTorch reference implementations. They define the semantics every fused kernel must reproduce."""
from __future__ import annotations

import torch


def compaction_index(keep: torch.Tensor) -> torch.Tensor:
    """Per-row indices of the kept slots, left-padded with -1 to the longest row.

    keep: ``[B, L]`` bool. Returns ``[B, L']`` long with ``L' = max_b keep[b].sum()``; row ``b`` ends with the
    ascending indices of its kept slots and starts with ``L' - keep[b].sum()`` entries of -1."""
    counts = keep.sum(1)
    width = int(counts.max()) if keep.shape[0] else 0
    # Stable sort puts kept slots last and in their original order.
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, keep.shape[1] - width:]
    slot = torch.arange(width, device=keep.device)
    return torch.where(slot >= width - counts[:, None], order, torch.full_like(order, -1))


def gather_rows(x: torch.Tensor, index: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """``out[b, i] = x[b, index[b, i]]`` along dim 1, ``fill`` where ``index`` is -1.

    x: ``[B|1, L, *]``; index: ``[B, L']``. Returns ``[B, L', *]``."""
    B, width = index.shape
    rows = torch.arange(B, device=index.device)[:, None] if x.shape[0] == B else torch.zeros_like(index[:, :1])
    out = x[rows, index.clamp(min=0)]  # row gather (advanced indexing), no expanded index tensor
    pad = (index < 0).view(B, width, *([1] * (x.dim() - 2)))
    return out.masked_fill(pad, fill) if bool(pad.any()) else out


def gather_positions(positions: torch.Tensor, index: torch.Tensor, fill: int = 1) -> torch.Tensor:
    """Gather position ids along the sequence (last) dim: ``[B|1, L]`` or M-RoPE ``[R, B|1, L]``."""
    if positions.dim() == 2:
        return gather_rows(positions.unsqueeze(-1), index, fill).squeeze(-1)
    return torch.stack([gather_positions(p, index, fill) for p in positions])


def attention_scores(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
                     reduce: str = "mean", q_positions: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Softmax attention of a few query rows over all keys, reduced over heads.

    q: ``[B, H, R, d]``; k: ``[B, H_kv, L, d]`` (grouped-query: head ``h`` reads kv head ``h // (H / H_kv)``);
    key_mask: ``[B, L]`` bool (False keys get no weight); q_positions: ``[B, R]`` slot of each query, for a causal
    row (keys after it get no weight), or None when every query sees every key. ``dtype``: the dtype of the logits
    and of the returned scores; the softmax itself is taken in fp32 over the full row (as transformers' eager
    attention does, which casts the probabilities back to the model dtype). Returns ``[B, R, L]`` (mean, sum or max
    over heads) or, with ``reduce="none"``, ``[B, H, R, L]``."""
    H, H_kv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // H_kv, dim=1)
    logits = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale  # [B, H, R, L]
    allowed = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).expand(q.shape[0], -1, -1)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    if q_positions is not None:
        allowed = allowed & (torch.arange(k.shape[2], device=q.device) <= q_positions[..., None])
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1, dtype=torch.float32).to(dtype)
    if reduce == "mean":
        return probs.mean(1)
    if reduce == "sum":
        return probs.sum(1)
    if reduce == "max":
        return probs.amax(1)
    if reduce == "none":
        return probs
    raise ValueError(f"unknown head reduction {reduce!r}")


def cosine_distance(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``1 - cos(x_i, x_j)`` for ``x: [N, D]``, computed in ``dtype``. Returns ``[N, N]``."""
    unit = torch.nn.functional.normalize(x.to(dtype), dim=-1, eps=1e-8)
    return 1 - unit @ unit.T


def greedy_maxmin(x: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Greedy max-min diversity selection (DivPrune) over the rows of ``x: [N, D]``.

    The first pick is the row farthest from its nearest other row; each next pick is the row whose distance to the
    picked set (its nearest picked row) is largest. Distance is cosine distance in ``dtype``; ties go to the
    lowest index. Returns ``[k]`` long: the picks in selection order."""
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    dist = cosine_distance(x, dtype)
    nearest_other = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf")).amin(0)
    first = int(torch.argmax(nearest_other)) if n > 1 else 0
    picks = [first]
    to_set = dist[first].clone()
    to_set[first] = float("-inf")
    for _ in range(k - 1):
        nxt = int(torch.argmax(to_set))
        picks.append(nxt)
        to_set = torch.minimum(to_set, dist[nxt])
        to_set[picks] = float("-inf")
    return torch.tensor(picks, dtype=torch.long, device=x.device)


def pivot_least_similar(x: torch.Tensor, pivots: torch.Tensor, pool: torch.Tensor, per_pivot: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DART duplication selection: for each pivot in the given order, take the ``per_pivot`` pool rows least
    cosine-similar to it; picked rows leave the pool, so later pivots cannot take them again.

    x: ``[M, D]`` features; pivots: ``[P]`` row indices (iteration order); pool: ``[C]`` candidate row indices.
    Ties go to the earlier pool entry; similarities in ``dtype``. Returns the picked row indices in pick order (at
    most ``P * per_pivot``)."""
    unit = torch.nn.functional.normalize(x.to(dtype), dim=-1, eps=1e-8)
    # One matrix product for all pivots (the fused kernel uses the same one, so both see the same floats).
    sims = unit[pivots] @ unit[pool].T  # [P, C]
    alive = torch.ones(len(pool), dtype=torch.bool, device=x.device)
    picked = []
    for i in range(len(pivots)):
        n = min(per_pivot, int(alive.sum()))
        if n <= 0:
            break
        sim = sims[i].masked_fill(~alive, float("inf"))
        # Ascending stable sort: least similar first, earlier pool entry first among equals.
        take = torch.sort(sim, stable=True).indices[:n]
        alive[take] = False
        picked.append(pool[take])
    if not picked:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat(picked)
