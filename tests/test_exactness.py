"""Invariant 2: a pruned run equals the unpatched model fed the kept tokens with the prescribed positions.

One matrix: every registered method x every tiny model x {eager, sdpa} x {batch 1, batch 2 left padded with
different prompt lengths (and, for Qwen, different visual token counts), batch 2 with two images in one row, batch 2
with a text-only row} x {forward, generate}. LLaVA also runs
each method under its non-default position policy. Logits are compared on the real (non-padding) slots; generated
tokens must be equal.
"""
import pytest
import torch

import reference as R
import tiny_models as tm
import vtr
from vtr.methods import REGISTRY

STEPS = 6
RATIO = 0.75
TOL = 1e-5


def cases():
    for method, cls in sorted(REGISTRY.items()):
        for family in tm.FAMILIES:
            policies = [None, "other"] if family == "llava" else [None]
            for policy in policies:
                for attn in ("eager", "sdpa"):
                    for batch, variant in ((1, "single"), (2, "single"), (2, "multi"), (2, "mixed")):
                        for mode in ("forward", "generate"):
                            yield pytest.param(method, family, policy, attn, batch, variant, mode,
                                               id=f"{method}-{family}-{policy or 'default'}-{attn}-b{batch}-"
                                                  f"{variant}-{mode}")


def _policy(method: str, family: str, policy):
    if policy is None:
        return None
    default = REGISTRY[method].default_positions
    return "compact" if default == "original" else "original"


@pytest.mark.parametrize("method,family,policy,attn,batch,variant,mode", list(cases()))
def test_pruned_equals_reference(method, family, policy, attn, batch, variant, mode):
    model, proc = tm.build(family, attn=attn)
    inputs = tm.image_inputs(family, proc, batch, variant)
    options = {"positions": _policy(method, family, policy)} if policy else {}
    with vtr.patch(model, method, ratio=RATIO, **options) as handle:
        with torch.no_grad():
            if mode == "forward":
                logits = model(**inputs).logits
            else:
                out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
        record = handle.last
    lm_inputs = R.capture_lm_inputs(model, inputs, generate=(mode == "generate"))
    index = record.index
    assert index is not None, "nothing was pruned"
    assert record.n_kept != record.n_visual
    ref_prefill, ref_steps = R.reference_for(model, handle.method, lm_inputs, index, STEPS)
    if mode == "forward":
        real = (index >= 0)[..., None]
        assert logits.shape == ref_prefill.shape
        assert ((logits - ref_prefill).abs() * real).max() <= TOL
        # and pruning changed the output
        unpatched = model(**inputs).logits
        assert not torch.allclose(unpatched[:, -1], logits[:, -1])
    else:
        steps = torch.stack(out.logits, 1)
        assert (steps - ref_steps).abs().max() <= TOL
        assert torch.equal(out.sequences[:, -STEPS:], ref_steps.argmax(-1))
