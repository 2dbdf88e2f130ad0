"""The vision tower: signals of the vision layers a method reads, captured while the images are encoded, and the
``vision`` stage, which prunes tokens inside the tower so that its later layers run on the kept patches."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from .. import compat
from ..methods.base import Stage
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
        """Crops of different lengths (images that kept different counts) are right-padded: hide the padding."""
        def hook(module, args, kwargs):
            call = self._vision.get(threading.get_ident())
            stage = call.stage if call is not None else None
            if stage is None or bool((stage.lengths == stage.tokens.shape[1]).all()):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if compat.vision_attn_implementation(self.model) not in ("eager", "sdpa"):
                raise NotImplementedError(f"vtr: {self.method.name} kept different token counts in the images of "
                                          "one vision-tower call, which needs a padding mask in the tower; use "
                                          "eager or SDPA attention in the vision tower, or one image per call")
            mask = compat.vision_padding_mask(stage.lengths, hidden.shape[1], hidden.dtype)
            if len(args) >= 2:
                return (args[0], mask) + tuple(args[2:]), kwargs
            return args, dict(kwargs, attention_mask=mask)
        return hook

    def _stage_output(self, i: int):
        def hook(module, args, output):
            hidden = compat.layer_output(output)
            stage = self._stage_state(hidden)
            if stage is None:
                return None
            stage.outputs.append((weakref.ref(hidden), stage.tokens))
            if i not in self.vision_stage_layers:
                return None
            call = self._vision[threading.get_ident()]
            projections = call.layers.pop(("stage", i))
            new = self._vision_prune(stage, i, compat.vision_self_attention(module), projections, hidden)
            if new is None:
                return None
            stage.outputs.append((weakref.ref(new), stage.tokens))
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def _vision_prune(self, stage: VisionStageState, layer: int, attn, projections: dict,
                      hidden: torch.Tensor) -> torch.Tensor | None:
        """Ask the method, image by image, which patches to keep after vision layer ``layer``; returns the layer's
        output gathered to the kept tokens (crops right-padded to the longest), or None if nothing was dropped.
        projections: the layer's own query, key and value projections (``[C, W, H * d]``)."""
        start = clock(hidden)
        ctx = VisionStageContext(self, attn, projections)
        first = int(self.vision_cls)
        tokens, lengths, changed = stage.tokens.clone(), stage.lengths.clone(), False
        picks = {}
        for image in stage.images:
            image.layer = layer
            if image.target <= 0 or image.n_patches <= image.target:
                continue
            chosen = self.method.vision_step(ctx, image)
            if chosen is None:
                continue
            chosen = self._checked_vision(chosen, image)
            if chosen.shape[1] == image.n_patches:
                continue
            slots = torch.cat([torch.arange(first, device=chosen.device).expand(len(chosen), first),
                               chosen.sort(1).values + first], 1)
            picks[image.crops.start] = (image, slots)
            changed = True
        if not changed:
            stage.seconds += clock(hidden) - start
            return None
        width = max(int(s.shape[1]) for _, s in picks.values())
        width = max([width] + [image.n for image in stage.images if image.crops.start not in picks])
        new = hidden.new_zeros(hidden.shape[0], width, hidden.shape[2])
        new_tokens = torch.full((hidden.shape[0], width), -1, dtype=tokens.dtype, device=tokens.device)
        for image in stage.images:
            crops = image.crops
            if crops.start in picks:
                _, slots = picks[crops.start]
                slots = slots.to(hidden.device)
                new[crops, :slots.shape[1]] = torch.gather(hidden[crops], 1,
                                                           slots[..., None].expand(-1, -1, hidden.shape[2]))
                new_tokens[crops, :slots.shape[1]] = torch.gather(tokens[crops], 1, slots.to(tokens.device))
                image.n = slots.shape[1]
            else:
                new[crops, :image.n] = hidden[crops, :image.n]
                new_tokens[crops, :image.n] = tokens[crops, :image.n]
            lengths[crops] = image.n
        stage.tokens, stage.lengths = new_tokens, lengths
        stage.history[layer] = new_tokens
        stage.seconds += clock(hidden) - start
        return new

    def _checked_vision(self, chosen, image: VisionImage) -> torch.Tensor:
        name = self.method.name
        if not isinstance(chosen, torch.Tensor) or chosen.dtype.is_floating_point or chosen.dtype == torch.bool \
                or chosen.dim() != 2 or chosen.shape[0] != image.n_crops:
            raise RuntimeError(f"{name}: vision_step() must return a [{image.n_crops}, k] integer tensor of patch "
                               f"indices (one row per crop of the image), got {chosen!r:.80}")
        chosen = chosen.long()
        k = chosen.shape[1]
        if k < image.target or k > image.n_patches:
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
            if image.target > 0 and image.n_patches != image.target and image.n_patches > image.target:
                raise RuntimeError(f"{self.method.name}: the vision stage ended with {image.n_patches} patches per "
                                   f"crop, not its target {image.target}")
        if not stage.history:
            return None

        def full(entry):
            if entry is None or entry.dim() != 3:
                return entry
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
