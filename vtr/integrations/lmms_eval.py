"""lmms-eval wrappers: the stock HF wrappers (simple and chat classes) with ``vtr.patch`` applied to their model.

Model args starting with ``vtr_`` configure vtr and are removed before the stock wrapper sees them:
``vtr_method`` (default dart), ``vtr_ratio`` or ``vtr_keep``, any method option as ``vtr_<option>`` (e.g.
``vtr_layer=2``), and ``vtr_log`` (a JSONL path receiving one line per sample: prefill seconds, visual tokens
before and after, selection seconds). Generation tasks only: ``loglikelihood`` raises ``NotImplementedError``.

Device: without ``device`` in the model args the wrappers take the device the machine has (``cuda`` when torch sees
a GPU, else ``cpu``, with ``device_map`` to match; the stock wrappers default to ``cuda``); ``device=cpu`` works,
also beside lmms-eval's own ``--device`` (the model args win). A failure while loading the model, patching it or
answering is raised; under the ``lmms-eval`` command, which logs an evaluation's exception and still exits 0, the
wrappers print it and exit with status 1 instead, so that a scripted sweep sees it.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import sys
from pathlib import Path

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


def under_lmms_eval_command() -> bool:
    """Whether this process is the ``lmms-eval`` command (``lmms-eval ...`` or ``python -m lmms_eval ...``), whose
    evaluation loop logs exceptions and exits 0."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return (spec is not None and spec.name == "lmms_eval.__main__") or Path(sys.argv[0]).name == "lmms-eval"


def fail_loudly(what: str, error: Exception):
    """Re-raise ``error``; under the ``lmms-eval`` command print it and exit with status 1 (a ``SystemExit``, which
    its ``except Exception`` does not swallow)."""
    if not under_lmms_eval_command():
        raise error
    print(f"\nvtr: the evaluation failed while {what}: {type(error).__name__}: {error}\n", file=sys.stderr,
          flush=True)
    raise SystemExit(1) from error


def device_args(kwargs: dict, base) -> dict:
    """The stock wrapper's keyword arguments with ``device`` (and ``device_map``, which the stock wrappers default to
    ``cuda`` or ``auto``) set to the device this machine has, unless given."""
    params = inspect.signature(base.__init__).parameters
    kwargs = dict(kwargs)
    if "device" in params and kwargs.get("device") is None:
        import torch
        kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if "device_map" in params and not kwargs.get("device_map") and str(kwargs.get("device")).startswith("cpu"):
        kwargs["device_map"] = "cpu"
    return kwargs


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
        except Exception as error:  # noqa: BLE001 - re-raised (or an exit status under the lmms-eval command)
            fail_loudly("answering", error)
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
                    try:
                        base.__init__(self, **device_args(kwargs, base))
                    except Exception as error:  # noqa: BLE001 - re-raised, see fail_loudly
                        fail_loudly(f"loading the model ({stock})", error)
                    try:
                        self._vtr_setup(settings)
                    except Exception as error:  # noqa: BLE001
                        fail_loudly("patching the model with vtr", error)

                @classmethod
                def create_from_arg_string(cls, arg_string, additional_config=None):
                    # lmms-eval passes its --device (and batch size) beside the model args; a key in both would be
                    # "multiple values for keyword argument": the model args win
                    from lmms_eval import utils
                    args = utils.simple_parse_args_string(arg_string)
                    extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
                    return cls(**args, **extra)

                return type(cls_name, (VtrMixin, base), {"__init__": __init__, "__module__": __name__,
                                                         "create_from_arg_string": create_from_arg_string,
                                                         "__doc__": f"lmms-eval's {kind} {stock} patched by vtr."})
    raise AttributeError(cls_name)


def __getattr__(name: str):
    # Classes are built on first access so that importing this module does not import every stock wrapper.
    if name.startswith("__"):
        raise AttributeError(name)
    cls = _make(name)
    globals()[name] = cls
    return cls
