from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from . import video
from .base import Merge, Method, Stage, StageSpec, unreachable_budget
from .registry import register


@register
@dataclass
class FrameFusion(Method):
    """FrameFusion (Fu et al., ICCV'25): inside the language model, cascaded merging of tokens that repeat the same
    spatial location of the previous frame, then one FastV-style pruning step, to an average per-layer budget.

    Budget: FrameFusion's ``cost`` ``C`` is the average fraction of a video's visual tokens the decoder layers
    process. vtr maps ``ratio`` to ``C = 1 - ratio`` (the official default ``cost=0.3`` is ``ratio=0.7``) and
    ``keep`` to ``C = keep / n`` (a layer-averaged count). ``handle.last.nominal_retention`` is ``C``;
    ``input_retention`` and ``layer_retention`` report what the layers really ran on.

    Cost model, with merge sparsities ``s_1..s_m`` applied so far (``q_i = prod_{j<=i} (1 - s_j)``, ``q_0 = 1``):
    the sparsity the remaining ``L - m`` layers need is ``u = 1 - (L * C - sum_i q_i) / ((L - m) * q_m)``,
    clamped to ``[0, 1]``. ``L``: ``cost_layers``, default the model's depth.

    Per video (a state per video of each batch row, fresh per request), at each call: the first on the input
    embeddings before decoder layer 0, then one inside every decoder layer ``K - 1`` (but the last) after its
    self-attention and residual add, on that residual stream, before its MLP (a post-attention ``layer`` stage
    at ``K``: layer ``K - 1``'s MLP and the later layers run on the result, its attention and KV cache on the
    sequence before):

    * merging (until it finishes): chains are the video's present tokens of one spatial location (row, column of its
      frame; Qwen-VL: of its temporal slice), in frame order; ``sim[t] = cos(h_t, h_prev)`` with the previous
      present token of its chain (``-2`` for the first). ``V`` present tokens, ``M = {t : sim[t] >=
      similarity_lower_bound}``, ``r = |M| / V``. If ``r < u``: ``r`` joins the sparsities and merging finishes when
      ``r < ratio_lower_bound``; else ``M`` = the ``floor(u * V)`` most similar tokens and FrameFusion is done (no
      pruning). Every maximal run of members of ``M`` in a chain is averaged into the chain token just before it,
      equal weights: ``h_a = (h_a + sum(run)) / (|run| + 1)``; the run is removed, the anchor keeps its slot and
      position.
    * pruning (at the call after merging finished, once): keep the ``max(1, round(V * (1 - u)))`` tokens the last
      ``last_queries`` prompt tokens attend to most in that layer's attention (post-RoPE, causal softmax over the
      current sequence, mean over heads and over those queries; with one query FastV's score). ``last_queries``
      defaults to 4 on Qwen-VL (the official Qwen2-VL adapter, ``num=4``) and 1 on LLaVA-OneVision (the official
      Qwen2 / LLaVA-Video adapter, ``num=1``).

    Images are one-frame videos (no chains: nothing merges; the pruning step runs in layer 0, after its attention).
    OneVision's trailing newline is text (never merged or pruned), as the spec requires of a OneVision port (the
    official LLaVA-Video adapter makes row newlines a patch slot). Positions: ``original`` (official: cos/sin of the
    survivors gathered; Qwen-VL: their 3-D positions). Defaults: ``similarity_lower_bound`` 0.5 on Qwen-VL (the
    official README and issue #13 for Qwen2-VL; also used for Qwen2.5-VL and Qwen3-VL, whose per-slice layout is the
    same), 0.6 on LLaVA-OneVision (the official example for LLaVA-Video-7B, the same SigLIP + Qwen2 stack; the paper
    sets it to the median layer-0 similarity of the target model, which was not measured here),
    ``ratio_lower_bound`` 0.1. Official code: ``thu-nics/FrameFusion`` (``framefusion/main.py:
    FrameFusion.forward``, ``_compute_pruning_ratio``; the decoder adapters ``framefusion/models/qwen2/
    modeling_qwen2.py`` and ``modeling_qwen2_vl.py``, whose attention calls ``framefusion/utils.py:
    scaled_dot_product_attention`` with ``num=1`` and ``num=4`` queries).

    Deliberate differences from the official code:
      * no call after the last decoder layer's attention (it could only change that layer's outputs at visual
        slots, never the text's);
      * ``L`` is the model's depth by default (official: 28 hard-coded, wrong for other depths; ``cost_layers=28``
        reproduces it);
      * where the official code fails an assertion (the merges already spent the budget, ``L * C < sum q``; an
        image below ``C = 1 / L``, whose layer 0 runs on all its tokens) vtr raises a ``ValueError`` naming the
        lowest reachable cost, before the layers it concerns run where that is known (an image: before layer 0);
        as in the official code, merges at the last call (no pruning step follows) may end above the budget
        (``handle.last.layer_retention`` says by how much); the pruning step keeps at least one token (official:
        ``round`` may keep none);
      * batched (a state per video of each row; official: batch 1, one state for the sequence); several videos
        and images per prompt, each its own cascade; merges averaged in fp32 (official: the model's dtype);
        similarities and the pruning attention in fp32 (official: the model's dtype; ``score_dtype="model"``
        computes them in it);
      * the pruning step's attention is causal for every query, also in a padded batch (official Qwen2-VL: causal
        when transformers drops the mask of an unpadded prompt, the usual case; with a mask its ``num=4`` rows are
        computed without one and see the tokens after them); Qwen2.5-VL and Qwen3-VL, which the official code does
        not support, follow its Qwen2-VL adapter (4 queries).
    """

    name: ClassVar[str] = "framefusion"
    summary: ClassVar[str] = ("video: cascaded merging of temporally repeated tokens in the first layers, then "
                              "pruning by the last prompt tokens' attention, to an average per-layer cost")
    stage: ClassVar[Stage] = Stage.PRE_LLM
    default_positions: ClassVar[str] = "original"
    needs: ClassVar[frozenset] = frozenset({"attention_inputs"})
    needs_whole_prompt: ClassVar[bool] = True

    similarity_lower_bound: float | None = field(default=None, metadata={"min": -1.0, "max": 1.0})  # None: by model
    """Cosine similarity to the same location of the previous frame at or above which a token is merged into it;
    None: 0.5 on Qwen-VL, 0.6 on LLaVA-OneVision."""
    ratio_lower_bound: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    """Merging continues layer by layer while a step merges at least this share of the tokens."""
    cost_layers: int | None = field(default=None, metadata={"min": 1})  # None: the model's depth
    """Depth the cost budget is computed over; None: the model's depth (28 reproduces the official hard-coded value)."""
    last_queries: int | None = field(default=None, metadata={"min": 1})
    """The pruning step ranks by the mean attention of this many last prompt tokens; None: 4 on Qwen-VL (the
    official Qwen2-VL adapter), else 1 (its LLaVA-Video adapter)."""

    def for_model(self, family) -> FrameFusion:
        method = super().for_model(family)
        defaults = {"similarity_lower_bound": 0.5 if family.mrope else 0.6, "last_queries": 4 if family.mrope else 1}
        unset = {name: value for name, value in defaults.items() if getattr(method, name) is None}
        return dataclasses.replace(method, **unset) if unset else method

    def for_depth(self, n_layers: int) -> FrameFusion:
        method = dataclasses.replace(self)
        method._depth = n_layers
        return method

    def stages(self) -> list[StageSpec]:
        depth = getattr(self, "_depth", None)
        if depth is None:
            raise ValueError(f"{self.name}: its stages (one before every decoder layer) are resolved at patch time "
                             "(vtr.patch)")
        return [StageSpec(Stage.PRE_LLM, 0)] + [StageSpec(Stage.LAYER, k, post_attention=True)
                                                for k in range(1, depth)]

    # ------------------------------------------------------------------------------------------ selection
    def budget_for(self, ctx, row, group):
        step = self.plan(ctx, row, group)
        return len(group) if step is None else len(step.keep)

    def select(self, ctx, row, group, budget):
        step = self.plan(ctx, row, group)
        if not len(step.slots):
            return step.keep
        return dataclasses.replace(step, embeds=step.embeds.to(ctx.hidden.dtype))

    def plan(self, ctx, row, group) -> Merge | None:
        """This stage's step for one video (None: keep all), computed once per stage; it advances the video's
        cascade state."""
        crop = int(group.span.crop[int(group.ids[0])]) if self.scope == "crop" and len(group) else -1
        key = (row, group.span.offset, crop)
        return ctx.cached(("framefusion", key), lambda: self._step(ctx, row, group, key))

    def _step(self, ctx, row, group, key) -> Merge | None:
        states = ctx.request_state.setdefault(self.name, {})
        n = len(group)
        if key not in states:
            states[key] = CascadeState(cost=self._cost(n), n=n)
        state = states[key]
        if state.done or n == 0:
            return None
        n_layers = self.cost_layers or self._depth
        self._check_reach(state, n_layers)
        u = required_sparsity(state.sparsities, state.cost, n_layers)
        device = group.slots.device
        if not state.merging:  # the pruning step (never the first call: merging runs there)
            state.done = True
            k = max(1, round(n * (1 - u)))
            if k >= n:
                return None
            scores = ctx.last_tokens_attention(row, self.last_queries or 1)[group.slots]
            return Merge(keep=torch.topk(scores, k).indices.sort().values)
        hidden = ctx.hidden[row, group.slots]
        chain = video.chain_ids(group.span, group.ids) if group.span.kind == "video" else None
        sims, prev = video.chain_similarity(hidden, chain, ctx.score_dtype)
        members, state.merging, state.done = merge_decision(sims, u, self.similarity_lower_bound,
                                                            self.ratio_lower_bound, state.sparsities)
        if not state.merging and not state.done:  # the next call prunes: out of reach already?
            self._check_reach(state, n_layers)
        if not bool(members.any()):
            return None
        keep, anchors, embeds, sources = video.merge_runs(hidden, prev, members.to(device))
        return Merge(keep=keep, slots=anchors, embeds=embeds, sources=sources)

    def _check_reach(self, state: CascadeState, n_layers: int) -> None:
        """Where the official cost model fails an assertion (the layers the merges so far committed already hold
        more than the budget, ``L * C < sum q``, when the next step's sparsity is computed; checked as soon as
        the next step is known to be the pruning step): ``ValueError`` naming the lowest cost reachable then."""
        spent = committed_cost(state.sparsities)
        if n_layers * state.cost < spent - 1e-9:
            m = len(state.sparsities)
            why = (f"layers 0 to {m - 1} run on {spent / m:.0%} of the tokens on average before FrameFusion can "
                   "prune (all of an image's; merging a video's repeated tokens lowers it)")
            raise unreachable_budget(self, state.cost, spent / n_layers, 1.0, n_layers,
                                     state.n if self.keep is not None else None, why)

    def _cost(self, n: int) -> float:
        if self.ratio is not None:
            return 1 - self.ratio
        return min(1.0, self.keep / n) if n else 1.0

    @property
    def nominal_retention(self) -> float | None:
        """``C``, the layer-averaged fraction of visual tokens the budget names."""
        return super().nominal_retention


@dataclass
class CascadeState:
    """One video's FrameFusion state within a request: merge sparsities so far, and the phase."""

    cost: float
    n: int = 0  # the video's candidate tokens at the first call
    sparsities: list = field(default_factory=list)
    merging: bool = True
    done: bool = False


def committed_cost(sparsities: list) -> float:
    """``sum_i q_i``: the layers' worth of a video's tokens the layers after the ``m`` merge steps so far run on
    (layer ``i`` on the fraction ``q_{i+1}`` left after merge ``i + 1``)."""
    q, spent = 1.0, 0.0
    for s in sparsities:
        q *= 1 - s
        spent += q
    return spent


def required_sparsity(sparsities: list, cost: float, n_layers: int) -> float:
    """FrameFusion's cost model: the uniform sparsity the layers after the ``m = len(sparsities)`` merge steps need
    so that the visual tokens averaged over ``n_layers`` layers are the fraction ``cost``, in ``[0, 1]`` (1 where
    the merges already spent the budget; the official code raises there)."""
    q, spent = 1.0, 0.0
    for s in sparsities:
        q *= 1 - s
        spent += q
    remaining = n_layers * cost - spent
    layers_left = n_layers - len(sparsities)
    if remaining <= 0 or layers_left <= 0 or q <= 0:
        return 1.0
    return max(0.0, 1 - remaining / (layers_left * q))


def merge_decision(sims: torch.Tensor, u: float, threshold: float, lower_bound: float,
                   sparsities: list) -> tuple[torch.Tensor, bool, bool]:
    """One merging call's rule: (members ``[c]`` bool, merging goes on, FrameFusion done). Appends the merge
    ratio to ``sparsities`` when it stays below the required sparsity ``u``."""
    V = len(sims)
    members = sims >= threshold
    ratio = int(members.sum()) / V
    if ratio < u:
        sparsities.append(ratio)
        return members, ratio >= lower_bound, False
    k = math.floor(u * V + 1e-9)
    members = torch.zeros_like(members)
    members[torch.topk(sims, k).indices] = True
    return members, False, True
