"""Selection alone, at any number of visual tokens: a stand-in for ``SelectionContext`` whose signals are random
tensors at a real model's widths, so a method's selection can be timed (and its peak memory measured) on a
32k-token video without running a 7B model's prefill.

The inputs a model would have produced (hidden states, keys, a last-token query, vision-tower features) are drawn
before timing; what the real context computes from them per stage (the last token's attention row, raters'
attention rows, the rotary gravity, the final norm, vision [CLS] and received attention per 577-token crop) is
computed inside the timed call with the library's own kernels, as in ``handle.last.selection_seconds``. The
engine's bookkeeping around a stage (compaction, position gathers; linear in the sequence) is not included.
Values are random, so the kept tokens mean nothing; costs depend on shapes (and for CDPruner's DPP on the rank of
the features, full here).
"""
from __future__ import annotations

import dataclasses
import math
import time
from types import SimpleNamespace

import torch

from .. import kernels
from ..layout import VisualSpan
from ..methods import lookup
from ..methods.base import Stage
from ..signals.vision import split_deepstack
from ..signals import SpanCandidates
from ..signals.text import TextSignals

CLIP_CROP = 576  # patches of one CLIP-336 crop (LLaVA); [CLS] is token 0 of each crop
PREFIX, SUFFIX = 16, 48  # text tokens before and after the visual span


@dataclasses.dataclass(frozen=True)
class Widths:
    """The shapes selection sees: language-model hidden size, attention heads, kv heads, head size and depth;
    vision-tower hidden size and heads."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vision_hidden: int = 1024
    vision_heads: int = 16
    family: str = "qwen2_vl"
    mrope: bool = True

    @classmethod
    def of(cls, config) -> "Widths":
        text = config.get_text_config()
        vision = getattr(config, "vision_config", None)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # CLIP / SigLIP: hidden_size; Qwen2-VL: embed_dim (its hidden_size is the merger's output width)
        vision_hidden = getattr(vision, "embed_dim", None) or getattr(vision, "hidden_size", 1024)
        return cls(text.hidden_size, text.num_attention_heads, text.num_key_value_heads or text.num_attention_heads,
                   head_dim, text.num_hidden_layers, vision_hidden, getattr(vision, "num_heads", None)
                   or getattr(vision, "num_attention_heads", 16), config.model_type,
                   config.model_type.startswith("qwen"))


class SyntheticContext:
    """``SelectionContext``'s interface (the parts methods call) for one row: ``PREFIX`` text tokens, one visual
    span of ``frames x per_frame`` tokens (a video when ``frames > 1``), ``SUFFIX`` text tokens."""

    def __init__(self, method, widths: Widths, frames: int, per_frame: int, device="cpu", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        n = frames * per_frame
        L = PREFIX + n + SUFFIX
        self.w, self.n, self.L = widths, n, L
        side = math.isqrt(per_frame)
        grid = (frames, side, side) if side * side == per_frame else (frames, 1, per_frame)
        kind = "video" if frames > 1 and "video" in method.visual_kinds else "image"
        if kind == "image" and frames > 1:  # an image-only method: the tokens as one image
            grid = (1, frames * side, side) if side * side == per_frame else (1, 1, n)
        positions = torch.arange(PREFIX, PREFIX + n)
        self.span = VisualSpan(kind, 0, positions, grid, crop=torch.arange(n) // CLIP_CROP)
        self.spec = method.stages()[0]
        self.engine = SimpleNamespace(method=method, family=SimpleNamespace(name=widths.family, mrope=widths.mrope),
                                      vision_feature_layer=-2,
                                      stage_positions=lambda spec: spec.positions or method.positions)
        self.valid = torch.ones(1, L, dtype=torch.bool, device=device)
        self.fwd = SimpleNamespace(request=SimpleNamespace(base=SimpleNamespace(mask2d=self.valid),
                                                           record=SimpleNamespace(n_layers=widths.layers)))
        rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
        self.hidden = rand(1, L, widths.hidden)
        self._keys = rand(1, widths.kv_heads, L, widths.head_dim)
        self._last_query = rand(1, widths.heads, 1, widths.head_dim)
        self._seed = seed
        crops = -(-n // CLIP_CROP)
        dv, hv = widths.vision_hidden, widths.vision_heads
        self._vision_hidden = rand(crops, CLIP_CROP + 1, dv)
        self._vision_q = rand(crops, hv, CLIP_CROP + 1, dv // hv)
        self._vision_k = rand(crops, hv, CLIP_CROP + 1, dv // hv)
        self._projector = rand(dv, widths.hidden) / dv ** 0.5
        self._memo = {}
        self.request_state = {}  # a multi-stage method's state (FrameFusion: its first stage starts the cascade)

    @property
    def score_dtype(self):
        return self.hidden.dtype if self.engine.method.score_dtype == "model" else torch.float32

    def cached(self, key, compute):
        key = ("method", key)
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def request_cached(self, key, compute):  # one stage is timed: its per-request signals are computed in it
        return self.cached(("request", key), compute)

    text_raters = TextSignals.text_raters  # the context's own rule, on the stand-in's embeddings

    def candidates(self) -> SpanCandidates:
        return SpanCandidates(self.span, self.span.positions.to(self.hidden.device), torch.arange(self.n))

    # ---------------------------------------------------------------------------------------- sequence side
    def eligible(self, tokens):
        return torch.ones(len(tokens), dtype=torch.bool)

    def groups(self, candidates):
        return [candidates]

    def text_slots(self, row):
        return torch.cat([torch.arange(PREFIX), torch.arange(PREFIX + self.n, self.L)]).to(self.hidden.device)

    def slots_of(self, row, positions):
        return positions.to(self.hidden.device)

    def unpadded_positions(self, row, slots):
        return slots

    def input_embeddings(self, row, positions):
        return self.hidden[row, positions.to(self.hidden.device)]

    def with_deepstack(self, row, tokens, features):
        return features  # the stand-in has no DeepStack levels

    def prompt_text_after(self, row, span):
        return torch.arange(PREFIX + self.n, self.L, device=self.hidden.device)

    def prompt_text_embedding(self, row):
        return self.hidden[row, self.text_slots(row)].float().mean(0)

    def last_slots(self):
        return torch.tensor([self.L - 1])

    def keys(self):
        return self._keys

    def normed_hidden(self):
        if "normed" not in self._memo:  # the model's final RMS norm (unit weight)
            h = self.hidden.float()
            self._memo["normed"] = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(self.hidden.dtype)
        return self._memo["normed"]

    def last_token_attention(self):
        if "last" not in self._memo:
            self._memo["last"] = kernels.attention_scores(self._last_query, self._keys, self.valid,
                                                          self.w.head_dim ** -0.5, "mean", dtype=self.score_dtype)[:, 0]
        return self._memo["last"]

    def attention_rows(self, row, queries, per_head=False):
        slots = queries.to(self.hidden.device)
        score = kernels.reference.attention_scores if per_head else kernels.attention_scores
        g = torch.Generator().manual_seed(self._seed + 1)  # the queries of these rows (drawn, not held for all L)
        q = torch.randn(1, self.w.heads, len(slots), self.w.head_dim, generator=g).to(self.hidden.device)
        out = score(q, self._keys, self.valid, self.w.head_dim ** -0.5,
                    "none" if per_head else "mean", q_positions=slots[None], dtype=self.score_dtype)
        return out[0]

    def rotary_gravity(self, row, queries):
        d = self.w.head_dim
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        angles = torch.arange(self.L, dtype=torch.float32)[:, None] * inv[None]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        sign = torch.cat([-torch.ones(d // 2), torch.ones(d - d // 2)])
        rotated = (cos + sign * sin).to(self.hidden.device)
        return rotated[queries.to(rotated.device)] @ rotated.T * d ** -0.5

    # ------------------------------------------------------------------------------------------ vision side
    def vision_sources(self, row, tokens):
        ids = tokens.ids.cpu()
        return ids // CLIP_CROP, ids % CLIP_CROP + 1

    def vision_grid(self, row, tokens):
        crop, index = self.vision_sources(row, tokens)
        return crop, index - 1, 24, CLIP_CROP

    def _vision_rows(self, queries, crops=slice(None)):
        return kernels.attention_scores(self._vision_q[crops, :, queries], self._vision_k[crops], None,
                                        (self.w.vision_hidden // self.w.vision_heads) ** -0.5, "mean")

    def vision_cls_attention(self, row, tokens, layer=None):
        if ("cls", layer) not in self._memo:
            self._memo["cls", layer] = self._vision_rows(slice(0, 1))[:, 0]  # [crops, 577]
        crop, index = self.vision_sources(row, tokens)
        return self._memo["cls", layer][crop, index]

    def vision_received_attention(self, row, tokens, layer=None):
        if ("received", layer) not in self._memo:  # every query of its crop, one crop at a time
            self._memo["received", layer] = torch.stack([self._vision_rows(slice(None), slice(c, c + 1))[0].mean(0)
                                                         for c in range(len(self._vision_q))])
        crop, index = self.vision_sources(row, tokens)
        return self._memo["received", layer][crop, index]

    def vision_global_attention(self, row, tokens, threshold, layer=None, newline=1.0, entropy_weight=0.0):
        if ("global", threshold) not in self._memo:  # one crop's [N, N] at a time; no pixels here (weight ignored)
            maps = []
            for c in range(len(self._vision_q)):
                A = self._vision_rows(slice(None), slice(c, c + 1))[0]
                received = A.mean(0)
                chosen = received > threshold * received.mean()
                maps.append(A[chosen].mean(0) if bool(chosen.any()) else received)
            self._memo["global", threshold] = torch.stack(maps)
        crop, index = self.vision_sources(row, tokens)
        return self._memo["global", threshold][crop, index]

    def last_vision_layer(self):
        return 23

    def vision_cls_attention_one_head(self, row, tokens, layer=None):
        if ("cls_one_head", layer) not in self._memo:  # one head over the full width (PruMerge)
            q, k = (x.transpose(1, 2).flatten(2) for x in (self._vision_q[:, :, :1], self._vision_k))
            self._memo["cls_one_head", layer] = (q @ k.transpose(1, 2) * q.shape[-1] ** -0.5).softmax(-1)[:, 0]
        crop, index = self.vision_sources(row, tokens)
        return self._memo["cls_one_head", layer][crop, index]

    def vision_projected_keys(self, row, tokens, layer=None):
        crop, index = self.vision_sources(row, tokens)
        return self._vision_k.transpose(1, 2).flatten(2)[crop, index]

    def vision_features(self, row, tokens, layer=None):
        crop, index = self.vision_sources(row, tokens)
        return self._vision_hidden[crop, index]

    def vision_keys(self, row, tokens, layer=None):
        crop, index = self.vision_sources(row, tokens)
        d = self.w.vision_hidden // self.w.vision_heads
        return self._vision_hidden[crop, index, :d]

    def project_visual(self, features):
        return (features.float() @ self._projector).to(self.hidden.dtype)

    def vision_token_features(self, row, tokens):
        if self.engine.family.mrope:  # a Qwen-VL token merges a 2x2 unit: the merged token itself
            return self.hidden[row, tokens.slots]
        return self.vision_features(row, tokens)

    def visual_inputs(self, features):
        if not self.engine.family.mrope:
            return self.project_visual(features), None
        return split_deepstack(features, self.hidden.shape[-1], self.hidden.dtype)

    def video_mean_query_attention(self, row, span, layer=None):
        """FastVID's Qwen2.5-VL salience: per temporal slice, the mean of its ``4 N`` patch queries against each
        merge unit's mean key, softmax over the ``N`` units, mean over heads."""
        if ("video_mean_query", layer) not in self._memo:
            frames = int(span.frame.max()) + 1
            per_frame = self.n // frames
            g = torch.Generator().manual_seed(self._seed + 2)
            hv, d = self.w.vision_heads, self.w.vision_hidden // self.w.vision_heads
            out = []
            for _ in range(frames):
                q, k = (torch.randn(hv, 4 * per_frame, d, generator=g).to(self.hidden.device) for _ in "qk")
                logits = torch.einsum("hd,hud->hu", q.mean(1), k.view(hv, per_frame, 4, d).mean(2)) * d ** -0.5
                out.append(logits.softmax(-1).mean(0))
            self._memo["video_mean_query", layer] = torch.stack(out)
        return self._memo["video_mean_query", layer]

    def video_received_attention(self, row, span, layer=None):
        """HoliTom's OneVision signal: per frame, the attention each of the ``(2 side)^2`` tower patches receives
        (every query of the frame, one frame at a time), pooled to the frame's tokens."""
        if ("video_received", layer) not in self._memo:
            frames, side = int(span.frame.max()) + 1, math.isqrt(self.n // (int(span.frame.max()) + 1))
            g = torch.Generator().manual_seed(self._seed + 1)
            hv, d = self.w.vision_heads, self.w.vision_hidden // self.w.vision_heads
            out = []
            for _ in range(frames):
                q, k = (torch.randn(1, hv, 4 * side * side, d, generator=g).to(self.hidden.device) for _ in "qk")
                received = kernels.attention_scores(q, k, None, d ** -0.5, "mean")[0].mean(0)
                out.append(torch.nn.functional.avg_pool2d(received.view(1, 2 * side, 2 * side), 2).flatten())
            self._memo["video_received", layer] = torch.stack(out)
        return self._memo["video_received", layer]


def resolve(name: str, ratio: float, widths: Widths):
    """The method with its model- and depth-dependent defaults resolved (CDPruner: relevance from the language
    model's embeddings, there being no CLIP text tower here)."""
    cls = lookup(name)
    options = {"relevance": "embeddings"} if name == "cdpruner" else {}
    fields = {f.name for f in dataclasses.fields(cls)}
    if "layer" in fields:
        options["layer"] = 1
    method = cls(ratio=ratio, **options)
    return method.for_model(SimpleNamespace(name=widths.family, mrope=widths.mrope)).for_depth(widths.layers)


def _rss(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(name: str, ratio: float, widths: Widths, frames: int, per_frame: int, device="cpu",
            seed: int = 0) -> dict:
    """One timed selection of ``name`` on a synthetic row of ``frames x per_frame`` visual tokens: seconds, kept
    count and the peak extra memory (bytes above what the inputs hold; CUDA: allocator peak; CPU on Linux: peak
    resident size, reset before the call; None elsewhere)."""
    import gc
    method = resolve(name, ratio, widths)
    if method.stages()[0].stage is Stage.VISION:
        return {"method": name, "n": frames * per_frame,
                "error": "not measured: it selects inside the vision tower, layer by layer per image; this stand-in "
                         "times selection between the vision side and the language model"}
    ctx = SyntheticContext(method, widths, frames, per_frame, device, seed)
    group = ctx.candidates()
    cuda = torch.device(device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss("VmRSS") if _reset_peak() else None
    start = time.perf_counter()
    try:
        budget = method.budget_for(ctx, 0, group)
        chosen = method.select(ctx, 0, group, budget) if budget < len(group) else torch.arange(len(group))
        if cuda:
            torch.cuda.synchronize()
    except (AttributeError, NotImplementedError) as error:  # a signal this stand-in does not provide
        return {"method": name, "n": ctx.n, "error": f"{type(error).__name__}: {error}"}
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = None if base is None else max(0, _rss("VmHWM") - base)
    keep = chosen.keep if hasattr(chosen, "keep") else chosen
    return {"method": name, "n": ctx.n, "frames": frames, "per_frame": per_frame, "seconds": seconds,
            "kept": int(len(keep)), "peak_extra_bytes": peak}
