from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Method, Stage, StageSpec, VisionMerge, layer_list
from .registry import register

# The official pruning layers (0-based decoder layers whose output is filtered) of 32-layer LLaVA-1.5: the
# filtered sequence enters layers 3, 7, 11 and 15.
OFFICIAL = (3, 7, 11, 15)


@register
@dataclass
class MustDrop(Method):
    """MustDrop, Multi-Stage Vision Token Dropping (Liu et al., arXiv 2411.10803): merge spatially similar
    patches in the vision tower, filter the visual tokens the text ignores at several decoder layers of the
    prefill, and keep only the final tokens in those layers' KV caches for decoding; a key set of tokens chosen in
    the tower is never dropped.

    1. Vision stage, after CLIP layer 0: the crop's patch grid is cut into ``window x window`` windows (3 x 3: 64
       windows of LLaVA-1.5's 24 x 24), each window scored by the mean cosine similarity of its patches' layer-0
       outputs over every ordered pair of distinct patches; the ``r`` most similar windows each merge into their
       last (bottom-right) patch, the mean of the window (``merge_wavg``, sizes 1). ``r``: with
       ``spatial_threshold`` (the official 0.8) the number of windows scoring at least that (adaptive; the budget
       is not used); without it (the default), as LightCompress's ``retained_tokens``: ``(N + 1 - T) // (window^2 -
       1)`` windows for a budget of ``T`` patches (``N + 1``: the crop's tokens with [CLS]), at most every window.
    2. Key set, at the tower's last layer (CLIP layer 23 of 24, after the feature layer; the merged sequence):
       the top ``ceil(key_share * n)`` of its ``n`` patches by the [CLS] attention (softmax, mean over heads).
    3. Prefill, before each stage layer ``K`` (``layers``; official: the outputs of layers 2, 6, 10, 14 of 32, i.e.
       K = 3, 7, 11, 15): with ``A`` the softmax attention of layer ``K - 1`` from the text after the image (mean
       over heads) to the image's tokens, ``g = A.sum(0)`` (over the text), a token is dropped when ``g < g.sum() *
       global_thr`` and ``max(A) < individual_thr``, unless it is in the key set (dual-attention filtering).
    4. Decoding: once the prefill is done, the KV caches of layers ``K_1 - 1`` on hold the final tokens only (the
       official code cuts them; layers before ``K_1 - 1`` keep their whole prompt), so decoding attends to them.

    Keep count: adaptive (the thresholds decide); ``handle.last`` reports every stage. The defaults
    (``global_thr=1.0``, ``individual_thr=0.0``: the official command-line defaults, no filtering) give the
    vision-stage merge alone, which is what LightCompress ships as MustDrop; the official scripts pair
    ``global_thr`` / ``individual_thr`` 0.001 / 0.001, 0.0012 / 0.001 and 0.011 / 0.01 with their 192, 128 and 64
    token settings (TextVQA), where the token count is the layer-averaged one. Positions: ``compact`` (official:
    the sequence rebuilt after the tower, the position ids narrowed at each stage, decoding at each layer's cache
    length). Official code: ``liuting20/MustDrop``: ``llava/model/multimodal_encoder/local_merge.py``
    (``conditional_pooling``, ``merge_wavg``), ``clip_encoder.py`` (``CLIPVisionModelAcc.custom_forward``),
    ``llava/model/language_model/modelling_sparse_llama.py`` (``LlamaDynamicvitModel.forward``,
    ``dual_attention_filter``); LightCompress ``llmc/compression/token_reduction/mustdrop.py``.

    Deliberate differences:
      * token order: the merged patch stays in its window's last slot, everything in raster order (official: the
        merged tokens first, in similarity order, then the others);
      * per image: the window count and thresholds per image (official: ``r`` is the minimum over the batch, one
        image per prompt, the text after it the only queries, batch 1 in the language model);
      * ``r`` from the budget by default (LightCompress's rule; official: the 0.8 threshold, ``spatial_threshold``);
      * a grid the window does not divide merges its full windows from the top-left (official: an assertion);
      * ``layers`` at the same fractions of other depths (``round(K * n / 32)``, at least 1, duplicates dropped);
      * attention, similarities and merges in fp32 (official: fp16; ``score_dtype="model"`` for the scores).
    Supported: LLaVA-1.5 (the official code's model).
    """

    name: ClassVar[str] = "mustdrop"
    layer_option: ClassVar[str] = "layers"
    summary: ClassVar[str] = "spatial window merge in the tower + text-attention filter in the prefill + cut KV caches"
    stage: ClassVar[Stage] = Stage.VISION
    default_positions: ClassVar[str] = "compact"
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    needs: ClassVar[frozenset] = frozenset({"attention_inputs"})
    needs_whole_prompt: ClassVar[bool] = True  # the filter reads the text after the image
    model_classes: ClassVar[tuple[str, ...] | None] = ("LlavaForConditionalGeneration",)
    unsupported_reason: ClassVar[str] = ("its official code is written for LLaVA-1.5's CLIP tower (a [CLS] token, one "
                                         "square crop per image).")

    window: int = field(default=3, metadata={"min": 2})
    """Side of the square windows of patches merged in the vision tower (the official 3 x 3)."""
    spatial_threshold: float | None = field(default=None, metadata={"min": -1.0, "max": 1.0})
    """The official adaptive window count: merge every window whose mean pairwise cosine similarity is at least
    this (official 0.8); None (default): as many windows as the budget needs (LightCompress's rule)."""
    key_share: float = field(default=0.08, metadata={"min": 0.0, "max": 1.0})
    """Share of the tower's patches (by the last layer's [CLS] attention) kept in the key set, never dropped."""
    global_thr: float = 1.0
    """Dual-attention filter: a token is a drop candidate when the text's summed attention to it is below this
    share of the image's total (official default 1.0; the scripts use 0.001 to 0.011)."""
    individual_thr: float = 0.0
    """Dual-attention filter: ... and when no text token attends to it more than this (official default 0.0: no
    filtering; the scripts use 0.001 to 0.01)."""
    layers: str = ""
    """Stage layers K (the filtered sequence enters them), comma separated; "" resolves to the official 3, 7, 11,
    15 of 32 at the same fractions of the model's depth."""

    def for_depth(self, n_layers: int) -> "MustDrop":
        if self.layers:
            layer_list(self, self.layers, n_layers)
            return self
        scaled = sorted({max(1, min(n_layers - 1, round(k * n_layers / 32))) for k in OFFICIAL})
        return dataclasses.replace(self, layers=",".join(map(str, scaled)))

    def stages(self) -> list[StageSpec]:
        vision = StageSpec(Stage.VISION, 0)
        if not self.layers:
            return [vision]
        layers = [int(k) for k in self.layers.split(",")]
        # every stage also cuts the caches of layers K_1 - 1 ... K - 1 to its tokens: after the last, all of them
        # hold the final tokens, as the official cache cut after the prefill
        return [vision] + [StageSpec(Stage.LAYER, k, slice_earlier=True, slice_from=layers[0] - 1) for k in layers]

    # ------------------------------------------------------------------------------------------ vision stage
    def vision_stage_layers(self, n_layers: int, feature_layer: int) -> tuple[int, ...]:
        return tuple(sorted({0, n_layers - 1}))

    def vision_target(self, n_tokens: int, n_crops: int) -> int | None:
        return None  # adaptive: the windows the step merges

    def vision_step(self, ctx, image) -> VisionMerge | None:
        if image.layer == 0:
            return self._merge_windows(ctx, image)
        attention = ctx.attention_rows(image, slice(0, 1))[:, :, 0, 1:].mean(1)  # [c, n]: [CLS] to each patch
        count = math.ceil(self.key_share * image.n_patches)
        top = torch.topk(attention, count, dim=1).indices
        image.state["key_set"] = ctx.original_tokens(image)[:, 1:].gather(1, top.to(ctx.tokens.device))
        return None

    def _merge_windows(self, ctx, image) -> VisionMerge | None:
        states = ctx.states(image)[:, 1:].to(ctx.score_dtype)  # [c, N, D]: the patches, raster order
        c, N, D = states.shape
        side, w = math.isqrt(N), self.window
        if side * side != N:
            raise ValueError(f"vtr: mustdrop needs a square patch grid, got {N} patches")
        g = side // w
        if g == 0:
            return None
        grid = torch.arange(N, device=states.device).view(side, side)[:g * w, :g * w]
        windows = grid.view(g, w, g, w).permute(0, 2, 1, 3).reshape(g * g, w * w)  # [n_windows, w*w] raster
        members = states[:, windows]  # [c, n_windows, w*w, D]
        sims = torch.nn.functional.cosine_similarity(members[:, :, :, None], members[:, :, None, :], dim=-1)
        sims = sims * (1 - torch.eye(w * w, device=sims.device))
        similarity = sims.sum((-1, -2)) / (w * w * (w * w - 1))  # [c, n_windows]
        if self.spatial_threshold is not None:
            r = int((similarity >= self.spatial_threshold).sum(1).min())
        else:
            r = min(g * g, max(0, (N + 1 - self.budget(N)) // (w * w - 1)))
        if r == 0:
            return None
        chosen = torch.topk(similarity, r, dim=1).indices  # [c, r]
        into_patch = torch.arange(N, device=states.device).expand(c, -1).clone()
        merged = windows[chosen]  # [c, r, w*w]
        rows = torch.arange(c, device=states.device)[:, None, None]
        into_patch[rows, merged[..., :-1]] = merged[..., -1:].expand(-1, -1, w * w - 1)
        kept = torch.ones(c, N, dtype=torch.bool, device=states.device)
        kept[rows, merged[..., :-1]] = False
        keep = kept.nonzero()[:, 1].view(c, -1)  # ascending per crop
        position = torch.full((c, N), -1, dtype=torch.long, device=states.device)
        position[torch.arange(c, device=states.device)[:, None], keep] = torch.arange(keep.shape[1],
                                                                                        device=states.device)
        return VisionMerge(keep=keep, into=position.gather(1, into_patch))

    # ------------------------------------------------------------------------------------------ prefill stages
    def budget_for(self, ctx, row, group):
        if self.ratio == 0 or len(group) == 0 or (self.keep is not None and self.keep >= group.span.n):
            return len(group)
        return len(self.plan(ctx, row, group))

    def select(self, ctx, row, group, budget):
        return self.plan(ctx, row, group)

    def plan(self, ctx, row, group):
        def compute():
            text = ctx.text_slots(row)
            text = text[text > group.slots.max().to(text.device)]  # the text after the image
            if not len(text):
                return torch.arange(len(group), device=group.slots.device)
            attention = ctx.attention_rows(row, text)[:, group.slots.to(text.device)].float()  # [q, n]
            total = attention.sum(0)
            drop = (total < total.sum() * self.global_thr) & (attention.max(0).values < self.individual_thr)
            key_set = ctx.vision_stage_state(row, group.span).get("key_set")
            if key_set is not None:  # never dropped
                crop, index = ctx.vision_sources(row, group)
                drop &= ~self._in_key_set(crop, index, key_set, int(crop.min())).to(drop.device)
            return (~drop).nonzero().flatten().to(group.slots.device)
        return ctx.cached(("mustdrop", row, group.span.index, len(group)), compute)

    @staticmethod
    def _in_key_set(crop: torch.Tensor, index: torch.Tensor, keys: torch.Tensor, first) -> torch.Tensor:
        """``[c]`` whether each candidate (its crop and tower token index) is in its crop's key set."""
        out = torch.zeros(len(index), dtype=torch.bool)
        for c_ in crop.unique().tolist():
            mine = crop == c_
            out[mine] = torch.isin(index[mine], keys[c_ - int(first)].cpu())
        return out
