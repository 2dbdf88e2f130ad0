"""Benchmark harness: speed (``vtr.bench.speed``, also the ``vtr-bench`` command), accuracy on local JSONL sets
(``vtr.bench.evaluate``) and kept-token overlays (``vtr.bench.overlay``)."""
