"""Signals of video frames in the vision tower. LLaVA-OneVision encodes every frame of every video of the call
as one tower batch (video after video, rows in order); a frame's signals are pooled like its features
(``compat.pool_video_frames``), so that their ``[F, N]`` entries line up with the frame's ``N`` pooled tokens in
raster order (``video.frame_table``). Attention signals are computed from the tower's own query and key
projections (captured with the layer), never projected again."""
from __future__ import annotations

import torch

from .. import compat
from ..layout import VisualSpan
from .core import ContextBase


class VideoSignals(ContextBase):
    """Frame signals of the vision tower (FastVID, HoliTom)."""

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
            for b in self.encoded_rows():
                for s in self.layout.rows[b].spans:
                    if s.kind == "video":
                        numbers[b, s.index, int(s.positions[0])] = (k, first)
                        k, first = k + 1, first + s.n
            self._memo["videos"] = numbers
        return self._memo["videos"][self.encoding_row(row), span.index, int(span.positions[0])]

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
        key = ("video_mean_query", layer, self._vision_dtype(hidden))
        if key not in call.signals:  # once per request, from the block's own projections
            unit = compat.qwen_merge_unit(self.engine.model)
            per_unit = compat.qwen_mean_query_attention(attn, hidden, call.extras[layer], self._vision_dtype(hidden),
                                                        unit, qkv=call.projections.get(layer, {}).get("qkv"))
            order = compat.qwen_unit_order(self.engine.model, call.grid_thw).to(per_unit.device)
            salience = torch.empty_like(per_unit)
            salience[order] = per_unit  # from the tower's (window) order to merged-token order
            call.signals[key] = salience.cpu()
        _, first = self._video_number(row, span)
        salience = call.signals[key][first:first + span.n]
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
        call = self.fwd.vision.video
        attn, hidden, _ = self._video_layer(layer)
        dtype = self._vision_dtype(hidden)
        q, k = self._vision_qk(layer, call)  # the tower's own projections of every frame
        received = torch.stack([compat.vision_attention_probs(attn, q[f:f + 1], k[f:f + 1], slice(None), dtype)[0]
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
        """The model's video pooling on per-patch values ``[F, P, k]`` -> ``[F, N, k]``
        (``compat.pool_video_frames``)."""
        return compat.pool_video_frames(self.engine.model, values)

