"""VFlowOpt against a slow loop re-derivation written from the notes (methods_image.md section 10) and the
official code (``siglip_encoder.py``, ``llava_qwen_training_free.py``, ``modeling_qwen2.py: forward_illava``):
global tokens and importance per crop from the eager attention of the tower's feature layer, the importance map
packed like the features (newline importance 1), grid buckets and their weighted merges, and the LLM stages'
picks; plus the schedule rule, the presets and the errors."""
import math

import pytest
import reference as R
import tiny_models as tm
import torch
from test_methods import crops_per_image
from test_vision_stage import sharpen

import vtr
from vtr.methods import vflowopt as V


def slow_importance(attention: torch.Tensor, t: float) -> torch.Tensor:
    """One crop: ``attention`` ``[H, N, N]`` eager probabilities. Loops over tokens as the official per-image loop
    does; no global token (official: NaN) -> the received attention (vtr's guard)."""
    A = attention.float().mean(0)
    N = A.shape[0]
    received = [float(sum(A[q, j] for q in range(N))) / N for j in range(N)]
    mean = sum(received) / N
    chosen = [j for j in range(N) if received[j] > t * mean]
    if not chosen:
        return torch.tensor(received)
    return torch.stack([A[g] for g in chosen]).mean(0)


def slow_entropy(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """``[n_crops, P]`` per-patch pixel entropy, loop by loop from the official
    ``calculate_patch_entropy_vectorized``: x * 255 cast to uint8 (truncation, negative values wrapped), grey =
    0.3333-weighted channel sum rounded, 256-bin histogram, -sum p log2(p + 1e-10)."""
    out = []
    for crop in pixels:
        H, W = crop.shape[1] // size, crop.shape[2] // size
        row = []
        for i in range(H):
            for j in range(W):
                patch = crop[:, i * size:(i + 1) * size, j * size:(j + 1) * size].float()
                as_uint8 = (patch * 255).to(torch.uint8).float()  # the official cast (CPU: wraps negatives)
                grey = (as_uint8 * torch.tensor([0.3333, 0.3333, 0.3333]).view(3, 1, 1)).sum(0).round().long()
                counts = {}
                for v in grey.flatten().tolist():
                    counts[v] = counts.get(v, 0) + 1
                total = grey.numel()
                row.append(-sum((c / total) * math.log2(c / total + 1e-10) for c in counts.values()))
        out.append(torch.tensor(row))
    return torch.stack(out)


def packed_importance(model, inputs, t, alpha_v=0.0):
    """Per image: ``[L]`` importance in the language model's token order (base grid, then the unpadded anyres grid
    with importance 1 in its newline column), packed by transformers' own feature packing as the official code
    unpads its attention map alongside the features."""
    pixels = inputs["pixel_values"]
    counts = crops_per_image(model, inputs)
    pixels = torch.cat([p[:n] for p, n in zip(pixels, counts)])
    with torch.no_grad():
        attentions = model.model.vision_tower(pixels, output_attentions=True).attentions[-1]  # the feature layer
    maps = torch.stack([slow_importance(a, t) for a in attentions])  # [crops, N]
    if alpha_v:
        maps = maps + alpha_v * slow_entropy(pixels, model.config.vision_config.patch_size).softmax(-1)
    maps = maps[..., None].double()
    packed, _ = model.model.pack_image_features(list(torch.split(maps, counts)), inputs["image_sizes"],
                                                image_newline=torch.ones(1).double(),
                                                vision_aspect_ratio=model.config.vision_aspect_ratio)
    return [p[:, 0].float() for p in packed]


def slow_plan(importance, embeds, side, width, vit, m):
    """The official merge on one image: the ``drop + extra`` lowest (ascending sort), bucketed by
    ``floor(point / m)`` on the base grid (``side`` wide) and the anyres grid (``width + 1`` wide), each bucket's
    weighted mean written into its most important member. Returns (kept indices, {index: merged embedding})."""
    L = len(importance)
    drop, extra = round(L * (1 - vit)), int(L / (m * m))
    low = sorted(range(L), key=lambda i: (float(importance[i]), i))[:drop + extra]
    keep = [i not in set(low) for i in range(L)]
    buckets = {}
    for i in low:
        if i < side * side:
            key = ("base", math.floor(float(torch.tensor(i // side).float() / m)),
                   math.floor(float(torch.tensor(i % side).float() / m)))
        else:
            j = i - side * side
            key = ("crop", math.floor(float(torch.tensor(j // (width + 1)).float() / m)),
                   math.floor(float(torch.tensor(j % (width + 1)).float() / m)))
        buckets.setdefault(key, []).append(i)
    merged = {}
    for members in buckets.values():
        weights = torch.stack([importance[i] for i in members]).float()
        weights = weights / weights.sum()
        rep = members[max(range(len(members)), key=lambda k: (float(importance[members[k]]), -k))]
        keep[rep] = True
        if len(members) > 1:
            merged[rep] = sum(weights[k] * embeds[members[k]].float() for k in range(len(members)))
    return [i for i in range(L) if keep[i]], merged


def slow_llm_stage(kept, importance, ratio):
    """forward_illava's KV-cache path: drop the round(n * (1 - ratio)) least important survivors."""
    r = round(len(kept) * (1 - ratio))
    low = set(sorted(kept, key=lambda i: (float(importance[i]), i))[:r])
    return [i for i in kept if i not in low]


def build(resized: bool, attn: str = "eager"):
    """The tiny OneVision model; ``resized``: ``anyres_max_1``, so that every anyres grid (up to 8 x 8 on its
    4 x 4 tower) is resized to the base grid's area after unpadding."""
    model, proc = tm.build("llava_onevision", attn=attn)
    if resized:
        model.config.vision_aspect_ratio = proc.vision_aspect_ratio = "anyres_max_1"
    return model, proc


@pytest.mark.parametrize("resized", [False, True], ids=["grid", "resized-grid"])
@pytest.mark.parametrize("options", [dict(ratio=0.9), dict(ratio=0.75, t=1.5, m=1.7), dict(ratio=0.5, t=2.0),
                                     dict(ratio=0.6, t=1.2, m=1.4), dict(keep=30, t=1.5, m=2.0),
                                     dict(ratio=0.75, t=1e6, m=1.5), dict(ratio=0.75, t=1.5, m=1.5, alpha_v=0.6),
                                     dict(ratio=0.5, t=1.2, m=1.5, alpha_v=-0.8)],
                         ids=["preset10", "preset25-t-m", "preset50", "solved", "keep", "no-global-token",
                              "entropy", "negative-entropy"])
def test_vflowopt_matches_the_slow_derivation(options, resized):
    """Batch of 2 with different image sizes (different grids and anyres layouts); ``resized``: the anyres grid
    shrunk after unpadding (``anyres_max_1`` on the tiny tower, as ``anyres_max_9`` does to large images on the
    7B model), the importance map resized with it."""
    model, proc = build(resized)
    sharpen(model, 6.0)  # far from uniform, yet no saturated (tied) probabilities
    inputs = tm.image_inputs("llava_onevision", proc, 2, "single")
    with vtr.patch(model, "vflowopt", **options) as handle, torch.no_grad():
        model(**inputs)
    record, method = handle.last, handle.method
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    lm = R.capture_lm_inputs(model, inputs)
    n_merged = 0
    for b, row in enumerate(record.layout.rows):
        (span,) = row.spans
        L = span.n
        retention = 1 - options["ratio"] if "ratio" in options else min(1.0, options["keep"] / L)
        preset = V.PRESETS[min(V.PRESETS, key=lambda p: abs(p - retention))]
        t = options.get("t", preset[0])
        m = options.get("m", preset[2] * side / 27)
        importance = packed_importance(model, inputs, t, options.get("alpha_v", 0.0))[b]
        assert len(importance) == L
        if resized:
            assert int(span.row[span.frame == 1].max()) + 1 < 8 or int(span.col.max()) < 8
        vit, llm = method.schedule(L, record.n_layers)
        if options.get("keep", 0) >= L:  # a keep naming every token keeps them all, at every stage
            for stage in record.stages:
                assert stage.kept[b].tolist() == [span.offset + i for i in range(L)]
            continue
        width = int(span.col.max())  # the newline column's index
        embeds = lm["embeds"][b, span.positions]
        kept, merged = slow_plan(importance, embeds, side, width, vit, m)
        assert record.stages[0].kept[b].tolist() == [span.offset + i for i in kept]
        got = record.stages[0].merged[b] if record.stages[0].merged else None
        got = {int(i) - span.offset: e for i, e in zip(got.kept, got.embeds)} if got is not None else {}
        assert sorted(got) == sorted(merged)
        for i, e in merged.items():
            assert torch.allclose(got[i].float(), e, atol=1e-5)
        n_merged += len(merged)
        for stage, ratio in zip(record.stages[1:], llm):
            kept = slow_llm_stage(kept, importance, ratio)
            assert stage.kept[b].tolist() == [span.offset + i for i in kept]
    assert n_merged > 0


def test_presets_and_schedule():
    """The released presets (their layer averages are the paper's 10 / 25 / 50 %), and other retentions solved
    by the official formula."""
    layers, depth = V.OFFICIAL_LAYERS, V.OFFICIAL_DEPTH
    for retention, (_, _, _, vit, llm) in V.PRESETS.items():
        assert V.solve_schedule(retention, layers, depth) == (vit, llm)
        assert abs(V.layer_average(vit, llm, layers, depth) - retention) < 1e-3
        # the official constraint: (r_v * 9 + r_v r_1 * 9 + r_v r_1 r_2 * 10) / 28
        assert abs(V.layer_average(vit, llm, layers, depth)
                   - (vit * 9 + vit * llm[0] * 9 + vit * llm[0] * llm[1] * 10) / 28) < 1e-12
    vit, llm = V.solve_schedule(0.2, layers, depth)  # nearest 25 %: the last ratio solved
    assert vit == V.PRESETS[0.25][3] and llm[0] == V.PRESETS[0.25][4][0] and 0 <= llm[1] <= 1
    assert abs(V.layer_average(vit, llm, layers, depth) - 0.2) < 1e-9
    vit, llm = V.solve_schedule(0.05, layers, depth)  # out of the 10 % preset's reach: vision ratio scaled
    assert llm == V.PRESETS[0.10][4] and abs(V.layer_average(vit, llm, layers, depth) - 0.05) < 1e-9
    assert V.solve_schedule(0.9, layers, depth) == (0.9, (1.0, 1.0))  # only the vision stage can keep 90 %
    vit, llm = V.solve_schedule(0.3, layers, depth, llm=(1.0, 0.5))
    assert llm == (1.0, 0.5) and abs(V.layer_average(vit, llm, layers, depth) - 0.3) < 1e-9


@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_resized_grids_match_the_reference_and_their_rows_alone(mode):
    """The exactness and batch-vs-alone checks of the test matrices on grids anyres_max resizes."""
    from test_exactness import check_against_reference
    from test_requests import assert_close, run
    model, proc = build(True)
    inputs = tm.image_inputs("llava_onevision", proc, 2, "single")
    check_against_reference(model, inputs, "vflowopt", mode, t=1.5, m=1.5, alpha_v=0.5)
    with vtr.patch(model, "vflowopt", ratio=0.75, t=1.5, m=1.5):
        kept, outputs = run(model, inputs, mode)
        for b in range(2):
            kept_alone, outputs_alone = run(model, tm.image_inputs("llava_onevision", proc, 2, "single", rows=[b]),
                                            mode)
            assert torch.equal(kept[b], kept_alone[0])
            assert_close(outputs[b], outputs_alone[0])


def test_ratio_zero_is_the_identity():
    model, proc = tm.build("llava_onevision")
    inputs = tm.image_inputs("llava_onevision", proc, 2, "single")
    with torch.no_grad():
        plain = model(**inputs).logits
    with vtr.patch(model, "vflowopt", ratio=0) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
    assert handle.last.n_kept == handle.last.n_visual


def test_text_tokens_are_never_dropped_and_counts_are_reported():
    model, proc = tm.build("llava_onevision")
    inputs = tm.image_inputs("llava_onevision", proc, 2, "multi")
    with vtr.patch(model, "vflowopt", ratio=0.9) as handle, torch.no_grad():
        model(**inputs)
    record = handle.last
    visual = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    for b, row in enumerate(record.layout.rows):
        for span in row.spans:
            visual[b, span.positions] = True
    for stage in record.stages[1:]:
        for b in range(2):
            text = (inputs["attention_mask"][b].bool() & ~visual[b]).nonzero().flatten()
            assert set(text.tolist()) <= set(stage.index[b].tolist())
    assert [len(k) for k in record.kept] == [len(k) for k in record.stages[-1].kept]
    assert all(k < n for k, n in zip(record.n_kept, record.n_visual))


@pytest.mark.parametrize("options,message", [
    (dict(ratio=0.5, alpha_v=1.5), r"alpha_v must be in \[-1.0, 1.0\]"),
    (dict(ratio=0.5, scope="crop"), "scope must be 'image'"),
    (dict(ratio=0.5, llm_keep="1.0,x"), "llm_keep must be comma-separated"),
    (dict(ratio=0.5, llm_keep="1.0,1.5"), r"llm_keep ratios must be in \(0, 1\]"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        V.VFlowOpt(**options)


def test_bad_options_are_refused_at_patch_time():
    model, _ = tm.build("llava_onevision")
    with pytest.raises(ValueError, match="llm_keep names 1 ratios for 2 stage layers"):
        vtr.patch(model, "vflowopt", ratio=0.5, llm_keep="0.5")
    with pytest.raises(ValueError, match=r"vision_layer must be in \[0, 1\] for this 2-layer vision tower"):
        vtr.patch(model, "vflowopt", ratio=0.5, vision_layer=2)
    with pytest.raises(ValueError, match="with other layers give llm_keep"):
        vtr.patch(model, "vflowopt", ratio=0.5, layers="2")
    llava, _ = tm.build("llava")
    with pytest.raises(ValueError, match="vflowopt does not support LlavaForConditionalGeneration"):
        vtr.patch(llava, "vflowopt", ratio=0.5)


def search_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "vflowopt_search.py"
    spec = importlib.util.spec_from_file_location("vflowopt_search", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_search_space_and_solved_last_ratio():
    """The official bounds at 25 % ((0.25, 0.375), (0.2 / 0.375, 1)) and its solved last ratio
    ``((28 T - r_v 9 - r_v r_1 9) / 10) / (r_v r_1)``."""
    search = search_module()
    (vit, first, t, m, alpha_v) = search.bounds(0.25)
    assert vit == (0.25, 0.375) and first == (0.2 / 0.375, 1.0) and t == (0.0, 50.0) and m == (3.0, 24.0)
    assert alpha_v == (-1.0, 1.0)
    r_v, r_1 = 0.3, 0.8
    official = min(1.0, ((28 * 0.25 - r_v * 9 - r_v * r_1 * 9) / 10) / (r_v * r_1))
    assert abs(search.last_ratio(0.25, r_v, r_1, V.OFFICIAL_LAYERS, V.OFFICIAL_DEPTH) - official) < 1e-12


def test_search_runs_on_the_tiny_model(tmp_path, capsys):
    pytest.importorskip("skopt")
    import json
    result = search_module().main(["--tiny", "--calls", "3", "--tiny-prompts", "1", "--out",
                                   str(tmp_path / "search.json")])
    assert len(result["history"]) == 3 and all(0 < h["similarity_sum"] <= 1 + 1e-5 for h in result["history"])
    best = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert best == result["best"]["options"]
    model, _ = tm.build("llava_onevision")
    vtr.patch(model, "vflowopt", **best).remove()  # the result is a valid option set


def test_videos_are_refused_naming_the_cause():
    """VFlowOpt prunes images: a video prompt gets a ValueError saying so (not a missing-signal message), and the
    patched model still serves images."""
    model, proc = tm.build("llava_onevision")
    with vtr.patch(model, "vflowopt", ratio=0.9) as handle, torch.no_grad():
        with pytest.raises(ValueError, match="vflowopt prunes images with vision-tower signals; this prompt holds a "
                                             "video"):
            model(**tm.video_inputs("llava_onevision", proc))
        model(**tm.image_inputs("llava_onevision", proc, 1))
        assert handle.last.n_kept[0] < handle.last.n_visual[0]
