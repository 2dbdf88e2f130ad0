"""Signals of one vision layer during a ``vision`` stage (pruning inside the tower), from the projections the
layer itself computed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import compat

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Engine


@dataclass
class VisionImage:
    """One image inside the vision tower during a ``vision`` stage.

    crops: the image's tower inputs (a range of the tower's batch: one for LLaVA-1.5, base + tiles for LLaVA-NeXT).
    n: current tokens per crop ([CLS] included where the tower has one). cls: whether token 0 is a [CLS] token the
    engine always keeps. target: patches per crop the stage must end with (``Method.vision_target``; None: an
    adaptive count). sizes: after a merging step, how many original tokens each current token stands for. layer: the
    vision layer that just ran; feature_layer: the layer whose output the projector reads. state: per image and
    request, kept by the method between layers (e.g. cumulative scores, which the method gathers itself when it
    prunes).

    Qwen-VL towers (one packed sequence, no [CLS]): crops is the image's number in the call (one "crop"), n its
    current patches, ``rows`` their range in the tower's current sequence (Qwen2.5-VL: in window order), ``unit``
    the patches of one 2x2 merge unit (4, one language token): the engine keeps or drops whole units, so
    ``vision_step`` returns unit indices and ``target`` (patches) is a multiple of ``unit``."""

    crops: slice
    n: int
    cls: bool
    target: int | None
    layer: int
    feature_layer: int
    state: dict
    unit: int = 1
    rows: slice | None = None
    sizes: torch.Tensor | None = None  # [n_crops, n] tokens merged into each current token ([CLS] included); None: 1

    @property
    def n_crops(self) -> int:
        return self.crops.stop - self.crops.start

    @property
    def n_patches(self) -> int:
        return self.n - int(self.cls)

    @property
    def n_units(self) -> int:
        """Current merge units (Qwen-VL); the patches elsewhere."""
        return self.n_patches // self.unit


class VisionStageContext:
    """The signals of one vision layer for a ``vision`` stage, computed for the rows a method asks for from the
    query, key and value projections the layer itself computed (``[C, W, H * d]``, right-padded crops; Qwen-VL: the
    block's fused ``qkv`` output ``[S, 3 * H * d]`` of the packed rows, rotated with the rows' rotary embedding), so
    the tower keeps SDPA / FlashAttention and nothing is projected twice. Each signal is computed once per image."""

    def __init__(self, engine: "Engine", attn: torch.nn.Module, projections: dict, rotary=None,
                 hidden: torch.Tensor | None = None, tokens: torch.Tensor | None = None):
        self.engine, self.attn, self.projections = engine, attn, projections
        self.rotary = rotary  # Qwen-VL: (cos, sin) ``[S, d]`` of the current rows, which the block rotated q, k by
        self.hidden = hidden  # CLIP/SigLIP: ``[C, W, D]`` the states the step runs on (see ``states``)
        self.tokens = tokens  # CLIP/SigLIP: ``[C, W]`` each slot's original token index (see ``original_tokens``)
        self._memo = {}

    def original_tokens(self, image: VisionImage) -> torch.Tensor:
        """``[c, n]``: the original index in the unpruned tower sequence ([CLS] = 0, patch ``p`` = ``p + 1``) of
        each of the image's crops' current tokens."""
        return self.tokens[image.crops, :image.n]

    def states(self, image: VisionImage) -> torch.Tensor:
        """``[c, n, D]``: the image's crops' hidden states where the step runs: the layer's output, or, for a
        method with ``vision_merge_point="attention"``, the residual stream after the layer's self-attention."""
        return self.hidden[image.crops, :image.n]

    @property
    def score_dtype(self) -> torch.dtype:
        dtype = next(iter(self.projections.values())).dtype
        return dtype if self.engine.method.score_dtype == "model" else torch.float32

    def _heads(self, name: str, image: VisionImage) -> torch.Tensor:
        """``[c, H, n, d]``: this image's crops (all holding ``n`` real tokens) of one projection (Qwen-VL: ``c = 1``,
        queries and keys after the rotary embedding, as the block attends with them)."""
        if "qkv" in self.projections:
            key = ("qwen", image.crops.start)
            if key not in self._memo:
                cos, sin = (t[image.rows] for t in self.rotary)
                heads = compat.qwen_vision_heads(self.attn, self.projections["qkv"][image.rows], cos, sin)
                self._memo[key] = dict(zip("qkv", (h[None].to(self.score_dtype).contiguous() for h in heads)))
            return self._memo[key][name]
        heads = compat.vision_heads(self.attn, self.projections[name][image.crops, :image.n], name)
        return heads.to(self.score_dtype).contiguous()  # reductions over a transposed view are slow on CPU

    def attention_rows(self, image: VisionImage, rows: slice) -> torch.Tensor:
        """``[c, H, r, n]``: softmax attention probabilities (fp32 softmax, as eager attention) of the query tokens
        ``rows`` of each crop over its ``n`` current tokens, per head."""
        key = ("rows", image.crops.start, rows.start, rows.stop)
        if key not in self._memo:
            q = self._heads("q", image)[:, :, rows]
            scale = compat.vision_attention_scale(self.attn)
            logits = torch.matmul(q, self._heads("k", image).transpose(-1, -2)) * scale
            self._memo[key] = logits.softmax(-1, dtype=torch.float32).to(self.score_dtype)
        return self._memo[key]

    def keys(self, image: VisionImage) -> torch.Tensor:
        """``[c, H, n, d]``: the attention's key projections (bias included) per head."""
        return self._heads("k", image)

    def values(self, image: VisionImage) -> torch.Tensor:
        """``[c, H, n, d]``: the attention's value projections (bias included) per head."""
        key = ("values", image.crops.start)
        if key not in self._memo:
            self._memo[key] = self._heads("v", image)
        return self._memo[key]

    def global_query_attention(self, image: VisionImage) -> torch.Tensor:
        """``[c, n]``: softmax attention (fp32 softmax, scaled logits) of a "global" query, the mean of the crop's
        ``n`` current queries per head, over its tokens, mean over heads (FlowCut's Qwen-VL score: the tower has no
        [CLS] token)."""
        key = ("global", image.crops.start)
        if key not in self._memo:
            q = self._heads("q", image).mean(2, keepdim=True)  # [c, H, 1, d]
            scale = compat.vision_attention_scale(self.attn)
            logits = torch.matmul(q, self._heads("k", image).transpose(-1, -2)) * scale
            self._memo[key] = logits.softmax(-1, dtype=torch.float32).to(self.score_dtype).mean(1)[:, 0]
        return self._memo[key]
