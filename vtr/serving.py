"""Selection for serving engines (vLLM): one image's or video's projected features in, the kept tokens out.

A serving engine encodes each visual input on its own and sizes its placeholder run when the prompt is processed,
before any feature exists. So only methods that prune before the language model, whose keep count follows from
the token count alone and whose choice reads nothing but the input's own features and grid, can run there. They
run the very same ``Method.budget`` and ``Method.select`` as ``vtr.patch`` does in Hugging Face models, through a
selection context that holds that one input.
"""
from __future__ import annotations

import torch

from .layout import VisualSpan
from .methods import Method, Stage, lookup
from .signals import SpanCandidates


def servable_reason(method: Method) -> str | None:
    """Why ``method`` cannot prune inside a serving engine's multimodal pipeline, or None if it can."""
    if method.stage is not Stage.PRE_LLM:
        where = f"before decoder layer {method.layer}" if hasattr(method, "layer") else "at several decoder layers"
        return (f"{method.name} prunes inside the language model ({where}"
                "): it drops tokens whose keys and values are already in the layers below, per request, which "
                "paged attention's fixed per-token KV-cache blocks do not allow; only methods that prune before "
                "the language model run in a serving engine (random, uniform, divprune)")
    if method.needs or method.needs_whole_prompt:
        what = ", ".join(sorted(method.needs)) or "the prompt's text"
        return (f"{method.name} reads {what} besides the image's own features; a serving engine encodes each "
                "image on its own, before and apart from the prompt, and hands vtr only its projected features")
    if type(method).budget_for is not Method.budget_for:
        return f"{method.name}'s keep count depends on more than the image's token count"
    if method.scope != "image":
        return f"{method.name}: scope={method.scope!r} needs LLaVA-NeXT tiles; serving supports scope='image'"
    return None


def method_from_options(name: str, ratio: float | None = None, keep: int | None = None, **options) -> Method:
    """A configured method for serving, checked: the registered ``name`` with its budget and options.

    Raises ``TypeError`` for an unknown name or option, ``ValueError`` for a bad budget or option value and for a
    method that cannot run in a serving engine (the message says why)."""
    cls = lookup(name)
    method = cls(ratio=ratio, keep=keep, **options)
    reason = servable_reason(method)
    if reason:
        raise ValueError(f"vtr: {reason}")
    return method


def kept_count(method: Method, n: int) -> int:
    """How many of an input's ``n`` visual tokens ``method`` keeps (its own rule, as in ``vtr.patch``)."""
    return min(n, method.budget(n))


class _OneInputContext:
    """The part of ``SelectionContext`` a servable method reads: the input's features as row 0 of ``hidden``."""

    def __init__(self, method: Method, embeds: torch.Tensor):
        self._method, self.hidden = method, embeds[None]

    @property
    def score_dtype(self) -> torch.dtype:
        return self.hidden.dtype if self._method.score_dtype == "model" else torch.float32

    def __getattr__(self, name):
        raise AttributeError(f"vtr: {self._method.name} reads {name!r} from its selection context, which a serving "
                             "engine does not provide (it hands vtr one input's features and grid)")


def select_tokens(method: Method, embeds: torch.Tensor, grid: tuple[int, int, int], kind: str = "image"
                  ) -> torch.Tensor:
    """Indices of the tokens ``method`` keeps of one image or video, ascending (raster order).

    embeds: ``[n, D]`` the input's projected visual features (the language model's input embeddings), in raster
    order (frame, row, column) of grid ``(t, h, w)``, ``t * h * w == n``, in language-model tokens (after the
    spatial merge). kind: ``"image"`` or ``"video"``. Returns ``[kept_count(method, n)]`` int64 on ``embeds``'s
    device. Raises ``ValueError`` if the grid does not cover ``embeds``, ``RuntimeError`` if the method breaks its
    contract (as the engine does)."""
    n = embeds.shape[0]
    budget = kept_count(method, n)
    if budget >= n:
        return torch.arange(n, device=embeds.device)
    positions = torch.arange(n, device=embeds.device)
    span = VisualSpan(kind=kind, index=0, positions=positions, grid=tuple(int(g) for g in grid))
    chosen = method.select(_OneInputContext(method, embeds), 0, SpanCandidates(span, positions, positions), budget)
    chosen = torch.as_tensor(chosen).flatten().long()
    if len(chosen) != budget or len(chosen.unique()) != budget or int(chosen.min()) < 0 or int(chosen.max()) >= n:
        raise RuntimeError(f"{method.name} selected {chosen.tolist()} for a budget of {budget} of {n} tokens")
    return chosen.sort().values.to(embeds.device)
