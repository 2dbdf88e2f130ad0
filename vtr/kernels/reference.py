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


# Selection at video scale (16k-32k visual tokens): no selection materialises an n x n matrix beyond one block.
# Up to BLOCK_ROWS tokens (an image) the dense matrix IS one block and is computed as before; above it, distances
# and similarities are computed BLOCK_ROWS rows at a time and reduced online (min, max, argmax, top-k), so the
# extra memory is O(BLOCK_ROWS * n), linear in n. Each block is one matrix product of at least MIN_GEMM_ROWS rows
# against all columns: BLAS libraries compute an entry of a row block bit for bit as the full product does (they
# switch to a matrix-vector kernel, with other rounding, for 1-3 rows, hence the padding), so block reductions
# give the dense formula's values. The greedy loops (DivPrune, CDPruner's DPP) need one new row per pick; above
# one block that row is a matrix-vector product (a padded 8-row product costs ~10x more on CPU, a 30-minute loop
# at 32k tokens), equal to the dense entries up to the last bit: selections are the dense formula's unless two
# candidates' distances lie within that rounding (tests/test_scaling_memory.py: equal on random inputs larger
# than a block and on exactly representable ties).
BLOCK_ROWS = 1024
MIN_GEMM_ROWS = 8
# The largest N x N matrix (bytes) a selection holds by default (DivPrune's distances, CDPruner's kernel,
# VisPruner's similarities): 1 GiB, an fp32 matrix over 16,384 tokens. Within it the selection holds the matrix, as
# the official code does (which holds two or three of them), and reads its rows; above it, it works in blocks of
# rows with O(N) extra memory, recomputing what a pick reads (one pass over the features per pick). Each method
# that uses it takes a ``matrix_mb`` option.
MATRIX_BYTES = 1 << 30


def fits(n: int, dtype: torch.dtype = torch.float32, budget: int | None = None) -> bool:
    """Whether an ``n x n`` matrix of ``dtype`` fits ``budget`` bytes (default ``MATRIX_BYTES``)."""
    budget = MATRIX_BYTES if budget is None else budget
    return n * n * torch.empty(0, dtype=dtype).element_size() <= budget


def row_products(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right.T`` for ``left: [m, D]`` (m >= 1) and ``right: [n, D]``, returned ``[m, n]``, computed as a
    matrix product of at least ``MIN_GEMM_ROWS`` rows (``left`` padded with copies of its last row) so that every
    entry is the float the full product would hold."""
    m = left.shape[0]
    if m < MIN_GEMM_ROWS:
        left = torch.cat([left, left[-1:].expand(MIN_GEMM_ROWS - m, -1)])
    return (left @ right.T)[:m]


GRAM_BLOCK = 256


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ x.T`` for ``x: [N, D]``, ``[N, N]``. On the CPU, blocks of ``GRAM_BLOCK`` rows at and above the diagonal
    are multiplied and mirrored below it: the product is symmetric bit for bit (``x_i . x_j`` and ``x_j . x_i``
    sum the same products in the same order) and each block's entries are the full product's (``row_products``;
    every block multiplies at least ``GRAM_BLOCK`` columns, as a tiny product can take another kernel that rounds
    differently), so this is the full product's floats in about half the multiplications (the official
    selections multiply the whole matrix). On other devices one matrix product."""
    n = x.shape[0]
    if x.device.type != "cpu" or n <= 2 * GRAM_BLOCK:
        return row_products(x, x)
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for start, stop in row_blocks(n, GRAM_BLOCK):
        first = min(start, n - GRAM_BLOCK)  # the columns multiplied: from the diagonal, at least GRAM_BLOCK
        block = row_products(x[start:stop], x[first:])[:, start - first:]
        out[start:stop, start:] = block
        out[stop:, start:stop] = block[:, stop - start:].T
    return out


def row_blocks(n: int, block: int = BLOCK_ROWS):
    """``(start, stop)`` of consecutive row blocks covering ``range(n)``."""
    return ((s, min(s + block, n)) for s in range(0, n, block))


def unit_rows(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, D]``: the rows of ``x`` L2-normalised in ``dtype`` (eps 1e-8)."""
    return torch.nn.functional.normalize(x.to(dtype), dim=-1, eps=1e-8)


def cosine_distance(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``1 - cos(x_i, x_j)`` for ``x: [N, D]``, computed in ``dtype``. Returns ``[N, N]`` (the dense matrix:
    selection holds it only up to ``BLOCK_ROWS`` rows)."""
    unit = unit_rows(x, dtype)
    return 1 - unit @ unit.T


def nearest_other_distance(unit: torch.Tensor) -> torch.Tensor:
    """``[N]``: each row's cosine distance to its nearest other row (column-wise minimum of the distance matrix
    without its diagonal, as the dense formula takes it), ``BLOCK_ROWS`` rows at a time: O(N) memory, the dense
    formula's values."""
    n = unit.shape[0]
    nearest = torch.full((n,), float("inf"), dtype=unit.dtype, device=unit.device)
    for start, stop in row_blocks(n):
        block = 1 - row_products(unit[start:stop], unit)
        local = torch.arange(stop - start, device=unit.device)
        block[local, local + start] = float("inf")  # the diagonal: a row is not its own neighbour
        nearest = torch.minimum(nearest, block.amin(0))
    return nearest


def maxmin_start(x: torch.Tensor, dtype: torch.dtype = torch.float32, max_matrix_bytes: int | None = None):
    """What both greedy max-min implementations start from: ``(unit rows, nearest-other distances [N], dist)``
    where ``dist`` is the dense ``[N, N]`` distance matrix when it fits ``max_matrix_bytes`` (default
    ``MATRIX_BYTES``; the rows of later picks are read from it; its diagonal holds +inf, which no pick reads) and
    None above (each pick's row is computed: ``1 - unit @ unit[j]``). The dense matrix is the only ``N x N``
    allocation (built in place)."""
    unit = unit_rows(x, dtype)
    n = unit.shape[0]
    if fits(n, dtype, max_matrix_bytes):
        dist = gram(unit).neg_().add_(1)  # 1 - cos, the same floats as ``1 - unit @ unit.T``
        dist.diagonal().fill_(float("inf"))  # a row is not its own neighbour
        return unit, dist.amin(0), dist
    return unit, nearest_other_distance(unit), None


def greedy_maxmin(x: torch.Tensor, k: int, dtype: torch.dtype = torch.float32,
                  max_matrix_bytes: int | None = None) -> torch.Tensor:
    """Greedy max-min diversity selection (DivPrune) over the rows of ``x: [N, D]``.

    The first pick is the row farthest from its nearest other row; each next pick is the row whose distance to the
    picked set (its nearest picked row) is largest. Distance is cosine distance in ``dtype``; ties go to the
    lowest index. Returns ``[k]`` long: the picks in selection order.

    Memory: the ``N x N`` distance matrix while it fits ``max_matrix_bytes`` (default ``MATRIX_BYTES``, 1 GiB:
    16,384 tokens in fp32; official DivPrune holds three such matrices): time O(N^2 D) for the matrix plus O(k N)
    for the steps, each reading one row of it (the official loop re-reduces every picked row at each step,
    O(k^2 N)). Above the budget, O(N) beyond ``x``: the first pick reduces the distances ``BLOCK_ROWS`` rows at a
    time and each step computes the newest pick's row, O(k N D) more time (memory-bound: one read of ``x`` per
    pick). Both give the same picks (the same floats: ``row_products``)."""
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    unit, nearest, dist = maxmin_start(x, dtype, max_matrix_bytes)
    row = (lambda j: dist[j]) if dist is not None else (lambda j: 1 - unit @ unit[j])
    first = int(torch.argmax(nearest)) if n > 1 else 0
    picks = [first]
    picked = torch.zeros(n, dtype=torch.bool, device=x.device)
    picked[first] = True
    to_set = row(first).masked_fill(picked, float("-inf"))
    for step in range(1, k):
        nxt = int(torch.argmax(to_set))
        picks.append(nxt)
        if step == k - 1:
            break
        picked[nxt] = True
        # A mask rather than the pick list: O(N) per step whatever k (the list costs O(k) and a host copy).
        to_set = torch.minimum(to_set, row(nxt)).masked_fill_(picked, float("-inf"))
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
