"""What a method sees when it selects: the candidate tokens of each image and lazily computed signals."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import compat, kernels
from .layout import TokenLayout, VisualSpan

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine, ForwardState, SeqLayout
    from .methods.base import StageSpec


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


class SelectionContext:
    """One stage's view of the batch. Signals are computed once per stage, and only for the query rows a method
    needs (never the full attention matrix)."""

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

    def cached(self, key, compute):
        """``compute()`` once per stage for ``key`` (a method's per-image plan, shared by ``budget_for`` and
        ``select``)."""
        key = ("method", key)
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

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

    # ------------------------------------------------------------------------------------- layer-stage signals
    @property
    def _own_layer(self) -> bool:
        """The method scores with the stage layer's own attention (its input norm and projections applied to the
        stage's hidden states, PyramidDrop) rather than with layer K-1's (FastV, DART)."""
        return "layer_inputs" in self.engine.method.needs

    def _attention_inputs(self):
        if self._own_layer:
            if "own" not in self._memo:
                layer = compat.decoder_layers(self.engine.lm)[self.spec.layer]
                h = compat.input_norm(layer)(self.hidden)
                positions = self.prev.positions
                cos, sin = compat.rotary_embeddings(self.engine.lm, h, positions[-3:] if positions.dim() == 3
                                                    else positions)
                self._memo["own"] = (compat.self_attention(layer), h, cos, sin)
            return self._memo["own"]
        capture = self.fwd.captures.get(self.spec.layer - 1)
        if capture is None:
            raise RuntimeError(f"{self.engine.method.name}: no attention inputs captured at layer "
                               f"{self.spec.layer - 1}; the method must declare needs={{'attention_inputs'}}")
        return capture

    def last_slots(self) -> torch.Tensor:
        """``[B]``: slot of each row's last real token (the prompt's last token, whichever side the padding is)."""
        L = self.valid.shape[1]
        return L - 1 - self.valid.flip(1).long().argmax(1)

    def last_token_attention(self) -> torch.Tensor:
        """``[B, L]``: softmax attention of each row's last real token over all tokens at layer K-1 (at layer K for
        a method that needs ``"layer_inputs"``), mean over heads (in ``score_dtype``; fp32 softmax as eager
        attention does)."""
        if "last_attention" not in self._memo:
            attn, h, _, _ = self._attention_inputs()
            cos, sin = self._rotary()
            rows, last = torch.arange(h.shape[0], device=h.device), self.last_slots().to(h.device)
            q = compat.project_queries(attn, h[rows, last][:, None], cos[rows, last][:, None],
                                       sin[rows, last][:, None])
            scores = kernels.attention_scores(q, self.keys(), self.valid, compat.attention_scaling(attn), "mean",
                                              dtype=self.score_dtype)
            self._memo["last_attention"] = scores[:, 0]
        return self._memo["last_attention"]

    def attention_rows(self, row: int, queries: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """``[q, L]``: softmax attention of the row's tokens at slots ``queries`` (``[q]``) over the current sequence
        at the scoring layer, causal (a query sees the keys up to its own slot), mean over heads, in
        ``score_dtype``; ``[H, q, L]`` per head with ``per_head``. Only these rows are computed, never the full
        attention matrix."""
        attn, h, _, _ = self._attention_inputs()
        cos, sin = self._rotary()
        slots = queries.to(h.device)
        q = compat.project_queries(attn, h[row, slots][None], cos[row, slots][None], sin[row, slots][None])
        score = kernels.reference.attention_scores if per_head else kernels.attention_scores
        scores = score(q, self.keys()[row:row + 1], self.valid[row:row + 1], compat.attention_scaling(attn),
                       "none" if per_head else "mean", q_positions=slots[None], dtype=self.score_dtype)
        return scores[0]

    def unrotated_attention(self, row: int, queries: torch.Tensor, reduce: str = "max") -> torch.Tensor:
        """``[q, L]``: softmax attention of the row's tokens at slots ``queries`` over every real token of the
        current sequence at the scoring layer, from the queries and keys BEFORE the rotary embedding and without
        the causal mask (PruneVid's ``attn_weights_wo_pos``), reduced over heads (``"max"``, ``"mean"``), in
        ``score_dtype`` (fp32 softmax). Only these rows are computed."""
        attn, h, _, _ = self._attention_inputs()
        slots = queries.to(h.device)
        q = compat.project_unrotated(attn, "q", h[row, slots][None])
        k = compat.project_unrotated(attn, "k", h[row:row + 1])
        scores = kernels.reference.attention_scores(q, k, self.valid[row:row + 1].to(h.device),
                                                    compat.attention_scaling(attn), reduce, dtype=self.score_dtype)
        return scores[0]

    @property
    def request_state(self) -> dict:
        """A dict that lives as long as the request: what a method's stage leaves for its later stages."""
        return self.fwd.request.method_state

    def queries(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """``[H, q, d]``: post-RoPE queries of the row's tokens at ``slots`` at the scoring layer (the row's own
        positions), in ``score_dtype``."""
        attn, h, _, _ = self._attention_inputs()
        cos, sin = self._rotary()
        slots = slots.to(h.device)
        q = compat.project_queries(attn, h[row, slots][None], cos[row, slots][None], sin[row, slots][None])
        return q[0].to(self.score_dtype)

    def values(self) -> torch.Tensor:
        """``[B, H_kv, L, d]``: the scoring layer's values (before grouped-query repetition), in ``score_dtype``."""
        if "values" not in self._memo:
            attn, h, _, _ = self._attention_inputs()
            self._memo["values"] = compat.project_values(attn, h).to(self.score_dtype)
        return self._memo["values"]

    def rotary_gravity(self, row: int, queries: torch.Tensor) -> torch.Tensor:
        """``[q, L]``: the scaled attention logit an all-ones query at slots ``queries`` and an all-ones key at each
        slot get from the rotary embedding alone, at the scoring layer's positions (SparseVLM+'s "attention
        gravity": a function of the relative offset; it can be near 0 or negative for some offsets)."""
        attn, _, _, _ = self._attention_inputs()
        cos, sin = self._rotary()
        cos, sin = cos[row].to(self.score_dtype), sin[row].to(self.score_dtype)
        half = cos.shape[-1] // 2
        sign = torch.cat([-torch.ones(half), torch.ones(cos.shape[-1] - half)]).to(cos)  # rotate_half(ones)
        rotated = cos + sign * sin  # RoPE applied to an all-ones vector at each slot: [L, d]
        return rotated[queries.to(rotated.device)] @ rotated.T * compat.attention_scaling(attn)

    def keys(self) -> torch.Tensor:
        """``[B, H_kv, L, d]``: post-RoPE keys of layer K-1 (of layer K for ``"layer_inputs"`` methods; before
        grouped-query repetition), rotated at each row's own positions, i.e. as the row alone would have them: read
        from the KV cache when layer K-1 just filled it with those positions, else recomputed from its inputs. (A
        plain forward over a left-padded batch numbers a row from its first padding slot; attention does not care,
        the L1 norm of a key does.)"""
        if "keys" not in self._memo:
            keys = None
            if not self._own_layer and not bool(self.position_offsets().any()):
                keys = compat.cached_keys(self.fwd.cache, self.spec.layer - 1, self.hidden.shape[1])
            if keys is None:
                attn, h, _, _ = self._attention_inputs()
                keys = compat.project_keys(attn, h, *self._rotary())
            self._memo["keys"] = keys
        return self._memo["keys"]

    def _rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) ``[B, L, d]`` of layer K-1 at each row's own positions."""
        if "rotary" not in self._memo:
            _, h, cos, sin = self._attention_inputs()
            offset = self.position_offsets()
            if bool(offset.any()):
                positions = self.prev.positions
                own = (positions[-3:] if positions.dim() == 3 else positions) - offset.view(-1, 1)
                cos, sin = compat.rotary_embeddings(self.engine.lm, h, own)
            B = h.shape[0]
            self._memo["rotary"] = cos.expand(B, *cos.shape[1:]), sin.expand(B, *sin.shape[1:])
        return self._memo["rotary"]

    def position_offsets(self) -> torch.Tensor:
        """``[B]``: how far each row's positions are from the ones the row alone gets (its first real token at 0)."""
        positions = self.prev.positions
        rows = positions[-3:] if positions.dim() == 3 else positions[None]
        first = self.valid.long().argmax(1).to(positions.device)
        return rows[0, torch.arange(len(first), device=positions.device), first]

    @property
    def score_dtype(self) -> torch.dtype:
        """dtype scores are computed in: fp32, or the model's own with the method's ``score_dtype="model"``."""
        return self.hidden.dtype if self.engine.method.score_dtype == "model" else torch.float32

    def normed_hidden(self) -> torch.Tensor:
        """``[B, L, D]``: the stage's hidden states through the language model's final norm."""
        if "normed" not in self._memo:
            self._memo["normed"] = compat.final_norm(self.engine.lm)(self.hidden)
        return self._memo["normed"]

    # ------------------------------------------------------------------------------------ vision-tower signals
    # Read from the inputs and outputs of the vision layers a ``needs={"vision"}`` method names, captured while the
    # images were encoded; only the attention rows a method asks for are computed (the tower keeps SDPA/FA2).
    def _vision_layer(self, layer: int | None):
        call = self.fwd.vision
        layer = self.engine.vision_feature_layer if layer is None else layer
        if call is None or layer not in call.layers or call.layers[layer][2] is None:
            raise RuntimeError(f"{self.engine.method.name}: no vision-tower signals of layer {layer} were captured "
                               "for this prefill; the images must be encoded by the model itself in the same call "
                               "(pass pixel_values to forward() or generate(), not precomputed features)")
        return call.layers[layer]

    def _vision_dtype(self, hidden: torch.Tensor) -> torch.dtype:
        return hidden.dtype if self.engine.method.score_dtype == "model" else torch.float32

    def vision_sources(self, row: int, tokens: SpanCandidates) -> tuple[torch.Tensor, torch.Tensor]:
        """``(crop, index)``, each ``[c]``: the vision-tower input (all images' crops in input order) and the token
        index in its sequence ([CLS] included) that made each candidate. Images only; newline tokens have none."""
        span = self._image_only(tokens).span
        key = ("sources", row, span.index)
        if key not in self._memo:
            first, size = self._image_crops()[row, span.index]
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

    def _image_crops(self) -> dict:
        """(row, image span index) -> (first crop of the image in the tower's batch, its image size)."""
        if "crops" not in self._memo:
            sizes = self.fwd.vision.image_sizes if self.fwd.vision is not None else None
            crops, first, k = {}, 0, 0
            for b, row in enumerate(self.layout.rows):
                for span in row.spans:
                    if span.kind == "image":
                        size = sizes[k] if sizes is not None else None
                        crops[b, span.index] = (first, size)
                        first += self.engine.family.crops_per_image(self.engine.model, size)
                        k += 1
            self._memo["crops"] = crops
        return self._memo["crops"]

    def vision_cls_attention(self, row: int, tokens: SpanCandidates, layer: int | None = None) -> torch.Tensor:
        """``[c]``: the softmax attention the [CLS] query (token 0 of each crop) pays each candidate's patch at a
        vision layer (default: the feature layer, CLIP's ``attentions[-2]`` on LLaVA), mean over heads."""
        self._image_only(tokens)
        attn, hidden, _ = self._vision_layer(layer)
        key = ("cls", layer)
        if key not in self._memo:
            probs = compat.vision_attention_rows(attn, hidden, slice(0, 1), self._vision_dtype(hidden))
            self._memo[key] = probs.mean(1)[:, 0]  # [n_crops, N]
        crop, index = self.vision_sources(row, tokens)
        return self._memo[key][crop.to(hidden.device), index.to(hidden.device)]

    def vision_features(self, row: int, tokens: SpanCandidates, layer: int | None = None) -> torch.Tensor:
        """``[c, D_v]``: each candidate's hidden state at the output of a vision layer (default: the feature
        layer, i.e. what the projector reads)."""
        self._image_only(tokens)
        _, _, output = self._vision_layer(layer)
        crop, index = self.vision_sources(row, tokens)
        return output[crop.to(output.device), index.to(output.device)]

    def vision_keys(self, row: int, tokens: SpanCandidates, layer: int | None = None) -> torch.Tensor:
        """``[c, d]``: each candidate's key at a vision layer's attention (bias included), mean over heads."""
        self._image_only(tokens)
        attn, hidden, _ = self._vision_layer(layer)
        key = ("keys", layer)
        if key not in self._memo:
            self._memo[key] = compat.vision_head_mean_keys(attn, hidden)  # [n_crops, N, d]
        crop, index = self.vision_sources(row, tokens)
        return self._memo[key][crop.to(hidden.device), index.to(hidden.device)]

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
            units = self.vision_units(row, tokens)
            return self._qwen_received(layer)[units]
        self._image_only(tokens)
        attn, hidden, _ = self._vision_layer(layer)
        key = ("received", layer)
        if key not in self._memo:
            dtype = self._vision_dtype(hidden)
            self._memo[key] = torch.stack([compat.vision_attention_rows(attn, h[None], slice(None), dtype)[0]
                                           .mean(0).mean(0) for h in hidden])  # [n_crops, N]
        crop, index = self.vision_sources(row, tokens)
        return self._memo[key][crop.to(hidden.device), index.to(hidden.device)]

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
        key = ("global", layer, float(threshold), float(entropy_weight))
        if key not in self._memo:
            dtype = self._vision_dtype(hidden)
            maps = []
            for h in hidden:
                A = compat.vision_attention_rows(attn, h[None], slice(None), dtype)[0].mean(0)  # [N, N]
                received = A.mean(0)
                chosen = received > threshold * received.mean()
                maps.append(A[chosen].mean(0) if bool(chosen.any()) else received)
            maps = torch.stack(maps)  # [n_crops, N]
            if entropy_weight:
                entropy = self.vision_patch_entropy().to(maps.device)  # [n_crops, P]
                maps[:, maps.shape[1] - entropy.shape[1]:] += entropy_weight * entropy.softmax(-1).to(maps.dtype)
            self._memo[key] = maps
        first, size = self._image_crops()[row, tokens.span.index]
        count = self.engine.family.crops_per_image(self.engine.model, size)
        packed = self.engine.family.pack_crop_values(self.engine.model, self._memo[key][first:first + count], size,
                                                     newline)
        if packed is not None:  # OneVision: follows the grid through anyres_max's resize, newlines included
            return packed[tokens.ids.to(packed.device)].to(self._memo[key].dtype)
        crop, index = self.vision_sources(row, tokens)
        return self._memo[key][crop.to(hidden.device), index.to(hidden.device)]

    def vision_patch_entropy(self) -> torch.Tensor:
        """``[n_crops, P]``: Shannon entropy (bits) of each patch's pixels, per vision-tower input, patches in
        raster order (VFlowOpt's ``calculate_patch_entropy_vectorized``): the tower's pixel tensor (normalised,
        about [-1, 1] for SigLIP) times 255 truncated to integers and wrapped modulo 256 (the official cast to
        uint8, which wraps negative values on CPU), grey = the channels weighted 0.3333 each and rounded, a
        256-bin histogram per patch, ``-sum p log2(p + 1e-10)``. fp32."""
        if "entropy" not in self._memo:
            call = self.fwd.vision
            if call is None or call.pixel_values is None:
                raise RuntimeError(f"{self.engine.method.name}: the pixel entropy needs the images' pixels, encoded "
                                   "by the model in the same call (pass pixel_values, not precomputed features)")
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
            self._memo["entropy"] = (-(p * torch.log2(p + 1e-10)).sum(1)).view(n, h * w)
        return self._memo["entropy"]

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
            for b, layout_row in enumerate(self.layout.rows):
                for span in layout_row.spans:
                    if span.kind == "image":
                        units[b, span.index] = first
                        first += span.n
            self._memo["units"] = units
        return self._memo["units"][row, tokens.span.index] + tokens.ids.cpu()

    def _qwen_received(self, layer: int | None) -> torch.Tensor:
        """``[U]`` received attention per merged token of the whole vision call (see vision_received_attention)."""
        attn, hidden, _ = self._vision_layer(layer)
        layer = self.engine.vision_feature_layer if layer is None else layer
        key = ("received", layer)
        if key not in self._memo:
            call = self.fwd.vision
            patches = compat.qwen_received_attention(attn, hidden, call.extras[layer], self._vision_dtype(hidden))
            per_unit = patches.view(-1, compat.qwen_merge_unit(self.engine.model)).mean(-1)
            order = compat.qwen_unit_order(self.engine.model, call.grid_thw).to(per_unit.device)
            received = torch.empty_like(per_unit)
            received[order] = per_unit  # from the tower's (window) order to merged-token order
            self._memo[key] = received.cpu()
        return self._memo[key]

    # ---------------------------------------------------------------------------------- video frames' signals
    # LLaVA-OneVision encodes every frame of every video of the call as one tower batch (video after video, rows in
    # order); the signals of a frame are pooled like its features (``compat.pool_video_frames``), so that their
    # ``[F, N]`` entries line up with the frame's ``N`` pooled tokens in raster order (``video.frame_table``).
    def video_frames(self, row: int, span: VisualSpan) -> torch.Tensor:
        """``[F]``: the vision-tower inputs (frames) of the video ``span`` of ``row`` in the call's video batch."""
        call = self._video_call(span)
        if call.frames is None:
            raise ValueError(f"vtr: {self.engine.method.name}: this model's videos are not a stack of tower frames")
        k, _ = self._video_number(row, span)
        return torch.arange(k * call.frames, (k + 1) * call.frames)

    def _video_number(self, row: int, span: VisualSpan) -> tuple[int, int]:
        """(ordinal of the video among the call's videos, rows in order; visual tokens of the videos before it)."""
        if "videos" not in self._memo:
            numbers, k, first = {}, 0, 0
            for b, layout_row in enumerate(self.layout.rows):
                for s in layout_row.spans:
                    if s.kind == "video":
                        numbers[b, s.index, int(s.positions[0])] = (k, first)
                        k, first = k + 1, first + s.n
            self._memo["videos"] = numbers
        return self._memo["videos"][row, span.index, int(span.positions[0])]

    def _video_call(self, span: VisualSpan):
        call = self.fwd.vision.video if self.fwd.vision is not None else None
        if span.kind != "video" or call is None or not call.layers:
            raise RuntimeError(f"{self.engine.method.name}: no vision-tower signals were captured for this video; "
                               "its frames must be encoded by the model in the same call (pass "
                               "pixel_values_videos to forward() or generate(), not precomputed features)")
        return call

    def video_mean_query_attention(self, row: int, span: VisualSpan, layer: int | None = None) -> torch.Tensor:
        """Qwen-VL: ``[t, N]`` FastVID's Qwen2.5-VL salience of each merged token of the video, per temporal slice
        (``compat.qwen_mean_query_attention`` at a vision block, default the last), in raster order."""
        call = self._video_call(span)
        attn, hidden, _ = self._video_layer(layer)
        layer = self.engine.vision_feature_layer if layer is None else layer
        key = ("video_mean_query", layer)
        if key not in self._memo:
            unit = compat.qwen_merge_unit(self.engine.model)
            per_unit = compat.qwen_mean_query_attention(attn, hidden, call.extras[layer], self._vision_dtype(hidden),
                                                        unit)
            order = compat.qwen_unit_order(self.engine.model, call.grid_thw).to(per_unit.device)
            salience = torch.empty_like(per_unit)
            salience[order] = per_unit  # from the tower's (window) order to merged-token order
            self._memo[key] = salience.cpu()
        _, first = self._video_number(row, span)
        salience = self._memo[key][first:first + span.n]
        if len(salience) != span.n:
            raise RuntimeError("vtr: the vision call encoded fewer merged video tokens than the prompt holds")
        return salience.view(int(span.frame.max()) + 1, -1)

    def _video_layer(self, layer: int | None):
        call = self.fwd.vision.video
        layer = self.engine.vision_feature_layer if layer is None else layer
        if layer not in call.layers or call.layers[layer][2] is None:
            raise RuntimeError(f"{self.engine.method.name}: vision layer {layer}'s signals were not captured")
        return call.layers[layer]

    def video_features(self, row: int, span: VisualSpan, layer: int | None = None) -> torch.Tensor:
        """``[F, P, D_v]``: the output of a vision layer (default: the feature layer the projector reads) for each
        of the video's frames, all ``P`` patches, before pooling."""
        frames = self.video_frames(row, span)
        return self._video_layer(layer)[2][frames.to(self.hidden.device)]

    def video_received_attention(self, row: int, span: VisualSpan, layer: int | None = None) -> torch.Tensor:
        """``[F, N]``: per frame of the video, the softmax attention each patch receives at a vision layer (default:
        the feature layer, the last of LLaVA-OneVision's 26), mean over heads and over every query of its frame,
        pooled like the features to the frame's ``N`` tokens (HoliTom's SigLIP signal). Frame by frame, so that one
        frame's ``[H, P, P]`` probabilities are held at a time. fp32 unless ``score_dtype="model"``."""
        frames = self.video_frames(row, span)
        attn, hidden, _ = self._video_layer(layer)
        dtype = self._vision_dtype(hidden)
        received = torch.stack([compat.vision_attention_rows(attn, hidden[f][None], slice(None), dtype)[0]
                                .mean(0).mean(0) for f in frames.tolist()])  # [F, P]
        return self.pool_video(received[..., None])[..., 0]

    def video_pooling_head(self, row: int, span: VisualSpan, siglip: torch.nn.Module
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """FastVID's OneVision signals: SigLIP's ``post_layernorm`` and attention-pooling head (from ``siglip``,
        see ``compat.siglip_pooling_signals``) on each frame's feature-layer output: ``(G [F, D_v], A [F, N])``,
        ``A`` the probe's attention (mean over heads) pooled like the features. fp32."""
        G, A = compat.siglip_pooling_signals(siglip, self.video_features(row, span))
        return G, self.pool_video(A[..., None])[..., 0]

    def pool_video(self, values: torch.Tensor) -> torch.Tensor:
        """The model's video pooling on per-patch values ``[F, P, k]`` -> ``[F, N, k]`` (``compat.pool_video_frames``)."""
        return compat.pool_video_frames(self.engine.model, values)

    # ------------------------------------------------------------------------------------------ CLIP text side
    def instruction_text(self, row: int, tokens: SpanCandidates) -> str:
        """The row's text after the image, read back from the prompt's ids with the language model's tokenizer
        (special tokens skipped): the instruction a text-conditioned method scores the image against."""
        text = self.text_slots(row)
        text = text[text > tokens.slots.max()]
        ids = self.fwd.inputs["input_ids"][row, self.prev.index[row, text].to(self.fwd.inputs["input_ids"].device)]
        return self.engine.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()

    def prompt_text_embedding(self, row: int) -> torch.Tensor | None:
        """``[D]``: mean of the language model's input embeddings over the row's text tokens (every real token
        outside the visual spans, their delimiters excluded), as OpenVINO GenAI's CDPruner reads the instruction on
        models without a CLIP text tower; None for a row without text. Pre-LLM stage only (reads the LM inputs)."""
        key = ("prompt_text", row)
        if key not in self._memo:
            slots = self.text_slots(row)
            ids = self.fwd.inputs["input_ids"][row, self.prev.index[row, slots].to(self.fwd.inputs["input_ids"].device)]
            delimiters = torch.tensor(self.engine.family.delimiter_ids(self.engine.model.config), device=ids.device)
            slots = slots[~torch.isin(ids, delimiters).to(slots.device)]
            self._memo[key] = self.hidden[row, slots].float().mean(0) if len(slots) else None
        return self._memo[key]

    def instruction_embeddings(self, row: int, tokens: SpanCandidates) -> torch.Tensor | None:
        """``[M, C]``: CLIP text embeddings of the instruction (``instruction_text``), split into segments of the
        text tower's context length (the last one zero-padded, as CDPruner's official code does); None when the
        image is followed by no text."""
        key = ("instruction", row, tokens.span.index)
        if key not in self._memo:
            text = self.instruction_text(row, tokens)
            embeds = None
            if text:
                clip, length = self.engine.clip, compat.clip_context_length(self.engine.clip)
                enc = self.engine.clip_tokenizer(text=text, return_tensors="pt")
                ids, mask = enc["input_ids"], enc["attention_mask"]
                pad = -ids.shape[1] % length
                ids = torch.cat([ids, ids.new_zeros(1, pad)], 1).view(-1, length)
                mask = torch.cat([mask, mask.new_zeros(1, pad)], 1).view(-1, length)
                device = next(clip.parameters()).device
                embeds = compat.clip_text_embeddings(clip, ids.to(device), mask.to(device)).float()
            self._memo[key] = embeds
        return self._memo[key]

    def clip_image_embeddings(self, row: int, tokens: SpanCandidates) -> torch.Tensor:
        """``[c, C]``: each candidate's feature-layer hidden state in CLIP's joint image-text space (the tower's
        post-layernorm, then CLIP's visual projection; fp32)."""
        return compat.clip_image_embeddings(self.engine.model, self.engine.clip, self.vision_features(row, tokens))


# ------------------------------------------------------------------------------------------------ vision stage
@dataclass
class VisionImage:
    """One image inside the vision tower during a ``vision`` stage.

    crops: the image's tower inputs (a range of the tower's batch: one for LLaVA-1.5, base + tiles for LLaVA-NeXT).
    n: current tokens per crop ([CLS] included where the tower has one). cls: whether token 0 is a [CLS] token the
    engine always keeps. target: patches per crop the stage must end with (``Method.vision_target``). layer: the
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
    target: int
    layer: int
    feature_layer: int
    state: dict
    unit: int = 1
    rows: slice | None = None

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

    def __init__(self, engine: "Engine", attn: torch.nn.Module, projections: dict, rotary=None):
        self.engine, self.attn, self.projections = engine, attn, projections
        self.rotary = rotary  # Qwen-VL: (cos, sin) ``[S, d]`` of the current rows, which the block rotated q, k by
        self._memo = {}

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
        heads = compat.vision_heads(self.attn, self.projections[name][image.crops, :image.n])
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
