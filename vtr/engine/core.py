"""The engine's shared core: layouts of pruned sequences, per-request and per-forward state, and the index
arithmetic every stage uses (compaction with inserted tokens, DeepStack cuts, position shifts)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import kernels
from ..layout import TokenLayout
from ..methods.base import Stage
from ..report import AddedToken, PrefillRecord


@dataclass
class SeqLayout:
    """A batch-rectangular sequence the decoder runs on, relative to the original prompt.

    index: ``[B, L]`` original prompt position of each slot (-1: padding slot added by vtr; ``prompt_length + a``:
    the row's ``a``-th token added by a merging stage, see ``RequestState.added``).
    local: ``[B, L]`` slot in the language model's input sequence (-1: added padding).
    mask2d: ``[B, L]`` bool, True for real tokens.
    positions: ``[B, L]`` (or M-RoPE ``[R, B, L]``) positions of the slots.
    shift: ``[B]`` visual tokens removed so far by ``compact`` stages (decoding positions move back by this); a
    stage under ``original`` leaves it unchanged.
    """

    index: torch.Tensor
    local: torch.Tensor
    mask2d: torch.Tensor
    positions: torch.Tensor
    shift: torch.Tensor
    layer: int = 0
    stage: Stage | None = None
    policy: str | None = None  # the stage's position policy ("original" / "compact"); None: the base layout
    earlier: bool = False  # a layer stage whose layout the KV caches of the layers before it were cut down to
    earlier_from: int = 0  # with ``earlier``: the first layer cut

    @property
    def length(self) -> int:
        return self.index.shape[1]


@dataclass
class RequestState:
    """Lives as long as the request's KV cache: how its prompt was pruned."""

    prompt_length: int
    base: SeqLayout
    layouts: list[SeqLayout] = field(default_factory=list)  # one per stage that removed tokens, in order
    record: PrefillRecord | None = None
    added: list[list[AddedToken]] = field(default_factory=list)  # per row: tokens merging stages added, in order
    decode_state: dict = field(default_factory=dict)  # the method's kv_cache-stage state (select_decode)
    method_state: dict = field(default_factory=dict)  # what a method's stage leaves for its later stages
    signals: dict = field(default_factory=dict)  # signals that do not change between stages (vtr.signals), by key
    decode_spans: list | None = None  # per row: (span, [n] cache slots of its present visual tokens, [n] ids)
    length_layer: int = 0  # the layer whose cache length transformers reads (``compat.length_layer``)
    # [B, L] the bidirectional attention block of each prompt token (-1: causal), for models that attend
    # bidirectionally within each image (Gemma 3); None otherwise
    blocks: torch.Tensor | None = None

    def layout_blocks(self, layout: "SeqLayout") -> torch.Tensor | None:
        """``[B, L']``: the bidirectional block of each slot of ``layout`` (an added token: its anchor's; padding:
        -1), or None for models without blocks. The kept tokens of a block stay one block."""
        if self.blocks is None:
            return None
        index = layout.index
        anchors = index.clone()
        for b, added in enumerate(self.added):
            extra = index[b] >= self.prompt_length
            if bool(extra.any()):
                anchors[b, extra] = torch.tensor([added[int(i) - self.prompt_length].position
                                                  for i in index[b, extra].tolist()], device=index.device)
        blocks = self.blocks.to(index.device).gather(1, anchors.clamp(min=0))
        return torch.where(index >= 0, blocks, -1)

    def original_position(self, row: int, index: int) -> int:
        """The prompt position a slot of index ``index`` stands for (an added token: its anchor's)."""
        return index if index < self.prompt_length else self.added[row][index - self.prompt_length].position

    def public_index(self, index: torch.Tensor) -> torch.Tensor:
        """A layout's index as ``handle.last`` reports it: added token ``a`` of a row as ``-2 - a``."""
        return torch.where(index >= self.prompt_length, self.prompt_length - 2 - index, index)

    def continuation_positions(self, q_len: int, logical_past: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Original positions of ``q_len`` new tokens after ``logical_past`` tokens of the unpruned sequence: each
        row continues from its prompt's last real token (+1 per M-RoPE axis, as generate() steps positions),
        counting the real tokens after the prompt (from the 2-D mask of the whole sequence when given). ``[B, q]``,
        or ``[3, B, q]`` on M-RoPE models."""
        positions, valid = self.base.positions, self.base.mask2d
        rope = positions[-3:] if positions.dim() == 3 else positions[None]
        last = valid.shape[1] - 1 - valid.flip(1).long().argmax(1)
        start = rope[:, torch.arange(len(last), device=rope.device), last.to(rope.device)] + 1  # [R, B]
        if mask is not None:
            offsets = (mask[:, self.prompt_length:].long().cumsum(1) - 1)[:, -q_len:].clamp(min=0)
        else:
            offsets = (logical_past - self.prompt_length + torch.arange(q_len)).expand(start.shape[1], q_len)
        new = start[..., None] + offsets.to(start.device)
        return new if positions.dim() == 3 else new[0]

    @property
    def cache_prompt_length(self) -> int:
        """How many prompt slots the KV cache of the layer whose length transformers reads holds (layer 0, or on
        hybrid models the first attention layer: ``length_layer``)."""
        return self.layout_at(self.length_layer).length

    @property
    def lm_input_length(self) -> int:
        first = self.layouts[0] if self.layouts else None
        return first.length if first is not None and first.stage is Stage.PRE_LLM else self.prompt_length

    def active(self, layer: int) -> SeqLayout | None:
        """The layer-stage layout decoder layer ``layer`` runs on, if any."""
        found = None
        for layout in self.layouts:
            if layout.stage is Stage.LAYER and (layout.layer <= layer
                                                or (layout.earlier and layer >= layout.earlier_from)):
                found = layout
        return found

    def layout_at(self, layer: int) -> SeqLayout:
        """The layout decoder layer ``layer`` runs on (its KV cache's prompt part)."""
        active = self.active(layer)
        if active is not None:
            return active
        first = self.layouts[0] if self.layouts else None
        return first if first is not None and first.stage is Stage.PRE_LLM else self.base

    def final(self) -> SeqLayout:
        return self.layouts[-1] if self.layouts else self.base


@dataclass
class VisionCall:
    """One ``get_image_features`` (or ``get_video_features``) call: its anyres image sizes (LLaVA-NeXT) or image
    grids (Qwen-VL) and, per captured vision layer, [attention module, attention input, layer output]
    (``[n_crops, N, D_v]`` each; Qwen-VL: ``[S, D_v]`` patches in the tower's order), the attention call's other
    arguments (``extras``) and the attention's own projections (``projections``)."""

    image_sizes: list | None
    grid_thw: torch.Tensor | None = None
    layers: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    stage: object = None  # the vision stage's state (``vision.VisionStageState``, ``qwen_vision.QwenStageState``)
    encoding: bool = False  # inside ``get_image_features`` (a Qwen-VL tower call outside it encodes videos)
    kind: str = "image"  # "video": a ``get_video_features`` call
    frames: int | None = None  # LLaVA-OneVision videos: frames per video (every video of a call has as many)
    video: "VisionCall | None" = None  # the same forward's video call, beside its image call
    pixel_values: torch.Tensor | None = None  # the call's pixel input, as passed (VFlowOpt's patch entropy)
    # per captured vision layer, the attention's own query and key projections (``{"q", "k"}``: ``[n_crops, N, H * d]``;
    # Qwen-VL: ``{"qkv"}``, ``[S, 3 * H * d]``), as the tower computed them: signals read them instead of projecting
    # the attention input again
    projections: dict = field(default_factory=dict)
    signals: dict = field(default_factory=dict)  # signals computed from this call, shared by every stage


@dataclass
class ForwardState:
    """One forward call (a prefill or a decoding step) in one thread."""

    depth: int = 0
    base_running: bool = False  # the base model's forward of this call has started
    prefill: bool = False
    inputs: dict | None = None  # the base model's inputs of a prefill with visual inputs
    layout: TokenLayout | None = None
    current: SeqLayout | None = None  # the layer-stage layout of the decoder layer running now
    request: RequestState | None = None
    cache: object = None
    labels: torch.Tensor | None = None
    loss_kwargs: dict = field(default_factory=dict)
    decode_tail: torch.Tensor | None = None
    captures: dict = field(default_factory=dict)  # layer -> (attention module, normed hidden, cos, sin)
    # stage layer -> {"normed": [B, L, D], "keys": [B, L, H_kv d]}: what a "layer_inputs" signal computed with the
    # layer's own input norm and key projection over the stage's whole sequence; then, once the stage pruned,
    # layer -> ([B, L'] slots gathered, that dict), handed to the layer in place of computing them again
    own_projections: dict = field(default_factory=dict)
    reuse: dict = field(default_factory=dict)
    vision: "VisionCall | None" = None  # the vision-tower signals of this prefill's images
    lm_embeds: torch.Tensor | None = None  # [B, L, D] the language model's input embeddings of the prefill
    mask2d: torch.Tensor | None = None  # a continuation's 2-D mask as the base model got it (before any mask mapping)
    # Qwen3-VL: the prefill's DeepStack inputs, (visual_pos_masks [B, L], per level [n_visual, D]); else None
    deepstack: tuple | None = None
    memo: dict = field(default_factory=dict)  # per-forward masks and rotary embeddings of pruned layouts
    block_outputs: dict = field(default_factory=dict)  # layer -> its output, made by a post-attention stage
    in_block: bool = False  # a post-attention stage is running a layer's MLP block itself
    # generate() encoded each prompt's visual inputs once, then repeated every row this many times (beam search,
    # num_return_sequences): row r of the prefill reads the encoding of prompt r // expansion
    expansion: int = 1


def insertion_index(keep: torch.Tensor, after: list, length: int) -> torch.Tensor:
    """Like ``compaction_index``, with new tokens inserted: ``after[b]`` lists, for the row's added tokens in
    order, the slot each follows (several after one slot keep their order). Added token ``j`` is slot
    ``length + j``. Returns ``[B, L']`` left-padded with -1."""
    rows = []
    for b in range(keep.shape[0]):
        kept = keep[b].nonzero().flatten()
        n = len(after[b])
        follows = torch.tensor(after[b], dtype=torch.float64, device=keep.device)
        keys = torch.cat([kept.double(), follows + (torch.arange(n, device=keep.device) + 1) / (n + 2)])
        entries = torch.cat([kept, length + torch.arange(n, device=keep.device)])
        rows.append(entries[torch.argsort(keys, stable=True)])
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r.new_full((width - len(r),), -1), r]) for r in rows])


def deepstack_inputs(masks: torch.Tensor, embeds: list, select: torch.Tensor):
    """Cut DeepStack inputs to a pruned sequence. masks: ``[B, L]`` visual positions; embeds: per layer
    ``[n_visual, D]`` features in (row, position) order; select: ``[B, L']`` slots kept (-1 for padding)."""
    rank = masks.flatten().long().cumsum(0).view_as(masks) - 1
    kept = kernels.gather_rows(masks.unsqueeze(-1), select, False).squeeze(-1)
    rows = kernels.gather_rows(rank.unsqueeze(-1), select, 0).squeeze(-1)[kept]
    return kept, [e[rows.to(e.device)] for e in embeds]


def shift_positions(positions: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Subtract a per-row shift ``[B]`` from positions ``[B, q]`` or ``[R, B, q]``."""
    return positions - shift.view(-1, 1).to(positions.device)


def clock(t: torch.Tensor) -> float:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()
