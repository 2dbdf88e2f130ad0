from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..kernels.reference import MATRIX_BYTES, fits, gram, row_blocks, row_products
from .base import Method, Stage, choices
from .registry import register

KERNELS = ("paper", "openvino")
OPENVINO_EPS = 1e-6  # OpenVINO GenAI's Config::numerical_threshold


@register
@dataclass
class CDPruner(Method):
    """CDPruner (Zhang et al., NeurIPS'25): keep the visual tokens a conditional DPP picks, trading relevance to the
    instruction against diversity.

    Similarity: cosine similarity of the projected visual tokens (the language model's inputs), fp32. Kernel
    ``diag(r) S diag(r)`` with ``r`` the min-max normalised relevance (``(r - min + 1e-6) / (max - min)``); greedy
    MAP inference of the DPP (Chen et al. 2018: ``T`` picks of the largest remaining marginal gain with incremental
    Cholesky updates). Before the language model. Official code: ``Theia-4869/CDPruner``, ``llava_arch.py:
    encode_images``, ``clip_encoder.py: load_text_tower, forward``.

    Relevance (``relevance``; ``"auto"`` picks ``"clip"`` on LLaVA-1.5 / NeXT and ``"embeddings"`` elsewhere):
      * ``"clip"`` (official code, CLIP vision towers only): minus the mean cosine similarity between each patch in
        CLIP's joint space (the feature layer's hidden state through the tower's post-layernorm and CLIP's
        ``visual_projection``) and the CLIP text embeddings of the instruction (split into segments of the text
        tower's context length); the minus sign is the authors' choice. The instruction is the row's text after
        the image, read back with the language model's tokenizer. Options ``clip`` (the CLIP checkpoint; default:
        the tower LLaVA-1.5 / NeXT were trained with) and ``tokenizer`` (default: the model's checkpoint), both
        loaded at patch time.
      * ``"embeddings"`` (the documented substitute on models without a CLIP text tower, LLaVA-OneVision and
        Qwen2/2.5/3-VL, as OpenVINO GenAI ships CDPruner for Qwen-VL): the cosine similarity (no minus sign)
        between each projected visual token and the mean of the language model's input embeddings over the row's
        text tokens (the whole prompt outside the visual spans and their delimiters).

    ``kernel`` and ``relevance_weight`` ``w`` (OpenVINO GenAI's knob, in [0, 1]):
      * ``"paper"`` (default): ``w = 1`` (default) is the paper's kernel above; 0 ignores relevance (pure
        diversity); in between the kernel is ``diag(q) S diag(q)`` with ``q = exp(a * r)``, ``a = w / (2 (1 -
        w))``, the quality weighting of the DPP literature (OpenVINO GenAI's fallback path, which it takes only
        when its compiled graph fails, ``conditional_kernel.cpp: compute_conditional_kernel_normal``).
      * ``"openvino"``: OpenVINO GenAI's default, its compiled graph (``conditional_kernel.cpp:
        create_conditional_kernel_model``, on every device): tokens and text L2-normalised as ``x / sqrt(|x|^2 +
        1e-6)``, relevance min-max normalised as ``(r - min) / (max - min + 1e-6)``, kernel ``(1 - w) S + w
        diag(r) S diag(r)``, ``w`` 0.5 by default (OpenVINO's), and keep counts rounded half away from zero
        (``std::round``). With ``split_threshold=1`` (OpenVINO's default, below) and the ``"embeddings"``
        relevance this is OpenVINO GenAI's default CDPruner on Qwen-VL images, one image (vision region) at a
        time as it prunes them.

    ``split_threshold`` (OpenVINO GenAI's ``CDPRUNER_SPLIT_THRESHOLD``; 0 = off, the default with ``kernel=
    "paper"`` and the paper's algorithm; 1, OpenVINO's default, with ``kernel="openvino"``): an image with more
    candidates splits them in token order into two halves, each with its own relevance normalisation (under
    ``scope="crop"``: the image's), kernel and DPP, keeping ``T // 2`` and ``T - T // 2`` tokens; for large token
    counts (the DPP costs ``O(N T^2)``).

    Keep count per image: ``round(n * (1 - ratio))`` (``kernel="openvino"``: halves rounded away from zero) or
    ``min(keep, n)``, at least 1 (official: ``visual_token_num``). Positions: ``compact`` on 1-D RoPE models,
    ``original`` on M-RoPE (as every pre-LLM method). Images only (OpenVINO GenAI prunes Qwen2-VL images only; on
    Qwen3-VL it also prunes videos, which vtr does not).

    Deliberate differences from the official code:
      * the instruction (``"clip"``): the official evaluation passes the benchmark question (answer-format suffix
        removed); vtr reads the text after the image from the prompt, so chat-template words (``ASSISTANT:``) are
        included; an image followed by no text gets uniform relevance (pure diversity), where the official code
        needs text;
      * relevance is normalised per image (official: over all images of the batch at once, which would make a
        row depend on its companions); constant relevance (max = min, official: division by zero) is uniform;
      * features are normalised in fp32 (official: in the model dtype, then cast to fp32, as ``score_dtype="model"``
        does; the relevance likewise in the model dtype; the similarities and the DPP are fp32 either way);
      * memory and time: the N x N kernel is built once, in place, while it fits ``matrix_mb`` (default 1024 MiB:
        16,384 tokens; official: the similarity and the kernel), as the official code computes it; above it it is
        never held (``ConditionalKernel``, ``BlendedKernel`` serve a row per pick, O(N) extra memory at one pass
        over the features per pick, the diagonal in O(N C)); the greedy DPP's own Cholesky rows remain, O(N T)
        (``greedy_dpp``; a failed allocation raises a ``MemoryError`` naming ``split_threshold``). The two paths
        give the same picks unless gains differ only in their last bits: past the kernel's rank they are rounding
        noise in any implementation, and so is the diagonal where the quality is uniform (unit features: every
        diagonal entry is 1 up to rounding);
      * LLaVA-NeXT: transformers' ``spatial_unpad`` layout, newline tokens always kept, one budget and one DPP per
        image (``scope="crop"``: one DPP per tile with its own budget, as the official per-crop budget, on relevance
        min-max normalised over all tiles of the image, as the official code normalises over every crop it
        encodes; the normalisation covers the tokens unpadding keeps, the official one also the padding patches
        it removes afterwards);
      * against OpenVINO GenAI (``"embeddings"``; ``openvinotoolkit/openvino.genai``, ``src/cpp/src/
        visual_language/cdpruner/`` and ``vision_token_pruning_processor.cpp: execute``): ``kernel="paper"`` is
        the paper's kernel and min-max formula, not OpenVINO's default graph (``kernel="openvino"``); the exact keep
        count (OpenVINO's OpenCL DPP rounds it up to an even number; its CPU loop does not); no text (a prompt of
        only an image) gives uniform relevance with ``"paper"`` and zero relevance with ``"openvino"`` (OpenVINO's
        zero text embedding); batched (OpenVINO: batch 1).
    """

    name: ClassVar[str] = "cdpruner"
    summary: ClassVar[str] = "conditional DPP over projected tokens, relevance to the instruction (CLIP or LM)"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    needs_whole_prompt: ClassVar[bool] = True
    relevance: str = field(default="auto", metadata=choices("auto", "clip", "embeddings"))
    """Relevance to the instruction: "clip" (the official CLIP text tower; LLaVA-1.5 / NeXT), "embeddings" (mean of
    the language model's input embeddings over the prompt's text, OpenVINO GenAI's Qwen-VL substitute) or "auto"
    (clip where the model has a CLIP tower, else embeddings)."""
    kernel: str = field(default="paper", metadata=choices(*KERNELS))
    """"paper": the official kernel diag(r) S diag(r); "openvino": OpenVINO GenAI's default compiled graph,
    (1 - w) S + w diag(r) S diag(r) with its normalisations and rounding."""
    relevance_weight: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0})
    """OpenVINO GenAI's relevance weight w (1 is the paper's kernel, 0 is diversity only); None: 1 with
    kernel="paper", 0.5 (OpenVINO GenAI's default) with kernel="openvino"."""
    split_threshold: int | None = field(default=None, metadata={"min": 0})
    """OpenVINO GenAI's CDPRUNER_SPLIT_THRESHOLD: images with more tokens than this are split into two halves, each
    with its own DPP; 0 turns the split off. None: 0 with kernel="paper", 1 (OpenVINO GenAI's default) with
    kernel="openvino"."""
    clip: str = "openai/clip-vit-large-patch14-336"
    """The CLIP checkpoint whose text tower scores relevance (relevance="clip"), loaded at patch time."""
    tokenizer: str = ""
    """The language model's tokenizer used to read the instruction back from each prompt (relevance="clip"), loaded
    at patch time; "" takes the model's own checkpoint."""
    matrix_mb: int = field(default=MATRIX_BYTES >> 20, metadata={"min": 0})
    """Largest N x N kernel (MiB) held: within it the dense kernel, as the official code; above it a row per pick
    with O(N) extra memory (same picks up to rounding ties, slower on a CPU: one pass over the features per pick)."""

    def __post_init__(self):
        super().__post_init__()
        openvino = self.kernel == "openvino"
        if self.relevance_weight is None:
            self.relevance_weight = 0.5 if openvino else 1.0
        if self.split_threshold is None:
            self.split_threshold = 1 if openvino else 0

    def budget(self, n: int) -> int:
        if self.kernel != "openvino" or self.ratio is None or self.ratio == 0:
            return super().budget(n)
        kept = n * (1 - self.ratio)  # OpenVINO: std::round, halves away from zero
        return min(n, max(1, math.floor(kept) + (1 if kept - math.floor(kept) >= 0.5 else 0)))

    @property
    def needs(self) -> frozenset:
        # The CLIP text tower (and the vision-tower signals it is matched with) only where relevance uses it.
        return frozenset({"vision", "clip_text"}) if self.relevance == "clip" else frozenset()

    def for_model(self, family):
        method = super().for_model(family)
        clip_tower = family.name in ("llava", "llava_next")
        if method.relevance == "auto":
            method = dataclasses.replace(method, relevance="clip" if clip_tower else "embeddings")
        if method.relevance == "clip" and not clip_tower:
            raise ValueError(f"cdpruner: relevance='clip' needs a CLIP vision tower (LLaVA-1.5 / NeXT), not the "
                             f"{family.name} family's; use relevance='embeddings' (the language model's embeddings "
                             "of the instruction)")
        return method

    def select(self, ctx, row, span, budget):
        # official: normalised in the model dtype, then cast to fp32 (score_dtype="model"); similarities in fp32
        features = self._unit(ctx.hidden[row, span.slots].to(ctx.score_dtype)).float()
        relevance = raw = None
        if self.scope == "crop":  # one DPP per tile, relevance min-max normalised over all tiles (official)
            ids, image = ctx.cached(("cdpruner", row, span.span.offset), lambda: self._image_relevance(ctx, row, span))
            if image is not None:
                relevance = image[torch.searchsorted(ids, span.ids.to(ids.device))]
        else:
            raw = self._raw_relevance(ctx, row, span, features)
        if self.split_threshold and len(span) > self.split_threshold:
            half = len(span) // 2
            first = self._select(features[:half], _part(relevance, 0, half), _part(raw, 0, half), budget // 2)
            second = self._select(features[half:], _part(relevance, half, None), _part(raw, half, None),
                                  budget - budget // 2)
            return torch.cat([first, second + half])
        return self._select(features, relevance, raw, budget)

    def _raw_relevance(self, ctx, row, tokens, features=None) -> torch.Tensor | None:
        """``[c]``: the tokens' relevance to the instruction before min-max normalisation (None without text), in
        ``score_dtype`` (official: the towers' dtype). ``features``: the tokens' unit features when at hand (the
        ``"embeddings"`` relevance reuses them, as OpenVINO's graph does)."""
        dtype = ctx.score_dtype
        if self.relevance == "clip":
            text = ctx.instruction_embeddings(row, tokens)
            if text is None:
                return None
            return mean_similarity(self._unit(ctx.clip_image_embeddings(row, tokens).to(dtype)),
                                   self._unit(text.to(dtype)), negate=True)
        text = ctx.prompt_text_embedding(row)
        if text is None:
            return None
        image = features.to(dtype) if features is not None else self._unit(ctx.hidden[row, tokens.slots].to(dtype))
        return mean_similarity(image, self._unit(text[None].to(dtype)), negate=False)

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` L2-normalised: ``x / |x|`` (paper), ``x / sqrt(|x|^2 + 1e-6)`` (OpenVINO's NormalizeL2)."""
        if self.kernel == "openvino":
            return x / torch.sqrt((x * x).sum(-1, keepdim=True) + OPENVINO_EPS)
        return torch.nn.functional.normalize(x, dim=-1)

    def _minmax(self, raw: torch.Tensor) -> torch.Tensor:
        if self.kernel == "openvino":  # OpenVINO's create_min_max_normalize_ops
            return (raw - raw.min()) / (raw.max() - raw.min() + OPENVINO_EPS)
        return minmax(raw)

    def _image_relevance(self, ctx, row, tile):
        """(ascending span ids ``[c]``, relevance ``[c]`` or None) over every candidate of ``tile``'s image."""
        present = ctx.present(row, tile.span)
        whole = present.subset(ctx.eligible(present))
        raw = self._raw_relevance(ctx, row, whole)
        return whole.ids, (self._minmax(raw).float() if raw is not None else None)

    def _select(self, features, relevance, raw, budget):
        """One DPP over unit ``features`` ``[c, D]``, with relevance already normalised (``relevance``) or
        normalised over these tokens (``raw``), or uniform when both are None."""
        openvino = self.kernel == "openvino"
        if relevance is None and raw is not None:
            relevance = self._minmax(raw).float()
        if relevance is None:  # no text: uniform (paper), OpenVINO's zero text embedding gives zero relevance
            relevance = (torch.zeros if openvino else torch.ones)(len(features), device=features.device)
        if fits(len(features), features.dtype, self.matrix_mb << 20):  # the dense kernel, as the official code
            similarity = gram(features)
            if openvino:
                return greedy_dpp(blended_kernel(similarity, relevance, self.relevance_weight), budget)
            return greedy_dpp(conditional_kernel(similarity, relevance, self.relevance_weight, in_place=True),
                              budget)
        if openvino:
            return greedy_dpp(BlendedKernel(features, relevance, self.relevance_weight), budget)
        return greedy_dpp(ConditionalKernel(features, quality(relevance, self.relevance_weight)), budget)


def _part(values, start, stop):
    return values[start:stop] if values is not None else None


def quality(relevance: torch.Tensor, weight: float) -> torch.Tensor:
    """``[N]`` per-item quality of the DPP kernel from relevance ``[N]`` in [0, 1]: ``r`` at ``weight`` 1, ``1`` at
    0, else ``exp(a * r)``, ``a = weight / (2 (1 - weight))``."""
    if weight == 1:
        return relevance
    if weight == 0:
        return torch.ones_like(relevance)
    return torch.exp(weight / (2 * (1 - weight)) * relevance)


def conditional_kernel(similarity: torch.Tensor, relevance: torch.Tensor, weight: float,
                       in_place: bool = False) -> torch.Tensor:
    """``[N, N]`` DPP kernel from similarities ``[N, N]`` and relevance ``[N]`` in [0, 1]: ``diag(q) S diag(q)``
    with ``q = quality(relevance, weight)``; ``in_place`` overwrites ``similarity`` (the same floats, no second
    ``N x N`` matrix)."""
    q = quality(relevance, weight)
    if in_place:
        return similarity.mul_(q[:, None]).mul_(q[None, :])
    return q[:, None] * similarity * q[None, :]


def blended_kernel(similarity: torch.Tensor, relevance: torch.Tensor, weight: float) -> torch.Tensor:
    """``[N, N]`` OpenVINO GenAI's default kernel ``(1 - w) S + w diag(r) S diag(r)``, in its graph's order
    (fp32 constants ``w`` and ``1 - w`` as its C++ computes them)."""
    w = torch.tensor(weight, dtype=torch.float32)
    conditional = (relevance[:, None] * similarity) * relevance[None, :]
    return similarity * (1 - w).to(similarity) + conditional * w.to(similarity)


class BlendedKernel:
    """``blended_kernel`` of unit features ``F: [N, C]`` served a row at a time (``ConditionalKernel``'s memory
    bound) above ``CDPruner.matrix_mb``: ``K_ij = S_ij ((1 - w) + w r_i r_j)``, up to the last bit."""

    def __init__(self, features: torch.Tensor, relevance: torch.Tensor, weight: float):
        self.features, self.relevance, self.n = features, relevance, features.shape[0]
        w = torch.tensor(weight, dtype=torch.float32)
        self.keep, self.weight = (1 - w).to(features), w.to(features)

    def diagonal(self) -> torch.Tensor:
        f, r = self.features, self.relevance
        diag = torch.empty(self.n, dtype=f.dtype, device=f.device)
        for start, stop in row_blocks(self.n):
            diag[start:stop] = torch.diagonal(row_products(f[start:stop], f)[:, start:stop])
        return diag * self.keep + ((r * diag) * r) * self.weight

    def row(self, j: int) -> torch.Tensor:
        s = self.features @ self.features[j]
        return s * self.keep + ((self.relevance[j] * s) * self.relevance) * self.weight


class ConditionalKernel:
    """The kernel ``diag(q) F F^T diag(q)`` of unit features ``F: [N, C]`` and quality ``q: [N]``, served a row at
    a time so that it is never held whole (O(N) memory; the official code builds the ``N x N`` similarity and
    kernel matrices). Used where the dense kernel exceeds ``CDPruner.matrix_mb``. A row is a matrix-vector
    product, equal to the dense entries up to the last bit; so is the diagonal, in O(N C)."""

    def __init__(self, features: torch.Tensor, quality: torch.Tensor):
        self.features, self.quality = features, quality
        self.n = features.shape[0]

    def diagonal(self) -> torch.Tensor:
        """``[N]``: ``q_i (f_i . f_i) q_i``, each ``f_i . f_i`` a row's own sum of squares (O(N C); the dense
        similarity's diagonal comes out of an O(N^2 C) product and may differ in the last bit)."""
        f, q = self.features, self.quality
        return q * (f * f).sum(-1) * q

    def row(self, j: int) -> torch.Tensor:
        """``[N]``: row ``j`` of the kernel."""
        return self.quality[j] * (self.features @ self.features[j]) * self.quality


class _DenseKernel:
    def __init__(self, kernel: torch.Tensor):
        self.kernel, self.n = kernel, kernel.shape[0]

    def diagonal(self) -> torch.Tensor:
        return torch.diagonal(self.kernel)

    def row(self, j: int) -> torch.Tensor:
        return self.kernel[j]


def mean_similarity(image: torch.Tensor, text: torch.Tensor, negate: bool = True) -> torch.Tensor:
    """``[c]``: the mean cosine similarity of each unit image embedding ``[c, C]`` to the unit text embeddings
    ``[M, C]``, negated for CLIP features (the authors' choice)."""
    relevance = (image @ text.to(image.device).T).mean(-1)
    return -relevance if negate else relevance


def minmax(relevance: torch.Tensor) -> torch.Tensor:
    """CDPruner's min-max normalisation ``(r - min + 1e-6) / (max - min)``; all ones when ``r`` is constant."""
    spread = relevance.max() - relevance.min()
    if not bool(spread > 0):
        return torch.ones_like(relevance)
    return (relevance - relevance.min() + 1e-6) / spread



def greedy_dpp(kernel, k: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP (Chen et al., NeurIPS'18): each pick is the item of largest remaining marginal
    gain ``d_i^2`` (ties: lowest index), followed by a rank-one Cholesky update. ``kernel``: the ``[N, N]`` matrix,
    or a ``ConditionalKernel`` that computes a row per pick. Returns ``[k]`` distinct picks in order.

    Memory: the ``[k, N]`` incremental Cholesky rows (``4 k N`` bytes: 0.5 GiB for 16,384 tokens keeping half), the
    algorithm's own bound (O(N k), not O(N)); ``split_threshold`` halves it. An allocation that fails raises a
    ``MemoryError`` saying so, rather than the allocator's message.

    When the kernel's rank runs out before ``k`` picks (no remaining gain > 0: every other item lies in the span of
    the picks, e.g. many identical background tokens), the rest are the unpicked items of largest quality
    ``K_ii`` (ties: lowest index). The official loop takes the square root of a non-positive gain there and its
    NaNs then pick duplicates; vtr fills the budget instead (found by the accuracy canary)."""
    if isinstance(kernel, torch.Tensor):
        kernel = _DenseKernel(kernel)
    n = kernel.n
    diagonal = kernel.diagonal()
    try:
        rows = torch.zeros(k, n, dtype=diagonal.dtype, device=diagonal.device)
    except RuntimeError as error:  # the allocator's out-of-memory
        raise MemoryError(f"cdpruner: the greedy DPP over {n} tokens keeping {k} needs {4 * k * n / 2**30:.1f} GiB "
                          "for its Cholesky rows (O(tokens x kept)); set split_threshold to split the image "
                          f"({error})") from None
    gain = diagonal.clone()
    picks = []
    for i in range(k):
        j = int(torch.argmax(gain))
        if not bool(gain[j] > 0):
            rest = torch.ones(n, dtype=torch.bool, device=diagonal.device)
            rest[picks] = False
            left = rest.nonzero().flatten()
            order = torch.argsort(-diagonal[left], stable=True)
            picks += left[order[:k - i]].tolist()
            break
        picks.append(j)
        e = (kernel.row(j) - rows[:i, j] @ rows[:i]) / torch.sqrt(gain[j])
        rows[i] = e
        gain = gain - e * e
        gain[j] = float("-inf")
    return torch.tensor(picks, dtype=torch.long, device=diagonal.device)
