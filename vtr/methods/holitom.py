from __future__ import annotations

import dataclasses
import math
from decimal import Decimal
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from . import video
from .base import SEED, Merge, Method, Stage, StageSpec, choices, scale_layers
from .clustering import dpc_knn
from .registry import register

OFFICIAL_DEPTH = 28  # LLaVA-OneVision-7B's Qwen2-7B, where the official inner layer is 18
ATTENTION_SIGNALS = ("auto", "vision", "embedding")


@register
@dataclass
class HoliTom(Method):
    """HoliTom (Shao et al., NeurIPS'25): holistic token merging. Before the language model, a global temporal
    segmentation merges locations that stay static over a window into one token each, and the remaining budget is
    spent per frame on the most attended dynamic tokens; inside it (prefill, layer ``inner_layer``), the tokens the
    last prompt token attends to least are averaged into their most similar kept tokens.

    Outer stage, per video of ``F`` frames (Qwen-VL: temporal slices) of ``N`` tokens ``X`` ``[F, N, D]`` (the
    language model's input embeddings), retention ``r = 1 - ratio`` (the official ``RETAIN_RATIO``, taken in
    decimal: ``ratio=0.9`` is the float ``0.1``; ``keep / n`` with ``keep``):

    1. ``sim[t, n] = cos(X[t, n], X[t + 1, n])``; location ``n`` is static between ``t`` and ``t + 1`` when
       ``sim > threshold`` (tau, default 0.80; 0.65 when ``r <= 0.10``, the official scripts' pairing).
    2. Windows by dynamic programming (``video.static_windows``, at most ``max_window`` frames): the segmentation
       of the frames that saves the most tokens, ``|Omega| * (e - s)`` for a window ``[s, e]`` whose locations
       ``Omega`` are static across all of it; ties keep the shorter window. ``total`` = tokens saved.
    3. ``r' = min(r / ((F * N - total) / (F * N)), 1)``, in this floating-point order (the official one; ``r * F *
       N / (F * N - total)`` can round a count below the other way).
    4. Per window: the static tokens are the means over its frames of the ``Omega`` locations; ``m =
       round(|Omega| * r')`` of them are DPC-KNN centres (k = ``min(7, m)``, itself included, in index order),
       every other static token joins its nearest centre (DPC distance) and a centre becomes ``beta * centre +
       (1 - beta) * mean(members)`` (``no_beta=True``: the plain mean, centre included). Each frame of the window
       keeps the top ``ceil(n_dyn * r')`` of its ``n_dyn = N - |Omega|`` dynamic tokens by attention ``A``
       (below), in spatial order. A one-frame window has no static tokens.
    5. The window's tokens, OneVision order: its static centres (spatial order), then each frame's dynamic tokens.

    Inner stage (``inner_layer``, default 18 of 28 layers, scaled to the model's depth like the other layer
    methods; ``inner_ratio`` r_in = 0.5, 0 turns it off): ``a`` = the attention of the prompt's last token at
    layer ``inner_layer - 1`` (mean over heads) on the video's present tokens (OneVision's newline included,
    as the official span); the top ``round(Nv * (1 - r_in))`` stay; each other token, in sequence order, is
    averaged into the kept token whose hidden state is most cosine-similar (similarities of the states entering
    the layer, computed once): ``h_j <- (h_j + h_i) / 2``, sequentially.

    Budget: ``ratio`` is ``1 - RETAIN_RATIO`` (the fraction removed at the language model's input); the outer
    keep count follows the rule above (about ``r * F * N`` tokens, ``handle.last.input_retention``), the inner
    stage halves what is left from its layer on (``handle.last.layer_retention``: the layer average).
    ``nominal_retention`` is ``r``. OneVision's trailing newline passes the outer stage untouched. Positions: the
    outer stage ``compact`` (official: the sequence rebuilt before the LLM), the inner stage keeps the positions
    its tokens had at the LLM input (gap-preserving); on Qwen-VL (M-RoPE) both stages keep the 3-D positions. An
    image is a one-frame video: its top ``ceil(N * r)`` tokens by ``A`` (and the inner stage).
    Official code: ``cokeshao/HoliTom`` (``holitom/llava_arch.py``: ``select_static_windows``,
    ``get_static_dynamic_features``, ``merge_tokens_by_clustering``; ``holitom/modeling_qwen2.py``).

    Deliberate differences from the official code:
      * attention signal ``A`` (option ``attention``): on LLaVA-OneVision videos, as the official code, SigLIP's
        received attention at the tower's last layer (layer 26 of the head-less tower, the HF tower's last; mean
        over heads and over the frame's queries), pooled like the features (``apply_pooling``), computed from that
        layer's captured input (the tower keeps its attention backend). Elsewhere (Qwen-VL, for which there is no
        official code; images, which the official code does not prune; ``attention="embedding"``) FastVID's
        documented fallback from the language model's input embeddings (``video.embedding_signals``: softmax over
        the frame's tokens of ``<mean(X_f), X_f,n> / sqrt(D)``). ``"auto"`` (default) picks the official signal
        where it exists;
      * order under ``positions="compact"``: the window's tokens take the window's first slots in the official
        order (static centres, then each frame's dynamic tokens), so ``handle.last.stages[0].kept`` names those
        slots and ``handle.last.stages[0].merged`` lists, for each, the tokens it stands for (itself when it moved
        unchanged; ``handle.last.merged`` is the last merging stage's, the inner one's). Under
        ``"original"`` (Qwen-VL) every token keeps its own slot and a static centre takes the slot of its location
        in the window's first frame;
      * the inner stage is on by default (official: only when the ``HOLITOM_k`` / ``HOLITOM_r`` environment
        variables are set; the paper's headline numbers use it); ``inner_ratio=0`` turns it off;
      * ``ratio=0`` keeps every token at both stages (the unpatched model);
      * the contextual share ``D`` (``context_share``, default 0 as the official scripts): each frame keeps the top
        ``round(ceil(n_dyn r') (1 - D))`` dynamic tokens by ``A`` and merges the rest into ``ceil(n_dyn r')`` minus
        that many DPC-KNN centres (k = ``min(7, m)``, location order, merged like the static centres, emitted after
        the frame's attended tokens). The official ``D > 0`` path fails before emitting anything (its position
        bookkeeping ``pos.masked_select(mask.unsqueeze(-1))`` broadcasts to the wrong shape), so this follows its
        evident intent; its density noise comes from the video's seeded generator, frame by frame;
      * no LLaVA-Video ("grid" newline) order, which HF has no class for;
      * inner stage: ``handle.last.merged`` lists the kept tokens and the visual tokens averaged into each (not
        expanded through the outer merges); the last token's attention is computed from layer
        ``inner_layer - 1``'s inputs with its causal mask (official: an eager re-run of that layer);
      * temporal similarities, the embedding fallback's attention, the inner stage's attention and similarities in
        fp32 (official: the model dtype; ``score_dtype="model"`` computes them in it; merges stay fp32);
      * DPC-KNN in fp64 with its noise from a generator seeded with ``seed`` per video; the counts in the official
        floating-point arithmetic (Python ``round``, half to even, and ``math.ceil`` of the float products, so
        ``ceil(30 * 0.1)`` is 4); at least one token per video at each stage; ``keep`` of at least the video's
        token count keeps everything at both stages;
      * batched (each row its own selection), several videos and images per prompt (official: batch 1, one video).
    """

    name: ClassVar[str] = "holitom"
    summary: ClassVar[str] = ("video: DP temporal windows, static tokens merged by density peaks, attended dynamic "
                              "tokens, then an inner-LLM merge")
    stage: ClassVar[Stage] = Stage.PRE_LLM
    default_positions: ClassVar[str] = "compact"
    newline_candidates: ClassVar[bool] = True  # the inner stage's span counts OneVision's newline (official)
    needs_whole_prompt: ClassVar[bool] = True  # the inner stage reads the prompt's last token
    layer_option: ClassVar[str] = "inner_layer"

    threshold: float | None = field(default=None, metadata={"min": -1.0, "max": 1.0})  # tau (cosine); None: 0.80,
    # 0.65 when r <= 0.10
    """tau: cosine similarity above which a location is static between two frames; None: 0.80, or 0.65 when r <= 0.10
    (the official scripts' pairing)."""
    beta: float = field(default=0.6, metadata={"min": 0.0, "max": 1.0})
    """Weight of a density-peak centre in its merge with the static tokens assigned to it."""
    no_beta: bool = False
    """Merge static tokens by the plain mean (centre included) instead of the beta-weighted one."""
    max_window: int = field(default=1024, metadata={"min": 2})
    """Longest temporal window (frames) the dynamic-programming segmentation considers."""
    inner_layer: int | None = None  # K; None: 18 of 28 layers, scaled
    """K of the inner stage inside the language model; None: 18 of 28 layers, scaled to the model's depth."""
    inner_ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 0.999999})
    """Share of the tokens the inner stage merges away at layer K (the official r_in = 0.5); 0 turns it off."""
    seed: int = field(default=0, metadata=SEED)
    """Seed of the DPC-KNN tie-breaking noise (fresh generator per video)."""
    context_share: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})  # D
    """D: share of each frame's dynamic budget given to density-peak centres of the tokens the attention left (0 as
    the official scripts)."""
    attention: str = field(default="auto", metadata=choices(*ATTENTION_SIGNALS))
    """Attention that ranks dynamic tokens: "vision" (SigLIP's last-layer received attention, LLaVA-OneVision
    videos), "embedding" (the fallback from input embeddings) or "auto"."""

    def __post_init__(self):
        super().__post_init__()
        if self.scope != "image":
            raise ValueError(f"{self.name}: scope must be 'image' (its budget is per video)")

    @property
    def needs(self) -> frozenset:
        return frozenset({"attention_inputs", "vision"} if self.attention == "vision" else {"attention_inputs"})

    def for_model(self, family) -> HoliTom:
        method = super().for_model(family)
        onevision = family.name == "llava_onevision"
        if method.attention == "vision" and not onevision:
            raise ValueError(f"{self.name}: attention='vision' reads the SigLIP tower's attention to LLaVA-OneVision's "
                             "video frames; this model is not LLaVA-OneVision (use 'embedding' or 'auto')")
        if method.attention == "auto":
            method = dataclasses.replace(method, attention="vision" if onevision else "embedding")
        return method

    def _inner(self) -> bool:
        return self.inner_ratio > 0 and self.ratio != 0

    def stages(self) -> list[StageSpec]:
        specs = [StageSpec(Stage.PRE_LLM, 0)]
        if self._inner():
            specs.append(StageSpec(Stage.LAYER, self.inner_layer if self.inner_layer is not None else 18,
                                   positions="original"))
        return specs

    def for_depth(self, n_layers: int) -> HoliTom:
        if self.inner_layer is not None or not self._inner():
            return self
        return dataclasses.replace(self, inner_layer=scale_layers((18,), n_layers, OFFICIAL_DEPTH)[0])

    @property
    def tau(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.65 if self.ratio is not None and 1 - self.ratio <= 0.10 + 1e-9 else 0.80

    def _retention(self, n: int) -> float:
        """``r``: the official ``RETAIN_RATIO`` that ``ratio`` names, ``1 - ratio`` in decimal (``ratio=0.9`` is
        ``RETAIN_RATIO=0.1``, the float ``0.1``, where ``1 - 0.9`` is ``0.09999999999999998``); ``keep / n`` with
        ``keep``."""
        if self.ratio is None:
            return min(1.0, self.keep / n)
        return float(Decimal(1) - Decimal(repr(self.ratio)))

    @property
    def nominal_retention(self) -> float | None:
        """``r``, the official ``RETAIN_RATIO`` (None for ``keep``)."""
        return self._retention(1) if self.ratio is not None else None

    def budget_for(self, ctx, row, group):
        if self.ratio == 0 or len(group) == 0:
            return len(group)
        if self.keep is not None and self.keep >= group.span.n:  # a budget naming every token keeps them all
            return len(group)
        if ctx.spec.stage is Stage.LAYER:
            return max(1, round(len(group) * (1 - self.inner_ratio)))
        return len(self.plan(ctx, row, group).keep)

    def select(self, ctx, row, group, budget):
        if ctx.spec.stage is Stage.LAYER:
            scores = ctx.last_token_attention()[row, group.slots.to(ctx.hidden.device)]
            merge = inner_merge(ctx.hidden[row, group.slots], scores, budget, ctx.score_dtype)
            return dataclasses.replace(merge, embeds=merge.embeds.to(ctx.hidden.dtype))
        return self.plan(ctx, row, group)

    def plan(self, ctx, row, group) -> Merge:
        def compute():
            newline = group.span.newline[group.ids.to(group.span.newline.device)].cpu()
            frames = (~newline).nonzero().flatten()
            table = frames[video.frame_table(group.span, group.ids[frames], self.name)]  # [F, N] into the group
            A = None
            if self.attention == "vision" and group.span.kind == "video":
                A = ctx.video_received_attention(row, group.span)
                if A.shape != table.shape:
                    raise RuntimeError(f"{self.name}: the video's tower signals cover {tuple(A.shape)} frame tokens, "
                                       f"its candidates {tuple(table.shape)}")
            merge = self.reduce(ctx.hidden[row, group.slots], table, self._retention(len(frames)),
                                ctx.engine.stage_positions(ctx.spec) == "compact", A, ctx.score_dtype)
            extra = newline.nonzero().flatten().to(merge.keep.device)
            return dataclasses.replace(merge, keep=torch.cat([merge.keep, extra]),
                                       embeds=merge.embeds.to(ctx.hidden.dtype))
        return ctx.cached(("holitom", row, group.span.index, int(group.slots[0]), len(group)), compute)

    def reduce(self, embeds: torch.Tensor, table: torch.Tensor, r: float, compact: bool,
               A: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> Merge:
        """The outer stage on one video: ``embeds`` ``[c, D]`` candidates, ``table`` ``[F, N]`` their frame layout
        (indices into ``embeds``), ``r`` retention, ``A`` ``[F, N]`` the attention signal (None: the embedding
        fallback), ``dtype`` of the scores and similarities. ``compact``: the window's tokens take its first slots
        in the official order; else each its own slot. Returns a ``Merge`` (indices into the candidates, fp32
        embeds)."""
        E = embeds.float()[table.to(embeds.device)]  # [F, N, D]
        A = video.embedding_signals(embeds[table.to(embeds.device)], dtype)[1] if A is None else A.to(E.device)
        windows = outer_windows(E, A, r, self.tau, None if self.no_beta else self.beta, self.max_window,
                                torch.Generator().manual_seed(self.seed), self.context_share, dtype)
        table = table.cpu()
        keep, slots, states, sources = [], [], [], []
        for (s, e), entries in windows:
            window_slots = table[s:e + 1].flatten().sort().values
            for j, (f, n, state, members) in enumerate(entries):
                slot = int(window_slots[j]) if compact else int(table[f, n])
                keep.append(slot)
                if state is None and slot == int(table[f, n]):
                    continue
                slots.append(slot)
                states.append(E[f, n] if state is None else state)
                sources.append(torch.tensor(sorted(int(table[g, m]) for g, m in members)))
        if not keep:  # everything merged away: keep the most attended token of the first frame
            keep = [int(table[0, int(A[0].argmax())])]
        device = embeds.device
        D = embeds.shape[-1]
        return Merge(keep=torch.tensor(keep, device=device), slots=torch.tensor(slots, dtype=torch.long, device=device),
                     embeds=torch.stack(states).to(device) if states else embeds.new_zeros(0, D).float(),
                     sources=sources)


def outer_windows(E: torch.Tensor, A: torch.Tensor, r: float, tau: float, beta: float | None, max_window: int,
                  generator: torch.Generator | None = None, context: float = 0.0,
                  dtype: torch.dtype = torch.float32) -> list:
    """HoliTom's outer stage on one video's tokens ``E`` ``[F, N, D]`` with attention ``A`` ``[F, N]``; ``context``
    the contextual share ``D`` of each frame's dynamic budget (``merge_tokens_by_attention_density``); ``dtype``
    of the temporal similarities (merges in fp32, DPC-KNN in fp64).

    Returns ``[((start, end), entries)]`` per window in frame order, ``entries`` the window's output tokens in the
    official OneVision order, each ``(frame, location, state, members)``: ``state`` ``[D]`` the merged static
    token (None: the token at ``(frame, location)`` unchanged) and ``members`` the ``(frame, location)`` pairs it
    stands for. A static token is reported at its location in the window's first frame."""
    F, N, _ = E.shape
    static = video.location_similarity(E[:-1], E[1:], dtype) > tau if F > 1 else torch.zeros(0, N, dtype=torch.bool)
    windows, saved = video.static_windows(static, max_window)
    total = F * N
    rr = min(r / ((total - saved) / total), 1)  # the official expression, in its floating-point order
    out = []
    for s, e in windows:
        omega = static[s:e].all(0) if e > s else torch.zeros(N, dtype=torch.bool, device=E.device)
        entries = []
        places = omega.nonzero().flatten()
        m = round(len(places) * rr)
        if m > 0:
            centres, assign, merged = density_merge(E[s:e + 1, places].mean(0), m, beta, generator)
            for j, c in enumerate(centres.tolist()):
                locations = places[(assign == j)].tolist()
                members = [(g, n) for n in locations for g in range(s, e + 1)]
                entries.append((s, int(places[c]), merged[j], members))
        dynamic = (~omega).nonzero().flatten()
        count = math.ceil(len(dynamic) * rr)
        dominant = round(count * (1 - context))
        for t in range(s, e + 1):
            if count == 0:
                break
            top = dynamic[torch.topk(A[t, dynamic], dominant).indices].sort().values
            entries.extend((t, int(n), None, [(t, int(n))]) for n in top)
            if count > dominant:
                entries.extend(contextual_tokens(E[t], dynamic[~torch.isin(dynamic, top)], count - dominant, beta,
                                                 generator, t))
        out.append(((s, e), entries))
    return out


def contextual_tokens(X: torch.Tensor, rest: torch.Tensor, m: int, beta: float | None,
                      generator: torch.Generator | None, frame: int) -> list:
    """A frame's contextual tokens (HoliTom with ``D > 0``): ``m`` DPC-KNN centres (k = ``min(7, m)``) among the
    dynamic tokens ``rest`` ``[n]`` (locations, ascending) the attention did not keep, in location order, each
    merged with the tokens nearest to it like the static centres. X: ``[N, D]`` the frame's tokens. Returns
    entries ``(frame, location, state, members)``."""
    centres, assign, merged = density_merge(X[rest], m, beta, generator)
    return [(frame, int(rest[c]), merged[j], [(frame, int(n)) for n in rest[assign == j].tolist()])
            for j, c in enumerate(centres.tolist())]


def density_merge(tokens: torch.Tensor, m: int, beta: float | None, generator: torch.Generator | None):
    """HoliTom's ``cluster_dpc_knn`` + ``merge_tokens_by_clustering`` on ``tokens`` ``[n, D]``: ``m`` DPC-KNN centres
    (k = ``min(7, m)``) in index order, every other token joined to its nearest centre, each centre merged with its
    members (``video.center_merge``). Returns (centres ``[m]``, each token's centre ``[n]`` (an index into
    centres), merged centres ``[m, D]`` fp32)."""
    centres, assign = dpc_knn(tokens, m, min(7, m), generator)
    order = torch.argsort(centres)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    centres, assign = centres[order], rank[assign]
    is_centre = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
    is_centre[centres] = True
    return centres, assign, video.center_merge(tokens[centres], tokens[~is_centre], assign[~is_centre], beta)


def inner_merge(hidden: torch.Tensor, scores: torch.Tensor, budget: int, dtype: torch.dtype = torch.float32
                ) -> Merge:
    """HoliTom's inner-LLM merge of one video's present tokens: ``hidden`` ``[n, D]`` (sequence order), ``scores``
    ``[n]`` the last token's attention. The top ``budget`` by score stay; every other token, in sequence order, is
    averaged into the kept token of highest cosine similarity (similarities of the original states, computed once,
    in ``dtype``): ``h_j <- (h_j + h_i) / 2``. Returns a ``Merge`` (fp32 states of the kept tokens that received
    any)."""
    top = torch.topk(scores, budget).indices.sort().values
    rest = torch.ones(len(hidden), dtype=torch.bool, device=hidden.device)
    rest[top] = False
    rest = rest.nonzero().flatten()
    h = hidden.float()
    unit = torch.nn.functional.normalize(hidden.to(dtype), dim=-1)
    nearest = (unit[rest] @ unit[top].T).argmax(1).tolist() if len(rest) else []  # [R, T]: no [R, T, D] tensor
    states = h[top].clone()
    members: dict[int, list[int]] = {}
    for i, j in zip(rest.tolist(), nearest):
        states[j] = (states[j] + h[i]) / 2
        members.setdefault(j, []).append(i)
    touched = sorted(members)
    idx = torch.tensor(touched, dtype=torch.long, device=hidden.device)
    return Merge(keep=top, slots=top[idx],
                 embeds=states[idx] if touched else h.new_zeros(0, h.shape[-1]),
                 sources=[torch.tensor(sorted([int(top[j])] + members[j])) for j in touched])
