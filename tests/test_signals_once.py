"""No signal is computed twice: what the model itself computes is read from it rather than recomputed, and what
no stage changes is computed once per request, whatever the number of stages."""
import collections

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
