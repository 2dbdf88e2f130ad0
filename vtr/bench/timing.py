"""Timers that synchronise the device, per-stage timing hooks, peak-memory probes and a FLOPs estimate."""
from __future__ import annotations

import statistics
import time

import torch


class Clock:
    """Device-aware interval timer: CUDA events on GPU (read after one synchronisation); on CPU wall time
    (perf_counter) and the process's CPU time (all its threads, user + system: ``time.process_time``).

    CPU time is what a busy machine distorts least: a pass that waits for a core the other processes hold
    stretches in wall time but not in CPU time (it still grows with cache and memory-bandwidth contention)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter(), time.process_time()

    def seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return end[0] - start[0]

    def cpu_seconds(self, start, end) -> float | None:
        """CPU time of the process between two marks; None on GPU (the work is the device's)."""
        return None if self.cuda else end[1] - start[1]

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}


class SteadyHeap:
    """Keeps the C heap's freed memory in the process while it is entered (Linux with glibc; elsewhere a no-op):
    no trimming of the heap's top and no ``mmap``'d blocks, so the large activations of one prefill reuse the pages
    an earlier one used instead of faulting fresh zeroed pages in from the kernel.

    Why: by default glibc returns freed memory to the kernel (a block above the mmap threshold on ``free``, the
    heap's top above the trim threshold), and how much a forward then page-faults back in depends on what ran
    before it, not on what it computes. In process CPU time (user + system) that is noise of a method's row: on
    Qwen2-VL-7B's full-depth preset with an 8x144 video (one thread, a loaded 2-core machine), the vision tower's
    window took 6.04-6.20 s of user time in every prefill, dense or pruned, and 0.02-1.33 s of system time with
    0-789k minor page faults, by the configuration run before it (HoliTom's rows in ``cpu-methods-video.json``
    read 0.9 s above dense in the tower, with no vtr code running there). Leaving it restores glibc's default
    parameters (the dynamic mmap threshold stays fixed at its default) and returns the free memory
    (``malloc_trim``). ``active``: whether the parameters took.

    What it does not guarantee: a heap that keeps everything can still fragment. A synthetic loop of one 64 MiB
    tensor allocated and freed 8 times grew the heap by a fresh block (16,384 faults) in most rounds (glibc's
    aligned allocation asks for more than the freed block holds); the benchmark's prefills, with their many block
    sizes, faulted 0-1 pages per tower after the first pass and stayed at 3.4-3.5 GB (measured with ``getrusage``
    on the Qwen2-VL-7B preset). Read a row's ``±`` as before."""

    def __init__(self):
        self.active = False
        self._libc = None

    def __enter__(self):
        import ctypes
        import sys

        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                libc.mallopt, libc.malloc_trim  # glibc only (musl has neither)
            except (OSError, AttributeError):
                return self
            self._libc = libc
            self.active = bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)) and bool(libc.mallopt(M_MMAP_MAX, 0))
        return self

    def __exit__(self, *exc):
        if self._libc is not None:
            for param, value in _GLIBC_DEFAULTS.items():
                self._libc.mallopt(param, value)
            self._libc.malloc_trim(0)
            self._libc = None
        self.active = False


class StageTimer:
    """Marks the start and end of the vision encoder and of the language model in every forward."""

    def __init__(self, model, clock: Clock):
        self.clock = clock
        self.marks: dict[str, list] = {}
        base = model.model
        vision = getattr(base, "vision_tower", None) or getattr(base, "visual", None)
        self.handles = []
        for name, module in (("vision", vision), ("llm", base.language_model)):
            if module is None:
                continue
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._end(name)))

    def _start(self, name):
        def hook(module, args):
            self.marks.setdefault(name, []).append([self.clock.mark(), None])
        return hook

    def _end(self, name):
        def hook(module, args, output):
            self.marks[name][-1][1] = self.clock.mark()
        return hook

    def reset(self):
        self.marks = {}

    def seconds(self, name: str, cpu: bool = False) -> float | None:
        """Total wall (or, ``cpu``, process CPU; None on GPU) time of the named stage since the last reset (0 if it
        did not run)."""
        if cpu and self.clock.cuda:
            return None
        seconds = self.clock.cpu_seconds if cpu else self.clock.seconds
        return sum(seconds(s, e) for s, e in self.marks.get(name, []) if e is not None)

    def remove(self):
        for handle in self.handles:
            handle.remove()


class PeakMemory:
    """Peak device memory of a block above its starting point, from the CUDA allocator's statistics. On CPU it is
    None: the process's resident size does not shrink when tensors are freed, so it cannot attribute a peak to one
    run (the KV-cache size is still reported exactly)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def kv_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def llm_prefill_flops(text_config, layer_lengths: list[int], batch: int) -> float:
    """Matmul FLOPs of one prefill through the decoder: per layer ``n`` tokens cost the q/k/v/o projections and
    the (SwiGLU) MLP, ``2 * n * params``, plus causal attention ``2 * 2 * n(n+1)/2 * H * d``; the LM head runs on
    the last token only. ``layer_lengths``: sequence length entering each layer (padding included)."""
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    kv = getattr(text_config, "num_key_value_heads", heads)
    per_token = 2 * d * (2 * heads * head_dim + 2 * kv * head_dim) + 2 * 3 * d * text_config.intermediate_size
    total = sum(n * per_token + 2 * n * (n + 1) * heads * head_dim for n in layer_lengths)
    return float(batch * (total + 2 * d * text_config.vocab_size))
