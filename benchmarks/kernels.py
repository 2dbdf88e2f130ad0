"""Kernel micro-benchmark: each hot-path op timed three ways on the same tensors.

* ``triton``    -- the fused kernel of ``vtr/kernels/triton_ops.py`` (only on CUDA with triton installed);
* ``reference`` -- the vectorised PyTorch reference of ``vtr/kernels/reference.py``, or for the selections that
  live in a method file (CDPruner's DPP, VisPruner's duplicate removal) vtr's own code;
* ``official``  -- a slow re-implementation of what the official method code does (Python loops over rows or
  tokens; FastV's full eager attention matrix; DivPrune's, CDPruner's and VisPruner's selection loops as their
  ``llava_arch.py`` writes them), written from the official code's semantics.

    python benchmarks/kernels.py [--device cuda|cpu] [--out results/kernels.json] [--quick] [--threads N]

GPU: CUDA events after warm-up, median of repeats. CPU: the process's CPU time (``time.process_time``) with one
torch thread unless ``--threads`` (what a machine shared with other work distorts least), and ``--quick`` is
implied (fewer repeats, batch 1 only for the heaviest official paths).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vtr.kernels import reference  # noqa: E402

# LLaVA-1.5: 576 visual tokens at slot 35 of a 640-token prompt. LLaVA-NeXT-like: 2880 visual tokens.
PROMPTS = {"llava-1.5": dict(L=640, s=35, N=576), "llava-next": dict(L=2944, s=35, N=2880)}
HIDDEN, HEADS, HEAD_DIM = 4096, 32, 128


# ------------------------------------------------------------------------------------------------ official paths
def official_gather(x, index, fill=0):
    """Per-row Python loop, kept rows by indexing, left padding by torch.cat, then a stack (LLaVA's own
    per-sample splice style)."""
    rows = []
    for b in range(index.shape[0]):
        idx = index[b][index[b] >= 0]
        src = x[b if x.shape[0] > 1 else 0, idx]
        pad = src.new_full((index.shape[1] - len(idx), *src.shape[1:]), fill)
        rows.append(torch.cat([pad, src]))
    return torch.stack(rows)


def official_compaction(keep):
    """Per-row nonzero, then -1 padding by torch.cat."""
    kept = [keep[b].nonzero().flatten() for b in range(keep.shape[0])]
    width = max(len(k) for k in kept)
    return torch.stack([torch.cat([k.new_full((width - len(k),), -1), k]) for k in kept])


def official_fastv(q_all, k, scale):
    """FastV with ``output_attentions=True``: the eager layer materialises the full causal ``[B, H, L, L]``
    attention (logits in the model dtype, softmax in fp32 cast back), then the last row is averaged over heads."""
    B, H, L, _ = q_all.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    logits = torch.matmul(q_all, k.transpose(-1, -2)) * scale
    causal = torch.full((L, L), float("-inf"), device=q_all.device, dtype=logits.dtype).triu(1)
    attn = (logits + causal).softmax(-1, dtype=torch.float32).to(q_all.dtype)  # [B, H, L, L]
    return attn.mean(1)[:, -1].float()  # [B, L]


def official_divprune(feats, k):
    """DivPrune's loop: full distance matrix, first pick by the second-smallest distance of each column, then every
    step recomputes the min over all picked rows with Python-level indexing (O(k^2 N))."""
    unit = feats.float() / feats.float().norm(dim=-1, keepdim=True)
    dist = 1 - unit @ unit.T
    picks = [int(torch.kthvalue(dist, 2, dim=0).values.argmax())]
    for _ in range(k - 1):
        min_to_set = dist[torch.tensor(picks, device=feats.device)].min(dim=0).values
        picks.append(int(min_to_set.argmax()))
    return picks


def official_cdpruner(feats, text, k):
    """CDPruner's ``encode_images`` on one image: normalised features in the features' dtype cast to fp32, the dense
    cosine similarity, relevance to the instruction embedding min-max normalised, the kernel ``r S r``, then
    ``k`` greedy steps, each subtracting the einsum of all previous Cholesky rows (O(k^2 N))."""
    unit = (feats / feats.norm(dim=-1, keepdim=True)).float()
    similarity = unit @ unit.T
    relevance = (unit @ (text / text.norm()).float()[:, None]).mean(-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    n = kernel.shape[0]
    cis = torch.zeros(k, n, device=feats.device)
    di2s = torch.diagonal(kernel).clone()
    picks = []
    for i in range(k):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kernel[j] - torch.einsum("t,tn->n", cis[:i, j], cis[:i])) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= torch.square(eis)
        di2s[j] = -float("inf")
    return picks


def official_vispruner(feats, order, target):
    """VisPruner's duplicate removal: each round gathers the remaining tokens' normalised features, multiplies the
    even half by the odd half, drops the (up to) 8 even tokens most similar to an odd one."""
    unit = feats / feats.norm(dim=-1, keepdim=True)
    residual = order
    while True:
        R = residual.shape[0]
        r = min(8, R - target)
        if r <= 0:
            return residual
        tokens = unit[residual]
        scores = (tokens[::2] @ tokens[1::2].T).max(-1).values
        distinct = torch.sort(scores, descending=True, stable=True).indices[r:]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])


def official_dart(h, pivot_set, pool_set, per_pivot):
    """DART's loop: Python sets, per pivot a cosine similarity to the remaining pool and a top-k of its negation."""
    retained, pool = set(pivot_set), set(pool_set)
    for p in list(retained):
        cand = list(pool)
        sim = F.cosine_similarity(h[p][None], h[cand], dim=-1)
        picked = [cand[i] for i in torch.topk(-sim, per_pivot).indices.tolist()]
        retained |= set(picked)
        pool -= set(picked)
    return retained


# ------------------------------------------------------------------------------------------------ timing
def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def make_timer(device, warmup, repeats):
    def cuda_time(fn):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def cpu_time(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn()
            times.append((time.process_time() - t0) * 1e3)
        return statistics.median(times)

    return cuda_time if device == "cuda" else cpu_time


def keep_mask(B, prompt, n_keep, device):
    """Text kept, ``n_keep`` random visual tokens kept per row (ragged across rows by a few tokens)."""
    L, s, N = prompt["L"], prompt["s"], prompt["N"]
    keep = torch.ones(B, L, dtype=torch.bool, device=device)
    keep[:, s:s + N] = False
    for b in range(B):
        keep[b, s + torch.randperm(N, device=device)[:n_keep - b % 4]] = True
    return keep


def cases(device, quick):
    """Yields (op, shape, inputs-builder, {way: callable}); callables return something comparable."""
    dtype = torch.bfloat16
    for name, prompt in PROMPTS.items():
        L, s, N = prompt["L"], prompt["s"], prompt["N"]
        for B in (1,) if quick and device == "cpu" and L > 1000 else (1, 8):
            keep = keep_mask(B, prompt, N // 3, device)
            index = reference.compaction_index(keep)
            x = torch.randn(B, L, HIDDEN, device=device, dtype=dtype)
            pos = torch.arange(L, device=device).expand(3, B, L)
            yield "compaction_index", f"{name} B={B} L={L}", dict(
                fn=lambda m, keep=keep: m.compaction_index(keep), official=lambda keep=keep: official_compaction(keep))
            yield "gather_rows", f"{name} B={B} [{L}->{index.shape[1]}, {HIDDEN}] bf16", dict(
                fn=lambda m, x=x, i=index: m.gather_rows(x, i), official=lambda x=x, i=index: official_gather(x, i))
            yield "gather_positions", f"{name} B={B} M-RoPE [3, {L}->{index.shape[1]}]", dict(
                fn=lambda m, p=pos, i=index: m.gather_positions(p, i),
                official=lambda p=pos, i=index: torch.stack([official_gather(r[..., None], i, 1)[..., 0] for r in p]))

            # FastV: last prompt token over all keys at layer K-1, mean over heads.
            q_all = torch.randn(B, HEADS, L, HEAD_DIM, device=device, dtype=dtype)
            k = torch.randn(B, HEADS, L, HEAD_DIM, device=device, dtype=dtype)
            valid = torch.ones(B, L, dtype=torch.bool, device=device)
            heavy = device == "cpu" and (L > 1000 or (quick and B > 1))  # [B, 32, L, L] on a 2-core CPU
            yield "attention_scores", f"{name} B={B} H=32 d=128 R=1 L={L}", dict(
                fn=lambda m, q=q_all[:, :, -1:], k=k, v=valid: m.attention_scores(q, k, v, HEAD_DIM ** -0.5)[:, 0],
                official=None if heavy else (lambda q=q_all, k=k: official_fastv(q, k, HEAD_DIM ** -0.5)))

    from vtr.methods.cdpruner import CDPruner, mean_similarity
    from vtr.methods.vispruner import remove_duplicates
    for name, prompt in PROMPTS.items():
        s, N = prompt["s"], prompt["N"]
        feats = torch.randn(N, HIDDEN, device=device, dtype=dtype)
        for k in ((64, 128, 192) if N == 576 else (320,)):
            yield "greedy_maxmin", f"{name} DivPrune k={k} of {N}", dict(
                fn=lambda m, f=feats, k=k: m.greedy_maxmin(f, k).tolist(),
                official=lambda f=feats, k=k: official_divprune(f, k))
        # CDPruner's conditional DPP (the language model's embeddings as the instruction: the kernel and the
        # loop are the official ones whatever the relevance's source) and VisPruner's duplicate removal (CLIP-L
        # features, 1024 wide), vtr's method code against the official loops
        text = torch.randn(HIDDEN, device=device)
        for k in ((64,) if N == 576 else (320,)):
            def vtr_cdpruner(f=feats.float(), k=k):
                method = CDPruner(keep=k, relevance="embeddings")
                unit = method._unit(f.float())  # the relevance to the text as CDPruner.select computes it
                raw = mean_similarity(unit, method._unit(text[None].float()), negate=False)
                return sorted(method._select(unit, None, raw, k).tolist())
            yield "cdpruner_dpp", f"{name} CDPruner k={k} of {N}", dict(
                fn=lambda m, run=vtr_cdpruner: run(), triton=False,
                official=lambda f=feats.float(), k=k: sorted(official_cdpruner(f, text, k)))
        clip = torch.randn(N, 1024, device=device)
        order = torch.randperm(N, device=device)
        target = N // 18  # ratio 0.889, half of the budget diverse
        yield "vispruner_dedup", f"{name} VisPruner {N - target}->{target} of {N}", dict(
            fn=lambda m, f=clip, o=order, t=target: remove_duplicates(
                torch.nn.functional.normalize(f, dim=-1), o[t:], t).tolist(), triton=False,
            official=lambda f=clip, o=order, t=target: official_vispruner(f, o[t:], t).tolist())

        # DART: 4 image + 4 text pivots (iterated in Python set order), pool = the other image tokens.
        L = prompt["L"]
        # fp32: the official code takes F.cosine_similarity in the model dtype; in bf16 its rounding alone reorders
        # near-equal similarities, which would hide whether the selections agree.
        h = torch.randn(L, HIDDEN, device=device)
        img_piv = (s + torch.randperm(N)[:4]).tolist()
        txt_piv = (s + N + torch.randperm(L - s - N)[:4]).tolist()
        pivot_set = set(img_piv + txt_piv)
        pool_list = [j for j in range(s, s + N) if j not in img_piv]
        pivots = torch.tensor(list(pivot_set), device=device)
        pool = torch.tensor(pool_list, device=device)
        for per_pivot in ((8, 15, 23) if N == 576 else (40,)):
            yield "pivot_least_similar", f"{name} DART 8 pivots, pool {len(pool_list)}, per_pivot {per_pivot}", dict(
                fn=lambda m, p=per_pivot: set(m.pivot_least_similar(h, pivots, pool, p).tolist()) | pivot_set,
                official=lambda p=per_pivot: official_dart(h, pivot_set, pool_list, p))


def agree(a, b):
    if isinstance(a, torch.Tensor):
        if a.is_floating_point():
            return bool(torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-3))  # official FastV is bf16
        return bool(torch.equal(a, b))
    return a == b


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/kernels.json")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shapes (implied on CPU)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--ops", default="", help="comma-separated ops to run (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on CPU: 1, timed in process CPU time)")
    args = parser.parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    quick = args.quick or args.device == "cpu"
    warmup, repeats = (1, 3) if quick else (5, 20)
    repeats = args.repeats or repeats
    torch.manual_seed(0)
    timer = make_timer(args.device, warmup, repeats)

    triton_ops = None
    if args.device == "cuda":
        from vtr.kernels import triton_ops
        if not triton_ops.AVAILABLE:
            triton_ops = None

    rows = []
    print(f"{'op':<20} {'shape':<52} {'triton ms':>10} {'ref ms':>10} {'official ms':>12} "
          f"{'ref/tri':>8} {'off/tri':>8} {'off/ref':>8}  agree")
    for op, shape, ways in cases(args.device, quick):
        if args.ops and op not in args.ops.split(","):
            continue
        ref_out = ways["fn"](reference)
        row = dict(op=op, shape=shape, triton_ms=None, reference_ms=timer(lambda: ways["fn"](reference)),
                   official_ms=None, triton_agrees=None, official_agrees=None)
        if triton_ops is not None and ways.get("triton", True):
            row["triton_agrees"] = agree(ways["fn"](triton_ops), ref_out)
            row["triton_ms"] = timer(lambda: ways["fn"](triton_ops))
        if ways["official"] is not None:
            row["official_agrees"] = agree(ways["official"](), ref_out)
            row["official_ms"] = timer(ways["official"])
        rows.append(row)

        def ratio(a, b):
            return f"{row[a] / row[b]:8.1f}" if row[a] is not None and row[b] else f"{'-':>8}"

        def ms(key, width):
            return f"{row[key]:{width}.3f}" if row[key] is not None else f"{'-':>{width}}"

        flags = "/".join("-" if row[f] is None else ("yes" if row[f] else "NO")
                         for f in ("triton_agrees", "official_agrees"))
        print(f"{op:<20} {shape:<52} {ms('triton_ms', 10)} {ms('reference_ms', 10)} {ms('official_ms', 12)} "
              f"{ratio('reference_ms', 'triton_ms')} {ratio('official_ms', 'triton_ms')} "
              f"{ratio('official_ms', 'reference_ms')}  {flags}", flush=True)

    meta = dict(
        device=args.device, quick=quick, warmup=warmup, repeats=repeats,
        timing="CUDA events, median" if args.device == "cuda" else "process CPU time (time.process_time), median",
        gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
        cpu=cpu_name(), cpu_threads=torch.get_num_threads(),
        python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
        triton=getattr(sys.modules.get("triton"), "__version__", None) if triton_ops else None,
        platform=platform.platform(),
        notes="agree: triton vs reference (selections identical, scores allclose) / official vs reference "
              "(same picks; DART compared as retained sets on fp32 features; FastV official is bf16 so allclose 2e-2); "
              "official timings skipped on CPU where they would take minutes (marked -); cdpruner_dpp and "
              "vispruner_dedup: 'ref' is vtr's method code (no Triton kernel)",
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
