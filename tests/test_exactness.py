"""Invariant 2: a pruned run equals the unpatched model fed the kept tokens with the prescribed positions.

One matrix: every registered method x every tiny model x {eager, sdpa} x {batch 1, batch 2 left padded with
different prompt lengths (and, except for LLaVA-1.5, different visual token counts), batch 2 with two images in one
row, batch 2 with a text-only row; and for the video models batch 1 and 2 videos} x {forward, generate}. The 1-D
RoPE LLaVA models also run each method under its non-default position policy. By default SDPA and the other
policy run on a representative subset of those cases (``_in_default_matrix``; ``VTR_TEST_FULL=1`` runs them
all). Logits are compared on the real (non-padding) slots; generated tokens must be equal.
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


INPUTS = {"image": ((1, "single"), (2, "single"), (2, "multi"), (2, "mixed")), "video": ((1, "video"), (2, "video"))}


def cases():
    for method in tm.matrix_methods():
        for family in tm.FAMILIES:
            if not tm.in_matrix(method, family):  # refused at patch time (test_errors.py), or not in the subset
                continue
            policies = [None, "other"] if family in ("llava", "llava_next") else [None]
            inputs = [("image", x) for x in INPUTS["image"]] if "image" in REGISTRY[method].visual_kinds else []
            if family in tm.VIDEO_FAMILIES and "video" in REGISTRY[method].visual_kinds:
                inputs += [("video", x) for x in INPUTS["video"]]
            for policy in policies:
                for attn in ("eager", "sdpa"):
                    for kind, (batch, variant) in inputs:
                        for mode in ("forward", "generate"):
                            if not (tm.full_matrices() or _in_default_matrix(policy, attn, batch, variant, mode)):
                                continue
                            yield pytest.param(method, family, policy, attn, batch, variant, mode,
                                               id=f"{method}-{family}-{policy or 'default'}-{attn}-b{batch}-"
                                                  f"{variant}-{mode}",
                                               marks=[pytest.mark.video] if kind == "video" else [])


def _in_default_matrix(policy, attn, batch, variant, mode) -> bool:
    """The representative subset (``tm.full_matrices``): eager generate on every input, eager forward (logits of
    every real slot) on one and two images per row and on videos; SDPA on the left-padded batch (generate), the
    text-only companion row (forward) and the video batch (generate); the non-default position policy eager on
    one image (forward) and the left-padded batch (generate)."""
    if policy is not None:
        return attn == "eager" and (batch, variant, mode) in ((1, "single", "forward"), (2, "single", "generate"))
    if attn == "eager":
        return mode == "generate" or variant in ("single", "multi", "video") and (batch == 1 or variant != "single")
    return (batch, variant, mode) in ((2, "single", "generate"), (2, "mixed", "forward"), (2, "video", "generate"))


def _policy(method: str, family: str, policy):
    if policy is None:
        return None
    default = REGISTRY[method].default_positions
    return "compact" if default == "original" else "original"


def inputs_for(family, proc, batch, variant):
    if variant == "video":
        return tm.video_inputs(family, proc, batch)
    return tm.image_inputs(family, proc, batch, variant)


def check_against_reference(model, inputs, method, mode, ratio=RATIO, **options):
    """Run ``method`` patched (a forward, or greedy generate) and compare with the reference on the kept tokens."""
    with vtr.patch(model, method, ratio=ratio, **options) as handle:
        with torch.no_grad():
            if mode == "forward":
                logits = model(**inputs).logits
            else:
                out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
        record = handle.last
    lm_inputs = R.capture_lm_inputs(model, inputs, generate=(mode == "generate"))
    decode = handle.method.decode_stage()
    if decode is not None:  # a kv_cache stage (DyCoke): each step's layers >= L see that step's visual subset
        prefill_pruned = record.index is not None
        if mode == "forward" and not prefill_pruned:  # nothing to prune before decoding (an image: one frame)
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, logits)
            return
        assert prefill_pruned or any(s is not None for step in record.decode_steps for s in step), \
            "nothing was pruned"
        ref_prefill, ref_steps, _ = R.decode_subset_reference(model, lm_inputs, record.index, handle.method.positions,
                                                           STEPS, decode.layer, record)
    else:
        assert record.index is not None and record.n_kept != record.n_visual, "nothing was pruned"
        ref_prefill, ref_steps, _ = R.reference_for(model, handle.method, lm_inputs, record.index, STEPS,
                                                    record=record)
    if mode == "forward":
        assert logits.shape == ref_prefill.shape
        assert ((logits - ref_prefill).abs() * (record.index >= 0)[..., None]).max() <= TOL
        with torch.no_grad():  # and pruning changed the output
            assert not torch.allclose(model(**inputs).logits[:, -1], logits[:, -1])
    else:
        assert (torch.stack(out.logits, 1) - ref_steps).abs().max() <= TOL
        assert torch.equal(out.sequences[:, -STEPS:], ref_steps.argmax(-1))


@pytest.mark.parametrize("method,family,policy,attn,batch,variant,mode", list(cases()))
def test_pruned_equals_reference(method, family, policy, attn, batch, variant, mode):
    model, proc = tm.build(family, attn=attn)
    options = tm.options(method, family)
    if policy:
        options["positions"] = _policy(method, family, policy)
    check_against_reference(model, inputs_for(family, proc, batch, variant), method, mode, **options)


@pytest.mark.parametrize("method,family", tm.method_family(  # images: the video-only methods leave them whole
    [m for m in tm.matrix_methods() if "image" in REGISTRY[m].visual_kinds], ["llava_next", "llava_onevision"]))
def test_extreme_aspect_ratios_equal_reference(method, family):
    """Anyres images whose unpadded grid keeps no row (20x300 on the tiny models) or no column (300x20) beside an
    ordinary one: pruned as the reference (generate: the layout read from the newline tokens alone)."""
    from test_layout import extreme_inputs
    model, proc = tm.build(family, attn="eager")
    check_against_reference(model, extreme_inputs(family, proc, [(20, 300), (300, 20), (48, 80)]), method,
                            "generate")


@pytest.mark.parametrize("mode", ["forward", "generate"])
@pytest.mark.parametrize("batch,variant", [(1, "single"), (2, "multi"),
                                           pytest.param(2, "video", marks=pytest.mark.video)])
@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_qwen3_deepstack_on_pruned_layers(method, batch, variant, mode):
    """Pruning before layer 1 leaves DeepStack's addition after layer 1 to run on the pruned sequence."""
    model, proc = tm.build("qwen3_vl")
    check_against_reference(model, inputs_for("qwen3_vl", proc, batch, variant), method, mode, layer=1)
