from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from . import video
from .base import Method, Stage, StageSpec, choices
from .registry import register


@register
@dataclass
class DyCoke(Method):
    """DyCoke (Tao et al., CVPR'25): temporal token pruning before the language model (TTM) and dynamic pruning of
    the visual KV cache at every decoding step.

    TTM, per video of ``F`` frames (Qwen-VL: temporal slices) of ``N`` tokens, on the language model's input
    embeddings, ``n_keep = int((1 - ratio) * N)`` in floating point as the official code (so ``ratio`` 0.8 keeps 19
    of 100, 0.9 keeps 9; the official ``dycoke_k`` is ``ratio``, default 0.7):
    frames ``i + 1`` for even ``i`` keep the ``n_keep`` tokens least cosine-similar to the same location of frame
    ``i``; then frames ``i + 2`` for ``i = 0, 4, 8, ... < F - 4`` keep the ``n_keep`` least similar to frame ``i``
    (original features); the other frames stay whole (F = 32: frames 0, 4, ..., 28 and 30, 3098 of 6272 tokens).
    ``keep`` instead of ``ratio``: ``n_keep = floor(keep * N / n)`` (exact).

    KV stage (``kv_cache``, decoding): at every single-token step the new token's attention at decoder layer
    ``layer - 1`` (default 3, the official L; the last layer of a shallower model; mean over heads, over the
    whole cache) is read on each video's visual tokens: ``v``. When ``cos(v, v_prev) < similarity`` (0.9; always at
    the first step), layers ``>= layer`` attend to the top ``int(n * (1 - kv_ratio))`` visual tokens by ``v``
    (floating point, as the official code; at least 1), the text and generated tokens always; when the step is
    stable they attend to every visual token (``stable="full"``, the official code) or to the
    previous step's subset (``stable="previous"``). ``v_prev`` is the previous step's ``v`` of the same request.
    ``kv_ratio`` (official ``dycoke_p``, default 0.8) defaults to ``ratio``, so that ``ratio=0`` is the unpatched
    model (with ``keep``, to 0: no KV pruning unless ``kv_ratio`` is given); pass ``ratio=0.7, kv_ratio=0.8`` for
    the official defaults. The full cache stays: later steps choose
    again. ``handle.last.decode_steps`` lists, per step and row, what layers >= L attended to. ``kv_ratio=0`` has no
    KV stage (TTM alone, as vLLM serves it), so it also runs where layer ``L - 1`` keeps no keys (Qwen3.5's linear
    attention layers).

    Keep count at the LLM input: whole frames plus ``n_keep`` per pruned frame. OneVision's trailing newline is
    never pruned (nor scored). An image is a one-frame video: TTM keeps it whole, the KV stage prunes it.
    Positions: ``compact`` on 1-D RoPE (official: the sequence is rebuilt before the LLM), ``original`` on Qwen-VL.
    Official code: ``KD-TAO/DyCoke`` (``llava_arch.py: dycole_ttm``; ``modeling_qwen2.py: PrunableDynamicCache``).

    Deliberate differences from the official code:
      * the similarity state ``v_prev`` belongs to the request (official: a config attribute that leaks from one
        sample to the next, so a new video's first step is compared with the previous video's attention);
      * kept tokens of a pruned frame stay in sequence order (official: ascending-similarity order);
      * an odd last frame without a partner stays whole (official: silently dropped); F < 5 skips the second pass
        (official: crashes);
      * the KV stage scores every visual token of the video (official: ``image_token_length - 1``, which leaves
        out the last one) and runs per video, per row (official: batch 1, one video, ``start=14`` hard-coded);
        continuations of several tokens at once, and ``generate(use_cache=False)`` (every step a prefill), attend
        to the whole cache; under beam search the similarity state stays with its batch row when beams are
        reordered;
      * the subset is applied as a key mask on the full cache (official: the cache gathered at ``kv_index``): the
        same attention, without the memory saving;
      * similarities and the KV stage's attention in fp32 (official: the model dtype; ``score_dtype="model"``
        computes them in it, with torch's ``cosine_similarity``; the official first pass L2-normalises the tokens
        before that call too, which changes only rounding).
    """

    name: ClassVar[str] = "dycoke"
    summary: ClassVar[str] = "video: temporal pruning of frame pairs/quads before the LLM + per-step KV-cache pruning"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    default_positions: ClassVar[str] = "compact"
    decode_stage_off: ClassVar[str] = "kv_ratio=0"

    kv_ratio: float | None = field(default=None, metadata={"min": 0.0, "max": 0.999999})
    """Official dycoke_p: share of visual tokens hidden from layers >= L at each decoding step; None takes ratio (0
    with keep)."""
    layer: int | None = None  # L: layers >= L use the pruned cache; None: 3 (range checked at patch time)
    """L: layers >= L attend to the chosen visual cache entries at each decoding step, scored at layer L-1; None: 3
    (the official L), the last layer of a shallower model."""
    similarity: float = 0.9
    """A decoding step re-selects when the cosine similarity of its attention to the previous step's is below this
    (above 1: no step is stable, every step selects); otherwise the step is stable (see stable)."""
    stable: str = field(default="full", metadata=choices("full", "previous"))
    """On a stable step: "full" attends to every visual token (official) or "previous" keeps the previous step's
    subset."""

    def stages(self) -> list[StageSpec]:
        return [StageSpec(Stage.PRE_LLM, 0)]

    def decode_stage(self) -> StageSpec | None:
        if self._kv_ratio() == 0:  # every step would attend to every visual token: no stage, so no layer it needs
            return None
        return StageSpec(Stage.KV_CACHE, self.layer if self.layer is not None else 3)

    def for_depth(self, n_layers: int) -> DyCoke:
        # the official L = 3, or the last layer of a model too shallow for it (an explicit layer is checked)
        if self.layer is not None:
            return self
        return dataclasses.replace(self, layer=max(1, min(3, n_layers - 1)))

    def _kv_ratio(self) -> float:
        if self.kv_ratio is not None:
            return self.kv_ratio
        return self.ratio if self.ratio is not None else 0.0

    def budget_for(self, ctx, row, group):
        if self.ratio == 0 or len(group) == 0:
            return len(group)
        return len(self.plan(ctx, row, group))

    def select(self, ctx, row, group, budget):
        return self.plan(ctx, row, group)

    def plan(self, ctx, row, group):
        def compute():
            table = video.frame_table(group.span, group.ids, self.name)
            return self.ttm(ctx.hidden[row, group.slots], table, self.frame_keep(table.shape[1], len(group)),
                            ctx.score_dtype)
        return ctx.cached(("dycoke", row, group.span.index, int(group.slots[0]), len(group)), compute)

    def frame_keep(self, N: int, n: int) -> int:
        """Tokens a pruned frame of ``N`` keeps in a video of ``n``: ``int((1 - ratio) * N)`` in floating point, as
        the official ``dycole_ttm`` (``1 - 0.8`` is ``0.19999999999999996``: 19 of 100); with ``keep``,
        ``floor(keep * N / n)`` in exact integer arithmetic."""
        if self.ratio is not None:
            return int((1 - self.ratio) * N)
        return min(self.keep, n) * N // n

    @staticmethod
    def ttm(embeds: torch.Tensor, table: torch.Tensor, n_keep: int, dtype: torch.dtype = torch.float32
            ) -> torch.Tensor:
        """Kept candidates (indices into ``embeds`` ``[c, D]``, ascending) of one video laid out as ``table``
        ``[F, N]``; similarities in ``dtype``."""
        table = table.to(embeds.device)
        E = embeds[table]
        F = E.shape[0]
        kept = {f: table[f] for f in range(F)}

        def prune(ref, f):
            sim = video.location_similarity(E[ref], E[f], dtype)
            kept[f] = table[f, torch.topk(sim, n_keep, largest=False).indices]

        for i in range(0, F - 1, 2):
            prune(i, i + 1)
        for i in range(0, F - 4, 4):
            prune(i, i + 2)
        return torch.cat([kept[f] for f in range(F)]).sort().values

    def select_decode(self, state, row, span, scores):
        P = self._kv_ratio()
        if P == 0:
            return None
        key = (row, span.offset)
        previous = state.get(key)
        state[key] = scores
        if previous is not None and len(previous) == len(scores) and \
                float(video.cosine(scores, previous, scores.dtype)) >= self.similarity:
            return None if self.stable == "full" else state.get((key, "kept"))
        kept = torch.topk(scores, max(1, int(len(scores) * (1 - P)))).indices  # official: int(n * (1 - P))
        state[(key, "kept")] = kept
        return kept
