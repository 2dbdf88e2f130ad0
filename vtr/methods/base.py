"""The base class every pruning method derives from, and what a method sees when it selects."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..selection import SelectionContext, SpanCandidates


class Stage(str, Enum):
    """Where a method removes tokens. The engine owns the sequence surgery of each stage."""

    VISION = "vision"  # inside the vision encoder (reserved: FlowCut-style progressive pruning)
    PRE_LLM = "pre_llm"  # between the vision side and decoder layer 0
    LAYER = "layer"  # before decoder layer K; layers < K keep the full sequence and KV cache
    KV_CACHE = "kv_cache"  # on the KV cache during decoding (reserved: DyCoke-style)


IMPLEMENTED_STAGES = (Stage.PRE_LLM, Stage.LAYER)


@dataclass(frozen=True)
class StageSpec:
    stage: Stage
    layer: int = 0  # first decoder layer that runs on the pruned sequence (0 for pre_llm)


POSITION_POLICIES = ("original", "compact")


@dataclass
class Method:
    """Base class of a pruning method: a dataclass of its options, a keep-count rule and a selection rule.

    Budget: exactly one of ``ratio`` (fraction of each image's visual tokens removed, in [0, 1)) and ``keep``
    (visual tokens kept per image, >= 1). ``ratio=0`` keeps every token for every method.
    positions: ``"original"`` (kept tokens keep their RoPE positions, decoding continues after the unpruned length)
    or ``"compact"`` (positions renumbered without the pruned tokens, decoding continues after the pruned length).
    ``None`` takes the method's default, which is what its official code does: ``default_positions`` on models with
    1-D RoPE, ``original`` on M-RoPE models (Qwen-VL), where kept visual tokens keep their 3-D grid positions.

    scope: ``"image"`` (one budget per image or video over all its tokens) or ``"crop"`` (one budget per anyres
    tile of LLaVA-NeXT images, plus one for the base image).

    Subclasses set the class attributes, add their options as fields, and implement ``select``.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.PRE_LLM
    default_positions: ClassVar[str] = "compact"
    # Signals the engine must capture: "attention_inputs" = inputs of layer K-1's self-attention.
    needs: ClassVar[frozenset] = frozenset()
    # Whether row-end newline tokens (LLaVA-NeXT / OneVision) are candidates; otherwise they are always kept.
    newline_candidates: ClassVar[bool] = False

    ratio: float | None = None
    keep: int | None = None
    positions: str | None = None
    scope: str = "image"

    def __post_init__(self):
        if (self.ratio is None) == (self.keep is None):
            raise ValueError(f"{self.name}: give exactly one of ratio= (fraction of visual tokens removed) and "
                             f"keep= (visual tokens kept per image), got ratio={self.ratio!r}, keep={self.keep!r}")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1):
            raise ValueError(f"{self.name}: ratio must be in [0, 1) (the fraction of visual tokens removed), "
                             f"got {self.ratio!r}")
        if self.keep is not None and not (isinstance(self.keep, int) and self.keep >= 1):
            raise ValueError(f"{self.name}: keep must be an integer >= 1 (visual tokens kept per image), "
                             f"got {self.keep!r}")
        if self.positions is not None and self.positions not in POSITION_POLICIES:
            raise ValueError(f"{self.name}: positions must be one of {POSITION_POLICIES}, got {self.positions!r}")
        if self.scope not in ("image", "crop"):
            raise ValueError(f"{self.name}: scope must be 'image' or 'crop', got {self.scope!r}")

    # ----------------------------------------------------------------------------------------------- contract
    def stages(self) -> list[StageSpec]:
        """Where this method prunes, in order. Single-stage methods have one entry."""
        return [StageSpec(self.stage, getattr(self, "layer", 0))]

    def budget(self, n: int) -> int:
        """How many of an image's ``n`` visual tokens this method keeps (the default rule: ``keep`` capped at
        ``n``, or ``round(n * (1 - ratio))``)."""
        if self.ratio == 0:
            return n
        if self.keep is not None:
            return min(self.keep, n)
        return min(n, round(n * (1 - self.ratio)))

    def select(self, ctx: SelectionContext, row: int, span: SpanCandidates, budget: int) -> torch.Tensor:
        """Indices (into ``span.slots``) of the ``budget`` tokens to keep, any order. Called once per image of each
        row (per tile under ``scope="crop"``), with ``budget < len(span)``."""
        raise NotImplementedError

    def for_model(self, mrope: bool) -> "Method":
        """This method with its position policy resolved for a model (M-RoPE models default to original)."""
        if self.positions is not None:
            return self
        return dataclasses.replace(self, positions="original" if mrope else self.default_positions)

    # ----------------------------------------------------------------------------------------------- helpers
    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __call__(self, model):
        """``with method(model) as handle:`` patches ``model`` for the block (kvpress style)."""
        from ..api import patch
        return patch(model, self)
