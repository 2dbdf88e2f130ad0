"""Run one vLLM engine in a fresh process and print its results as JSON (the multi-process test: vLLM spawns its
engine-core and worker processes, each of which must load vtr's plugin through the entry point).

    python tests/vllm/run_engine.py FOLDER        # vtr configured by the VTR_* environment variables, if any
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

if __name__ == "__main__":  # vLLM starts its processes with spawn, which re-imports this module
    import harness

    results = harness.vllm_generate(sys.argv[1], None)
    print("RESULT " + json.dumps({kind: [tokens, count, [{str(t): lp for t, lp in step.items()} for step in logprobs]]
                                  for kind, (tokens, count, logprobs) in results.items()}))
