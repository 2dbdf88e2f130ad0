from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from . import video
from .base import SEED, Merge, Method, Stage, StageSpec
from .clustering import cluster_merge, dpc_knn
from .registry import register

OFFICIAL_LAYER = 10  # selected_layer of the official 32-layer LLaMA-7B runs
OFFICIAL_DEPTH = 32
DPC_K = 7  # hard-coded in the official code, for frames and tokens
MIN_CLUSTERED = 14  # a set is clustered only when it holds more tokens than this (hard-coded)


@register
@dataclass
class PruneVid(Method):
    """PruneVid (Huang et al., ACL'25): temporal windows and static/dynamic token merging before the language model,
    then question-aware pruning inside it.

    Stage 1 (``pre_llm``), per video of ``F`` frames (Qwen-VL: temporal slices) of ``N`` candidate tokens each, on
    the language model's input embeddings ``E`` ``[F, N, D]``:

    1. frame clusters: DPC-KNN (k = 7, itself included) on the frame means ``mean_n E[f]`` with
       ``m = max(1, floor(F * temporal_segment_ratio))`` centres, each frame joining its nearest centre; the labels
       repaired by ``video.refine_clusters`` (longest runs kept, ties all kept, the rest relabelled from the longer
       neighbouring run); the windows are the runs of equal labels;
    2. per window of ``W`` frames: location ``n`` is static when the mean cosine similarity of its ``W (W-1)``
       ordered frame pairs exceeds ``tau`` (never for ``W = 1``); the static tokens are averaged over the window
       (one per location); static and each frame's dynamic tokens, when more than 14, are merged into
       ``floor(count * cluster_ratio)`` DPC-KNN clusters (k = 7; per-cluster mean, in centre order);
    3. the window emits ``[static, dynamic of frame 0, dynamic of frame 1, ...]``.

    Stage 2 (``layer``): at decoder layer ``layer`` (official ``selected_layer`` 10) the score of a visual token is
    ``softmax(q k^T / sqrt(d))`` from that layer's queries and keys BEFORE the rotary embedding and WITHOUT the causal
    mask, over every real token, max over heads, then max over the prompt's text tokens after the video (the row's
    last token when none follows). Per window, the top ``floor(s * alpha)`` of its ``s`` static tokens and, per
    frame, the top ``floor(d_f * alpha)`` of its ``d_f`` dynamic tokens are kept (at least one token per video);
    layers ``> layer`` run on them, and the KV caches of layers ``<= layer`` are cut to them after the prefill
    (as the official code does), so decoding attends to the kept tokens only, in every layer.

    Budget: ``alpha = 1 - ratio``: ``ratio`` is the fraction stage 2 removes (the official ``alpha = 0.4`` is
    ``ratio=0.6``); stage 1's reduction is adaptive (``tau``, the windows) and comes on top, so the overall
    retention is below ``1 - ratio``: ``handle.last`` reports the kept counts per stage (``stages``,
    ``input_retention``, ``layer_retention``) and ``nominal_retention`` (``1 - ratio``). ``ratio=0`` is the
    unpatched model (both stages keep every token; the record still lists them). ``keep=k`` instead:
    ``alpha = min(1, k / n)`` for a video of ``n`` candidate tokens (``k >= n``: that video stays whole; otherwise
    fewer than ``k`` remain, stage 1 merging first).

    Positions: stage 1 ``compact`` on 1-D RoPE (the official code rebuilds the sequence), each window's outputs in
    the official order in the first slots of the window; stage 2 keeps the positions stage 1 gave
    (gap-preserving, as the official code). With ``positions="original"`` (the only choice on Qwen-VL's M-RoPE)
    every stage-1 output takes the slot, hence the position, of a real token: a static token its centre's location
    in the window's first frame, a dynamic token its centre's own slot (in the window, outputs then come in
    sequence order). OneVision's trailing newline is never merged or pruned. An image is a one-frame video
    (every token dynamic, merged into clusters, then pruned per frame).

    Options (official defaults): ``temporal_segment_ratio`` 0.25, ``tau`` 0.8, ``cluster_ratio`` 0.5, ``layer``
    10 (None: 10 on models deeper than 11 layers, else the same fraction of a 32-layer model), ``seed`` of the
    DPC-KNN tie-breaking noise. Official code: ``Visual-AI/PruneVid`` (PLLaVA only:
    ``modeling_pllava.py: merge_frames_dynamic, refine_clusters, cluster_dpc_knn``, ``llama.py: LlamaModelVTP``,
    ``elastic_cache.py: VTPWindowCache``).

    Deliberate differences from the official code:
      * DPC-KNN in fp64 with the noise from a generator seeded with ``seed``, fresh per video (official: fp32,
        the global RNG); ``k = min(7, count)`` and at least one frame cluster (official: errors below 7 frames or
        4 frames);
      * similarities, the stage-2 attention and means in fp32 (official: the model dtype; ``score_dtype="model"``
        computes the similarities and the attention in it, with torch's ``cosine_similarity``; means stay fp32);
      * batched (each row and each video its own windows; official: batch element 0 decides the windows of the
        whole batch), several videos and images per prompt; the stage-2 softmax ignores padding keys;
      * one token per video at least after stage 2 (official: a window may lose every token);
      * models: LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-1.5/NeXT (images) with the same rules
        (official: PLLaVA only; the paper's OneVision numbers come from unreleased code).
    """

    name: ClassVar[str] = "prunevid"
    summary: ClassVar[str] = "video: temporal windows, static/dynamic cluster merging before the LLM + pre-RoPE " \
                             "text-attention pruning at layer 10"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    default_positions: ClassVar[str] = "compact"
    needs: ClassVar[frozenset] = frozenset({"attention_inputs"})
    needs_whole_prompt: ClassVar[bool] = True  # stage 2 reads the text after the video

    temporal_segment_ratio: float = field(default=0.25, metadata={"min": 0.0, "max": 1.0})
    """Frame clusters (temporal windows) per frame: max(1, floor(F * temporal_segment_ratio)) DPC-KNN centres."""
    tau: float = field(default=0.8, metadata={"min": -1.0, "max": 1.0})  # a cosine similarity
    """Mean cosine similarity across a window's frames above which a location is static."""
    cluster_ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """Static and per-frame dynamic token groups (above 14 tokens) are merged into floor(count * cluster_ratio) DPC-
    KNN clusters."""
    layer: int | None = field(default=None, metadata={"min": 0})  # attention of this layer; None: by depth
    """Decoder layer whose text-to-video attention drives stage 2 (official selected_layer 10); None: 10 on models
    deeper than 11 layers, else the same fraction of 32."""
    seed: int = field(default=0, metadata=SEED)
    """Seed of the DPC-KNN tie-breaking noise (fresh generator per video)."""

    def alpha(self, n: int) -> float:
        """Stage 2's keep share for a video of ``n`` candidate tokens: ``1 - ratio``, or ``min(1, keep / n)``."""
        return 1 - self.ratio if self.ratio is not None else min(1.0, self.keep / n)

    def stages(self) -> list[StageSpec]:
        layer = self.layer if self.layer is not None else OFFICIAL_LAYER
        return [StageSpec(Stage.PRE_LLM, 0), StageSpec(Stage.LAYER, layer + 1, positions="original", slice_earlier=True)]

    def for_depth(self, n_layers: int) -> PruneVid:
        if self.layer is not None:
            if not 0 <= self.layer <= n_layers - 2:
                raise ValueError(f"{self.name}: layer must be in [0, {n_layers - 2}] for this {n_layers}-layer "
                                 f"model (the layers after it run on the kept tokens), got {self.layer}")
            return self
        layer = OFFICIAL_LAYER if n_layers > OFFICIAL_LAYER + 1 else \
            max(0, min(n_layers - 2, OFFICIAL_LAYER * n_layers // OFFICIAL_DEPTH))
        return dataclasses.replace(self, layer=layer)

    # ------------------------------------------------------------------------------------------------- budget
    def budget_for(self, ctx, row, group):
        if self.ratio == 0 or len(group) == 0:
            return len(group)
        if ctx.spec.stage is Stage.PRE_LLM:
            if self.alpha(len(group)) >= 1:  # keep >= n: this video as the unpatched model has it
                ctx.request_state[("prunevid", row, group.span.offset)] = None
                return len(group)
            return len(self.plan(ctx, row, group)[0])
        return len(self.prune(ctx, row, group))

    def select(self, ctx, row, group, budget):
        if ctx.spec.stage is Stage.PRE_LLM:
            keep, slots, embeds, sources = self.plan(ctx, row, group)
            if not len(slots):
                return keep
            return Merge(keep=keep, slots=slots, embeds=embeds.to(ctx.hidden.dtype), sources=sources)
        return self.prune(ctx, row, group)

    # ------------------------------------------------------------------------------------------------ stage 1
    def plan(self, ctx, row, group):
        """Stage 1 for one video: (keep ``[k]``, replaced slots ``[m]``, their embeddings ``[m, D]``, their
        sources), indices into the group. Leaves each kept token's role for stage 2 in the request state."""
        def compute():
            table = video.frame_table(group.span, group.ids, self.name)
            out = self.merge(ctx.hidden[row, group.slots], table, self.positions != "original", ctx.score_dtype)
            keep, slots, embeds, sources, roles = out
            ctx.request_state[("prunevid", row, group.span.offset)] = (self.alpha(len(group)), {
                int(i): role for i, role in zip(group.ids[keep].tolist(), roles)})
            return keep, slots, embeds, sources
        return ctx.cached(("prunevid", row, group.span.index, int(group.slots[0]), len(group)), compute)

    def windows(self, frame_means: torch.Tensor, generator: torch.Generator | None = None) -> list[tuple[int, int]]:
        """The temporal windows ``[(start, end)]`` of a video from its frame means ``[F, D]``."""
        F = frame_means.shape[0]
        if F == 1:
            return [(0, 1)]
        m = max(1, math.floor(F * self.temporal_segment_ratio + 1e-9))
        _, labels = dpc_knn(frame_means, m, DPC_K, generator)
        return video.runs(video.refine_clusters(labels.tolist()))

    def merge(self, embeds: torch.Tensor, table: torch.Tensor, official_order: bool = True,
              dtype: torch.dtype = torch.float32):
        """Stage 1 on one video: ``embeds`` ``[c, D]`` candidates laid out as ``table`` ``[F, N]``. Returns (keep,
        replaced slots, their fp32 embeddings, their sources, roles): indices into the candidates; ``roles[i]`` is
        ``(window, -1)`` for a static and ``(window, frame in window)`` for a dynamic kept token ``keep[i]``.
        ``official_order``: the window's outputs fill its first slots in the official order; else each output
        takes the slot of its centre's location (static: in the window's first frame). ``dtype``: of the temporal
        similarities."""
        table = table.to(embeds.device)
        E = embeds.float()[table]  # [F, N, D]
        generator = torch.Generator().manual_seed(self.seed)
        keep, slots, merged, sources, roles = [], [], [], [], []
        for j, (start, end) in enumerate(self.windows(E.mean(1), generator)):
            W = end - start
            static = video.window_similarity(E[start:end], dtype) > self.tau
            locs = static.nonzero().flatten()
            # each output: (embedding, sources as (frame, location), role, its locations with the centre first)
            outputs = []
            values, groups = self._clusters(E[start:end, locs].mean(0), generator)
            for v, g in zip(values, groups):
                outputs.append((v, [(f, int(locs[i])) for f in range(start, end) for i in g], (j, -1), locs[g]))
            dyn = (~static).nonzero().flatten()
            for w in range(W):
                values, groups = self._clusters(E[start + w, dyn], generator)
                for v, g in zip(values, groups):
                    outputs.append((v, [(start + w, int(dyn[i])) for i in g], (j, w), dyn[g]))
            window_slots = table[start:end].flatten()
            for o, (v, members, role, locations) in enumerate(outputs):
                frame = start if role[1] < 0 else start + role[1]
                home = window_slots[o] if official_order else table[frame, int(locations[0])]
                src = torch.tensor(sorted(int(table[f, n]) for f, n in members), device=embeds.device)
                keep.append(int(home))
                roles.append(role)
                if len(src) == 1 and int(src[0]) == int(home):
                    continue  # its own unchanged embedding in its own slot
                slots.append(int(home))
                merged.append(v)
                sources.append(src)
        device = embeds.device
        merged = torch.stack(merged) if merged else embeds.new_zeros(0, embeds.shape[-1]).float()
        return (torch.tensor(keep, dtype=torch.long, device=device), torch.tensor(slots, dtype=torch.long,
                device=device), merged, sources, roles)

    def _clusters(self, x: torch.Tensor, generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``x`` ``[n, D]`` merged as the official code does: more than 14 tokens into ``floor(n * cluster_ratio)``
        clusters (means, centre order), else unchanged. Returns (values ``[n', D]``, member indices of each into
        ``x``, the centre first)."""
        n = x.shape[0]
        if n > MIN_CLUSTERED:
            m = max(1, math.floor(n * self.cluster_ratio + 1e-9))
            centres, means, members = cluster_merge(x, m, DPC_K, generator)
            return means, [torch.cat([g.new_tensor([c]), g[g != c]]) for c, g in zip(centres.tolist(), members)]
        return x.float(), [torch.tensor([i], device=x.device) for i in range(n)]

    # ------------------------------------------------------------------------------------------------ stage 2
    def prune(self, ctx, row, group) -> torch.Tensor:
        """Stage 2 for one video: the kept candidates (indices into the group, ascending)."""
        def compute():
            key = ("prunevid", row, group.span.offset)
            if key not in ctx.request_state:
                raise RuntimeError(f"{self.name}: no stage-1 record for this video")
            if ctx.request_state[key] is None:  # kept whole
                return torch.arange(len(group), device=group.slots.device)
            alpha, roles = ctx.request_state[key]
            text = ctx.text_slots(row)
            text = text[text > int(group.slots.max())]
            if not len(text):
                text = ctx.last_slots()[row:row + 1]
            scores = ctx.unrotated_attention(row, text, "max").amax(0)[group.slots.to(text.device)]
            return self.quota_select(scores, [roles[int(i)] for i in group.ids.tolist()], alpha)
        return ctx.cached(("prunevid2", row, group.span.index, int(group.slots[0]), len(group)), compute)

    @staticmethod
    def quota_select(scores: torch.Tensor, roles: list, alpha: float) -> torch.Tensor:
        """PruneVid's stage-2 quotas: per window the top ``floor(s * alpha)`` of its static tokens, per frame of a
        window the top ``floor(d * alpha)`` of its dynamic tokens, by ``scores`` ``[c]``; ``roles[i]`` =
        ``(window, -1 | frame)``. At least the overall best token. Returns sorted indices."""
        groups: dict = {}
        for i, role in enumerate(roles):
            groups.setdefault(tuple(role), []).append(i)
        chosen = []
        for members in groups.values():
            members = torch.tensor(members, device=scores.device)
            k = math.floor(len(members) * alpha + 1e-9)
            if k:
                chosen.append(members[torch.topk(scores[members], k).indices])
        if not chosen:
            return torch.argmax(scores).view(1)
        return torch.cat(chosen).sort().values
