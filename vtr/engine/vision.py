"""The vision tower: signals of the vision layers a method reads, captured while the images are encoded, and the
``vision`` stage, which prunes tokens inside the tower so that its later layers run on the kept patches."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from .. import compat
from ..methods.base import Stage, VisionMerge
from ..signals import VisionImage, VisionStageContext
from .core import VisionCall, clock


@dataclass
class VisionStageState:
    """One image encoding under a ``vision`` stage. tokens: ``[C, W]`` original token index (in the unpruned tower
    sequence, [CLS] = 0) of every current slot of each crop, -1 for right padding; lengths: ``[C]`` real tokens per
    crop; history: vision layer -> ``tokens`` after that layer pruned; outputs: (weak reference to a layer output,
    its tokens), to place the tower's recorded hidden states."""

    full: int
    tokens: torch.Tensor
    lengths: torch.Tensor
    images: list
    history: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)
    seconds: float = 0.0
    projected: object = None  # the projector's gather (order, valid, width) while it runs; True once it ran
    # merging steps (``VisionMerge``): ``[C, W]`` how many original tokens each slot stands for (None: all 1);
    # ``[C, full]`` the original token each original token is now part of (-1: dropped); per merging layer,
    # ``[C, W_prev]`` the original token each previous slot went into (-1: dropped or padding)
    sizes: torch.Tensor | None = None
    owner: torch.Tensor | None = None
    merges: dict = field(default_factory=dict)
    block: torch.Tensor | None = None  # a mid-layer step's layer output, run by the engine on the kept tokens
    in_block: bool = False
    # (weak reference to a layer's own output after a mid-layer step, which its norm and MLP ran on one token, the
    # engine's output that replaced it): transformers may have recorded the former among the hidden states
    stand_ins: list = field(default_factory=list)

    def survived(self) -> torch.Tensor:
        """``[C, full]`` bool: the tokens of each crop still present."""
        alive = torch.zeros(self.tokens.shape[0], self.full, dtype=torch.bool, device=self.tokens.device)
        rows, slots = (self.tokens >= 0).nonzero(as_tuple=True)
        alive[rows, self.tokens[rows, slots]] = True
        return alive


class VisionSignals:
    """Part of ``Engine`` (see ``vtr.engine``)."""

    def _attach_vision(self, reg) -> None:
        """Capture, for each vision layer the method reads, its attention input, its query and key projections and
        its output, during the image encoding (inside the forward, or before the prefill in generate). The tower
        keeps its own attention backend; signals compute the attention rows a method needs from the tower's own
        projections."""
        layers = compat.vision_layers(self.model)
        wanted = self.method.vision_layers(len(layers), compat.vision_feature_layer(self.model)) \
            if "vision" in self.method.needs else ()
        for i in wanted:
            attn = compat.vision_self_attention(layers[i])
            reg(attn.register_forward_pre_hook(self._vision_input(i), with_kwargs=True))
            reg(layers[i].register_forward_hook(self._vision_output(i)))
            for name, module in compat.vision_projections(attn).items():  # what the tower itself projects
                if name != "v":
                    reg(module.register_forward_hook(self._vision_projection(i, name)))
        if self.vision_stage_layers and compat.is_qwen_tower(self.model):
            self._attach_qwen_stage(reg)
        elif self.vision_stage_layers:
            for i, layer in enumerate(layers):
                if i in self.vision_stage_layers:  # the tower's own q/k/v projections, kept for the scores
                    for name, module in compat.vision_projections(compat.vision_self_attention(layer)).items():
                        reg(module.register_forward_hook(self._stage_projection(i, name)))
                    if self.method.vision_merge_point == "attention":  # ToMe: between attention and MLP
                        reg(compat.vision_feed_forward_norm(layer).register_forward_pre_hook(
                            self._stage_mid_layer(i, layer)))
                reg(layer.register_forward_pre_hook(self._stage_mask(i), with_kwargs=True))
                reg(layer.register_forward_hook(self._stage_output(i)))
            reg(compat.vision_tower(self.model).register_forward_hook(self._stage_tower_output))
            reg(compat.projector(self.model).register_forward_pre_hook(self._stage_projector_input))
            reg(compat.projector(self.model).register_forward_hook(self._stage_projector_output))
        compat.shadow_method(compat.base_model(self.model), compat.IMAGE_FEATURES, self._encode_images)
        if wanted and compat.has_own_video_encoding(self.model):  # frame signals of videos (HoliTom, FastVID)
            compat.shadow_method(compat.base_model(self.model), compat.VIDEO_FEATURES, self._encode_videos)

    def _encode_images(self, original, *args, **kwargs):
        sizes = compat.call_argument(original, args, kwargs, "image_sizes")
        call = VisionCall(image_sizes=sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes,
                          grid_thw=compat.call_argument(original, args, kwargs, "image_grid_thw"),
                          pixel_values=compat.call_argument(original, args, kwargs, "pixel_values"))
        me = threading.get_ident()
        earlier = self._vision.get(me)
        call.video = earlier.video if earlier is not None else None
        self._vision[me] = call
        call.encoding = True
        try:
            return original(*args, **kwargs)
        finally:
            call.encoding = False

    def _encode_videos(self, original, *args, **kwargs):
        """The frames of all videos of the call go through the tower as one batch (video after video); their
        captured signals are kept in a call of their own, beside the image call of the same forward."""
        pixels = compat.video_pixels(original, args, kwargs)
        me = threading.get_ident()
        images = self._vision.get(me)
        call = VisionCall(image_sizes=None, kind="video",
                          grid_thw=compat.call_argument(original, args, kwargs, "video_grid_thw"),
                          frames=int(pixels.shape[1]) if pixels is not None and pixels.dim() == 5 else None)
        self._vision[me] = call
        try:
            return original(*args, **kwargs)
        finally:
            images = images if images is not None else VisionCall(image_sizes=None)
            images.video = call
            self._vision[me] = images

    def _vision_input(self, i: int):
        def hook(module, args, kwargs):
            call = self._vision.get(threading.get_ident())
            if call is not None:
                call.layers[i] = [module, kwargs.get("hidden_states", args[0] if args else None), None]
                call.extras[i] = {k: v for k, v in kwargs.items() if k in ("cu_seqlens", "position_embeddings")}
        return hook

    def _vision_projection(self, i: int, name: str):
        def hook(module, args, output):
            call = self._vision.get(threading.get_ident())
            if call is not None:
                call.projections.setdefault(i, {})[name] = output
        return hook

    def _vision_output(self, i: int):
        def hook(module, args, output):
            call = self._vision.get(threading.get_ident())
            if call is not None and i in call.layers:
                call.layers[i][2] = compat.layer_output(output)
        return hook

    # ------------------------------------------------------------------------------------------ vision stage
    def _stage_state(self, hidden: torch.Tensor) -> VisionStageState | None:
        """This encoding's stage state, created at its first layer (the crops of each image from the call's image
        sizes; one crop per image without them)."""
        call = self._vision.get(threading.get_ident())
        if call is None or call.kind == "video":  # the stage prunes images; video frames pass whole
            return None
        if call.stage is None:
            C, N = hidden.shape[:2]
            images, first = [], 0
            sizes = call.image_sizes if call.image_sizes is not None else [None] * C
            for size in sizes:
                n_crops = self.family.crops_per_image(self.model, size)
                n_tokens = self.family.image_token_count(self.model, size)
                target = 0 if self.method.ratio == 0 else self.method.vision_target(n_tokens, n_crops)
                images.append(VisionImage(crops=slice(first, first + n_crops), n=N, cls=self.vision_cls,
                                          target=target, layer=-1, feature_layer=self.vision_feature_layer,
                                          state={}))
                first += n_crops
            if first != C:
                raise RuntimeError(f"vtr: the vision tower got {C} inputs but the call's images make {first}")
            tokens = torch.arange(N, device=hidden.device).expand(C, N)
            call.stage = VisionStageState(full=N, tokens=tokens, lengths=torch.full((C,), N, device=hidden.device),
                                          images=images)
        return call.stage

    def _stage_projection(self, i: int, name: str):
        def hook(module, args, output):
            call = self._vision.get(threading.get_ident())
            if call is not None:
                call.layers.setdefault(("stage", i), {})[name] = output
        return hook

    def _stage_mask(self, i: int):
        """Crops of different lengths (images that kept different counts) are right-padded: hide the padding. With
        proportional attention (ToMe), once tokens have merged every key also adds ``log(size)``."""
        def hook(module, args, kwargs):
            call = self._vision.get(threading.get_ident())
            if call is not None and i in self.vision_stage_layers:  # the projections' fallback (compiled towers)
                call.layers[("input", i)] = args[0] if args else kwargs["hidden_states"]
            stage = call.stage if call is not None else None
            sizes = stage.sizes if stage is not None and self.method.proportional_attention else None
            if stage is None or (sizes is None and bool((stage.lengths == stage.tokens.shape[1]).all())):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if compat.vision_attn_implementation(self.model) not in ("eager", "sdpa"):
                need = "proportional attention (an additive bias per key)" if sizes is not None else \
                    "a padding mask in the tower (the images of one call kept different token counts)"
                raise NotImplementedError(f"vtr: {self.method.name} needs {need}; use eager or SDPA attention in the "
                                          "vision tower" + ("" if sizes is not None else ", or one image per call"))
            mask = compat.vision_attention_bias(stage.lengths, sizes, hidden.shape[1], hidden.dtype)
            if len(args) >= 2:
                return (args[0], mask) + tuple(args[2:]), kwargs
            return args, dict(kwargs, attention_mask=mask)
        return hook

    def _stage_projections(self, i: int, layer: torch.nn.Module) -> dict:
        """Layer ``i``'s own query, key and value projections, as its attention computed them (captured by hooks on
        the projection modules); recomputed from the layer's input where a compiled tower did not call those hooks
        (``torch.compile`` may skip the hooks of the projections of a layer whose output it does not use)."""
        call = self._vision[threading.get_ident()]
        projections = call.layers.pop(("stage", i), None)
        inputs = call.layers.pop(("input", i), None)
        if projections is None or len(projections) < 3:
            if inputs is None:
                raise RuntimeError(f"{self.method.name}: vision layer {i}'s attention inputs were not captured")
            attn = compat.vision_self_attention(layer)
            normed = compat.vision_attention_norm(layer)(inputs)
            projections = {name: module(normed) for name, module in compat.vision_projections(attn).items()}
        return projections

    def _stage_mid_layer(self, i: int, layer: torch.nn.Module):
        """``vision_merge_point="attention"``: a pre-hook on layer ``i``'s feed-forward norm runs the step on the
        post-attention residual stream, then the layer's MLP block on the kept tokens itself; the layer's own norm
        and MLP get one token (negligible work) and ``_stage_output`` returns the engine's block output."""
        def hook(module, args):
            hidden = args[0]
            stage = self._stage_state(hidden)
            if stage is None or stage.in_block:
                return None
            new = self._vision_prune(stage, i, compat.vision_self_attention(layer), self._stage_projections(i, layer),
                                     hidden)
            if new is None:
                return None
            stage.in_block = True
            try:
                stage.block = compat.vision_feed_forward_block(layer, new)
            finally:
                stage.in_block = False
            return (hidden[:, -1:],) + tuple(args[1:])
        return hook

    def _stage_output(self, i: int):
        def hook(module, args, output):
            hidden = compat.layer_output(output)
            stage = self._stage_state(hidden)
            if stage is None:
                return None
            if stage.block is not None:  # a mid-layer step ran this layer's MLP block on the kept tokens
                block, stage.block = stage.block, None
                stage.outputs.append((weakref.ref(block), stage.tokens))
                stage.stand_ins.append((weakref.ref(hidden), block))
                return (block,) + tuple(output[1:]) if isinstance(output, tuple) else block
            stage.outputs.append((weakref.ref(hidden), stage.tokens))
            if i not in self.vision_stage_layers or self.method.vision_merge_point == "attention":
                return None
            new = self._vision_prune(stage, i, compat.vision_self_attention(module), self._stage_projections(i, module),
                                     hidden)
            if new is None:
                return None
            stage.outputs.append((weakref.ref(new), stage.tokens))
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def _vision_prune(self, stage: VisionStageState, layer: int, attn, projections: dict,
                      hidden: torch.Tensor) -> torch.Tensor | None:
        """Ask the method, image by image, which patches to keep (and, for a ``VisionMerge``, into which kept patch
        each other one merges) at vision layer ``layer``; returns ``hidden`` gathered to the kept tokens (merged
        ones the size-weighted mean of their group; crops right-padded to the longest), or None if nothing was
        dropped. projections: the layer's own query, key and value projections (``[C, W, H * d]``); hidden: the
        states the step runs on (``[C, W, D]``: the layer's output, or its post-attention residual stream)."""
        start = clock(hidden)
        ctx = VisionStageContext(self, attn, projections, hidden=hidden, tokens=stage.tokens)
        first = int(self.vision_cls)
        tokens, lengths, changed = stage.tokens.clone(), stage.lengths.clone(), False
        picks = {}
        for image in stage.images:
            image.layer = layer
            if image.target == 0 or (image.target is not None and image.n_patches <= image.target):
                continue
            image.sizes = stage.sizes[image.crops, :image.n] if stage.sizes is not None else None
            chosen = self.method.vision_step(ctx, image)
            if chosen is None:
                continue
            if layer >= compat.vision_prune_limit(self.model, self.method):
                raise RuntimeError(f"{self.method.name}: vision_step() after vision layer {layer}, past the feature "
                                   "layer, must keep every patch (return None)")
            into = None
            if isinstance(chosen, VisionMerge):
                chosen, into = self._checked_merge_step(chosen, image)
            chosen = self._checked_vision(chosen, image)
            if chosen.shape[1] == image.n_patches:
                continue
            order = torch.argsort(chosen, 1)
            if into is not None:  # positions in the sorted keep
                rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                        .expand_as(order))
                into = torch.where(into >= 0, rank.gather(1, into.clamp(min=0)), -1)
            slots = torch.cat([torch.arange(first, device=chosen.device).expand(len(chosen), first),
                               chosen.gather(1, order) + first], 1)
            picks[image.crops.start] = (image, slots, into)
            changed = True
        if not changed:
            stage.seconds += clock(hidden) - start
            return None
        width = max(int(s.shape[1]) for _, s, _ in picks.values())
        width = max([width] + [image.n for image in stage.images if image.crops.start not in picks])
        C, D = hidden.shape[0], hidden.shape[2]
        new = hidden.new_zeros(C, width, D)
        new_tokens = torch.full((C, width), -1, dtype=tokens.dtype, device=tokens.device)
        merging = any(into is not None for _, _, into in picks.values())
        if merging and stage.sizes is None:
            stage.sizes = torch.ones(tokens.shape, dtype=torch.float32, device=hidden.device) * (tokens >= 0)
            stage.owner = torch.arange(stage.full, device=tokens.device).expand(C, -1).clone()
        sizes = torch.zeros(C, width, dtype=torch.float32, device=hidden.device) if stage.sizes is not None else None
        went = torch.full(tokens.shape, -1, dtype=tokens.dtype, device=tokens.device)  # prev slot -> new token
        for image in stage.images:
            crops = image.crops
            if crops.start not in picks:
                new[crops, :image.n] = hidden[crops, :image.n]
                new_tokens[crops, :image.n] = tokens[crops, :image.n]
                if sizes is not None:
                    sizes[crops, :image.n] = stage.sizes[crops, :image.n]
                went[crops, :image.n] = tokens[crops, :image.n]
                continue
            _, slots, into = picks[crops.start]
            slots = slots.to(hidden.device)
            k = slots.shape[1]
            kept_tokens = torch.gather(tokens[crops], 1, slots.to(tokens.device))
            new_tokens[crops, :k] = kept_tokens
            gathered = torch.gather(hidden[crops], 1, slots[..., None].expand(-1, -1, D))
            if sizes is not None:
                size = torch.gather(stage.sizes[crops], 1, slots)
                if into is not None:  # ToMe's merge_wavg: sum(x * size) / sum(size) over each kept token's group
                    into = into.to(hidden.device)
                    groups = torch.cat([torch.arange(first, device=hidden.device).expand(len(into), first),
                                        torch.where(into >= 0, into + first, -1)], 1)  # [c, n]: slot in keep
                    prev = stage.sizes[crops, :image.n]
                    weight = torch.where(groups >= 0, prev, 0.0)
                    flat = (groups.clamp(min=0) + torch.arange(len(groups), device=hidden.device)[:, None] * k)
                    total = torch.zeros(len(groups) * k, device=hidden.device).index_add_(
                        0, flat.flatten(), weight.flatten())
                    summed = torch.zeros(len(groups) * k, D, dtype=torch.float32, device=hidden.device).index_add_(
                        0, flat.flatten(), (hidden[crops, :image.n].float() * weight[..., None]).flatten(0, 1))
                    gathered = (summed / total[:, None]).view(len(groups), k, D).to(hidden.dtype)
                    size = total.view(len(groups), k)
                    into_tokens = torch.where(groups >= 0, kept_tokens.gather(1, groups.clamp(min=0)), -1)
                    went[crops, :image.n] = into_tokens
                else:
                    went[crops, :image.n] = self._went(tokens[crops, :image.n], kept_tokens)
                sizes[crops, :k] = size
            new[crops, :k] = gathered
            image.n = k
            lengths[crops] = image.n
        if stage.owner is not None:
            lookup = torch.full((C, stage.full + 1), -1, dtype=tokens.dtype, device=tokens.device)
            rows, slots_ = (tokens >= 0).nonzero(as_tuple=True)
            lookup[rows, tokens[rows, slots_]] = went[rows, slots_]
            stage.owner = torch.where(stage.owner >= 0, lookup.gather(1, stage.owner.clamp(min=0)), -1)
            stage.merges[layer] = torch.where(tokens >= 0, went, -1)
        stage.tokens, stage.lengths, stage.sizes = new_tokens, lengths, sizes
        stage.history[layer] = new_tokens
        stage.seconds += clock(hidden) - start
        return new

    @staticmethod
    def _went(previous: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """``[c, n]``: each previous token itself where it is among ``kept`` (original indices), else -1."""
        return torch.where((previous[..., None] == kept[:, None, :]).any(-1), previous, -1)

    def _checked_merge_step(self, merge: VisionMerge, image: VisionImage):
        """A ``VisionMerge``: ``keep`` as a plain step; ``into`` ``[n_crops, n_patches]`` positions in ``keep``
        (or -1), every kept patch into itself."""
        name = self.method.name
        keep = self._checked_vision(merge.keep, image)
        into = merge.into
        if not isinstance(into, torch.Tensor) or into.dtype.is_floating_point or into.dtype == torch.bool \
                or tuple(into.shape) != (image.n_crops, image.n_patches):
            raise RuntimeError(f"{name}: a VisionMerge's into must be a [{image.n_crops}, {image.n_patches}] integer "
                               f"tensor (the kept patch each current patch merges into), got {into!r:.80}")
        into = into.long().to(keep.device)
        own = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        if int(into.min()) < -1 or int(into.max()) >= keep.shape[1] or not torch.equal(into.gather(1, keep), own):
            raise RuntimeError(f"{name}: a VisionMerge's into must hold positions in keep (or -1), and every kept "
                               "patch must merge into itself")
        return keep, into

    def _checked_vision(self, chosen, image: VisionImage) -> torch.Tensor:
        name = self.method.name
        if not isinstance(chosen, torch.Tensor) or chosen.dtype.is_floating_point or chosen.dtype == torch.bool \
                or chosen.dim() != 2 or chosen.shape[0] != image.n_crops:
            raise RuntimeError(f"{name}: vision_step() must return a [{image.n_crops}, k] integer tensor of patch "
                               f"indices (one row per crop of the image), got {chosen!r:.80}")
        chosen = chosen.long()
        k = chosen.shape[1]
        if k < (image.target or 0) or k > image.n_patches:
            raise RuntimeError(f"{name}: vision_step() kept {k} patches per crop; it must keep between the target "
                               f"{image.target} and the {image.n_patches} present")
        if k and (int(chosen.min()) < 0 or int(chosen.max()) >= image.n_patches
                  or any(len(row.unique()) != k for row in chosen)):
            raise RuntimeError(f"{name}: vision_step() returned invalid patch indices (each row must hold distinct "
                               f"indices in [0, {image.n_patches}))")
        return chosen

    def _stage_projector_input(self, module, args):
        """The projector (a per-token MLP) runs on the kept patches only: each crop's survivors gathered to the
        front (crops right-padded to the longest), scattered back to the full grid by ``_stage_projector_output``
        so that the model's anyres packing runs unchanged. Once per image encoding."""
        call = self._vision.get(threading.get_ident())
        stage = call.stage if call is not None else None
        features = args[0] if args else None
        if stage is None or not stage.history or stage.projected is not None or not isinstance(features, torch.Tensor) \
                or features.dim() != 3 or features.shape[0] != stage.tokens.shape[0] \
                or not 0 <= stage.full - features.shape[1] <= 1:
            return None
        alive = stage.survived()[:, stage.full - features.shape[1]:]  # [C, P]; the [CLS] column dropped if it was
        counts = alive.sum(1)
        width = int(counts.max())
        order = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :width]  # survivors first, in order
        stage.projected = (order, torch.arange(width, device=order.device) < counts[:, None], features.shape[1])
        return (torch.gather(features, 1, order[..., None].expand(-1, -1, features.shape[2])),) + tuple(args[1:])

    def _stage_projector_output(self, module, args, output):
        call = self._vision.get(threading.get_ident())
        stage = call.stage if call is not None else None
        if stage is None or not isinstance(stage.projected, tuple):
            return None
        order, valid, width = stage.projected
        stage.projected = True  # done: later projector calls (a method's own projections) pass through
        out = output.new_zeros(output.shape[0], width, output.shape[2])
        return out.scatter_(1, order[..., None].expand(-1, -1, output.shape[2]), output * valid[..., None])

    def _stage_tower_output(self, module, args, output):
        """The tower's outputs back at full length (pruned tokens zero), so that the model's own feature selection,
        projector and anyres packing run unchanged; the kept set then decides what the language model gets."""
        call = self._vision.get(threading.get_ident())
        stage = call.stage if call is not None else None
        if stage is None:
            return None
        for image in stage.images:
            if image.target is not None and 0 < image.target < image.n_patches:
                raise RuntimeError(f"{self.method.name}: the vision stage ended with {image.n_patches} patches per "
                                   f"crop, not its target {image.target}")
        if not stage.history:
            return None

        def full(entry):
            if entry is None or entry.dim() != 3:
                return entry
            entry = next((block for ref, block in stage.stand_ins if ref() is entry), entry)
            tokens = next((t for ref, t in stage.outputs if ref() is entry), None)
            if tokens is None:
                if entry.shape[1] == stage.full:
                    return entry  # the embeddings, before any layer ran
                raise RuntimeError("vtr: a hidden state of the vision tower has no known token layout")
            out = entry.new_zeros(entry.shape[0], stage.full, entry.shape[2])
            rows, slots = (tokens >= 0).nonzero(as_tuple=True)
            out[rows, tokens[rows, slots]] = entry[rows, slots]
            return out

        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(full(h) for h in output.hidden_states)
        output.last_hidden_state = full(output.last_hidden_state)
        return output
