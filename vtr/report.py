"""What one prefill did: the record behind ``handle.last``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import TokenLayout


@dataclass
class MergedTokens:
    """Kept tokens of one row whose embeddings a merging method replaced.

    kept: ``[m]`` their indices in the row's visual numbering. sources: ``m`` tensors: the visual indices merged
    into each (itself included). embeds: ``[m, D]`` the embeddings the language model received for them."""

    kept: torch.Tensor
    sources: list = field(default_factory=list)
    embeds: torch.Tensor | None = field(default=None, repr=False)

    @staticmethod
    def join(parts: list["MergedTokens"]) -> "MergedTokens":
        if not parts:
            return MergedTokens(kept=torch.zeros(0, dtype=torch.long))
        return MergedTokens(kept=torch.cat([p.kept for p in parts]), sources=[s for p in parts for s in p.sources],
                            embeds=torch.cat([p.embeds for p in parts]))


@dataclass
class AddedToken:
    """A token a merging stage added inside the language model (SparseVLM's recycled cluster means).

    span: the image or video of its row it belongs to, as the visual index of that span's first token.
    sources: ``[m]`` the visual indices (the row's visual numbering) merged into it, expanded through earlier added
    tokens. position: the
    original prompt position whose RoPE position it takes under ``positions="original"`` (its anchor's). layer: the
    stage layer it was added before. state: ``[D]`` the hidden state it entered that layer with."""

    span: int
    sources: torch.Tensor
    position: int
    layer: int
    state: torch.Tensor = field(repr=False)


@dataclass
class StageRecord:
    """One pruning stage of one prefill.

    n_visual: per row, visual tokens present when the stage ran.
    kept: per row, ascending indices (in the row's visual numbering: all images of the row, in order) of the visual
    tokens still present after the stage.
    length: sequence length (padding included) the following layers run on.
    index: ``[B, length]`` the original prompt position of each slot the following layers run on (as
    ``PrefillRecord.index``).
    merged: per row, the kept tokens a merging method gave new embeddings (None when the method merged nothing).
    added: per row, the tokens merging stages inside the language model added (SparseVLM's recycled cluster
    tokens) that are present after this stage, in sequence order; None when there are none.
    """

    stage: str
    layer: int
    n_visual: list[int]
    kept: list[torch.Tensor]
    length: int = 0
    merged: list[MergedTokens] | None = None
    added: list[list[AddedToken]] | None = None
    index: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_present(self) -> list[int]:
        """Per row, visual tokens the following layers run on: the kept ones plus tokens a merging stage added."""
        added = self.added or [[] for _ in self.kept]
        return [len(k) + len(a) for k, a in zip(self.kept, added)]


@dataclass
class PrefillRecord:
    """What the most recent prefill did, per batch row.

    n_visual: visual tokens before pruning. kept: the indices of each row's own visual tokens after the last stage;
    n_kept: how many visual tokens the language model runs on then (added tokens included). stages: every stage
    in order.
    selection_seconds: wall time spent computing scores and choosing tokens (device synchronised).
    index: ``[B, L']`` the original prompt position of every slot of the pruned sequence the model ran on (-1 for
    padding slots vtr added), or None when nothing was pruned. Use it to map a plain forward's logits back.
    Slots of tokens a merging stage added inside the language model hold ``-2 - a`` (``a``: the added token's
    number in its row).
    layout: where the visual tokens were (see ``vtr.layout``).
    n_layers: decoder layers of the model (for ``visual_per_layer`` and ``layer_average``).
    """

    n_visual: list[int]
    stages: list[StageRecord] = field(default_factory=list)
    selection_seconds: float = 0.0
    index: torch.Tensor | None = None
    layout: TokenLayout | None = field(default=None, repr=False)
    n_layers: int = 0
    # vision stage: vision layer -> [C, W] the original token index ([CLS] = 0, -1 padding) of each tower input's
    # tokens after that layer pruned (inputs in the tower's batch order: images, LLaVA-NeXT crops); Qwen-VL towers:
    # block -> [1, S'] the original row (the call's images packed in order; Qwen2.5-VL: window order) of every kept
    # row, whole 2x2 merge units
    vision_tokens: dict | None = field(default=None, repr=False)
    nominal_retention: float | None = None
    decode_steps: list = field(default_factory=list)

    # decode_steps: methods with a ``kv_cache`` stage (DyCoke): one entry per single-token decoding step of this
    # request, per row the candidate visual tokens (row's visual numbering, ascending) that layers >= L attended
    # to at that step, or None where they attended to all of them. Tokens that are never candidates (the
    # LLaVA-NeXT / OneVision row newlines) are always attended and not listed.
    # nominal_retention: the fraction of visual tokens the method's budget names (``1 - ratio`` for most
    # methods), beside what really happened (``input_retention``, ``layer_retention``).

    @property
    def input_retention(self) -> list[float]:
        """Per row, the fraction of visual tokens the language model's first layer runs on (merged and added
        tokens included); 1.0 for a row without visual tokens."""
        entering = [c[0] if c else n for c, n in zip(self.visual_per_layer(), self.n_visual)]
        return [e / n if n else 1.0 for e, n in zip(entering, self.n_visual)]

    @property
    def layer_retention(self) -> list[float]:
        """Per row, ``layer_average`` as a fraction of the row's visual tokens (prefill)."""
        return [a / n if n else 1.0 for a, n in zip(self.layer_average, self.n_visual)]

    def visual_per_layer(self) -> list[list[int]]:
        """Per row, the visual tokens entering each decoder layer (``n_layers`` counts; merged tokens included)."""
        rows = []
        for b, n in enumerate(self.n_visual):
            counts = [n] * self.n_layers
            for stage in self.stages:
                counts[stage.layer:] = [stage.n_present[b]] * (self.n_layers - stage.layer)
            rows.append(counts)
        return rows

    @property
    def layer_average(self) -> list[float]:
        """Per row, the visual token count averaged over the decoder layers: what papers quote as the budget of a
        method that prunes inside the language model (SparseVLM's "192", PyramidDrop's 270 of 576)."""
        return [sum(c) / len(c) if c else float(n) for c, n in zip(self.visual_per_layer(), self.n_visual)]

    @property
    def kept(self) -> list[torch.Tensor]:
        if self.stages:
            return self.stages[-1].kept
        return [torch.arange(n) for n in self.n_visual]

    @property
    def merged(self) -> list[MergedTokens] | None:
        """Per row, the kept visual tokens whose embeddings were replaced by merges (VisionZip's contextual
        tokens), with the visual tokens merged into each; None when no stage merged."""
        merged = [s.merged for s in self.stages if s.merged is not None]
        return merged[-1] if merged else None

    @property
    def n_kept(self) -> list[int]:
        """Per row, the visual tokens the language model runs on after the last stage: the image's own kept tokens
        (``kept``) plus the tokens a merging stage added (SparseVLM's recycled ones, ``stages[-1].added``)."""
        return self.stages[-1].n_present if self.stages else [len(k) for k in self.kept]
