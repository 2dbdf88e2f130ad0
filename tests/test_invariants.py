"""Invariants 1, 3, 4, 5: ratio 0 is the identity, kept counts follow each method's rule, text is never dropped,
text-only prompts pass through, unpatching restores the model exactly and a cache pruned before is never continued
silently."""
import copy
import math
from decimal import Decimal

import pytest
import torch

import tiny_models as tm
import vtr
from vtr.methods import REGISTRY

METHODS = tm.matrix_methods()


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def run(model, inputs, steps=4):
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return logits, out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("method,family", tm.method_family(METHODS, tm.FAMILIES))
def test_ratio_zero_is_identity(method, family):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2)
    expected = run(model, inputs)
    with vtr.patch(model, method, ratio=0.0, **tm.options(method, family)) as handle:
        got = run(model, inputs)
        assert handle.last.n_kept == handle.last.n_visual
        assert handle.last.index is None
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


@pytest.mark.parametrize("method", METHODS)
def test_keep_everything_is_identity(method):
    family = tm.family_for(method, "qwen2_vl")
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2)
    expected = run(model, inputs)
    with vtr.patch(model, method, keep=10_000):
        got = run(model, inputs)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def expected_kept(method: str, n: int, ratio=None, keep=None) -> int:
    """Each method's keep-count rule, written out independently of the implementation (multi-stage methods:
    after their last stage)."""
    if method == "pdrop":
        return pdrop_counts(n, ratio, keep)[-1]
    if method == "dart":
        per_pivot = keep // 8 if keep is not None else int(n * (1 - ratio) / 8)
        return min(n, 4 + 8 * per_pivot)
    if method == "dycoke":  # an image is one frame: temporal pruning keeps it whole (the KV stage prunes it)
        return n
    if method in ("evs", "vidcom2"):  # videos only: images pass whole
        return n
    if method == "mustdrop":  # budget T: (n + 1 - T) // 8 of the 3x3 windows merge (8 tokens each), as many as fit
        budget = min(keep, n) if keep is not None else max(1, round(n * (1 - ratio)))
        windows = (math.isqrt(n) // 3) ** 2
        return n - 8 * min(windows, max(0, (n + 1 - budget) // 8))
    if method == "holitom":  # an image is one frame: ceil(n * r) tokens at the input, then the inner stage halves
        # r: the official RETAIN_RATIO, 1 - ratio in decimal; its official count ceil(n * r) in floating point
        r = float(Decimal(1) - Decimal(repr(ratio))) if ratio is not None else min(1.0, keep / n)
        outer = max(1, math.ceil(n * r))
        return outer if keep is not None and keep >= n else max(1, round(outer * 0.5))
    if method == "prunevid":  # an image is one frame of dynamic tokens: more than 14 merged into floor(n / 2)
        alpha = min(1.0, keep / n) if keep is not None else 1 - ratio  # clusters, then floor(share * alpha), >= 1
        return n if alpha >= 1 else max(1, math.floor((n // 2 if n > 14 else n) * alpha + 1e-9))
    if method == "framefusion":  # an image: no chains; after layer 0's attention the cost model's count
        cost = min(1.0, keep / n) if keep is not None else 1 - ratio
        left = 4 * cost - 1  # budget of the 3 layers after layer 0, which runs on all n
        return n if left >= 3 else max(1, round(n * left / 3)) if left > 0 else 1
    if keep is not None:
        return min(keep, n)
    if method == "fastvid":  # an image is one frame: floor(n * r) tokens, at least 1
        return max(1, int(n * (1 - ratio) + 1e-9))
    if method == "divprune":
        return int(round((1 - ratio) * n))
    return round(n * (1 - ratio))


def pdrop_counts(n: int, ratio=None, keep=None, n_layers: int = 4) -> list[int]:
    """PyramidDrop on a 4-layer model: stages before layers 1, 2, 3 (8/16/24 or 2/8/16 of 32, scaled), each
    keeping ``int(n * lam ** s)``, lam such that the layer average of ``lam ** s`` is the kept fraction."""
    fraction = keep / n if keep is not None else 1 - ratio
    if fraction >= 1:
        return [n] * 3
    low, high = 0.0, 1.0
    for _ in range(100):
        lam = (low + high) / 2
        average = (1 + lam + lam ** 2 + lam ** 3) / 4
        low, high = (lam, high) if average < fraction else (low, lam)
    return [max(1, int(n * lam ** s + 1e-6)) for s in (1, 2, 3)]


# SparseVLM's released counts and PruMerge's adaptive (IQR) count depend on the attention: their own tests
# (test_methods.py, test_merging_methods.py) check them against the official rule.
@pytest.mark.parametrize("method,family", tm.method_family([m for m in METHODS if m not in ("sparsevlm", "prumerge")],
                                                           ["llava", "qwen2_vl"]))
@pytest.mark.parametrize("budget", [{"ratio": 0.5}, {"ratio": 0.9}, {"ratio": 0.778}, {"keep": 1}, {"keep": 20}])
def test_kept_counts_follow_the_rule(method, family, budget):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2, "multi")
    with vtr.patch(model, "random", ratio=0.5) as layout, torch.no_grad():
        model(**inputs)
    sizes = [span.n for row in layout.last.layout.rows for span in row.spans]  # each image's tokens: keep's unit
    if any(tm.out_of_reach(method, n, **budget) for n in sizes):  # refused: test_multistage.py
        with pytest.raises(ValueError, match="cannot reach"), torch.no_grad():
            with vtr.patch(model, method, **budget, **tm.options(method, family)):
                model(**inputs)
        return
    with vtr.patch(model, method, **budget, **tm.options(method, family)) as handle:
        with torch.no_grad():
            model(**inputs)
    record = handle.last
    for row, kept in zip(record.layout.rows, record.kept):
        assert len(kept) == sum(expected_kept(method, span.n, **budget) for span in row.spans)
        assert torch.equal(kept, kept.unique())  # ascending, no duplicates
        for span in row.spans:  # per image
            mine = kept[(kept >= span.offset) & (kept < span.offset + span.n)]
            assert len(mine) == expected_kept(method, span.n, **budget)


@pytest.mark.parametrize("method,family", tm.method_family(METHODS, tm.FAMILIES))
def test_text_tokens_are_never_dropped(method, family):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2, "mixed")
    with vtr.patch(model, method, ratio=tm.reachable_ratio(method, 0.9), **tm.options(method, family)) as handle:
        with torch.no_grad():
            model(**inputs)
    record = handle.last
    visual = record.layout.visual_mask()
    real = inputs["attention_mask"].bool()
    index = record.index  # None: nothing pruned before the language model (DyCoke on an image)
    if index is None:
        index = torch.where(real, torch.arange(real.shape[1]), -1)
    for b in range(len(record.layout.rows)):
        kept_positions = set(index[b][index[b] >= 0].tolist())
        text = set((real[b] & ~visual[b]).nonzero().flatten().tolist())
        assert text <= kept_positions
        kept_visual = record.layout.rows[b].visual_positions[record.kept[b]].tolist() if record.kept[b].numel() else []
        assert kept_positions == text | set(kept_visual)


@pytest.mark.parametrize("method,family", tm.method_family(METHODS, tm.FAMILIES))
def test_text_only_prompts_pass_through(method, family):
    model, proc = tm.build(family)
    inputs = tm.text_inputs(proc, 2)
    expected = run(model, inputs)
    with vtr.patch(model, method, ratio=tm.reachable_ratio(method, 0.9), **tm.options(method, family)) as handle:
        got = run(model, inputs)
        assert handle.last.n_visual == [0, 0]
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


@pytest.mark.parametrize("how", ["remove", "unpatch", "context"])
@pytest.mark.parametrize("method", ["dart", "divprune"])
def test_unpatch_restores_the_model(method, how):
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 2)
    expected = run(model, inputs)  # first: transformers installs its own output-capturing hooks lazily
    hooks = hook_count(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = set(vars(model)) | set(vars(model.model))
    if how == "context":
        with vtr.patch(model, method, ratio=0.75):
            pruned = run(model, inputs)
    else:
        handle = vtr.patch(model, method, ratio=0.75)
        pruned = run(model, inputs)
        handle.remove() if how == "remove" else vtr.unpatch(model)
    assert not torch.equal(pruned[1], expected[1]) or not torch.equal(pruned[2], expected[2])
    assert hook_count(model) == hooks
    assert vtr.handle_of(model) is None
    assert set(vars(model)) | set(vars(model.model)) == attributes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for e, g in zip(expected, run(model, inputs)):
        assert torch.equal(e, g)
    vtr.patch(model, method, ratio=0.5).remove()  # can be patched again


@pytest.mark.parametrize("method,family", tm.method_family(METHODS, tm.FAMILIES))
def test_a_pruned_cache_is_never_continued_after_removal(method, family):
    """A cache the patch pruned refuses the unpatched model after remove(), in a hand-written decoding step and in
    a second generate turn, and so do a copy of it and a new patch of the same method; a cache whose request
    removed nothing (DyCoke on an image, kept whole before its decoding stage) continues as the unpatched model's.
    The video-only methods (EVS, VidCom2) on videos."""
    model, proc = tm.build(family)
    videos_only = "image" not in REGISTRY[method].visual_kinds
    inputs = tm.video_inputs(family, proc, 2) if videos_only else tm.image_inputs(family, proc, 2)
    kwargs = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        with vtr.patch(model, method, ratio=0.5, **tm.options(method, family)) as handle:
            turn = model.generate(**inputs, **kwargs)
        cache = turn.past_key_values
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(2, 1)], 1)
        again = dict(input_ids=torch.cat([turn.sequences, turn.sequences[:, -1:]], 1),
                     attention_mask=torch.cat([mask, mask[:, -1:]], 1), max_new_tokens=1, do_sample=False)
        if handle.last.index is None:
            assert handle.method.decode_stage() is not None
            unpatched = model.generate(**inputs, **kwargs)
            assert torch.equal(model.generate(**again, past_key_values=cache),
                               model.generate(**again, past_key_values=unpatched.past_key_values))
            return
        removed = r"KV cache was pruned by vtr.patch\(model, '\w+', ...\), which has since been removed"
        with pytest.raises(ValueError, match=removed):  # Qwen without a mask: transformers fails a masked step
            model(input_ids=turn.sequences[:, -1:], past_key_values=cache,
                  **({} if family.startswith("qwen") else {"attention_mask": mask}))
        with pytest.raises(ValueError, match=removed):
            model.generate(**again, past_key_values=cache)
        with pytest.raises(ValueError, match=removed):
            model.generate(**again, past_key_values=copy.deepcopy(cache))
        with vtr.patch(model, method, ratio=0.5, **tm.options(method, family)), pytest.raises(ValueError, match=removed):
            model.generate(**again, past_key_values=cache)
        assert cache.get_seq_length() > 0  # still readable


def test_method_object_is_a_context_manager():
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 1)
    with vtr.DART(ratio=0.75, layer=1)(model) as handle:
        with torch.no_grad():
            model(**inputs)
        assert handle.last.n_kept == [4 + 8 * 2]
        assert handle.method.layer == 1
    assert vtr.handle_of(model) is None
