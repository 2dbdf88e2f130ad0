"""lmms-eval wrappers: the stock HF wrappers (simple and chat classes) with ``vtr.patch`` applied to their model.

Model args starting with ``vtr_`` configure vtr and are removed before the stock wrapper sees them:
``vtr_method`` (default dart), ``vtr_ratio`` or ``vtr_keep``, any method option as ``vtr_<option>`` (e.g.
``vtr_layer=2``), and ``vtr_log`` (a JSONL path receiving one line per sample: prefill seconds, visual tokens
before and after, selection seconds). Generation tasks only: ``loglikelihood`` raises ``NotImplementedError``.
"""
from __future__ import annotations

import ast
import importlib
import json

import vtr
from vtr.bench.recorder import PrefillRecorder

from .lmms_eval_manifest import WRAPPERS


def split_vtr_args(kwargs: dict) -> tuple[dict, dict]:
    """(vtr settings, remaining stock kwargs); string values from the command line are parsed as literals."""
    settings = {}
    for key in [k for k in kwargs if k.startswith("vtr_")]:
        value = kwargs.pop(key)
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
        settings[key[4:]] = value
    return settings, kwargs


class VtrMixin:
    """Patches ``self.model`` after the stock wrapper has loaded it, and logs every prefill."""

    def _vtr_setup(self, settings: dict) -> None:
        settings = dict(settings)
        method = settings.pop("method", "dart")
        self.vtr_log_path = settings.pop("log", None)
        if "ratio" not in settings and "keep" not in settings:
            settings["ratio"] = 0.778
        self.vtr_handle = vtr.patch(self.model, method, **settings)
        self.vtr_recorder = PrefillRecorder(self.model)
        self._vtr_written = 0

    def vtr_flush(self) -> list[dict]:
        """Per-sample entries so far; appends the new ones to ``vtr_log`` when set."""
        entries = self.vtr_recorder.entries
        if self.vtr_log_path and self._vtr_written < len(entries):
            with open(self.vtr_log_path, "a") as f:
                for entry in entries[self._vtr_written:]:
                    f.write(json.dumps(entry) + "\n")
            self._vtr_written = len(entries)
        return entries

    def generate_until(self, requests):
        try:
            return super().generate_until(requests)
        finally:
            self.vtr_flush()

    def loglikelihood(self, requests):
        # lmms-eval 0.7.3's stock HF wrappers cannot score log-likelihood on transformers 5.x (the Qwen ones raise
        # NotImplementedError; LlavaHf tokenises an <image> prompt without its image, which transformers refuses),
        # and a pruned prefill returns logits for the kept slots only, which their is_greedy check would misread.
        raise NotImplementedError(
            f"{type(self).__name__}: log-likelihood tasks are not supported (lmms-eval's stock HF wrappers cannot "
            "score them on transformers 5.x); use generation tasks (multiple choice answered by letter, as in "
            "MMBench or ScienceQA-IMG)")


def _make(cls_name: str):
    for stock, classes in WRAPPERS.values():
        for kind, (name, stock_cls) in classes.items():
            if name == cls_name:
                base = getattr(importlib.import_module(f"lmms_eval.models.{kind}.{stock}"), stock_cls)

                def __init__(self, **kwargs):
                    settings, kwargs = split_vtr_args(dict(kwargs))
                    base.__init__(self, **kwargs)
                    self._vtr_setup(settings)

                return type(cls_name, (VtrMixin, base), {"__init__": __init__, "__module__": __name__,
                                                         "__doc__": f"lmms-eval's {kind} {stock} patched by vtr."})
    raise AttributeError(cls_name)


def __getattr__(name: str):
    # Classes are built on first access so that importing this module does not import every stock wrapper.
    if name.startswith("__"):
        raise AttributeError(name)
    cls = _make(name)
    globals()[name] = cls
    return cls
