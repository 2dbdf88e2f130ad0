"""vtr.serving, the selection a serving engine (vLLM) calls: its keep count at prompt time and its choice after the
vision pass must be what vtr.patch keeps in the Hugging Face model for the same input, and it must refuse what a
serving engine cannot run, saying why. (The vLLM tests, tests/vllm, check the whole plugin against HF generate.)"""
import pytest
import torch

import reference as R
import tiny_models as tm
import vtr
from vtr import compat, serving
from vtr.methods import REGISTRY
from vtr.integrations.vllm import PRUNED
from vtr.patches import family_of

SERVABLE = ["cdpruner", "divprune", "dycoke (kv_ratio=0)", "evs", "fastervlm", "fastvid", "hiprune",
            "holitom (inner_ratio=0)", "random", "uniform", "vidcom2 (variant=vllm)", "visionzip", "vispruner"]
# methods whose choice reads the input's features (and the prompt's text) only: serving.select runs them here
FEATURE_ONLY = [("random", {}), ("uniform", {}), ("divprune", {}), ("cdpruner", {"relevance": "embeddings"}),
                ("dycoke", {"kv_ratio": 0}), ("fastvid", {"signals": "embedding"}), ("holitom", {"inner_ratio": 0}),
                ("evs", {}), ("vidcom2", {"variant": "vllm"})]
SERVED_FAMILIES = [f for f in tm.FAMILIES if tm.MODEL_CLASSES[f] in PRUNED]  # the families vtr prunes in vLLM


def _one_input(family, kind):
    """(model, inputs, the input's LM input features, its span, the signals a serving engine hands with them: the
    mean text embedding, Qwen3-VL's DeepStack features as vLLM concatenates them) of a one-row prompt with one
    input."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 1) if kind == "image" else tm.video_inputs(family, proc, 1)
    lm = R.capture_lm_inputs(model, inputs)
    embeds = lm["embeds"][0]
    config = model.config
    token = config.image_token_id if kind == "image" else config.video_token_id
    ids = inputs["input_ids"][0]
    features = embeds[ids == token]
    extra = {}
    if family.startswith("qwen"):
        extra[f"{kind}_grid_thw"] = inputs[f"{kind}_grid_thw"][:1]
    elif kind == "image" and family != "llava":
        extra["image_sizes"] = inputs["image_sizes"][:1]
    elif kind == "video":
        extra["pixel_values_videos"] = inputs["pixel_values_videos"][:1]
    family_ = family_of(model)
    text = ~torch.isin(ids, torch.tensor(family_.placeholder_ids(config) + family_.delimiter_ids(config)))
    text &= inputs["attention_mask"][0].bool()
    signals = serving.InputSignals(text_embedding=embeds[text].float().mean(0),
                                   deepstack=torch.cat(list(lm["deepstack"]), -1) if lm.get("deepstack") else None)
    return model, inputs, features, serving.layout_span(family_, model, kind, len(features), features, **extra), \
        signals


def _resolved(model, name, **settings):
    family = family_of(model)
    layers = compat.vision_layers(model)
    return serving.for_family(serving.configure(name, **settings), family, type(model).__name__,
                              len(compat.decoder_layers(compat.text_model(model))), len(layers),
                              compat.vision_feature_layer(model))


@pytest.mark.parametrize("family", SERVED_FAMILIES)
@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("method,options", FEATURE_ONLY, ids=[m for m, _ in FEATURE_ONLY])
def test_prompt_count_and_selection_equal_the_hf_engine(method, options, kind, family):
    if (kind == "video" and family not in tm.VIDEO_FAMILIES) or kind not in REGISTRY[method].visual_kinds:
        pytest.skip("the family or the method has no videos")
    if family.startswith("llava") and REGISTRY[method].default_positions == "original":
        options = dict(options, positions="compact")  # vLLM numbers a 1-D-RoPE prompt consecutively
    model, inputs, features, span, signals = _one_input(family, kind)
    settings = dict(ratio=0.5, **options)
    if (method, kind) == ("holitom", "video"):  # its keep count follows the frames' static windows
        with pytest.raises(ValueError, match="static windows"):
            serving.prompt_count(_resolved(model, method, **settings), span, family_of(model), model)
        return
    with vtr.patch(model, method, **settings) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.last.kept[0]
    method = _resolved(model, method, **settings)
    assert serving.prompt_count(method, span, family_of(model), model) == len(kept)
    assert len(kept) < span.n or (method.name, kind) == ("dycoke", "image")  # TTM keeps an image whole
    chosen = serving.select(method, span, features, signals, family_of(model), model)
    assert torch.equal(chosen.keep.cpu(), kept)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("method", ["divprune", "random", "uniform"])
@pytest.mark.parametrize("budget", [dict(ratio=0.5), dict(ratio=0.75), dict(keep=7)], ids=["r0.5", "r0.75", "k7"])
def test_select_tokens_equals_the_hf_engine(method, kind, family, budget):
    """The vtr 0.1 API (a raster grid of features in, the kept indices out)."""
    model, inputs, features, span, _ = _one_input(family, kind)
    with vtr.patch(model, method, **budget) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.last.kept[0]
    configured = serving.configure(method, **budget)
    chosen = serving.select_tokens(configured, features, span.grid, kind)
    assert serving.kept_count(configured, len(features)) == len(chosen) < len(features)
    assert torch.equal(chosen, kept)


def test_every_registered_method_is_either_servable_or_refused():
    assert serving.servable_methods() == SERVABLE
    for name, cls in REGISTRY.items():
        reason = serving.servable_reason(cls(ratio=0.5))
        assert (reason is None) == (name in SERVABLE), (name, reason)


@pytest.mark.parametrize("method", ["fastv", "dart", "pdrop", "sparsevlm", "prunevid", "framefusion", "vflowopt"])
def test_in_llm_methods_are_refused_with_the_reason(method):
    with pytest.raises(ValueError, match="paged attention"):
        serving.configure(method, ratio=0.5)


def test_vision_stage_methods_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="inside the vision tower"):
        serving.configure("flowcut", ratio=0.5)


@pytest.mark.parametrize("method,match", [("prumerge", "outliers"), ("vidcom2", "pass variant='vllm'")])
def test_content_dependent_pre_llm_methods_are_refused_at_configuration(method, match):
    """PruMerge+'s count is its outliers; the authors' VidCom2 counts its frame budgets (vLLM's port is exact)."""
    with pytest.raises(ValueError, match=match):
        serving.configure(method, ratio=0.5)
    if method == "vidcom2":
        assert serving.configure(method, ratio=0.5, variant="vllm").variant == "vllm"


@pytest.mark.parametrize("method,option", [("dycoke", "kv_ratio"), ("holitom", "inner_ratio")])
def test_multi_stage_methods_serve_their_pre_llm_stage_when_told(method, option):
    with pytest.raises(ValueError, match=f"pass {option}=0"):
        serving.configure(method, ratio=0.5)
    assert serving.configure(method, ratio=0.5, **{option: 0}).name == method


def test_unknown_methods_list_what_vllm_serves():
    with pytest.raises(ValueError) as info:
        serving.configure("divprun", ratio=0.5)
    assert "Did you mean 'divprune'" in str(info.value) and "Methods vLLM serves: " + ", ".join(SERVABLE) in str(
        info.value) and "fastv," not in str(info.value)


def test_bad_options_fail_at_configuration():
    with pytest.raises(ValueError, match="ratio must be in"):
        serving.configure("divprune", ratio=1.5)
    with pytest.raises(TypeError, match="random has no option 'layer'"):
        serving.configure("random", ratio=0.5, layer=2)


def test_family_rules_are_checked():
    model, _ = tm.build("llava_onevision")
    with pytest.raises(ValueError, match="pass positions='compact'"):
        _resolved(model, "fastvid", ratio=0.5)  # FastVID keeps gaps; vLLM numbers 1-D positions consecutively
    model, _ = tm.build("qwen2_vl")
    with pytest.raises(ValueError, match="does not support Qwen2VLForConditionalGeneration"):
        _resolved(model, "fastervlm", ratio=0.5)
    with pytest.raises(ValueError, match="positions='compact' is not defined"):
        _resolved(model, "divprune", ratio=0.5, positions="compact")


def test_content_dependent_keep_counts_are_refused_per_input():
    """The placeholder run is sized before the vision pass: FastVID on a video of more frames than segments, and
    HoliTom's videos, keep counts that depend on the frames."""
    from vtr.layout import VisualSpan
    video = VisualSpan(kind="video", index=0, positions=torch.arange(9 * 4), grid=(9, 2, 2))
    with pytest.raises(ValueError, match="segments >= the frame count"):
        serving.prompt_count(serving.configure("fastvid", ratio=0.5, positions="original"), video)
    assert serving.prompt_count(serving.configure("fastvid", ratio=0.5, segments=9), video) == 18
    with pytest.raises(ValueError, match="static windows"):
        serving.prompt_count(serving.configure("holitom", ratio=0.5, inner_ratio=0), video)


def test_ratio_zero_keeps_everything_without_selecting():
    features = torch.randn(12, 8)
    chosen = serving.select_tokens(serving.configure("divprune", ratio=0.0), features, (1, 3, 4))
    assert torch.equal(chosen, torch.arange(12))


# ---------------------------------------------------------------- the vLLM plugin's configuration (no vLLM needed)
def test_vllm_configuration_from_environment_and_hf_overrides():
    from types import SimpleNamespace

    from vtr.integrations.vllm import configured_method
    assert configured_method(SimpleNamespace(), environ={}) is None
    method = configured_method(None, environ={"VTR_METHOD": "random", "VTR_KEEP": "7", "VTR_OPTIONS": '{"seed": 3}'})
    assert (method.name, method.keep, method.seed) == ("random", 7, 3)
    # hf_overrides={"vtr": {...}} wins over the environment
    config = SimpleNamespace(vtr={"method": "divprune", "ratio": 0.9})
    method = configured_method(config, environ={"VTR_METHOD": "random", "VTR_RATIO": "0.5"})
    assert (method.name, method.ratio) == ("divprune", 0.9)


@pytest.mark.parametrize("settings,match", [
    ({"VTR_METHOD": "dart", "VTR_RATIO": "0.5"}, "paged attention"),
    ({"VTR_METHOD": "divprune", "VTR_RATIO": "half"}, "ratio must be a number"),
    ({"VTR_METHOD": "divprune", "VTR_RATIO": "0.5", "VTR_OPTIONS": "{seed"}, "VTR_OPTIONS"),
    ({"VTR_METHOD": "divprune"}, "exactly one of ratio"),
    ({"VTR_METHOD": "nope", "VTR_RATIO": "0.5"}, "unknown method 'nope'"),
])
def test_vllm_configuration_errors_name_the_setting(settings, match):
    from vtr.integrations.vllm import VtrConfigError, configured_method
    with pytest.raises(VtrConfigError, match=match):
        configured_method(None, environ=settings)


def test_vllm_request_settings_override_the_servers():
    from vtr.integrations.vllm import VtrConfigError, request_settings
    server = {"method": "random", "ratio": 0.5, "seed": 3}
    assert request_settings(server, None) == server
    assert request_settings(server, {"ratio": 0}) == {"method": "random", "ratio": 0, "seed": 3}
    assert request_settings(server, {"keep": 4}) == {"method": "random", "keep": 4, "seed": 3}
    # another method stands alone: the server's options belong to its method
    assert request_settings(server, {"method": "divprune", "ratio": 0.25}) == {"method": "divprune", "ratio": 0.25}
    with pytest.raises(VtrConfigError, match="served without vtr"):
        request_settings(None, {"method": "divprune", "ratio": 0.5})
    with pytest.raises(VtrConfigError, match="must be an object"):
        request_settings(server, "divprune")


def test_docs_vllm_table_lists_what_vllm_serves():
    """The generated vLLM matrix of the docs marks served exactly the methods ``servable_methods`` lists."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))
    import generate
    matrix = generate.vllm_matrix()
    served = {name for cells in matrix.values() for name, cell in cells.items() if cell not in ("refused", "-")}
    assert served == {name.split()[0] for name in SERVABLE}
    assert matrix["Qwen2_5_VLForConditionalGeneration"]["hiprune"] == "images"
    assert matrix["LlavaForConditionalGeneration"]["fastvid"] == 'images (`positions="compact"`)'
    assert matrix["Qwen3VLForConditionalGeneration"]["holitom"] == "images (`inner_ratio=0`)"
    assert matrix["Qwen2VLForConditionalGeneration"]["dart"] == "refused"
    # vLLM's Qwen3-VL-MoE class is Qwen3-VL's with MoE layers: the plugin serves it all that it serves Qwen3-VL
    assert matrix["Qwen3VLMoeForConditionalGeneration"] == matrix["Qwen3VLForConditionalGeneration"]


def test_only_a_selection_that_reads_the_prompt_puts_it_in_the_input_hash():
    """vLLM's plugin hashes the prompt with an input only when the served selection reads it (CDPruner); HoliTom's
    inner stage reads it, but it is off when served, so a second chat turn reuses HoliTom's cached run."""
    assert serving.reads_prompt(serving.configure("cdpruner", ratio=0.5))
    assert not serving.reads_prompt(serving.configure("holitom", ratio=0.5, inner_ratio=0))
    assert not any(serving.reads_prompt(serving.configure(name, ratio=0.5))
                   for name in ("random", "uniform", "divprune", "fastervlm", "visionzip", "vispruner", "hiprune",
                                "fastvid"))
