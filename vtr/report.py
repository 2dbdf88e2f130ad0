"""What one prefill did: the record behind ``handle.last``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import TokenLayout


@dataclass
class MergedTokens:
    """Kept tokens of one row whose embeddings a merging method replaced (one per row in ``PrefillRecord.merged``).

    Attributes:
        kept (torch.Tensor): ``[m]`` their indices in the row's visual numbering (token indices).
        sources (list[torch.Tensor]): ``m`` index tensors: the visual indices merged into each (itself included).
        embeds (torch.Tensor | None): ``[m, D]`` the embeddings the language model received for them (the model's
            dtype, its hidden size ``D``).
        deepstack (torch.Tensor | None): ``[m, levels * D]`` the DeepStack features they received, level after
            level, where the method merged those too (VisionZip on Qwen3-VL); None where each kept its own.
    """

    kept: torch.Tensor
    sources: list = field(default_factory=list)
    embeds: torch.Tensor | None = field(default=None, repr=False)
    deepstack: torch.Tensor | None = field(default=None, repr=False)

    @staticmethod
    def join(parts: list["MergedTokens"]) -> "MergedTokens":
        if not parts:
            return MergedTokens(kept=torch.zeros(0, dtype=torch.long))
        deepstack = [p.deepstack for p in parts if len(p.kept)]
        return MergedTokens(kept=torch.cat([p.kept for p in parts]), sources=[s for p in parts for s in p.sources],
                            embeds=torch.cat([p.embeds for p in parts]),
                            deepstack=torch.cat(deepstack) if deepstack and all(d is not None for d in deepstack)
                            else None)


@dataclass
class AddedToken:
    """A token a merging stage added inside the language model (SparseVLM's recycled cluster means); one per added
    token of one row in ``StageRecord.added``.

    Attributes:
        span (int): the image or video of its row it belongs to, as the visual index of that span's first token.
        sources (torch.Tensor): ``[m]`` the visual indices (the row's visual numbering) merged into it, expanded
            through earlier added tokens.
        position (int): the original prompt position whose RoPE position it takes under ``positions="original"``
            (its anchor's).
        layer (int): the stage layer it was added before (decoder layer index).
        state (torch.Tensor): ``[D]`` the hidden state it entered that layer with.
    """

    span: int
    sources: torch.Tensor
    position: int
    layer: int
    state: torch.Tensor = field(repr=False)


@dataclass
class StageRecord:
    """One pruning stage of one prefill (``PrefillRecord.stages``, in order).

    Attributes:
        stage (str): where it ran: ``"vision"``, ``"pre_llm"`` or ``"layer"`` (``vtr.Stage`` values).
        layer (int): the first decoder layer that runs on its result (0 for stages before the language model).
        n_visual (list[int]): per row: visual tokens present when the stage ran (count).
        kept (list[torch.Tensor]): per row: ascending indices (in the row's visual numbering: all images of the
            row, in order) of the visual tokens still present after the stage.
        length (int): whole batch: sequence length (padding included) the following layers run on (slots).
        merged (list[MergedTokens] | None): per row: the kept tokens a merging method gave new embeddings (None
            when the method merged nothing).
        added (list[list[AddedToken]] | None): per row: the tokens merging stages inside the language model added
            (SparseVLM's recycled cluster tokens) that are present after this stage, in sequence order; None when
            there are none.
        index (torch.Tensor | None): ``[B, length]`` whole batch: the original prompt position of each slot the
            following layers run on (as ``PrefillRecord.index``).
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
    """What the most recent prefill did (``handle.last``). Per-row fields have one entry per batch row, in batch
    order; token counts and indices count visual tokens in the row's visual numbering (all images and videos of the
    row, in prompt order). The properties below (``kept``, ``n_kept``, ``merged``, retentions, layer averages) are
    derived from these fields.

    Attributes:
        n_visual (list[int]): per row: visual tokens before pruning (count).
        stages (list[StageRecord]): every stage of this prefill, in order.
        selection_seconds (float): whole batch: wall time spent computing scores and choosing tokens, device
            synchronised (seconds).
        index (torch.Tensor | None): ``[B, L']`` whole batch: the original prompt position of every slot of the
            pruned sequence the model ran on (-1 for padding slots vtr added), or None when nothing was pruned. Use
            it to map a plain forward's logits back. Slots of tokens a merging stage added inside the language
            model hold ``-2 - a`` (``a``: the added token's number in its row).
        layout (TokenLayout | None): per row (``layout.rows``): where the visual tokens were: each image's or
            video's token positions, frame, row, column, newline flag, anyres crop and RoPE position (see
            ``vtr.layout``).
        n_layers (int): decoder layers of the model (for ``visual_per_layer`` and ``layer_average``).
        vision_tokens (dict | None): vision stage only (FlowCut), whole batch: vision layer -> ``[C, W]`` the
            original token index ([CLS] = 0, -1 padding) of each tower input's tokens after that layer pruned
            (inputs in the tower's batch order: images, LLaVA-NeXT crops); Qwen-VL towers: block -> ``[1, S']`` the
            original row (the call's images packed in order; Qwen2.5-VL: window order) of every kept row, whole
            2x2 merge units. None for other methods.
        vision_merges (dict | None): a vision stage that merges (ToMe, MustDrop), whole batch: vision layer ->
            ``[C, W]`` for each token of each tower input before that layer's step (laid out as
            ``vision_tokens`` of the step before), the original index of the token it is part of after the step
            (itself if it stayed on its own, -1 if dropped or padding); merged tokens are the size-weighted means
            of their groups. None for other methods.
        nominal_retention (float | None): the fraction of visual tokens the method's budget names (``1 - ratio``
            for most methods; None for ``keep``), beside what really happened (``input_retention``,
            ``layer_retention``).
        decode_steps (list): methods with a ``kv_cache`` stage (DyCoke): one entry per single-token decoding step
            of this request, each a per-row list: the candidate visual tokens (row's visual numbering, ascending)
            that layers >= L attended to at that step, or None where they attended to all of them. Tokens that are
            never candidates (LLaVA-NeXT / OneVision row newlines) are always attended and not listed. Empty for
            other methods.
    """

    n_visual: list[int]
    stages: list[StageRecord] = field(default_factory=list)
    selection_seconds: float = 0.0
    index: torch.Tensor | None = None
    layout: TokenLayout | None = field(default=None, repr=False)
    n_layers: int = 0
    vision_tokens: dict | None = field(default=None, repr=False)
    vision_merges: dict | None = field(default=None, repr=False)
    nominal_retention: float | None = None
    decode_steps: list = field(default_factory=list)

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
        """Per row, the visual tokens entering each decoder layer (``n_layers`` counts; merged and added tokens
        included)."""
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
        """Per row, ascending indices (row's visual numbering) of the row's own visual tokens present after the last
        stage (every token when nothing was pruned)."""
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
