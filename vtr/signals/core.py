"""What every signal source shares: the candidate tokens of each image (or tile), the stage's view of the
batch, and the memos through which each signal is computed once: per stage (``_memo``, ``cached``) and, for signals
no stage changes, per request (``request_cached``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import compat
from ..layout import TokenLayout, VisualSpan

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Engine, ForwardState, SeqLayout
    from ..methods.base import StageSpec


@dataclass
class SpanCandidates:
    """Tokens of one image (or one tile of it, under ``scope="crop"``) that a method chooses from.

    slots: ``[c]`` positions in the current sequence; ids: ``[c]`` their indices within ``span``."""

    span: VisualSpan
    slots: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.slots)

    def subset(self, mask: torch.Tensor) -> "SpanCandidates":
        return SpanCandidates(self.span, self.slots[mask], self.ids[mask])


class ContextBase:
    """One stage's view of the batch, shared by every signal source: the candidates, the text slots, the memo."""

    def __init__(self, engine: "Engine", fwd: "ForwardState", prev: "SeqLayout", hidden: torch.Tensor,
                 spec: "StageSpec"):
        self.engine, self.fwd, self.prev, self.hidden, self.spec = engine, fwd, prev, hidden, spec
        self.layout: TokenLayout = fwd.layout
        self.valid: torch.Tensor = prev.mask2d  # [B, L] real tokens of the current sequence
        self._memo = {}
        B, L0 = prev.index.shape[0], fwd.request.prompt_length
        # original prompt position (or prompt_length + a for added token a) -> current slot, per row
        width = L0 + max((len(a) for a in fwd.request.added), default=0)
        inverse = torch.full((B, width), -1, dtype=torch.long, device=prev.index.device)
        rows, slots = (prev.index >= 0).nonzero(as_tuple=True)
        inverse[rows, prev.index[rows, slots]] = slots
        self._inverse = inverse

    def encoding_row(self, row: int) -> int:
        """The row whose visual inputs the vision call encoded for ``row``: itself, or, where ``generate`` encoded
        each prompt once before repeating the rows (beam search, ``num_return_sequences``), the prompt's first
        row."""
        return row - row % self.fwd.expansion

    def encoded_rows(self) -> range:
        """The rows whose visual inputs the vision call encoded, in its order (see ``encoding_row``)."""
        return range(0, len(self.layout.rows), self.fwd.expansion)

    def cached(self, key, compute):
        """``compute()`` once per stage for ``key`` (a method's per-image plan, shared by ``budget_for`` and
        ``select``)."""
        key = ("method", key)
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def request_cached(self, key, compute):
        """``compute()`` once per request for ``key``: a signal that no stage changes (it reads the prompt or the
        language model's inputs), shared by every stage of a multi-stage method."""
        memo = self.fwd.request.signals
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    @property
    def request_state(self) -> dict:
        """A dict that lives as long as the request (fresh per request): what a multi-stage method carries from
        one of its stages to the next (FrameFusion's merge cascade)."""
        return self.fwd.request.method_state

    # ------------------------------------------------------------------------------------------- candidates
    def present(self, row: int, span: VisualSpan) -> SpanCandidates:
        """Every token of ``span`` still in the sequence; then the tokens merging stages added to it (their ids
        ``span.n + k`` for the span's ``k``-th added token)."""
        slots = self._inverse[row, span.positions.to(self._inverse.device)]
        alive = slots >= 0
        ids = alive.nonzero().flatten()
        added = self.added_numbers(row, span)
        if added:
            extra = self._inverse[row, self.fwd.request.prompt_length + torch.tensor(added)]
            there = extra >= 0
            slots = torch.cat([slots[alive], extra[there]])
            ids = torch.cat([ids, span.n + there.nonzero().flatten().to(ids.device)])
            return SpanCandidates(span, slots, ids)
        return SpanCandidates(span, slots[alive], ids)

    def added_numbers(self, row: int, span: VisualSpan) -> list[int]:
        """The row's added-token numbers (see ``RequestState.added``) that belong to ``span``, in order."""
        return [a for a, token in enumerate(self.fwd.request.added[row]) if token.span == span.offset]

    def visual_ids(self, row: int, group: SpanCandidates, members: torch.Tensor) -> torch.Tensor:
        """``members`` (indices into ``group``) as ascending indices in the row's visual numbering, an added token
        replaced by the tokens merged into it."""
        span, ids = group.span, group.ids[members].cpu()
        added = self.added_numbers(row, span)
        parts = [span.offset + ids[ids < span.n]]
        parts += [self.fwd.request.added[row][added[int(i) - span.n]].sources for i in ids[ids >= span.n]]
        return torch.cat(parts).unique()

    def eligible(self, tokens: SpanCandidates) -> torch.Tensor:
        """Which present tokens the method may drop: newline tokens only if its official code counts them; added
        tokens always."""
        if self.engine.method.newline_candidates:
            return torch.ones(len(tokens), dtype=torch.bool)
        ids = tokens.ids.cpu()
        own = ids < tokens.span.n
        eligible = torch.ones(len(ids), dtype=torch.bool)
        eligible[own] = ~tokens.span.newline[ids[own].to(tokens.span.newline.device)].cpu()
        return eligible

    def groups(self, candidates: SpanCandidates) -> list[SpanCandidates]:
        """Budget groups: the whole image (``scope="image"``) or each anyres tile (``scope="crop"``)."""
        if self.engine.method.scope == "image" or not len(candidates):
            return [candidates]
        if bool((candidates.ids >= candidates.span.n).any()):
            raise ValueError(f"vtr: {self.engine.method.name} adds tokens that belong to no anyres tile; use "
                             "scope='image'")
        crop = candidates.span.crop[candidates.ids.to(candidates.span.crop.device)].cpu()
        if bool((crop < 0).any()):
            raise ValueError("vtr: scope='crop' needs the anyres tile of every token, known for LLaVA-NeXT when the "
                             "call carries image_sizes (generate() in transformers 5.23 pre-encodes images and drops "
                             "them); use scope='image' or call the model's forward")
        return [candidates.subset(crop == c) for c in crop.unique().tolist()]

    def text_slots(self, row: int) -> torch.Tensor:
        """Slots of the row's real non-visual tokens, ascending."""
        visual = torch.zeros_like(self.valid[row])
        for span in self.layout.rows[row].spans:
            visual[self.present(row, span).slots] = True
        return (self.valid[row] & ~visual).nonzero().flatten()

    def slots_of(self, row: int, positions: torch.Tensor) -> torch.Tensor:
        """Current slots of original prompt positions ``[n]`` (-1 where the token is gone)."""
        return self._inverse[row, positions.to(self._inverse.device)]

    def input_embeddings(self, row: int, positions: torch.Tensor) -> torch.Tensor:
        """``[n, D]``: the language model's input embeddings of the row's tokens at original prompt positions
        ``[n]`` (what the model received before any stage pruned)."""
        return self.fwd.lm_embeds[row, positions.to(self.fwd.lm_embeds.device)]

    def with_deepstack(self, row: int, tokens: SpanCandidates, features: torch.Tensor) -> torch.Tensor:
        """``features`` ``[c, D]`` of candidates still at their language-model input slots (a ``pre_llm`` stage)
        followed, on Qwen3-VL, by their DeepStack features, level after level: ``[c, D * (1 + levels)]``, the
        merger outputs vLLM's Qwen3-VL concatenates and hands its video pruning. Unchanged elsewhere."""
        if self.fwd.deepstack is None:
            return features
        masks, levels = self.fwd.deepstack
        rank = masks.flatten().long().cumsum(0).view_as(masks) - 1  # [B, L]: index into each level's rows
        positions = self.prev.index[row, tokens.slots.to(self.prev.index.device)].to(masks.device)
        if not bool(masks[row, positions].all()):
            raise RuntimeError(f"{self.engine.method.name}: DeepStack features cover only the visual tokens")
        rows = rank[row, positions]
        return torch.cat([features] + [level[rows.to(level.device)].to(features) for level in levels], -1)

    def prompt_text_after(self, row: int, span: VisualSpan) -> torch.Tensor:
        """Original prompt positions ``[t]`` of the row's real non-visual tokens after ``span``, ascending."""
        base = self.fwd.request.base
        text = base.mask2d[row].clone()
        for other in self.layout.rows[row].spans:
            text[other.positions.to(text.device)] = False
        text[: int(span.positions.max()) + 1] = False
        return text.nonzero().flatten()

    def unpadded_positions(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """Index of each slot in the row's sequence without padding (what batch-1 official code sees)."""
        return (self.valid[row].long().cumsum(0) - 1)[slots]

    @property
    def score_dtype(self) -> torch.dtype:
        """dtype scores are computed in: fp32, or the model's own with the method's ``score_dtype="model"``."""
        return self.hidden.dtype if self.engine.method.score_dtype == "model" else torch.float32

    def _layer(self, layer: int | None) -> int:
        return self.engine.vision_feature_layer if layer is None else layer

    def _vision_qk(self, layer: int | None, call=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A vision layer's query and key projections ``[n, N, H * d]`` as the tower computed them (projected again
        from the captured attention input only where they were not captured)."""
        call = self.fwd.vision if call is None else call
        layer = self.engine.vision_feature_layer if layer is None else layer
        projected = call.projections.get(layer, {})
        if "q" in projected and "k" in projected:
            return projected["q"], projected["k"]
        attn, hidden, _ = call.layers[layer]
        projections = compat.vision_projections(attn)
        return projections["q"](hidden), projections["k"](hidden)

    def _vision_dtype(self, hidden: torch.Tensor) -> torch.dtype:
        return hidden.dtype if self.engine.method.score_dtype == "model" else torch.float32
