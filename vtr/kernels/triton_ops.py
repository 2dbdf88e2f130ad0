"""Fused Triton kernels, one per op of ``reference.py`` (same names, signatures and results).

The ops are small and latency-bound: each runs as one or two launches with no host round trip inside, and the
selection loops (DivPrune, DART) run entirely inside a single Triton program. Matrix products stay in torch
(cuBLAS) where the reference has them, so the selection kernels see bit-identical inputs.

Only Triton features that exist in triton 3.6 are used (load/store with masks, reductions, cumsum, loops).
On CPU these kernels run under ``TRITON_INTERPRET=1`` (set before this module is imported).
"""
from __future__ import annotations

import torch

from . import reference

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    AVAILABLE = False

__all__ = ["AVAILABLE", "attention_scores", "compaction_index", "gather_positions", "gather_rows", "greedy_maxmin",
           "pivot_least_similar"]

# Dtypes the gather kernel copies bit for bit (bool travels as uint8); anything else goes to the reference.
_COPYABLE = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16,
             torch.int32, torch.int64, torch.bool}
_REDUCE = {"mean": 0, "sum": 1, "max": 2}


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


if AVAILABLE:

    # ------------------------------------------------------------------------------------------------ gather
    @triton.jit
    def _gather_kernel(x_ptr, idx_ptr, out_ptr, fill_ptr, n_rows, width, F,
                       sxb, sxl, sxf, sob, sol, sof,
                       BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        # Tile = BLOCK_R output rows x BLOCK_F features; output row = (b, i) flattened over [B, width].
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        row_ok = rows < n_rows
        col_ok = cols < F
        src = tl.load(idx_ptr + rows, mask=row_ok, other=-1)  # int64 source row, -1 = fill
        b = (rows // width).to(tl.int64)
        i = (rows % width).to(tl.int64)
        cols64 = cols.to(tl.int64)
        take = (src >= 0)[:, None] & col_ok[None, :]
        vals = tl.load(x_ptr + (b * sxb + src * sxl)[:, None] + cols64[None, :] * sxf, mask=take)
        vals = tl.where(take, vals, tl.load(fill_ptr))
        tl.store(out_ptr + (b * sob + i * sol)[:, None] + cols64[None, :] * sof, vals,
                 mask=row_ok[:, None] & col_ok[None, :])

    # ------------------------------------------------------------------------------------------------ compaction
    @triton.jit
    def _compaction_kernel(keep_ptr, count_ptr, out_ptr, L, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        pad = width - tl.load(count_ptr + row).to(tl.int32)
        offs = tl.arange(0, BLOCK)
        for start in range(0, pad, BLOCK):  # leading -1 padding
            slot = start + offs
            tl.store(out_ptr + row * width + slot, tl.full([BLOCK], -1, tl.int64), mask=slot < pad)
        base = pad  # output slot of the next kept entry
        for start in range(0, L, BLOCK):
            pos = start + offs
            kept = tl.load(keep_ptr + row * L + pos, mask=pos < L, other=0).to(tl.int32)
            dest = base + tl.cumsum(kept, 0) - kept  # exclusive prefix sum
            tl.store(out_ptr + row * width + dest, pos.to(tl.int64), mask=kept != 0)
            base += tl.sum(kept, 0)

    # ------------------------------------------------------------------------------------------------ attention
    @triton.jit
    def _masked_logits(q_row, k_base, mask_base, limit, start, L, D, scale, skl, skd,
                       HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        """Logits of one query row against keys [start, start + BLOCK_L), -inf where not allowed."""
        keys = start + tl.arange(0, BLOCK_L)
        dims = tl.arange(0, BLOCK_D)
        ok = (keys < L) & (keys <= limit)
        kb = tl.load(k_base + keys.to(tl.int64)[:, None] * skl + dims[None, :] * skd,
                     mask=(keys < L)[:, None] & (dims < D)[None, :], other=0.0).to(tl.float32)
        if HAS_MASK:
            ok = ok & (tl.load(mask_base + keys, mask=keys < L, other=0) != 0)
        s = tl.sum(kb * q_row[None, :], 1) * scale
        return tl.where(ok, s, float("-inf")), ok

    @triton.jit
    def _softmax_stats_kernel(q_ptr, k_ptr, mask_ptr, pos_ptr, stats_ptr, H, R, L, D, G, scale,
                              sqb, sqh, sqr, sqd, skb, skh, skl, skd,
                              HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr,
                              BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        # Pass 1, one program per (b, h, r): online max / sum-of-exp over all key blocks.
        pid = tl.program_id(0)
        r = pid % R
        h = (pid // R) % H
        b = pid // (R * H)
        dims = tl.arange(0, BLOCK_D)
        q_row = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + r * sqr + dims * sqd,
                        mask=dims < D, other=0.0).to(tl.float32)
        k_base = k_ptr + b.to(tl.int64) * skb + (h // G).to(tl.int64) * skh
        limit = L
        if HAS_POS:
            limit = tl.load(pos_ptr + b * R + r)
        m = tl.max(tl.full([BLOCK_L], float("-inf"), tl.float32), 0)
        z = tl.sum(tl.zeros([BLOCK_L], tl.float32), 0)
        for start in range(0, L, BLOCK_L):
            s, ok = _masked_logits(q_row, k_base, mask_ptr + b * L, limit, start, L, D, scale, skl, skd,
                                   HAS_MASK, BLOCK_L, BLOCK_D)
            m_new = tl.maximum(m, tl.max(s, 0))
            # Guard -inf - -inf: while nothing is allowed yet z is 0 and the rescale factor is irrelevant.
            alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
            z = z * alpha + tl.sum(tl.where(ok, tl.exp(s - m_new), 0.0), 0)
            m = m_new
        tl.store(stats_ptr + 2 * pid, m)
        tl.store(stats_ptr + 2 * pid + 1, z)

    @triton.jit
    def _head_reduce_kernel(q_ptr, k_ptr, mask_ptr, pos_ptr, stats_ptr, out_ptr, H, H_kv, R, L, D, G, scale,
                            sqb, sqh, sqr, sqd, skb, skh, skl, skd,
                            REDUCE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr,
                            BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        # Pass 2, one program per (b, r, key block): recompute logits head by head, normalise with pass-1
        # stats, reduce over heads in registers; the output tile is owned by this program (no atomics).
        pid = tl.program_id(0)
        r = pid % R
        b = pid // R
        start = tl.program_id(1) * BLOCK_L
        dims = tl.arange(0, BLOCK_D)
        limit = L
        if HAS_POS:
            limit = tl.load(pos_ptr + b * R + r)
        acc = tl.zeros([BLOCK_L], tl.float32)
        if REDUCE == 2:
            acc = acc + float("-inf")
        for hk in range(0, H_kv):
            k_base = k_ptr + b.to(tl.int64) * skb + hk * skh
            for g in range(0, G):
                h = hk * G + g
                q_row = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + r * sqr + dims * sqd,
                                mask=dims < D, other=0.0).to(tl.float32)
                s, ok = _masked_logits(q_row, k_base, mask_ptr + b * L, limit, start, L, D, scale, skl, skd,
                                       HAS_MASK, BLOCK_L, BLOCK_D)
                row = (b * H + h) * R + r
                m = tl.load(stats_ptr + 2 * row)
                z = tl.load(stats_ptr + 2 * row + 1)
                p = tl.where(ok, tl.exp(s - m), 0.0) / z  # fully masked row: 0 / 0 = NaN, as the reference
                if REDUCE == 2:
                    acc = tl.where(p != p, p, tl.maximum(acc, p))  # NaN-propagating max, like torch.amax
                else:
                    acc += p
        if REDUCE == 0:
            acc = acc / H
        keys = start + tl.arange(0, BLOCK_L)
        tl.store(out_ptr + (b * R + r).to(tl.int64) * L + keys, acc, mask=keys < L)

    # ------------------------------------------------------------------------------------------------ DivPrune
    @triton.jit
    def _greedy_maxmin_kernel(dist_ptr, nearest_ptr, to_set_ptr, out_ptr, n, k, BLOCK: tl.constexpr):
        # The whole k-step selection in one program: to_set (distance of each row to the picked set, -inf
        # once picked) lives in a scratch vector; each step fuses "update with the newest pick" and "argmax".
        offs = tl.arange(0, BLOCK)
        best_val = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        best = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
        for start in range(0, n, BLOCK):  # first pick: argmax of the distance to the nearest other row
            idx = start + offs
            v = tl.load(nearest_ptr + idx, mask=idx < n, other=float("-inf"))
            tl.store(to_set_ptr + idx, tl.full([BLOCK], float("inf"), tl.float32), mask=idx < n)
            bv = tl.max(v, 0)
            bi = tl.argmax(v, 0, tie_break_left=True) + start
            better = bv > best_val  # strict: the earlier block wins ties
            best = tl.where(better, bi, best)
            best_val = tl.where(better, bv, best_val)
        tl.store(out_ptr, best.to(tl.int64))
        for step in range(1, k):
            tl.debug_barrier()  # to_set writes of the previous sweep are visible to every thread
            row = dist_ptr + best.to(tl.int64) * n
            nxt_val = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
            nxt = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
            for start in range(0, n, BLOCK):
                idx = start + offs
                inb = idx < n
                cur = tl.load(to_set_ptr + idx, mask=inb, other=float("-inf"))
                d = tl.load(row + idx, mask=inb, other=float("-inf"))
                cur = tl.where(idx == best, float("-inf"), tl.minimum(cur, d))
                tl.store(to_set_ptr + idx, cur, mask=inb)
                bv = tl.max(cur, 0)
                bi = tl.argmax(cur, 0, tie_break_left=True) + start
                better = bv > nxt_val
                nxt = tl.where(better, bi, nxt)
                nxt_val = tl.where(better, bv, nxt_val)
            best = nxt
            tl.store(out_ptr + step, best.to(tl.int64))

    @triton.jit
    def _maxmin_step_kernel(row_ptr, to_set_ptr, out_ptr, step, n, BLOCK: tl.constexpr):
        # One greedy step in one program: fold the newest pick's distance row (out[step - 1]) into the distance to
        # the picked set, mark the pick, and write the argmax (ties to the lowest index) to out[step]. Reads the
        # pick from device memory, so the host never waits for it.
        offs = tl.arange(0, BLOCK)
        best = tl.load(out_ptr + step - 1)
        nxt_val = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        nxt = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
        for start in range(0, n, BLOCK):
            idx = start + offs
            inb = idx < n
            cur = tl.load(to_set_ptr + idx, mask=inb, other=float("-inf"))
            d = tl.load(row_ptr + idx, mask=inb, other=float("-inf"))
            cur = tl.where(idx == best, float("-inf"), tl.minimum(cur, d))
            tl.store(to_set_ptr + idx, cur, mask=inb)
            bv = tl.max(cur, 0)
            bi = tl.argmax(cur, 0, tie_break_left=True) + start
            better = bv > nxt_val  # strict: the earlier block wins ties
            nxt = tl.where(better, bi, nxt)
            nxt_val = tl.where(better, bv, nxt_val)
        tl.store(out_ptr + step, nxt.to(tl.int64))

    # ------------------------------------------------------------------------------------------------ DART
    @triton.jit
    def _pivot_select_kernel(sim_ptr, pool_ptr, alive_ptr, out_ptr, P, C, per_pivot, BLOCK: tl.constexpr):
        # One program: pivot by pivot, per_pivot rounds of "argmin over alive pool entries" (= the first
        # entries of a stable ascending sort), each pick killed in the shared alive vector.
        offs = tl.arange(0, BLOCK)
        for start in range(0, C, BLOCK):
            idx = start + offs
            tl.store(alive_ptr + idx, tl.full([BLOCK], 1, tl.int8), mask=idx < C)
        remaining = C
        cursor = 0
        for p in range(0, P):
            sim_row = sim_ptr + p * C
            for j in range(0, tl.minimum(per_pivot, remaining)):
                tl.debug_barrier()  # the previous kill is visible to every thread
                low_val = tl.min(tl.full([BLOCK], float("inf"), tl.float32), 0)
                low = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
                for start in range(0, C, BLOCK):
                    idx = start + offs
                    inb = idx < C
                    alive = tl.load(alive_ptr + idx, mask=inb, other=0) != 0
                    s = tl.load(sim_row + idx, mask=inb, other=float("inf"))
                    s = tl.where(alive, s, float("inf"))
                    bv = tl.min(s, 0)
                    bi = tl.argmin(s, 0, tie_break_left=True) + start
                    better = bv < low_val  # strict: the earlier block wins ties
                    low = tl.where(better, bi, low)
                    low_val = tl.where(better, bv, low_val)
                tl.store(alive_ptr + low, 0)
                tl.store(out_ptr + cursor, tl.load(pool_ptr + low))
                cursor += 1
            remaining -= tl.minimum(per_pivot, remaining)


def gather_rows(x: torch.Tensor, index: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """``out[b, i] = x[b, index[b, i]]``, ``fill`` where ``index`` is -1. x: ``[B|1, L, *]``, index ``[B, L']``
    long; returns ``[B, L', *]``.

    Why: one 2-D tiled launch (rows x feature block) replaces the reference's gather + mask + masked_fill
    (three passes and a host sync on ``pad.any()``); a batch-1 ``x`` is broadcast with a zero batch stride."""
    B, width = index.shape
    if x.dtype not in _COPYABLE or x.dim() < 2 or x.shape[0] not in (1, B):
        return reference.gather_rows(x, index, fill)
    out = torch.empty(B, width, *x.shape[2:], dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = x.reshape(x.shape[0], x.shape[1], -1)  # a view unless the trailing dims cannot be flattened
    _gather(rows, index, out.view(B, width, -1), fill)
    return out


def gather_positions(positions: torch.Tensor, index: torch.Tensor, fill: int = 1) -> torch.Tensor:
    """Gather position ids along the last dim: ``[B|1, L]`` -> ``[B, L']`` or M-RoPE ``[R, B|1, L]`` ->
    ``[R, B, L']``.

    Why: the M-RoPE rows go through the gather kernel in one launch as a strided ``[B, L, R]`` view (the
    kernel takes arbitrary strides), instead of one launch per row plus a stack."""
    if positions.dim() == 2:
        return gather_rows(positions.unsqueeze(-1), index, fill).squeeze(-1)
    if positions.dtype not in _COPYABLE or positions.shape[1] not in (1, index.shape[0]):
        return reference.gather_positions(positions, index, fill)
    B, width = index.shape
    out = torch.empty(positions.shape[0], B, width, dtype=positions.dtype, device=positions.device)
    if out.numel():
        _gather(positions.permute(1, 2, 0), index, out.permute(1, 2, 0), fill)
    return out


def _gather(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor, fill) -> None:
    """x: ``[B|1, L, F]`` and out: ``[B, L', F]``, any strides."""
    B, width, F = out.shape
    # The fill value is converted by torch (exactly as masked_fill does; torch.full is a device-side fill, no
    # host-to-device copy) and read by the kernel.
    fill_t = torch.full((1,), fill, dtype=x.dtype, device=x.device)
    if x.dtype == torch.bool:  # Triton has no bool loads; copy the bytes
        x, out, fill_t = x.view(torch.uint8), out.view(torch.uint8), fill_t.view(torch.uint8)
    n_rows = B * width
    BLOCK_F = min(_pow2(F), 1024)
    BLOCK_R = min(_pow2(n_rows), max(1, 4096 // BLOCK_F))
    sxb = 0 if x.shape[0] == 1 else x.stride(0)
    grid = (triton.cdiv(n_rows, BLOCK_R), triton.cdiv(F, BLOCK_F))
    _gather_kernel[grid](x, index.contiguous(), out, fill_t, n_rows, width, F,
                         sxb, x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
                         BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F)


def compaction_index(keep: torch.Tensor) -> torch.Tensor:
    """keep ``[B, L]`` bool -> ``[B, L']`` long, ``L' = max_b keep[b].sum()``: each row is left-padded with -1
    and ends with the ascending indices of its kept slots.

    Why: one program per row scans ``keep`` block by block with an exclusive prefix sum and scatters each kept
    index straight to its slot, instead of the reference's full stable sort of every row; only ``L'`` (the
    output width) needs the host."""
    B, L = keep.shape
    counts = keep.sum(1)
    width = int(counts.max()) if B else 0
    out = torch.empty(B, width, dtype=torch.long, device=keep.device)
    if out.numel() == 0:
        return out
    BLOCK = min(_pow2(L), 4096)
    _compaction_kernel[(B,)](keep.contiguous().view(torch.uint8), counts, out, L, width, BLOCK=BLOCK)
    return out


def attention_scores(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
                     reduce: str = "mean", q_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of a few query rows over all keys (fp32), reduced over heads by mean/sum/max.

    q ``[B, H, R, d]``; k ``[B, H_kv, L, d]`` (head h reads kv head ``h // (H // H_kv)``); key_mask ``[B, L]``
    bool or None; q_positions ``[B, R]`` (causal: keys after it get no weight) or None. Returns ``[B, R, L]``
    fp32; a row with no allowed key is NaN, as in the reference.

    Why: the reference materialises ``[B, H, R, L]`` fp32 logits and probabilities (and repeats the kv heads);
    here pass 1 keeps only the online-softmax max and normaliser per (b, h, r) and pass 2 recomputes the logits
    per key block and reduces over heads in registers, so memory is ``O(B*H*R + B*R*L)``."""
    if reduce not in _REDUCE:
        raise ValueError(f"unknown head reduction {reduce!r}")
    B, H, R, D = q.shape
    H_kv, L = k.shape[1], k.shape[2]
    out = torch.empty(B, R, L, dtype=torch.float32, device=q.device)
    if H == 0:
        return reference.attention_scores(q, k, key_mask, scale, reduce, q_positions)
    if out.numel() == 0:
        return out
    stats = torch.empty(B * H * R, 2, dtype=torch.float32, device=q.device)  # (max, sum of exp) per row
    mask = key_mask.to(torch.uint8).contiguous() if key_mask is not None else out
    pos = q_positions.to(torch.long).contiguous() if q_positions is not None else out
    BLOCK_D = _pow2(D)
    BLOCK_L = min(_pow2(L), max(16, 8192 // BLOCK_D))
    common = (H, R, L, D, H // H_kv, float(scale), *q.stride(), *k.stride())
    flags = dict(HAS_MASK=key_mask is not None, HAS_POS=q_positions is not None, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    _softmax_stats_kernel[(B * H * R,)](q, k, mask, pos, stats, *common, **flags)
    _head_reduce_kernel[(B * R, triton.cdiv(L, BLOCK_L))](
        q, k, mask, pos, stats, out, H, H_kv, *common[1:], REDUCE=_REDUCE[reduce], **flags)
    return out


def greedy_maxmin(x: torch.Tensor, k: int, max_matrix_bytes: int | None = None) -> torch.Tensor:
    """DivPrune greedy max-min selection over the rows of ``x: [N, D]``; returns ``[min(k, N)]`` long, the picks
    in selection order (identical to the reference).

    Why: the distances come from the reference's own products (``maxmin_start``: the dense matrix while it fits
    ``max_matrix_bytes``, one cuBLAS matmul; above, blockwise with O(N) memory and one matrix-vector product per
    pick), so the selection sees the very same floats; the k sequential steps, which the reference drives from
    Python with ~4 launches and a host sync each, run inside ONE Triton program over the dense matrix, and as
    one program per step without it (the pick stays on the device: no host sync per step)."""
    n = x.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    unit, nearest, dist = reference.maxmin_start(x, max_matrix_bytes=max_matrix_bytes)
    out = torch.empty(k, dtype=torch.long, device=x.device)
    to_set = torch.empty(n, dtype=torch.float32, device=x.device)
    if dist is not None:
        _greedy_maxmin_kernel[(1,)](dist.contiguous(), nearest, to_set, out, n, k, BLOCK=min(_pow2(n), 2048),
                                    num_warps=8)
        return out
    out[0] = torch.argmax(nearest)
    to_set.fill_(float("inf"))
    for step in range(1, k):
        row = 1 - unit @ unit.index_select(0, out[step - 1:step])[0]  # the reference's matrix-vector product
        _maxmin_step_kernel[(1,)](row, to_set, out, step, n, BLOCK=min(_pow2(n), 2048), num_warps=8)
    return out


def pivot_least_similar(x: torch.Tensor, pivots: torch.Tensor, pool: torch.Tensor, per_pivot: int) -> torch.Tensor:
    """DART duplication selection. x ``[M, D]``; pivots ``[P]`` row indices in iteration order; pool ``[C]``
    candidate rows. For each pivot, the ``per_pivot`` least cosine-similar pool rows still alive (ties -> earlier
    pool entry) are picked and leave the pool. Returns the picked row indices in pick order,
    ``[min(P * per_pivot, C)]`` long.

    Why: all pivot-to-pool similarities come from one matmul (cuBLAS) instead of one mat-vec, sort and host sync
    per pivot; the inherently sequential greedy part runs in ONE Triton program (repeated argmin over the alive
    pool, which equals the first entries of the reference's stable ascending sort). The reference takes its
    similarities from the same matmul, so both order near-ties identically."""
    P, C = len(pivots), len(pool)
    total = min(P * max(int(per_pivot), 0), C)
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    unit = torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-8)
    sims = (unit[pivots] @ unit[pool].T).contiguous()  # [P, C]
    alive = torch.empty(C, dtype=torch.int8, device=x.device)
    out = torch.empty(total, dtype=torch.long, device=x.device)
    _pivot_select_kernel[(1,)](sims, pool.contiguous(), alive, out, P, C, int(per_pivot),
                               BLOCK=min(_pow2(C), 2048), num_warps=8)
    return out
