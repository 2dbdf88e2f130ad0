"""Invariant 5: bad input gets a clear error naming the problem, and a failed patch leaves the model untouched."""
import pytest
import torch
import transformers

import tiny_models as tm
import vtr
from test_invariants import hook_count
from vtr.methods import REGISTRY


@pytest.fixture
def llava():
    model, proc = tm.build("llava")
    with torch.no_grad():
        model(**tm.image_inputs("llava", proc, 1))  # let transformers install its lazy hooks first
    return model, proc


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="dartt", ratio=0.5), ValueError, r"unknown method 'dartt'.*Did you mean 'dart'"),
    (dict(method="dart", ratio=1.0), ValueError, r"ratio must be in \[0, 1\)"),
    (dict(method="dart", ratio=-0.1), ValueError, r"ratio must be in \[0, 1\)"),
    (dict(method="fastv", keep=0), ValueError, r"keep must be an integer >= 1"),
    (dict(method="fastv"), ValueError, r"exactly one of ratio="),
    (dict(method="fastv", ratio=0.5, keep=4), ValueError, r"exactly one of ratio="),
    (dict(method="fastv", ratio=0.5, layer=4), ValueError, r"layer must be in \[1, 3\]"),
    (dict(method="fastv", ratio=0.5, layer=0), ValueError, r"layer must be in \[1, 3\]"),
    (dict(method="flowcut", ratio=0.5, llm_layer=4), ValueError,
     r"flowcut: llm_layer must be in \[1, 3\] for this 4-layer model \(0 turns that stage off\), got 4"),
    (dict(method="dart", ratio=0.5, pivots=3), TypeError, r"dart has no option 'pivots'"),
    (dict(method="divprune", ratio=0.5, positions="shifted"), ValueError, r"positions must be one of"),
])
def test_bad_arguments(llava, kwargs, error, match):
    model, _ = llava
    hooks = hook_count(model)
    with pytest.raises(error, match=match):
        vtr.patch(model, **kwargs)
    assert hook_count(model) == hooks and vtr.handle_of(model) is None


def test_unsupported_model_lists_supported_ones():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(TypeError, match=r"does not support LlamaForCausalLM; supported model classes: "
                                        r"LlavaForConditionalGeneration, .*Qwen2VLForConditionalGeneration"):
        vtr.patch(model, "dart", ratio=0.5)
    assert hook_count(model) == 0


@pytest.mark.parametrize("method,family", [
    pytest.param(m, f, id=f"{m}-{f}") for m in sorted(vtr.methods()) for f in tm.FAMILIES
    if not tm.supports(m, f) and (m, f) not in tm.LAYER_REFUSED])
def test_methods_refuse_models_they_do_not_support(method, family):
    """A method whose official code has no rule for a model (no [CLS] token in its vision tower, ...) is refused
    at patch time, naming the model; nothing is attached."""
    model, _ = tm.build(family)
    with pytest.raises(ValueError, match=rf"{method} does not support {tm.MODEL_CLASSES[family]}: .+ Supported: "):
        vtr.patch(model, method, ratio=0.5)
    assert hook_count(model) == 0 and vtr.handle_of(model) is None


@pytest.mark.parametrize("method,family", [pytest.param(m, f, id=f"{m}-{f}") for m, f in sorted(tm.LAYER_REFUSED)])
def test_methods_refuse_layer_types_they_cannot_use(method, family):
    """A method that needs what a layer of the model cannot give (a KV cache cut token by token in a sliding-window
    or recurrent layer) is refused at patch time, naming the layer and why; nothing is attached."""
    model, _ = tm.build(family)
    with pytest.raises(ValueError, match=tm.LAYER_REFUSED[method, family]):
        vtr.patch(model, method, ratio=0.5)
    assert hook_count(model) == 0 and vtr.handle_of(model) is None


@pytest.mark.video
@pytest.mark.parametrize("method", ["hiprune", "visionzip", "vispruner"])
def test_image_only_methods_refuse_videos(method):
    """HiPrune's Qwen2.5-VL rule and the received-attention substitute of VisionZip / VisPruner are defined for
    images; a video in the prompt raises, naming the method."""
    model, proc = tm.build("qwen2_5_vl")
    with vtr.patch(model, method, ratio=0.5), torch.no_grad():
        with pytest.raises(ValueError, match=f"{method} prunes images with vision-tower signals; this prompt holds a "
                                             "video"):
            model(**tm.video_inputs("qwen2_5_vl", proc, 1))


def test_unsupported_attention_backend():
    model, _ = tm.build("llava", attn="flex_attention")
    with pytest.raises(ValueError, match=r"attn_implementation='flex_attention'; supported: eager, sdpa"):
        vtr.patch(model, "fastv", ratio=0.5)
    assert hook_count(model) == 0


def test_compact_positions_on_mrope_model():
    model, _ = tm.build("qwen2_vl")
    with pytest.raises(ValueError, match=r"positions='compact' is not defined for Qwen2VLForConditionalGeneration"):
        vtr.patch(model, "divprune", ratio=0.5, positions="compact")
    assert hook_count(model) == 0


def test_already_patched(llava):
    model, _ = llava
    handle = vtr.patch(model, "dart", ratio=0.5)
    hooks = hook_count(model)
    with pytest.raises(RuntimeError, match="already patched with dart"):
        vtr.patch(model, "fastv", ratio=0.5)
    assert hook_count(model) == hooks and vtr.handle_of(model) is handle
    handle.remove()


def test_method_instance_and_options_conflict(llava):
    model, _ = llava
    with pytest.raises(ValueError, match="either to the Method instance or to patch"):
        vtr.patch(model, vtr.DART(ratio=0.5), ratio=0.9)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_chunked_prefill_splitting_an_image_raises(family):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 1)
    with vtr.patch(model, "divprune", ratio=0.5):
        with pytest.raises(ValueError, match="chunked prefill"):
            model.generate(**inputs, max_new_tokens=2, prefill_chunk_size=16)


def test_new_images_on_a_non_empty_cache_raise(llava):
    model, proc = llava
    inputs = tm.image_inputs("llava", proc, 1)
    with vtr.patch(model, "divprune", ratio=0.5):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            with pytest.raises(ValueError, match="cannot add new images or videos to a pruned KV cache"):
                model(**inputs, past_key_values=out.past_key_values)


def test_static_cache_raises(llava):
    model, proc = llava
    with vtr.patch(model, "dart", ratio=0.5):
        with pytest.raises(ValueError, match="DynamicCache only, got StaticCache"):
            model.generate(**tm.image_inputs("llava", proc, 1), max_new_tokens=2, cache_implementation="static")


def test_inputs_embeds_with_images_raise(llava):
    model, proc = llava
    inputs = tm.image_inputs("llava", proc, 1)
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with vtr.patch(model, "dart", ratio=0.5):
        with pytest.raises(ValueError, match="needs input_ids to find the visual tokens"):
            model(inputs_embeds=embeds, **inputs)


def test_numpy_numbers_are_options_and_bad_numbers_name_the_problem():
    """A budget or option computed with numpy (np.float32, np.int64) is the number it holds; a string ratio, a NaN
    and a cosine threshold outside [-1, 1] are refused naming the option."""
    import numpy as np
    assert vtr.HoliTom(ratio=np.float32(0.5)).ratio == 0.5 and type(vtr.DART(keep=np.int64(40)).keep) is int
    assert type(vtr.FrameFusion(ratio=0.5, cost_layers=np.int32(28)).cost_layers) is int
    for method, options, match in [("holitom", {"ratio": "0.5"}, r"ratio must be in \[0, 1\)"),
                                   ("holitom", {"ratio": 0.5, "threshold": 1.5}, r"threshold must be in \[-1.0, 1.0\]"),
                                   ("holitom", {"ratio": 0.5, "threshold": float("nan")},
                                    "threshold must be a finite number, got nan"),
                                   ("prunevid", {"ratio": 0.5, "tau": -2.0}, r"tau must be in \[-1.0, 1.0\]")]:
        with pytest.raises(ValueError, match=match):
            REGISTRY[method](**options)
