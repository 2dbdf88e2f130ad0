from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Stage, layer_list, scale_layers
from .registry import register

# The official schedule (LLaVA-1.5 / 1.6 scripts): drops before layers 8, 16, 24 of 32, each keeping half.
OFFICIAL = (8, 16, 24)
# The authors' suggestion for small budgets (192 / 128 / 64 tokens, issue #29): earlier drops, lambda solved.
EARLY = (2, 8, 16)
# Layer-averaged kept fraction of the official schedule on a 32-layer model: (8 + 4 + 2 + 1) / 32.
OFFICIAL_FRACTION = 15 / 32


def layer_average(lam: float, layers: tuple[int, ...], n_layers: int) -> float:
    """Fraction of the image's tokens present on average over the decoder layers when stage ``s`` keeps
    ``lam ** s`` of them (before flooring to whole tokens)."""
    bounds = (0,) + layers + (n_layers,)
    return sum((bounds[s + 1] - bounds[s]) * lam ** s for s in range(len(bounds) - 1)) / n_layers


def solve_lambda(fraction: float, layers: tuple[int, ...], n_layers: int) -> float:
    """The per-stage keep ratio whose layer average is ``fraction`` (bisection; the average grows with lambda)."""
    low, high = 0.0, 1.0
    if fraction >= 1:
        return 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if layer_average(mid, layers, n_layers) < fraction else (low, mid)
    return (low + high) / 2


@register
@dataclass
class PyramidDrop(Method):
    """PyramidDrop (Xing et al., CVPR'25): drop visual tokens in stages as the sequence goes deeper.

    Before each stage layer ``K`` the last prompt token's softmax attention row is computed with layer ``K``'s own
    input norm and q/k projections at the current positions (``pdrop_rank_drop`` in ``Cooperx521/PyramidDrop``),
    mean over heads, and each image keeps its top ``int(N * lam ** s)`` tokens at stage ``s`` (``N``: the image's
    tokens at the language model input, LLaVA-NeXT / OneVision newline tokens included, as the official code counts
    them; at least 1). Positions are compacted after every stage (official); decoding continues per layer with that
    layer's own compacted numbering (the official decode shift ``int(N lam_s) - int(N lam_{s+1})`` per stage). On
    M-RoPE models (Qwen-VL, not covered by the official code) positions stay original, as for every method there.
    Notes: ../shared/research/methods_image.md section 4.

    Budget: ``ratio`` / ``keep`` name the *layer-averaged* visual token count (what the paper's tables quote):
    ``1 - ratio`` (or ``keep / N``) is the average over the decoder layers of the fraction of the image present,
    and ``lam`` is solved for it (bisection over the schedule). ``layers``: the stage layers, comma separated;
    ``""`` (default) resolves at patch time to the official 8,16,24 (at the same fractions of other depths) when
    ``ratio <= 17/32`` keeps at least the official schedule's average (15/32 of the image, 270 of 576), else to
    2,8,16, the authors' suggestion for the 192 / 128 / 64 budgets (issue #29); with ``keep`` always 2,8,16. So
    ``ratio=17/32`` reproduces the official default exactly (``lam = 0.5``: 576 -> 288 -> 144 -> 72 on
    LLaVA-1.5-7B). ``lam`` (0 < lam <= 1) fixes the per-stage ratio directly and overrides the budget. A budget
    below ``K_1 / L`` (the layers before the first stage run on every token; 2/32 with the 2,8,16 schedule, 1/4 on
    a 4-layer model) is out of reach: ``ValueError`` naming the lowest reachable value (at patch time for
    ``ratio``, at the first forward for ``keep``).
    The realised average (after flooring) is in ``handle.last.layer_average``.

    Cost: the stage layer's input norm and key projection over the whole sequence before each stage are the
    signal itself (the official code computes them too); the stage layer then takes the kept rows of them instead
    of computing them again (the engine's ``"layer_inputs"`` reuse), so what PyramidDrop costs beyond its ideal is
    that signal over the tokens it drops, the last token's attention row and the top-k.

    Deliberate differences from the official code: batched with each row's own last real token, padding on
    either side (official: right padding required); several images per prompt: each image keeps its own count;
    the attention row is computed in fp32 (``score_dtype="model"`` for the model dtype); training-time query
    averaging over answer spans is not implemented (inference only).
    """

    name: ClassVar[str] = "pdrop"
    layer_option: ClassVar[str] = "layers"
    summary: ClassVar[str] = "top-k by last-token attention in stages (8/16/24), each keeping lam of the previous"
    stage: ClassVar[Stage] = Stage.LAYER
    default_positions: ClassVar[str] = "compact"
    needs: ClassVar[frozenset] = frozenset({"layer_inputs"})
    needs_whole_prompt: ClassVar[bool] = True
    newline_candidates: ClassVar[bool] = True
    layers: str = ""
    """Stage layers, comma separated; "" resolves at patch time to the official 8,16,24 (at the same fractions of
    other depths) when the budget keeps at least the official schedule's average, else (and with keep) to 2,8,16."""
    lam: float | None = dataclasses.field(default=None, metadata={"min": 1e-9, "max": 1.0})
    """Keep ratio per stage (stage s keeps N * lam**s); None solves it from ratio / keep as a layer-averaged budget."""

    def for_depth(self, n_layers: int) -> "PyramidDrop":
        if self.layers:
            layer_list(self, self.layers, n_layers)
            return self
        early = self.keep is not None or (self.ratio is not None and 1 - self.ratio < OFFICIAL_FRACTION)
        if self.lam is not None:
            early = False
        layers = scale_layers(EARLY if early else OFFICIAL, n_layers)
        return dataclasses.replace(self, layers=",".join(map(str, layers)))

    def layer_average_range(self, n_layers: int) -> tuple[float, float] | None:
        """The layers before the first stage run on every token: the average is above ``K_1 / L`` (``lam`` given:
        it fixes the schedule and overrides the budget)."""
        if self.lam is not None:
            return None
        return self.stages()[0].layer / n_layers, 1.0

    def _lambda(self, n: int, n_layers: int) -> float:
        if self.lam is not None:
            return self.lam
        if self.ratio == 0:
            return 1.0
        fraction = self.keep / n if self.keep is not None else 1 - self.ratio
        return solve_lambda(fraction, tuple(s.layer for s in self.stages()), n_layers)

    def budget_for(self, ctx, row, group):
        stage = self.stage_number(ctx.spec) + 1
        n = group.span.n
        # The epsilon keeps a solved lam of 0.5 - 1e-17 from flooring 576 * 0.5 to 287.
        return min(len(group), max(1, int(n * self._lambda(n, ctx.fwd.request.record.n_layers) ** stage + 1e-6)))

    def select(self, ctx, row, span, budget):
        scores = ctx.last_token_attention()[row, span.slots]
        return torch.topk(scores, budget).indices
