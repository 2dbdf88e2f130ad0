"""vtr's metrics on vLLM's ``/metrics`` (Prometheus), through vLLM's stat-logger plugin entry point
(``vllm.stat_logger_plugins``: ``VtrStatLogger``):

* ``vtr:visual_tokens_received_total`` and ``vtr:visual_tokens_kept_total`` (labels ``model_name``, ``method``,
  ``modality``): visual tokens of the requests' images and videos, and what the language model got of them, counted
  when each request is processed (in the API server's process, where the stat logger runs);
* ``vtr:selection_seconds`` (histogram; labels ``model_name``, ``method``): the time of each input's selection in
  the model runner, from the end of its vision pass to its kept embeddings (signals and method included).

The selection runs in vLLM's worker processes; each appends ``method seconds`` lines to a file of its own in a
directory the API server's process creates (``VTR_METRICS_DIR``, inherited by the processes vLLM spawns), and the
stat logger reads the new lines at every ``record``. A worker starts a new file every ``ROTATE_BYTES``, and the
stat logger deletes a file it has read to the end once its worker writes a newer one, so a server that runs for
months holds at most about two files per worker on disk. Nothing is registered for a model served without vtr.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from collections import Counter

from vllm.v1.metrics.loggers import StatLoggerBase

CHANNEL = "VTR_METRICS_DIR"
ROTATE_BYTES = 1 << 20  # ~40,000 selections per file
BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_lock = threading.Lock()
_tokens: Counter = Counter()  # (method, modality, "received" | "kept") -> tokens, counted in this process
_metrics = {}
_file = {"seq": 0}  # this worker's current file number


def channel_directory() -> str:
    """The directory worker processes report selection times in: created by the first process that loads the
    plugin (the API server, or the process of an offline ``LLM``), inherited by the processes it spawns."""
    path = os.environ.get(CHANNEL)
    if not path or not os.path.isdir(path):
        path = tempfile.mkdtemp(prefix="vtr-metrics-")
        os.environ[CHANNEL] = path
        atexit.register(shutil.rmtree, path, True)
    return path


def count_tokens(method: str, modality: str, received: int, kept: int) -> None:
    """One input of a request, as processed (API server process)."""
    with _lock:
        _tokens[method, modality, "received"] += received
        _tokens[method, modality, "kept"] += kept


def record_selection(method: str, seconds: float) -> None:
    """One input's selection (worker process)."""
    path = os.environ.get(CHANNEL)
    if not path or not os.path.isdir(path):
        return
    with _lock:
        name = os.path.join(path, f"selection-{os.getpid()}-{_file['seq']:09d}.log")
        with open(name, "a") as f:
            f.write(f"{method} {seconds:.9f}\n")
            if f.tell() >= ROTATE_BYTES:  # the stat logger deletes this file once it has read it
                _file["seq"] += 1


def _prometheus():
    if not _metrics:
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Histogram
        labels = ["model_name", "method", "modality"]
        _metrics["received"] = PromCounter("vtr:visual_tokens_received", "Visual tokens of the requests' images "
                                           "and videos, before vtr's pruning.", labels)
        _metrics["kept"] = PromCounter("vtr:visual_tokens_kept", "Visual tokens the language model got after "
                                       "vtr's pruning.", labels)
        _metrics["seconds"] = Histogram("vtr:selection_seconds", "Time of one input's token selection in the "
                                        "model runner (signals and method).", ["model_name", "method"],
                                        buckets=BUCKETS)
    return _metrics


class VtrStatLogger(StatLoggerBase):
    """vLLM stat logger (per engine) exporting vtr's metrics; inert for a model served without vtr."""

    def __init__(self, vllm_config, engine_index: int = 0):
        from .vllm import server_settings
        self.model = vllm_config.model_config.served_model_name if vllm_config.model_config else ""
        try:
            self.enabled = server_settings(vllm_config.model_config.hf_config) is not None
        except ValueError:  # reported, in one line, where the processor is built
            self.enabled = False
        self.engine_index = engine_index
        self._offsets: dict[str, int] = {}
        self._reported: Counter = Counter()
        if self.enabled:
            _prometheus()

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if not self.enabled or self.engine_index != 0:  # one logger reports for all engines of the server
            return
        metrics = _prometheus()
        with _lock:
            tokens = dict(_tokens)
        for key, total in tokens.items():
            delta = total - self._reported[key]
            if delta:
                method, modality, which = key
                metrics[which].labels(self.model, method, modality).inc(delta)
                self._reported[key] = total
        for method, seconds in self._new_selections():
            metrics["seconds"].labels(self.model, method).observe(seconds)

    def _new_selections(self):
        path = os.environ.get(CHANNEL)
        if not path or not os.path.isdir(path):
            return []
        out = []
        names = sorted(os.listdir(path))  # a worker's files in the order it wrote them
        for i, name in enumerate(names):
            file = os.path.join(path, name)
            with open(file) as f:
                f.seek(self._offsets.get(file, 0))
                data = f.read()
            complete = data[:data.rfind("\n") + 1]  # a line being written is read next time
            self._offsets[file] = self._offsets.get(file, 0) + len(complete.encode())
            for line in complete.splitlines():
                method, seconds = line.split()
                out.append((method, float(seconds)))
            later = names[i + 1] if i + 1 < len(names) else ""
            if complete == data and later.rsplit("-", 1)[0] == name.rsplit("-", 1)[0]:
                os.remove(file)  # read to its end, and its worker has moved on to a later file
                del self._offsets[file]
        return out

    def log_engine_initialized(self):
        pass
