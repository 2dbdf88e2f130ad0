from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from . import video
from .. import compat
from .base import SEED, Merge, Method, Stage, choices
from .clustering import dpc_scores
from .registry import register


@register
@dataclass
class FastVID(Method):
    """FastVID (Shen et al., NeurIPS'25): dynamic temporal segmentation, then per frame salient tokens kept and the
    rest merged into density peaks of anchor frames; at the language model's input, original positions.

    Per video of ``F`` frames (Qwen-VL: temporal slices) of ``N`` candidate tokens each, with embeddings ``E``
    ``[F, N, D]`` (the language model's input), frame descriptors ``G`` and token salience ``A`` (below):

    1. DySeg: cut after frame ``f`` where ``cos(G_f, G_f+1)`` is among the ``segments - 1`` smallest or below
       ``threshold``.
    2. Retention ``r = 1 - ratio`` (``keep / n`` with ``keep``); ``R = max(1, floor(N * r))`` tokens per frame.
    3. ``variant="ov"`` (the OneVision "parallel" code, ``fastvid_llavaonevision``): ``C = floor(R * context_share)``
       context and ``S = R - C`` salient tokens per frame; in a segment of ``L`` frames the anchors are the frames
       ``j`` with ``(L - 1 - j) % anchor_stride == 0`` and each gets ``floor(C * L / ceil(L / anchor_stride))``
       context tokens, the other frames none. Targets: the top context count by DPC-KNN score (k = ``dpc_k``,
       itself included) over the anchor's non-salient tokens; every non-salient token of the segment (the anchor's
       own, targets included) joins its most cosine-similar target of that anchor (anchors independently: a token
       can feed several), and ``target = w * target + (1 - w) * mean(members)``, ``w = max(1 / (n + 1),
       anchor_weight)``.
       ``variant="qwen"`` (the Qwen2.5-VL "sequential" code, ``fastvid_qwen25vl``): per segment ``R * L`` tokens,
       ``C_seg = max(1, floor(R * L * context_share))``; inside the segment frames whose descriptor is at least
       ``ignore_threshold``-similar to the next one get no token (only the last frame of each such run is
       "valid"); salient tokens spread evenly over valid frames (the first ones get the remainder), context over
       every ``anchor_stride``-th valid frame counted from the end (the last anchors get the remainder); context
       per anchor at most ``N // 2``, salient per frame at most ``N - context``; members of an anchor's targets:
       every token of the segment except its salient tokens and that anchor's own targets (``n = 0``: unchanged).
    4. Salient tokens: top ``S`` of ``A_f`` per frame, kept unchanged.

    Keep count: the sum of the frames' salient and context counts (at most ``F * R``; ``handle.last`` reports it,
    and ``nominal_retention`` the ``r`` it came from). Merged targets keep their slot with the merged embedding
    (``handle.last.merged``: the tokens merged into each; not a partition). OneVision's trailing newline is never
    pruned. Positions: ``original`` (official: gap-preserving; Qwen-VL: the 3-D positions of the kept tokens).
    An image is a one-frame video (one segment, no merging across frames). Defaults by model: ``variant`` "qwen"
    on Qwen-VL, else "ov"; ``threshold`` 0.84 for "qwen", 0.9 for "ov" (the official scripts).
    Official code: ``LunarShen/FastVID`` (``Qwen2Model.forward`` "FastVID" block; Qwen2.5-VL
    ``Qwen2_5_VLForConditionalGeneration.forward``).

    Deliberate differences from the official code:
      * signals (option ``signals``; ``"auto"``, the default, takes the official ones wherever vtr can compute
        them): on Qwen2.5-VL videos, as the official code, ``A_f`` is the last ViT block's salience (per temporal
        slice: the mean query over the slice's patches against each 2x2 merge unit's mean key, both after the
        vision RoPE, softmax over the slice's units, mean over heads; computed from that block's captured input,
        in fp32 unless ``score_dtype="model"``, where the official code computes it in bf16 inside its
        FlashAttention call) and ``G_f`` the mean of the slice's merged embeddings; Qwen2-VL by the same rule (no
        official code). On LLaVA-OneVision videos the official ``G_f`` / ``A_f`` come from SigLIP's
        ``post_layernorm`` and attention-pooling (MAP) head, which the ``-hf`` checkpoints lack: pass
        ``siglip_head=`` a SigLIP vision model holding them (``SiglipVisionModel.from_pretrained(
        "google/siglip-so400m-patch14-384")``, which the official code loads too); they run on each frame's
        feature-layer output (the official 26-layer features): ``G_f`` the pooled output, ``A_f`` the probe's
        attention (mean over heads) pooled to the frame's tokens like the features (``apply_pooling``). Elsewhere
        (OneVision without the head, Qwen3-VL, images, ``signals="embedding"``) the documented fallback:
        ``G_f`` = the mean of the frame's language-model input embeddings (the official Qwen2.5-VL descriptor) and
        ``A_f`` = softmax over the frame's tokens of ``<mean(E_f), E_f,n> / sqrt(D)`` (the Qwen2.5-VL mean-query
        rule applied to the language model's inputs);
      * DPC-KNN in fp64 (official: fp32) with the density noise drawn from a generator seeded with ``seed``, fresh
        per video (reproducible, independent of the batch); the frame and token similarities and the fallback
        signals in fp32 unless ``score_dtype="model"``; merges in fp32;
      * a video with fewer frames than ``segments`` gets one segment per frame (official: needs F >= c); a
        context count larger than the anchor's non-salient tokens is capped at that number (official: topk
        error); ``R`` is at least 1; a video (or image) whose counts come to no token at all (``variant="qwen"``
        on one-token frames: its context cap ``N // 2`` is 0) keeps the most salient token of its last frame
        (official: none), as every method keeps at least one token per image;
      * batched (each row its own selection), several videos and images per prompt (official: batch 1, one video).
    """

    name: ClassVar[str] = "fastvid"
    summary: ClassVar[str] = "video: dynamic segments, salient tokens + density-peak anchor merges, at the LLM input"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    default_positions: ClassVar[str] = "original"

    variant: str | None = field(default=None, metadata=choices("ov", "qwen"))
    """Code path: "ov" (the official OneVision code: parallel salient/context split per frame) or "qwen" (the
    Qwen2.5-VL code: sequential, per segment); None picks by model."""
    segments: int = field(default=8, metadata={"min": 1})  # c
    """c: at most this many dynamic temporal segments (DySeg)."""
    threshold: float | None = None  # tau; None: 0.9 ("ov") or 0.84 ("qwen")
    """tau: consecutive frames less similar than this start a new segment; None: 0.9 ("ov") or 0.84 ("qwen"), the
    official scripts' values."""
    ignore_threshold: float = 0.95  # tau_ig ("qwen")
    """tau_ig ("qwen"): a frame at least this similar to the next one gets no token of its own."""
    context_share: float = field(default=0.4, metadata={"min": 0.0, "max": 1.0})  # d
    """d: share of each frame's (or segment's) retained tokens that are context (merged) tokens rather than salient
    ones."""
    anchor_stride: int = field(default=4, metadata={"min": 1})  # p
    """p: every p-th valid frame of a segment, counted from its end, is an anchor frame holding context tokens."""
    anchor_weight: float = field(default=0.6, metadata={"min": 0.0, "max": 1.0})  # beta
    """beta: weight of the density-peak target in its merge with its members."""
    dpc_k: int = field(default=4, metadata={"min": 1})
    """k of the DPC-KNN density score that picks the context targets (itself included)."""
    seed: int = field(default=0, metadata=SEED)
    """Seed of the DPC-KNN tie-breaking noise (fresh generator per video)."""
    signals: str = field(default="auto", metadata=choices("auto", "vision", "embedding"))
    """Frame descriptor and salience: "vision" (the official ones: Qwen-VL's last ViT block, or SigLIP's head on
    OneVision), "embedding" (the documented fallback from the language model's input embeddings) or "auto" (vision
    where vtr can compute it)."""
    siglip_head: torch.nn.Module | None = field(default=None, repr=False)  # OneVision: G and A from SigLIP's head
    """LLaVA-OneVision: a SigLIP vision model holding the post-layernorm and attention-pooling head the -hf
    checkpoints lack (e.g. SiglipVisionModel.from_pretrained("google/siglip-so400m-patch14-384"))."""

    def _check_options(self) -> None:
        super()._check_options()
        if self.siglip_head is not None:
            compat.vision_pooling_module(self.siglip_head)  # ValueError naming what it lacks

    @property
    def needs(self) -> frozenset:
        return frozenset({"vision"}) if self.signals == "vision" else frozenset()

    def for_model(self, family) -> FastVID:
        onevision = family.name == "llava_onevision"
        if self.siglip_head is not None and not onevision:
            raise ValueError(f"{self.name}: siglip_head gives the signals of LLaVA-OneVision's SigLIP tower; "
                             f"{family.name} has another vision tower")
        # Qwen2-VL / Qwen2.5-VL: the last ViT block's mean-query attention; OneVision: the SigLIP head, if given
        available = family.name == "qwen2_vl" or (onevision and self.siglip_head is not None)
        if self.signals == "vision" and not available:
            raise ValueError(f"{self.name}: signals='vision' needs " + (
                "siglip_head= (the SigLIP attention-pooling head, absent from the -hf LLaVA-OneVision checkpoints)"
                if onevision else "the Qwen2/2.5-VL vision transformer's video encoding, which this model lacks"))
        method = super().for_model(family)
        if method.signals == "auto":
            method = dataclasses.replace(method, signals="vision" if available else "embedding")
        variant = method.variant or ("qwen" if family.mrope else "ov")
        threshold = method.threshold if method.threshold is not None else (0.84 if variant == "qwen" else 0.9)
        return dataclasses.replace(method, variant=variant, threshold=threshold)

    @property
    def resolved(self) -> tuple[str, float]:
        """(variant, threshold) with the defaults of an unresolved method (outside ``vtr.patch``: "ov")."""
        variant = self.variant or "ov"
        return variant, self.threshold if self.threshold is not None else (0.84 if variant == "qwen" else 0.9)

    def budget_for(self, ctx, row, group):
        if self.ratio == 0 or len(group) == 0 or (self.keep is not None and self.keep >= len(group)):
            return len(group)
        return len(self.plan(ctx, row, group)[0])

    def select(self, ctx, row, group, budget):
        keep, targets, embeds, sources = self.plan(ctx, row, group)
        if not len(targets):
            return keep
        return Merge(keep=keep, slots=targets, embeds=embeds.to(ctx.hidden.dtype), sources=sources)

    def plan(self, ctx, row, group):
        """(keep ``[k]``, merged targets ``[m]``, their embeddings ``[m, D]``, their sources): indices into the
        group, computed once per stage."""
        def compute():
            table = video.frame_table(group.span, group.ids, self.name)
            signals = None
            if self.signals == "vision" and group.span.kind == "video":
                signals = ctx.video_pooling_head(row, group.span, self.siglip_head) if self.siglip_head is not None \
                    else (None, ctx.video_mean_query_attention(row, group.span))
                if signals[1].shape != table.shape:
                    raise RuntimeError(f"{self.name}: the vision tower's salience covers {tuple(signals[1].shape)} "
                                       f"frame tokens, the video's candidates {tuple(table.shape)}")
            return self.reduce(ctx.hidden[row, group.slots], table, self._retention(len(group)), signals,
                               ctx.score_dtype)
        # keyed by the group's first slot too: a tile (scope="crop") is planned on its own
        return ctx.cached(("fastvid", row, group.span.index, int(group.slots[0]), len(group)), compute)

    def _retention(self, n: int) -> float:
        return 1 - self.ratio if self.ratio is not None else min(1.0, self.keep / n)

    def reduce(self, embeds: torch.Tensor, table: torch.Tensor, r: float, signals=None,
               dtype: torch.dtype = torch.float32):
        """FastVID on one video: ``embeds`` ``[c, D]`` candidates, ``table`` ``[F, N]`` their frame layout, ``r``
        retention, ``signals`` ``(G [F, C], A [F, N])`` from the vision side (None, or a None entry: the embedding
        fallback's), ``dtype`` of the scores and similarities (merges in fp32, DPC-KNN in fp64). Returns (keep,
        targets, merged embeddings, sources), indices into the candidates."""
        device = embeds.device
        table = table.to(device)
        E = embeds.float()[table]  # [F, N, D]
        N = E.shape[1]
        G, A = video.embedding_signals(embeds[table], dtype)
        if signals is not None:
            G = G if signals[0] is None else signals[0].to(device)
            A = A if signals[1] is None else signals[1].to(device)
        sims = video.adjacent_similarity(G, dtype)
        variant, threshold = self.resolved
        segments = video.dynamic_segments(sims, self.segments, threshold)
        R = max(1, math.floor(N * r + 1e-9))
        generator = torch.Generator().manual_seed(self.seed)
        keep, targets, merged, sources = [], [], [], []
        for start, end in segments:
            plan = self._budgets(R, N, start, end, sims)
            none = torch.zeros(0, dtype=torch.long, device=device)
            salient = {f: none for f in range(start, end)}  # frames without tokens ("qwen" duplicates): none
            for f, (s_f, _) in plan.items():
                salient[f] = torch.topk(A[f], s_f).indices if s_f else none
                keep.append(table[f, salient[f]])
            rest = {f: _complement(salient[f], N) for f in range(start, end)}
            for f, (_, c_f) in plan.items():
                if c_f == 0:
                    continue
                U = rest[f]
                c_f = min(c_f, len(U))
                score = dpc_scores(E[f, U], self.dpc_k, generator)
                chosen = U[torch.topk(score.to(device), c_f).indices]
                if variant == "qwen":
                    chosen = chosen.sort().values
                if variant == "ov":
                    member_frames = [(g, rest[g]) for g in range(start, end)]
                else:  # every token of the segment but its salient ones and this anchor's own targets
                    member_frames = [(g, rest[g] if g != f else rest[g][~torch.isin(rest[g], chosen)])
                                     for g in range(start, end)]
                flat = torch.cat([table[g, idx] for g, idx in member_frames])
                vectors = torch.cat([E[g, idx] for g, idx in member_frames])
                t_vec = E[f, chosen]
                sim = video.cosine_matrix(vectors, t_vec, dtype)  # [M, C]
                assign = sim.argmax(1)
                own = {int(table[f, t]): j for j, t in enumerate(chosen.tolist())}
                for m, idx in enumerate(flat.tolist()):  # a target joins itself (cosine ties cannot move it)
                    if idx in own:
                        assign[m] = own[idx]
                merged.append(video.anchor_merge(t_vec, vectors, assign, self.anchor_weight))
                t_ids = table[f, chosen]
                targets.append(t_ids)
                keep.append(t_ids)
                for j, t in enumerate(t_ids.tolist()):
                    members = flat[assign == j]
                    sources.append(torch.cat([members.new_tensor([t]), members[members != t]]).sort().values)
        keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long, device=device)
        if not len(keep):  # the min-1 rule: the last frame's most salient token
            keep = table[-1, A[-1].argmax()].view(1)
        targets = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long, device=device)
        merged = torch.cat(merged) if merged else embeds.new_zeros(0, embeds.shape[-1]).float()
        return keep, targets, merged, sources

    def _budgets(self, R: int, N: int, start: int, end: int, sims: torch.Tensor) -> dict:
        """Frame -> (salient, context) counts of one segment ``[start, end)``; frames absent get nothing."""
        L, p = end - start, self.anchor_stride
        if self.resolved[0] == "ov":
            C = math.floor(R * self.context_share)
            S = R - C
            share = math.floor(C * L / math.ceil(L / p))
            return {start + j: (S, share if (L - 1 - j) % p == 0 else 0) for j in range(L)}
        total = R * L
        C_seg = max(1, math.floor(total * self.context_share))
        S_seg = total - C_seg
        valid = [f for f in range(start, end) if f == end - 1 or float(sims[f]) < self.ignore_threshold]
        V = len(valid)
        salient = [S_seg // V + (1 if i < S_seg % V else 0) for i in range(V)]
        anchors = valid[::-1][::p]  # every p-th valid frame, counted from the end
        n_a = len(anchors)
        context = {f: C_seg // n_a + (1 if i < C_seg % n_a else 0) for i, f in enumerate(anchors)}
        out = {}
        for f, s_f in zip(valid, salient):
            c_f = min(context.get(f, 0), N // 2)
            out[f] = (min(s_f, N - c_f), c_f)
        return out


def _complement(chosen: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=chosen.device)
    mask[chosen] = False
    return mask.nonzero().flatten()
