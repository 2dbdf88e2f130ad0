"""Per-request log of prefills: wall time (device synchronised) and what vtr kept, for evaluators."""
from __future__ import annotations

import time

import torch

from ..api import handle_of


class PrefillRecorder:
    """Hooks a model and appends one entry per batch row of every prefill (a forward with an empty cache):
    ``{"prefill_s", "n_visual", "n_kept", "selection_s"}``. Decoding steps are not recorded."""

    def __init__(self, model):
        self.model = model
        self.entries: list[dict] = []
        self._start = None
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]

    @staticmethod
    def _is_prefill(kwargs) -> bool:
        cache = kwargs.get("past_key_values")
        return cache is None or cache.get_seq_length() == 0

    def _sync(self):
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _pre(self, module, args, kwargs):
        if self._is_prefill(kwargs):
            self._sync()
            self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        if self._start is None:
            return
        self._sync()
        seconds = time.perf_counter() - self._start
        self._start = None
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = ids.shape[0] if ids is not None else output.logits.shape[0]
        handle = handle_of(self.model)
        record = handle.last if handle is not None else None
        for row in range(batch):
            entry = {"prefill_s": seconds}
            if record is not None and row < len(record.n_visual):
                entry.update(n_visual=record.n_visual[row], n_kept=record.n_kept[row],
                             selection_s=record.selection_seconds)
            self.entries.append(entry)

    def remove(self):
        for handle in self._handles:
            handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
