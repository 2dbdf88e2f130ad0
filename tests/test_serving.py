"""vtr.serving, the selection a serving engine (vLLM) calls: it must choose exactly what vtr.patch chooses in the
Hugging Face model for the same input, and refuse the methods a serving engine cannot run, saying why."""
import pytest
import torch

import reference as R
import tiny_models as tm
import vtr
from vtr import serving
from vtr.methods import REGISTRY

SERVABLE = ["divprune", "random", "uniform"]


def _hf_choice(model, inputs, kind, method, **budget):
    """Kept indices of the prompt's one visual input under vtr.patch, and that input's LM input features."""
    with vtr.patch(model, method, **budget) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.last.kept[0]
    embeds = R.capture_lm_inputs(model, inputs)["embeds"][0]
    token = model.config.image_token_id if kind == "image" else model.config.video_token_id
    features = embeds[inputs["input_ids"][0] == token]
    t, h, w = inputs[f"{kind}_grid_thw"][0].tolist()
    merge = model.config.vision_config.spatial_merge_size
    return kept, features, (t, h // merge, w // merge)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("method", SERVABLE)
@pytest.mark.parametrize("budget", [dict(ratio=0.5), dict(ratio=0.75), dict(keep=7)], ids=["r0.5", "r0.75", "k7"])
def test_select_tokens_equals_the_hf_engine(method, kind, family, budget):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 1) if kind == "image" else tm.video_inputs(family, proc, 1)
    kept, features, grid = _hf_choice(model, inputs, kind, method, **budget)
    configured = serving.method_from_options(method, **budget)
    chosen = serving.select_tokens(configured, features, grid, kind)
    assert serving.kept_count(configured, len(features)) == len(chosen) < len(features)
    assert torch.equal(chosen, kept)


@pytest.mark.parametrize("method", ["fastv", "dart", "pdrop", "sparsevlm"])
def test_in_llm_methods_are_refused_with_the_reason(method):
    with pytest.raises(ValueError, match="paged attention"):
        serving.method_from_options(method, ratio=0.5)


@pytest.mark.parametrize("method", ["fastervlm", "visionzip", "vispruner", "hiprune", "cdpruner"])
def test_methods_that_read_more_than_the_features_are_refused(method):
    with pytest.raises(ValueError, match=f"vtr: {method} reads"):
        serving.method_from_options(method, ratio=0.5)


def test_every_registered_method_is_either_servable_or_refused():
    servable = [name for name, cls in sorted(REGISTRY.items()) if serving.servable_reason(cls(ratio=0.5)) is None]
    assert servable == SERVABLE


def test_bad_options_fail_at_configuration():
    with pytest.raises(ValueError, match="ratio must be in"):
        serving.method_from_options("divprune", ratio=1.5)
    with pytest.raises(TypeError):
        serving.method_from_options("random", ratio=0.5, layer=2)


def test_ratio_zero_keeps_everything_without_selecting():
    features = torch.randn(12, 8)
    chosen = serving.select_tokens(serving.method_from_options("divprune", ratio=0.0), features, (1, 3, 4))
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


@pytest.mark.parametrize("settings,error,match", [
    ({"VTR_METHOD": "dart", "VTR_RATIO": "0.5"}, ValueError, "paged attention"),
    ({"VTR_METHOD": "divprune", "VTR_RATIO": "half"}, ValueError, "ratio must be a number"),
    ({"VTR_METHOD": "divprune", "VTR_RATIO": "0.5", "VTR_OPTIONS": "{seed"}, ValueError, "VTR_OPTIONS"),
    ({"VTR_METHOD": "divprune"}, ValueError, "exactly one of ratio"),
    ({"VTR_METHOD": "nope", "VTR_RATIO": "0.5"}, Exception, "nope"),
])
def test_vllm_configuration_errors_name_the_setting(settings, error, match):
    from vtr.integrations.vllm import configured_method
    with pytest.raises(error, match=match):
        configured_method(None, environ=settings)
