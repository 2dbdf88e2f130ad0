"""No signal is computed twice: what the model itself computes is read from it rather than recomputed, and what
no stage changes is computed once per request, whatever the number of stages."""
import collections

import pytest
import torch

import tiny_models as tm
import vtr
from vtr.signals.text import TextSignals


def test_pdrop_hands_each_stage_layer_its_own_norm_and_key_projection():
    """PyramidDrop scores with a stage layer's own input norm and key projection over the whole sequence; the layer
    then gets the kept rows of them instead of computing them again (one row goes through, negligible work)."""
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 1)
    layers = model.model.language_model.layers
    seen = collections.defaultdict(list)
    with vtr.patch(model, "pdrop", ratio=0.5, layers="1,2,3") as handle, torch.no_grad():
        hooks = []  # after the patch's: what each module computes on
        for k, layer in enumerate(layers):
            for name, module in (("norm", layer.input_layernorm), ("keys", layer.self_attn.k_proj)):
                hooks.append(module.register_forward_pre_hook(
                    lambda m, a, k=k, name=name: seen[k, name].append(a[0].shape[1])))
        model(**inputs)
        for hook in hooks:
            hook.remove()
    record = handle.last
    lengths = [inputs["input_ids"].shape[1]] + [s.length for s in record.stages]
    for s, k in enumerate((1, 2, 3)):
        assert lengths[s + 1] < lengths[s]  # the stage pruned
        # the signal over the stage's whole sequence, then one row through the layer's own modules
        assert seen[k, "norm"] == [lengths[s], 1] and seen[k, "keys"] == [lengths[s], 1], (k, seen)
    assert seen[0, "keys"] == [lengths[0]]  # a layer without a stage computes its own, once


def test_sparsevlm_raters_are_computed_once_per_request(monkeypatch):
    """SparseVLM's raters read the language model's inputs, which no stage changes: once per image per request,
    not once per stage."""
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 2)
    computed = []
    real = TextSignals.prompt_text_after
    monkeypatch.setattr(TextSignals, "prompt_text_after",
                        lambda self, row, span: computed.append(row) or real(self, row, span))
    with vtr.patch(model, "sparsevlm", ratio=0.5, layers="1,2,3") as handle, torch.no_grad():
        model(**inputs)
        assert len(handle.last.stages) == 3
        assert sorted(computed) == [0, 1]
        model(**inputs)  # a new request computes its own
        assert sorted(computed) == [0, 0, 1, 1]


def _projection_calls(model, run):
    """How many times each vision-tower projection module runs during ``run()``."""
    calls = collections.Counter()
    hooks = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "qkv") and ("vision" in name or "visual" in name):
            hooks.append(module.register_forward_hook(lambda m, a, o, name=name: calls.update([name])))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


@pytest.mark.parametrize("method,family,video", [
    ("fastervlm", "llava", False), ("visionzip", "llava", False), ("vispruner", "llava", False),
    ("hiprune", "llava", False), ("hiprune", "qwen2_5_vl", False), ("vflowopt", "llava_onevision", False),
    ("fastvid", "qwen2_5_vl", True), ("holitom", "llava_onevision", True)])
def test_vision_signals_read_the_towers_own_projections(method, family, video):
    """The attention signals of the vision tower (the [CLS] row, received attention, VFlowOpt's global attention,
    FastVID's mean-query salience, HoliTom's frame attention) are computed from the query and key projections the
    tower itself computed: no projection runs more often than in the unpatched forward."""
    model, proc = tm.build(family)
    inputs = tm.video_inputs(family, proc, 1) if video else tm.image_inputs(family, proc, 1)
    with torch.no_grad():
        unpatched = _projection_calls(model, lambda: model(**inputs))
        with vtr.patch(model, method, ratio=0.5) as handle:
            patched = _projection_calls(model, lambda: model(**inputs))
    assert handle.last.n_kept != handle.last.n_visual  # it pruned
    assert patched == unpatched and sum(unpatched.values()) > 0


@pytest.mark.parametrize("method,family,video,options", [
    ("dart", "llava", False, {"layer": 2}), ("fastv", "qwen2_vl", False, {"layer": 2}),
    ("prunevid", "qwen2_vl", True, {}), ("flowcut", "llava_next", False, {})])
def test_decoder_signals_read_the_scoring_layers_own_projections(method, family, video, options):
    """Keys and values of the layer before a stage come from what that layer computed (its KV cache, or its key
    projection before the rotary embedding for rows numbered from a padding slot, PruneVid's unrotated keys):
    no key or value projection of the language model runs more often than in the unpatched forward, with a
    left-padded batch of two rows."""
    model, proc = tm.build(family)
    inputs = tm.video_inputs(family, proc, 2) if video else tm.image_inputs(family, proc, 2)
    assert not bool(inputs["attention_mask"].all())  # padded: a row numbered from its padding slots

    def calls(run):
        seen = collections.Counter()
        hooks = [module.register_forward_hook(lambda m, a, o, name=name: seen.update([name]))
                 for name, module in model.model.language_model.named_modules() if name.endswith(("k_proj", "v_proj"))]
        try:
            run()
        finally:
            for hook in hooks:
                hook.remove()
        return seen

    with torch.no_grad():
        unpatched = calls(lambda: model(**inputs))
        with vtr.patch(model, method, ratio=0.5, **options) as handle:
            patched = calls(lambda: model(**inputs))
    assert any(s.stage == "layer" for s in handle.last.stages)
    assert patched == unpatched
