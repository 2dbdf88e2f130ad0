"""Signals of the vision tower for images, read from the inputs, query and key projections and outputs of the
vision layers a ``needs={"vision"}`` method names, captured while the images were encoded: the projections are the
tower's own (never computed again) and only the attention rows a method asks for are computed from them (the tower
keeps SDPA / FlashAttention, which return no probabilities). Each signal is computed once per request (kept with
the vision call), whatever the number of stages that read it."""
from __future__ import annotations

import torch

from .. import compat
from .core import ContextBase, SpanCandidates


def split_deepstack(features: torch.Tensor, D: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[m, D (+ levels * D)]`` merged-token embeddings, with the DeepStack levels appended (Qwen3-VL): ``(embeds
    [m, D], deepstack [m, levels * D] or None)`` in ``dtype``."""
    deepstack = features[:, D:].to(dtype) if features.shape[1] > D else None
    return features[:, :D].to(dtype), deepstack


class TowerSignals(ContextBase):
    """Image signals of the vision tower (FasterVLM, VisionZip, VisPruner, HiPrune, CDPruner, VFlowOpt...)."""

    def _vision_layer(self, layer: int | None):
        call = self.fwd.vision
        layer = self.engine.vision_feature_layer if layer is None else layer
        if call is None or layer not in call.layers or call.layers[layer][2] is None:
            raise RuntimeError(f"{self.engine.method.name}: no vision-tower signals of layer {layer} were captured "
                               "for this prefill; the images must be encoded by the model itself in the same call "
                               "(pass pixel_values to forward() or generate(), not precomputed features)")
        return call.layers[layer]

    def vision_stage_state(self, row: int, span) -> dict:
        """The per-image ``state`` dict a ``vision`` stage's steps kept for the image ``span`` of ``row`` (what a
        multi-stage method carries from the tower to its later stages: MustDrop's key set); empty if the stage
        did not run on it."""
        stage = self.fwd.vision.stage if self.fwd.vision is not None else None
        if stage is None:
            return {}
        first, _ = self._image_crop(row, span)  # the prompt's encoding (beams repeat its rows)
        return next((image.state for image in stage.images if image.crops.start == first), {})

    def last_vision_layer(self) -> int:
        """0-based index of the vision tower's last layer."""
        return len(compat.vision_layers(self.engine.model)) - 1

    def _vision_memo(self) -> dict:
        """The memo of the vision call's signals: once per request (stages after the first read them again)."""
        return self.fwd.vision.signals

    def _qwen_qkv(self, layer: int, call=None) -> torch.Tensor | None:
        """A Qwen-VL block's fused projection output ``[S, 3 * H * d]`` as the tower computed it (None if absent)."""
        call = self.fwd.vision if call is None else call
        return call.projections.get(layer, {}).get("qkv")

    def vision_sources(self, row: int, tokens: SpanCandidates) -> tuple[torch.Tensor, torch.Tensor]:
        """``(crop, index)``: ``[c]`` the vision-tower input (all images' crops in input order) and ``[c]`` the token
        index in its sequence ([CLS] included) that made each candidate, or ``[c, u]`` the ``u`` patches a language
        token concatenates (InternVL's pixel shuffle; signals per patch are then averaged over them). Images only;
        newline tokens have none."""
        span = self._image_only(tokens).span
        key = ("sources", row, span.index)
        if key not in self._memo:
            first, size = self._image_crop(row, span)
            crop, index = self.engine.family.vision_patches(self.engine.model, span, size)
            self._memo[key] = (crop + first).masked_fill(crop < 0, -1), index
        crop, index = self._memo[key]
        ids = tokens.ids.cpu()
        crop, index = crop[ids], index[ids]
        if bool((index < 0).any()):
            raise RuntimeError(f"{self.engine.method.name}: newline tokens have no vision-tower patch")
        return crop, index

    def _image_only(self, tokens: SpanCandidates) -> SpanCandidates:
        """``tokens``, or a ``ValueError`` naming the method when they are not an image's (before any signal is
        looked for: a video's frames have no image signals, which is not the user's mistake to fix elsewhere)."""
        if tokens.span.kind != "image":
            raise ValueError(f"vtr: {self.engine.method.name} prunes images with vision-tower signals; this prompt "
                             f"holds a {tokens.span.kind}")
        return tokens

    def _image_crop(self, row: int, span) -> tuple[int, object]:
        """(first crop of the row's image ``span`` in the tower's batch, its image size)."""
        return self._image_crops()[self.encoding_row(row), span.index]

    def _image_crops(self) -> dict:
        """(encoded row, image span index) -> (first crop of the image in the tower's batch, its image size)."""
        if "crops" not in self._memo:
            sizes = self.fwd.vision.image_sizes if self.fwd.vision is not None else None
            crops, first, k = {}, 0, 0
            for b in self.encoded_rows():
                for span in self.layout.rows[b].spans:
                    if span.kind == "image":
                        size = sizes[k] if sizes is not None else None
                        crops[b, span.index] = (first, size)
                        first += self.engine.family.crops_per_image(self.engine.model, size, span)
                        k += 1
            self._memo["crops"] = crops
        return self._memo["crops"]

    def vision_cls_attention(self, row: int, tokens: SpanCandidates, layer: int | None = None) -> torch.Tensor:
        """``[c]``: the softmax attention the [CLS] query (token 0 of each crop) pays each candidate's patch at a
        vision layer (default: the feature layer, CLIP's ``attentions[-2]`` on LLaVA), mean over heads."""
        self._image_only(tokens)
        attn, hidden, _ = self._vision_layer(layer)
        memo, key = self._vision_memo(), ("cls", self._layer(layer), self._vision_dtype(hidden))
        if key not in memo:
            q, k = self._vision_qk(layer)
            probs = compat.vision_attention_probs(attn, q, k, slice(0, 1), self._vision_dtype(hidden))
            memo[key] = probs.mean(1)[:, 0]  # [n_crops, N]: one query row per crop
        return _per_token(memo[key], *self.vision_sources(row, tokens))

    def vision_features(self, row: int, tokens: SpanCandidates, layer: int | None = None) -> torch.Tensor:
        """``[c, D_v]``: each candidate's hidden state at the output of a vision layer (default: the feature
        layer, as the model's feature selection reads it, i.e. what the projector reads). InternVL: the ``u``
        patches' states concatenated in the pixel shuffle's order, ``[c, u * D_v]``."""
        self._image_only(tokens)
        _, _, output = self._vision_layer(layer)
        crop, index = self.vision_sources(row, tokens)
        features = _per_token(output, crop, index, reduce=None)
        if layer is None or layer == self.engine.vision_feature_layer:
            features = compat.vision_feature_output(self.engine.model, features)
        return features.flatten(1, 2) if index.dim() == 2 else features

    def vision_keys(self, row: int, tokens: SpanCandidates, layer: int | None = None) -> torch.Tensor:
        """``[c, d]``: each candidate's key at a vision layer's attention (bias included), mean over heads. Qwen-VL
        (a merged token stands for a 2x2 merge unit): the keys after the vision RoPE, averaged over the unit's
        patches (VisionZip's Qwen2.5-VL port in LightCompress)."""
        if self.engine.family.mrope:
            units = self.vision_units(row, tokens)
            table = self._qwen_unit_table("keys", layer, compat.qwen_vision_keys)
            return table[units.to(table.device)]
        self._image_only(tokens)
        attn, hidden, _ = self._vision_layer(layer)
        memo, key = self._vision_memo(), ("keys", self._layer(layer))
        if key not in memo:
            memo[key] = compat.vision_heads(attn, self._vision_qk(layer)[1], "k").mean(1)  # [n_crops, N, d]
        return _per_token(memo[key], *self.vision_sources(row, tokens))

    def vision_projected_keys(self, row: int, tokens: SpanCandidates, layer: int | None = None) -> torch.Tensor:
        """``[c, H * d]``: each candidate's key at a vision layer's attention, the full ``k_proj`` output (bias
        included, heads not split), as the tower computed it, in ``score_dtype``'s precision."""
        self._image_only(tokens)
        _, hidden, _ = self._vision_layer(layer)
        memo, key = self._vision_memo(), ("projected_keys", self._layer(layer))
        if key not in memo:
            memo[key] = self._vision_qk(layer)[1].to(self._vision_dtype(hidden))
        crop, index = self.vision_sources(row, tokens)
        return memo[key][crop.to(hidden.device), index.to(hidden.device)]

    def vision_cls_attention_one_head(self, row: int, tokens: SpanCandidates,
                                      layer: int | None = None) -> torch.Tensor:
        """``[c]``: the [CLS] query's attention to each candidate's patch computed as ONE head over the full
        projection width (PruMerge's): ``softmax_j(q_0 . k_j / sqrt(D_v))`` over every token of the crop ([CLS]
        included), ``q`` and ``k`` the full ``q_proj`` / ``k_proj`` outputs of a vision layer's attention input (as
        the tower computed them, in ``score_dtype``'s precision), ``D_v`` the tower's hidden width. Softmax in fp32."""
        self._image_only(tokens)
        _, hidden, _ = self._vision_layer(layer)
        memo, key = self._vision_memo(), ("cls_one_head", self._layer(layer))
        if key not in memo:
            dtype = self._vision_dtype(hidden)
            q, k = (x.to(dtype) for x in self._vision_qk(layer))  # [n_crops, N, W]
            logits = torch.matmul(q[:, :1], k.transpose(-1, -2)) * hidden.shape[-1] ** -0.5
            memo[key] = logits.softmax(-1, dtype=torch.float32)[:, 0]  # [n_crops, N]
        crop, index = self.vision_sources(row, tokens)
        return memo[key][crop.to(hidden.device), index.to(hidden.device)]

    def vision_token_features(self, row: int, tokens: SpanCandidates) -> torch.Tensor:
        """``[c, F]``: the features by which VisionZip and VisPruner compare and merge the candidates. Where a
        language token is one patch of the tower (CLIP; InternViT: the unit's patches concatenated) the feature
        layer's hidden states before the projector (``vision_features``); where it merges a 2x2 unit of patches
        (Qwen-VL, GLM-4.1V) the merged token itself, the merger's output, i.e. its language-model input embedding
        ``[c, D]`` (VisPruner#1: pruning "on the merged tokens"; LightCompress's Qwen2.5-VL ports). Before the
        language model (``pre_llm`` stages)."""
        if not self.engine.family.mrope:
            return self.vision_features(row, tokens)
        self.vision_units(row, tokens)  # images only, with the message every image signal gives
        if self.spec.stage.value != "pre_llm":
            raise RuntimeError(f"{self.engine.method.name}: merged-token features are read before the language "
                               "model (pre_llm stages)")
        return self.hidden[row, tokens.slots]

    def visual_inputs(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The language model's inputs for ``[m, F]`` features in ``vision_token_features``' space (merged ones),
        optionally followed by DeepStack levels as ``with_deepstack`` appends them: ``(embeds [m, D], deepstack
        [m, levels * D] or None)``. Tower features go through the projector; on Qwen-VL they are embeddings
        already, and the DeepStack levels are split off."""
        if not self.engine.family.mrope:
            return self.project_visual(features), None
        return split_deepstack(features, self.hidden.shape[-1], self.hidden.dtype)

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        """The model's multimodal projector on vision features ``[..., D_v]``: language-model input embeddings."""
        return compat.project_visual(self.engine.model, features).to(self.hidden.dtype)

    def vision_received_attention(self, row: int, tokens: SpanCandidates, layer: int | None = None) -> torch.Tensor:
        """``[c]``: the softmax attention each candidate's patch receives at a vision layer, mean over heads and
        over every query of its crop ([CLS] included) ("global attention"), computed crop by crop so that one
        crop's ``[H, N, N]`` probabilities are held at a time. Qwen-VL (no [CLS]; a merged token stands for a 2x2
        merge unit): summed over the queries of each patch's attention segment (its image, or its window in
        window-attention blocks), then averaged over the unit's patches, as HiPrune's Qwen2.5-VL code does."""
        if self.engine.family.mrope:
            units = self.vision_units(row, tokens)  # images only: checked before any signal is looked for
            received = self._qwen_received(layer)
            return received[units.to(received.device)]
        self._image_only(tokens)
        attn, hidden, _ = self._vision_layer(layer)
        memo, key = self._vision_memo(), ("received", self._layer(layer), self._vision_dtype(hidden))
        if key not in memo:
            dtype = self._vision_dtype(hidden)
            q, k = self._vision_qk(layer)
            memo[key] = torch.stack([compat.vision_attention_probs(attn, q[c:c + 1], k[c:c + 1], slice(None), dtype)
                                     [0].mean(0).mean(0) for c in range(len(q))])  # [n_crops, N]
        return _per_token(memo[key], *self.vision_sources(row, tokens))

    def vision_global_attention(self, row: int, tokens: SpanCandidates, threshold: float,
                                layer: int | None = None, newline: float = 1.0,
                                entropy_weight: float = 0.0) -> torch.Tensor:
        """``[c]``: the attention each candidate's patch gets from its crop's "global" tokens at a vision layer
        (VFlowOpt's importance): per crop, ``A`` = softmax attention mean over heads ``[N, N]``, ``received`` =
        ``A`` averaged over the queries, global tokens ``G = {j: received_j > threshold * mean(received)}``, and
        the score is ``A[G].mean(0)``; a crop without any global token scores by ``received`` (``A`` averaged
        over every query) instead of NaN. Computed crop by crop (one ``[H, N, N]`` at a time). CLIP / SigLIP
        towers only. LLaVA-OneVision: the crop maps are laid out over the image as the model packs its features
        (unpadded, bilinearly resized with the grid under ``anyres_max``), ``newline`` for newline tokens, as
        VFlowOpt's official code packs its map; elsewhere read at each candidate's patch (no newlines).
        ``entropy_weight`` (VFlowOpt's ``alpha_v``): plus that times the softmax over the crop's patches of their
        pixel entropy (``vision_patch_entropy``)."""
        self._image_only(tokens)
        attn, hidden, _ = self._vision_layer(layer)
        memo, key = self._vision_memo(), ("global", self._layer(layer), float(threshold), float(entropy_weight),
                                          self._vision_dtype(hidden))
        if key not in memo:
            dtype = self._vision_dtype(hidden)
            q, k = self._vision_qk(layer)
            maps = []
            for c in range(len(q)):
                A = compat.vision_attention_probs(attn, q[c:c + 1], k[c:c + 1], slice(None), dtype)[0].mean(0)
                received = A.mean(0)
                chosen = received > threshold * received.mean()
                maps.append(A[chosen].mean(0) if bool(chosen.any()) else received)
            maps = torch.stack(maps)  # [n_crops, N]
            if entropy_weight:
                entropy = self.vision_patch_entropy().to(maps.device)  # [n_crops, P]
                maps[:, maps.shape[1] - entropy.shape[1]:] += entropy_weight * entropy.softmax(-1).to(maps.dtype)
            memo[key] = maps
        first, size = self._image_crop(row, tokens.span)
        count = self.engine.family.crops_per_image(self.engine.model, size)
        packed = self.engine.family.pack_crop_values(self.engine.model, memo[key][first:first + count], size,
                                                     newline)
        if packed is not None:  # OneVision: follows the grid through anyres_max's resize, newlines included
            return packed[tokens.ids.to(packed.device)].to(memo[key].dtype)
        return _per_token(memo[key], *self.vision_sources(row, tokens))

    def vision_patch_entropy(self) -> torch.Tensor:
        """``[n_crops, P]``: Shannon entropy (bits) of each patch's pixels, per vision-tower input, patches in
        raster order (VFlowOpt's ``calculate_patch_entropy_vectorized``): the tower's pixel tensor (normalised,
        about [-1, 1] for SigLIP) times 255 truncated to integers and wrapped modulo 256 (the official cast to
        uint8, which wraps negative values on CPU), grey = the channels weighted 0.3333 each and rounded, a
        256-bin histogram per patch, ``-sum p log2(p + 1e-10)``. fp32."""
        call = self.fwd.vision
        if call is None or call.pixel_values is None:
            raise RuntimeError(f"{self.engine.method.name}: the pixel entropy needs the images' pixels, encoded "
                               "by the model in the same call (pass pixel_values, not precomputed features)")
        memo = call.signals
        if "entropy" not in memo:
            pixels = compat.tower_pixels(self.engine.model, call.pixel_values, call.image_sizes).float()
            size = compat.vision_patch_size(self.engine.model)
            C = pixels.shape[1]
            patches = pixels.unfold(2, size, size).unfold(3, size, size)  # [n, C, h, w, size, size]
            n, _, h, w = patches.shape[:4]
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n * h * w, C, size * size)
            values = (patches * 255).to(torch.int64).remainder(256).float()
            grey = (values * torch.full((1, C, 1), 0.3333)).sum(1).round().long()  # [n h w, size^2]
            hist = torch.zeros(len(grey), 256).scatter_add_(1, grey, torch.ones_like(grey, dtype=torch.float32))
            p = hist / hist.sum(1, keepdim=True)
            memo["entropy"] = (-(p * torch.log2(p + 1e-10)).sum(1)).view(n, h * w)
        return memo["entropy"]

    def vision_grid(self, row: int, tokens: SpanCandidates) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Where each candidate lies on its grid: ``(grid, cell, width, cells)``: ``[c]`` the grid it belongs to (a
        crop; the image on Qwen-VL), ``[c]`` its raster cell in that grid, the grid's width and its number of cells
        (CLIP: the crop's patch grid, 24 x 24 at 336 px; Qwen-VL: the image's merged-token grid)."""
        if self.engine.family.mrope:
            grid = tokens.span.grid
            if grid is None or grid[0] != 1:
                raise ValueError(f"vtr: {self.engine.method.name} needs the merged-token grid of a single image")
            ids = tokens.ids.cpu()
            return torch.zeros_like(ids), ids, grid[2], tokens.span.n
        crop, index = self.vision_sources(row, tokens)
        tokens_grid = self.engine.family.token_grid(self.engine.model, tokens.span)
        if tokens_grid is not None:  # a language token is several patches (InternVL): the tile's token grid
            cell, width, cells = tokens_grid
            return crop, cell[tokens.ids.cpu()], width, cells
        side = compat.vision_grid_side(self.engine.model)
        return crop, index - 1, side, side * side  # CLIP's [CLS] is token 0, patch p is token p + 1

    def vision_units(self, row: int, tokens: SpanCandidates) -> torch.Tensor:
        """Qwen-VL: ``[c]`` each candidate's merged token in the vision call's merged-token order (all images of
        the call, in input order)."""
        if tokens.span.kind != "image":
            raise ValueError(f"vtr: {self.engine.method.name} prunes images with vision-tower signals; this prompt "
                             f"holds a {tokens.span.kind}")
        if "units" not in self._memo:
            first, units = 0, {}
            for b in self.encoded_rows():
                for span in self.layout.rows[b].spans:
                    if span.kind == "image":
                        units[b, span.index] = first
                        first += span.n
            self._memo["units"] = units
        return self._memo["units"][self.encoding_row(row), tokens.span.index] + tokens.ids.cpu()

    def _qwen_received(self, layer: int | None) -> torch.Tensor:
        """``[U]`` received attention per merged token of the whole vision call (see vision_received_attention)."""
        return self._qwen_unit_table("received", layer, compat.qwen_received_attention)

    def _qwen_unit_table(self, name: str, layer: int | None, per_patch) -> torch.Tensor:
        """``[U, ...]``: a per-patch signal of a Qwen-VL vision layer (``per_patch(attn, hidden, extra, dtype,
        qkv=...)`` -> ``[S, ...]`` in the tower's order) averaged over each merge unit's patches and put in
        merged-token order, for the whole vision call, once per request."""
        attn, hidden, _ = self._vision_layer(layer)
        layer = self._layer(layer)
        memo, key = self._vision_memo(), (name, layer, self._vision_dtype(hidden))
        if key not in memo:
            call = self.fwd.vision
            patches = per_patch(attn, hidden, call.extras[layer], self._vision_dtype(hidden),
                                qkv=self._qwen_qkv(layer))
            per_unit = patches.view(-1, compat.qwen_merge_unit(self.engine.model), *patches.shape[1:]).mean(1)
            order = compat.qwen_unit_order(self.engine.model, call.grid_thw).to(per_unit.device)
            table = torch.empty_like(per_unit)
            table[order] = per_unit  # from the tower's (window) order to merged-token order
            memo[key] = table
        return memo[key]


def _per_token(table: torch.Tensor, crop: torch.Tensor, index: torch.Tensor, reduce: str | None = "mean"):
    """``table[crop, index]`` for per-patch values ``table`` ``[n_crops, N, ...]``; where a language token is ``u``
    patches (``index`` ``[c, u]``), their values averaged (``reduce="mean"``, the rule VisPruner's and HiPrune's
    authors apply to merged tokens) or kept ``[c, u, ...]`` (``reduce=None``)."""
    crop, index = crop.to(table.device), index.to(table.device)
    if index.dim() == 1:
        return table[crop, index]
    values = table[crop[:, None], index]
    return values.mean(1) if reduce == "mean" else values
