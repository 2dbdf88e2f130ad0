"""Run one vLLM engine in a fresh process and print its results as JSON (the multi-process test: vLLM spawns its
engine-core and worker processes, each of which must load vtr's plugin through the entry point).

    python tests/vllm/run_engine.py FOLDER FAMILY    # vtr configured by the VTR_* environment variables, if any
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

if __name__ == "__main__":  # vLLM starts its processes with spawn, which re-imports this module
    import harness

    folder, family = sys.argv[1:3]
    kinds = ("image", "video")
    with harness.Engine(folder, None) as engine:
        results = engine.run([harness.request(family, kind, harness.prompt(family, kind)) for kind in kinds])
    print("RESULT " + json.dumps({kind: [tokens, count, [{str(t): lp for t, lp in step.items()} for step in logprobs]]
                                  for kind, (tokens, count, logprobs, _, _) in zip(kinds, results)}))
