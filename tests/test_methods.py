"""Each method selects what its paper's official code selects, checked against plain transcriptions of the
research specification (shared/research/methods_image.md) run on signals read from the unpatched model."""
import random
from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import reference as R
import tiny_models as tm
import vtr
from vtr import compat
from vtr.methods import dart as dart_module


def patched_forward(model, inputs, method, **options):
    with vtr.patch(model, method, **options) as handle:
        with torch.no_grad():
            model(**inputs)
    return handle.last


def unpatched_signals(model, inputs, own_positions=False):
    """One unpatched forward with its cache. ``own_positions``: number each row from its first real token, as the
    row alone (and official batch-1 code) would; Qwen-VL models do that themselves from the mask."""
    cache = DynamicCache(config=R.lm_of(model).config)
    extra = {}
    if own_positions and not hasattr(model.model, "rope_deltas"):
        extra["position_ids"] = (inputs["attention_mask"].long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**inputs, past_key_values=cache, use_cache=True, output_hidden_states=True,
                    output_attentions=True, **extra)
    return out, cache


@pytest.mark.parametrize("family", tm.FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_is_topk_of_eager_last_token_attention(family, batch):
    """Official: A = eager attention probs of layer K-1, mean over heads, row of the last token; top-k."""
    model, proc = tm.build(family, attn="eager")
    inputs = tm.image_inputs(family, proc, batch)
    record = patched_forward(model, inputs, "fastv", ratio=0.75, layer=2)
    out, _ = unpatched_signals(model, inputs)
    # [B, L]: layer K-1 = 1 (hybrid models return the attention of their softmax-attention layers only)
    types = compat.layer_types(compat.text_model(model))
    softmax = [i for i, t in enumerate(types) if t != "linear_attention"]
    attention = out.attentions[softmax.index(1) if len(out.attentions) < len(types) else 1].mean(1)[:, -1]
    for b, row in enumerate(record.layout.rows):
        expected = []
        for span in row.spans:
            candidates = (~span.newline).nonzero().flatten()  # newline tokens are always kept
            k = round(len(candidates) * 0.25)
            top = candidates[torch.topk(attention[b, span.positions[candidates]], k).indices]
            expected += [span.offset + top, span.offset + span.newline.nonzero().flatten()]
        assert torch.equal(record.kept[b], torch.cat(expected).sort().values)


def dart_official(keys, normed, text_positions, image, ratio, pivots=4):
    """Batch-1 transcription of DART's get_retained_image_token (keys: [H, L, d] post-RoPE, normed: [L, D],
    image: the sequence indices of the image's candidate tokens). Returns the kept sequence indices."""
    flat = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)
    n = len(image)
    piv_i = [image[i] for i in torch.topk(flat[image].abs().sum(-1), pivots).indices.tolist()]
    txt = [p for p in text_positions if p > image[-1]]
    piv_t = [txt[i] for i in torch.topk(flat[txt].abs().sum(-1), min(pivots, len(txt))).indices.tolist()]
    retained = set(piv_i + piv_t)
    pool = set(image) - set(piv_i)
    per_pivot = int(n * (1 - ratio) / (2 * pivots))
    for p in list(retained):
        cand = list(pool)
        sim = F.cosine_similarity(normed[p][None], normed[cand], dim=-1)
        pick = [cand[i] for i in torch.topk(-sim, min(per_pivot, len(cand))).indices.tolist()]
        retained |= set(pick)
        pool -= set(pick)
    retained -= set(piv_t)
    return sorted(retained)


@pytest.mark.parametrize("family", tm.FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_dart_matches_official_selection(family, batch):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, batch)
    record = patched_forward(model, inputs, "dart", ratio=0.75)
    seen = {}
    hook = R.lm_of(model).layers[2].register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0]))
    try:
        _, cache = unpatched_signals(model, inputs, own_positions=True)
    finally:
        hook.remove()
    keys = cache.layers[1].keys  # layer K-1 = 1, post-RoPE
    normed = R.lm_of(model).norm(seen["h"])  # the input of layer K = 2 (after Qwen3-VL's DeepStack additions)
    real = inputs["attention_mask"].bool()
    visual = record.layout.visual_mask()
    for b, row in enumerate(record.layout.rows):
        # The official code sees the row without its padding.
        slots = real[b].nonzero().flatten()
        local = {int(s): i for i, s in enumerate(slots)}
        text = [local[int(s)] for s in (real[b] & ~visual[b]).nonzero().flatten()]
        span = row.spans[0]
        image = [local[int(p)] for p in span.positions[~span.newline]]  # newline tokens are always kept
        kept = dart_official(keys[b][:, slots], normed[b][slots], text, image, 0.75)
        position_of = {local[int(p)]: i for i, p in enumerate(span.positions)}
        expected = sorted([position_of[p] for p in kept] + span.newline.nonzero().flatten().tolist())
        assert record.kept[b].tolist() == expected


def test_pivot_order_changes_the_selection():
    """Two pivots compete for the same least-similar candidate: whoever comes first takes it."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    c1, c2, c3 = torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, 2.0]), torch.tensor([2.0, -1.0])
    x = torch.stack([a, b, c1, c2, c3])
    pool = torch.tensor([2, 3, 4])
    assert sorted(vtr.kernels.pivot_least_similar(x, torch.tensor([0, 1]), pool, 1).tolist()) == [2, 4]
    assert sorted(vtr.kernels.pivot_least_similar(x, torch.tensor([1, 0]), pool, 1).tolist()) == [2, 3]


def test_cpython_set_order_matches_the_interpreter():
    """DART iterates its pivots in CPython set order; vtr computes that order without a set (compiled code does
    not iterate sets that way). Collisions, duplicates and table growth included."""
    assert dart_module.cpython_set_order([40, 45, 600, 612, 39, 700, 702, 601]) == [612, 39, 40, 45, 600, 601, 700,
                                                                                    702]  # the spec's example
    rng = random.Random(0)
    for _ in range(3000):
        values = [rng.randint(0, rng.choice([16, 100, 5000, 10 ** 6])) for _ in range(rng.randint(0, 40))]
        assert dart_module.cpython_set_order(values) == list(set(values))
    with pytest.raises(ValueError, match="non-negative"):
        dart_module.cpython_set_order([3, -1])


def divprune_official(features, k):
    """Transcription of DivPrune: first = argmax of each column's second-smallest distance, then max-min."""
    unit = F.normalize(features.float(), dim=-1)
    dist = 1 - unit @ unit.T
    first = int(torch.argmax(torch.sort(dist, dim=0).values[1]))
    chosen = [first]
    min_dist = dist[first].clone()
    for _ in range(k - 1):
        nxt = int(torch.argmax(min_dist))
        chosen.append(nxt)
        min_dist = torch.minimum(min_dist, dist[nxt])
    return sorted(chosen)


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_divprune_matches_official_selection(family):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2, "multi")
    record = patched_forward(model, inputs, "divprune", ratio=0.75)
    embeds = R.capture_lm_inputs(model, inputs)["embeds"]
    for b, row in enumerate(record.layout.rows):
        expected = []
        for span in row.spans:
            picks = divprune_official(embeds[b, span.positions], int(round(0.25 * span.n)))
            expected += [span.offset + p for p in picks]
        assert record.kept[b].tolist() == sorted(expected)


@pytest.mark.parametrize("family,grid,stride", [("llava", (8, 8), 2), ("qwen2_vl", (6, 10), 2)])
def test_uniform_downsamples_the_grid(family, grid, stride):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2)
    record = patched_forward(model, inputs, "uniform", ratio=0.75)
    row = record.layout.rows[1]
    assert row.spans[0].grid == (1, *grid)
    rows, cols = grid
    expected = [r * cols + c for r in range(rows) for c in range(cols)
                if r % stride == stride // 2 and c % stride == stride // 2]
    assert record.kept[1].tolist() == expected


def test_uniform_falls_back_to_evenly_spaced_raster_indices():
    model, proc = tm.build("llava")
    record = patched_forward(model, tm.image_inputs("llava", proc, 1), "uniform", keep=10)
    assert record.kept[0].tolist() == [int((i + 0.5) * 64 / 10) for i in range(10)]


def test_random_is_seeded_and_independent_of_the_batch_row():
    model, proc = tm.build("llava")
    two = tm.image_inputs("llava", proc, 2)
    one = tm.image_inputs("llava", proc, 1)
    a = patched_forward(model, two, "random", ratio=0.75, seed=3)
    b = patched_forward(model, one, "random", ratio=0.75, seed=3)
    c = patched_forward(model, one, "random", ratio=0.75, seed=4)
    assert torch.equal(a.kept[0], a.kept[1]) and torch.equal(a.kept[0], b.kept[0])
    assert not torch.equal(b.kept[0], c.kept[0])


def test_record_reports_stages_and_time():
    model, proc = tm.build("qwen2_vl")
    record = patched_forward(model, tm.image_inputs("qwen2_vl", proc, 2), "fastv", ratio=0.5, layer=3)
    assert [(s.stage, s.layer) for s in record.stages] == [("layer", 3)]
    assert record.stages[0].n_visual == record.n_visual == [64, 60]
    assert record.n_kept == [32, 30]
    assert record.selection_seconds > 0


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_layer_signals_without_a_cache(method):
    """Without a KV cache the keys of layer K-1 are recomputed from its inputs: same selection."""
    model, proc = tm.build("qwen2_5_vl")
    inputs = tm.image_inputs("qwen2_5_vl", proc, 2)
    with vtr.patch(model, method, ratio=0.75) as handle:
        with torch.no_grad():
            cached = model(**inputs, use_cache=True).logits
            with_cache = handle.last.kept
            uncached = model(**inputs, use_cache=False).logits
            without = handle.last.kept
    assert all(torch.equal(a, b) for a, b in zip(with_cache, without))
    assert torch.allclose(cached, uncached, atol=1e-5)


# ------------------------------------------------------------------------------------------ vision-side methods
def vision_tower_outputs(model, inputs):
    """The unpatched vision tower run with eager attention probabilities on every crop the model encodes, as the
    official LLaVA code runs it: (attentions, hidden_states) tuples over layers, each ``[n_crops, ...]``."""
    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:  # LLaVA-NeXT: the real crops of each image, in order
        counts = crops_per_image(model, inputs)
        pixels = torch.cat([p[:n] for p, n in zip(pixels, counts)])
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    return out.attentions, out.hidden_states


def crops_per_image(model, inputs):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    return [image_size_to_num_patches(s, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
            for s in inputs["image_sizes"].tolist()]


def token_sources(model, inputs):
    """Per image, ``[n]`` (crop * 10_000 + patch index) of each language-model visual token (-1: newline),
    derived by running transformers' own feature packing on labelled features."""
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    if inputs["pixel_values"].dim() == 4:  # LLaVA-1.5: one crop per image, [CLS] dropped
        return [torch.arange(1, n + 1) + 10_000 * i for i in range(len(inputs["pixel_values"]))]
    counts = crops_per_image(model, inputs)
    labels = (torch.arange(sum(counts))[:, None] * 10_000 + torch.arange(1, n + 1)[None]).double()[..., None]
    packed, lengths = model.model.pack_image_features(list(torch.split(labels, counts)), inputs["image_sizes"],
                                                      "default", image_newline=torch.tensor([-1.0]).double())
    return [p[:, 0].long() for p in packed]  # one [n, 1] tensor per image


def image_patches(record, model, inputs):
    """Per row, per image span: ``(span, cand, crop, patch)``: the span's tokens that come from a vision patch
    (``cand``, indices in the span) and that patch's crop and token index in the vision tower's sequence."""
    sources, k, rows = token_sources(model, inputs), 0, []
    for row in record.layout.rows:
        spans = []
        for span in row.spans:
            src = sources[k]
            k += 1
            cand = (src >= 0).nonzero().flatten()
            spans.append((span, cand, src[cand] // 10_000, src[cand] % 10_000))
        rows.append(spans)
    return rows


def span_scores(record, inputs, model, per_crop):
    """Per row, per image span: (candidate token indices in the span, the value of ``per_crop[crop, patch]``)."""
    return [[(span, cand, per_crop[crop, patch]) for span, cand, crop, patch in row]
            for row in image_patches(record, model, inputs)]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("batch,variant", [(1, "single"), (2, "multi")])
def test_fastervlm_keeps_the_top_cls_attention(family, batch, variant):
    """Official: a = attentions[-2][:, :, 0, 1:] (eager CLIP probabilities of the feature layer) mean over heads;
    top-T per image; newline tokens (LLaVA-NeXT) are always kept."""
    model, proc = tm.build(family, attn="eager")
    inputs = tm.image_inputs(family, proc, batch, variant)
    record = patched_forward(model, inputs, "fastervlm", ratio=0.75)
    attentions, _ = vision_tower_outputs(model, inputs)
    cls = attentions[-2][:, :, 0].mean(1)  # [n_crops, N], [CLS] included at index 0
    for b, spans in enumerate(span_scores(record, inputs, model, cls)):
        expected = []
        for span, candidates, scores in spans:
            top = candidates[torch.topk(scores, round(len(candidates) * 0.25)).indices]
            expected += [span.offset + top, span.offset + span.newline.nonzero().flatten()]
        assert record.kept[b].tolist() == torch.cat(expected).sort().values.tolist()


def vision_layer_keys(model, hidden_states):
    """Head-mean keys of the feature layer (-2), recomputed from its input: ``[n_crops, N, d]`` (what the official
    patched CLIPAttention stores as ``metric``)."""
    layer = model.model.vision_tower.encoder.layers[-2]
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.layer_norm1(hidden_states[-3]))
    n, N, _ = keys.shape
    return keys.view(n, N, layer.self_attn.num_heads, -1).mean(2)


def visionzip_official(cls, keys, hidden, budget):
    """Transcription of VisionZip for one image's candidates (sequence order), without a [CLS] slot: top-D
    dominant, strided targets over the rest, nearest target by normalised key, target + mean(members). Returns
    (kept candidate indices, {target candidate index: merged hidden state})."""
    contextual = budget * 5 // 32
    dominant = torch.topk(cls, budget - contextual).indices.tolist()
    rest = [i for i in range(len(cls)) if i not in dominant]
    if contextual == 0:
        return sorted(dominant), {}
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    unit = keys[rest] / keys[rest].norm(dim=-1, keepdim=True)
    members = {t: [] for t in targets}
    for o in range(len(rest)):
        if o in targets:
            continue
        sims = [float(unit[o] @ unit[t]) for t in targets]
        best = max(range(len(targets)), key=lambda j: (sims[j], -j))  # ties: the first target
        members[targets[best]].append(rest[o])
    merged = {rest[t]: hidden[rest[t]] + (hidden[m].mean(0) if m else 0) for t, m in members.items()}
    return sorted(dominant + list(merged)), merged


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("batch,variant,budget", [(1, "single", {"keep": 20}), (2, "multi", {"ratio": 0.75})])
def test_visionzip_matches_official_selection_and_merges(family, batch, variant, budget):
    model, proc = tm.build(family, attn="eager")
    inputs = tm.image_inputs(family, proc, batch, variant)
    record = patched_forward(model, inputs, "visionzip", **budget)
    attentions, hidden_states = vision_tower_outputs(model, inputs)
    cls = attentions[-2][:, :, 0].sum(1)  # official: summed over heads
    keys, hidden = vision_layer_keys(model, hidden_states), hidden_states[-2]
    patches = image_patches(record, model, inputs)
    n_merged = 0
    for b, row in enumerate(record.layout.rows):
        expected, merged_rows = [], {}
        got = {int(i): e for i, e in zip(record.merged[b].kept, record.merged[b].embeds)}
        for span, cand, crop, patch in patches[b]:
            T = budget["keep"] if "keep" in budget else round(len(cand) * (1 - budget["ratio"]))
            kept, merged = visionzip_official(cls[crop, patch], keys[crop, patch], hidden[crop, patch],
                                              min(T, len(cand)))
            expected += [span.offset + cand[kept], span.offset + span.newline.nonzero().flatten()]
            for c, h in merged.items():
                merged_rows[span.offset + int(cand[c])] = model.model.multi_modal_projector(h)
        assert record.kept[b].tolist() == torch.cat(expected).sort().values.tolist()
        assert sorted(got) == sorted(merged_rows)
        for i, embed in merged_rows.items():
            assert torch.allclose(got[i], embed, atol=1e-5)
        n_merged += len(got)
    assert n_merged > 0


def vispruner_official(cls, features, budget, important_ratio):
    """Loop transcription of VisPruner's encode_images for one image's candidates: important by [CLS] attention,
    then rounds of A/B split of the residual order, dropping the most duplicated A tokens."""
    order = sorted(range(len(cls)), key=lambda i: (-float(cls[i]), i))
    n_important = int(budget * important_ratio)
    important, residual, n_diverse = order[:n_important], order[n_important:], budget - n_important
    unit = features / features.norm(dim=-1, keepdim=True)
    while n_diverse > 0:
        drop = min(8, len(residual) - n_diverse)
        if drop <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        best = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda i: (-best[i], i))
        residual = [a[i] for i in ranked[drop:]] + b
    return sorted(important + (residual if n_diverse > 0 else []))


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("batch,variant,budget,important", [(1, "single", {"keep": 40}, 0.5),
                                                            (2, "multi", {"ratio": 0.75}, 0.5),
                                                            (1, "single", {"keep": 21}, 0.75)])
def test_vispruner_matches_official_selection(family, batch, variant, budget, important):
    model, proc = tm.build(family, attn="eager")
    inputs = tm.image_inputs(family, proc, batch, variant)
    record = patched_forward(model, inputs, "vispruner", important_ratio=important, **budget)
    attentions, hidden_states = vision_tower_outputs(model, inputs)
    cls, features = attentions[-2][:, :, 0].mean(1), hidden_states[-2]
    patches = image_patches(record, model, inputs)
    for b, row in enumerate(record.layout.rows):
        expected = []
        for span, cand, crop, patch in patches[b]:
            T = budget["keep"] if "keep" in budget else round(len(cand) * (1 - budget["ratio"]))
            kept = vispruner_official(cls[crop, patch], features[crop, patch], min(T, len(cand)), important)
            expected += [span.offset + cand[kept], span.offset + span.newline.nonzero().flatten()]
        assert record.kept[b].tolist() == torch.cat(expected).sort().values.tolist()


def vispruner_official_round(unit, residual_indices, diverse_token_num):
    """One round of VisPruner's official duplicate removal, its tensor code as written (batch 1)."""
    B, R = 1, residual_indices.shape[1]
    r = min(8, R - diverse_token_num)
    residual_tokens = unit[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
    a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
    scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
    distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
    return torch.cat([residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r),
                                                 distinct_indices], residual_indices[..., 1::2]], dim=-1)


def test_vispruner_decides_where_the_official_code_is_undefined():
    """What vtr decides and its docstring lists: a round that must drop more tokens than group A holds (here R =
    10 residual tokens for 2 diverse ones: r = 8 > |A| = 5) raises in the official code; vtr drops all of A and
    goes on, ending at exactly T_div. Ties (equal scores) go to the lower index, where the official argsort is
    unstable."""
    from vtr.methods.vispruner import remove_duplicates
    unit = F.normalize(torch.randn(1, 12, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    with pytest.raises(RuntimeError):
        vispruner_official_round(unit, torch.arange(10)[None], 2)
    assert vispruner_official_round(unit, torch.arange(12)[None], 8).shape == (1, 8)  # a defined round
    assert remove_duplicates(unit[0], torch.arange(10), 2).tolist() == [3, 7]  # B [1,3,5,7,9], then B of that
    same = F.normalize(torch.ones(12, 4), dim=-1)  # every A token equally duplicated: the lowest indices drop
    assert remove_duplicates(same, torch.arange(12), 8).tolist() == [8, 10, 1, 3, 5, 7, 9, 11]


def hiprune_official(shallow, deep, crop, patch, budget, alpha, side, cells=None):
    """Transcription of HiPrune's encode_images for one image's candidates: anchors = top round(T * alpha / 5) of
    the object layer's global attention, buffers = anchor patches -1, +1, -side, +side in the same crop (clamped
    to ``cells``, side * side by default; no row-wrap check), registers = top of the feature layer's global
    attention among the rest."""
    cells = side * side if cells is None else cells
    anchors = torch.topk(shallow, round(budget * alpha / 5)).indices.tolist()
    where = {(int(c), int(p)): i for i, (c, p) in enumerate(zip(crop, patch))}
    group = set()
    for a in anchors:
        for offset in (0, -1, 1, -side, side):
            i = where.get((int(crop[a]), min(max(int(patch[a]) + offset, 0), cells - 1)))
            if i is not None:
                group.add(i)
    assert len(group) < budget  # the official code's own precondition
    rest = deep.clone()
    rest[list(group)] -= 1  # official: attention <= 1, so these are never registers
    registers = torch.topk(rest, budget - len(group)).indices.tolist()
    return sorted(group | set(registers)), len(anchors)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("object_layer", [3, 9])
@pytest.mark.parametrize("batch,variant,budget,alpha", [(1, "single", {"keep": 40}, 0.5),
                                                        (2, "multi", {"ratio": 0.75}, 1.0)])
def test_hiprune_matches_official_selection(family, object_layer, batch, variant, budget, alpha):
    model, proc = tm.build(family, attn="eager")
    inputs = tm.image_inputs(family, proc, batch, variant)
    record = patched_forward(model, inputs, "hiprune", object_layer=object_layer, alpha=alpha, **budget)
    attentions, _ = vision_tower_outputs(model, inputs)
    shallow = attentions[object_layer - 1].mean(1).mean(1)  # [n_crops, N]: received, [CLS] query included
    deep = attentions[-2].mean(1).mean(1)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    patches = image_patches(record, model, inputs)
    anchors = 0
    for b, row in enumerate(record.layout.rows):
        expected = []
        for span, cand, crop, patch in patches[b]:
            T = budget["keep"] if "keep" in budget else round(len(cand) * (1 - budget["ratio"]))
            kept, n_anchors = hiprune_official(shallow[crop, patch], deep[crop, patch], crop, patch - 1,
                                               min(T, len(cand)), alpha, side)
            anchors += n_anchors
            expected += [span.offset + cand[kept], span.offset + span.newline.nonzero().flatten()]
        assert record.kept[b].tolist() == torch.cat(expected).sort().values.tolist()
    assert anchors > 0


def test_hiprune_refuses_an_object_layer_the_tower_lacks():
    model, _ = tm.build("llava")
    with pytest.raises(ValueError, match=r"hiprune: object_layer must be in \[1, 10\] for this 10-layer vision"):
        vtr.patch(model, "hiprune", ratio=0.5, object_layer=11)


def dpp_official(kernel, k):
    """Transcription of CDPruner's fast greedy MAP loop (cis / di2s), one item at a time."""
    n = kernel.shape[0]
    cis = torch.zeros(k, n, dtype=kernel.dtype)
    di2s = torch.diagonal(kernel).clone()
    picks = []
    for i in range(k):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kernel[j] - sum((cis[t, j] * cis[t] for t in range(i)), torch.zeros(n))) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= eis ** 2
        di2s[j] = -float("inf")
    return sorted(picks)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("batch,variant,budget", [(1, "single", {"keep": 20}), (2, "multi", {"ratio": 0.75})])
def test_cdpruner_matches_official_selection(family, batch, variant, budget):
    """Official: F = projected features, S = cos(F); relevance = -mean cos(visual_projection(post_layernorm(
    hidden[-2])), CLIP text embeds of the instruction in 77-token (here 6-token) segments), min-max normalised;
    kernel diag(r) S diag(r); greedy DPP. The instruction is the text after the image, read back with the
    language model's tokenizer."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, batch, variant)
    record = patched_forward(model, inputs, "cdpruner", **budget)
    expected, segments = cdpruner_clip_official(model, proc, inputs, record, budget)
    assert [k.tolist() for k in record.kept] == expected
    assert segments > 1  # the instruction spans several text-tower segments


def cdpruner_clip_official(model, proc, inputs, record, budget, per_crop=False):
    """Transcription of CDPruner's official encode_images with CLIP relevance, per image of each row: relevance
    = -mean cos(visual_projection(post_layernorm(hidden[-2])), CLIP text embeds of the instruction in 77-token
    (here 6-token) segments), min-max normalised over the image's candidates (all its crops: the official code
    normalises over every crop it encodes); kernel diag(r) S diag(r) of the projected features; greedy DPP over
    the image, or (``per_crop``) one DPP per crop with the crop's own budget. Returns (kept ids per row, text
    segments)."""
    clip, clip_tok = tm.tiny_clip("")
    _, hidden_states = vision_tower_outputs(model, inputs)
    embeds = R.capture_lm_inputs(model, inputs)["embeds"]
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    kept_rows = []
    for b, row in enumerate(image_patches(record, model, inputs)):
        expected = []
        for span, cand, crop, patch in row:
            after = [int(t) for i, t in enumerate(ids[b]) if i > int(span.positions.max()) and real[b, i]
                     and int(t) != model.config.image_token_id]
            text = proc.tokenizer.decode(after, skip_special_tokens=True).strip()
            enc = clip_tok(text=text, return_tensors="pt")
            length = clip.config.text_config.max_position_embeddings
            pad = length * ((enc["input_ids"].shape[1] - 1) // length + 1) - enc["input_ids"].shape[1]
            segments = {key: torch.cat([v, v.new_zeros(1, pad)], 1).reshape(-1, length) for key, v in enc.items()}
            with torch.no_grad():
                text_embeds = clip.get_text_features(**segments).pooler_output
                image_embeds = clip.visual_projection(
                    model.model.vision_tower.post_layernorm(hidden_states[-2][crop, patch]).float())
            image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
            text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
            relevance = (-(image_embeds @ text_embeds.T)).mean(-1)
            relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
            groups = [crop == c for c in crop.unique().tolist()] if per_crop else [torch.ones_like(crop).bool()]
            for members in groups:
                where = members.nonzero().flatten()
                features = embeds[b, span.positions[cand[where]]]
                unit = features / features.norm(dim=-1, keepdim=True)
                similarity = unit.float() @ unit.float().T
                r = relevance[where]
                kernel = r[:, None] * similarity * r[None, :]
                T = budget["keep"] if "keep" in budget else round(len(where) * (1 - budget["ratio"]))
                picks = dpp_official(kernel, min(T, len(where)))
                expected.append(span.offset + cand[where[picks]])
            expected.append(span.offset + span.newline.nonzero().flatten())
        kept_rows.append(torch.cat(expected).sort().values.tolist())
    return kept_rows, len(segments["input_ids"])


@pytest.mark.parametrize("batch,variant,budget", [(1, "single", {"keep": 12}), (2, "multi", {"ratio": 0.75})])
def test_cdpruner_per_crop_normalises_relevance_over_the_image(batch, variant, budget):
    """LLaVA-NeXT with scope="crop" (the official per-crop budget): the official code min-max normalises the
    relevance over all crops of the image at once, then runs one DPP per crop."""
    model, proc = tm.build("llava_next")
    inputs = tm.image_inputs("llava_next", proc, batch, variant)
    record = patched_forward(model, inputs, "cdpruner", scope="crop", **budget)
    expected, _ = cdpruner_clip_official(model, proc, inputs, record, budget, per_crop=True)
    assert [k.tolist() for k in record.kept] == expected
    crops = [len(crop.unique()) for row in image_patches(record, model, inputs) for _, _, crop, _ in row]
    assert min(crops) > 1  # every image has tiles besides its base image


def test_cdpruner_relevance_changes_the_selection():
    """The instruction matters: another question after the same image selects other tokens."""
    model, proc = tm.build("llava")
    image = tm.random_image(64, 64)
    kept = []
    for question in ("what is in this image ?", "describe the big red dog on the left ."):
        inputs = proc(text=[f"USER : <image> {question} ASSISTANT :"], images=[image], return_tensors="pt")
        kept.append(patched_forward(model, inputs, "cdpruner", ratio=0.75).kept[0])
    assert not torch.equal(kept[0], kept[1])


def cdpruner_embeddings_reference(model, inputs, record, budget, weight=1.0, split=0):
    """CDPruner with the language model's embeddings as the instruction (OpenVINO GenAI's Qwen-VL variant): text =
    mean input embedding of the prompt's tokens outside the visual spans and their delimiters; relevance =
    cos(projected token, text), min-max normalised; kernel diag(q) S diag(q) with q = r (weight 1), 1 (weight 0)
    or exp(a r); greedy DPP; with ``split``, two halves in token order selecting T // 2 and T - T // 2."""
    embeds = R.capture_lm_inputs(model, inputs)["embeds"]
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    framing = {model.config.image_token_id, getattr(model.config, "vision_start_token_id", -1),
               getattr(model.config, "vision_end_token_id", -1)}
    kept = []
    for b, row in enumerate(record.layout.rows):
        visual = {int(p) for span in row.spans for p in span.positions}
        text = [i for i in range(ids.shape[1]) if real[b, i] and i not in visual and int(ids[b, i]) not in framing]
        text_embedding = embeds[b, text].float().mean(0)
        expected = []
        for span in row.spans:
            cand = (~span.newline).nonzero().flatten()
            features = embeds[b, span.positions[cand]].float()
            T = budget["keep"] if "keep" in budget else max(1, round(len(cand) * (1 - budget["ratio"])))
            T = min(T, len(cand))
            parts = [(0, len(cand), T)]
            if split and len(cand) > split:
                half = len(cand) // 2
                parts = [(0, half, T // 2), (half, len(cand), T - T // 2)]
            picks = []
            for start, stop, k in parts:
                unit = features[start:stop] / features[start:stop].norm(dim=-1, keepdim=True)
                relevance = unit @ (text_embedding / text_embedding.norm())
                relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
                if weight in (0.0, 1.0):
                    quality = relevance if weight == 1.0 else torch.ones_like(relevance)
                else:
                    quality = torch.exp(weight / (2 * (1 - weight)) * relevance)
                kernel = quality[:, None] * (unit @ unit.T) * quality[None, :]
                picks += [start + p for p in dpp_official(kernel, k)]
            expected += [span.offset + cand[sorted(picks)], span.offset + span.newline.nonzero().flatten()]
        kept.append(torch.cat(expected).sort().values.tolist())
    return kept


@pytest.mark.parametrize("family,options", [
    ("qwen2_vl", {}), ("qwen2_5_vl", {}), ("qwen3_vl", {}), ("llava_onevision", {}),
    ("llava", {"relevance": "embeddings"}),
    ("qwen2_vl", {"relevance_weight": 0.5}), ("qwen2_vl", {"relevance_weight": 0.0}),
    ("qwen2_vl", {"split_threshold": 20}), ("llava_onevision", {"split_threshold": 10, "relevance_weight": 0.8}),
])
@pytest.mark.parametrize("batch,variant,budget", [(1, "single", {"keep": 12}), (2, "multi", {"ratio": 0.75})])
def test_cdpruner_with_language_model_embeddings_matches_openvino(family, options, batch, variant, budget):
    """Models without a CLIP text tower: the relevance is the language model's own embedding of the instruction
    (OpenVINO GenAI's CDPruner for Qwen-VL), with its relevance_weight and split options."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, batch, variant)
    record = patched_forward(model, inputs, "cdpruner", **budget, **options)
    weight = options.get("relevance_weight", 1.0)
    expected = cdpruner_embeddings_reference(model, inputs, record, budget, weight, options.get("split_threshold", 0))
    assert [k.tolist() for k in record.kept] == expected


def cdpruner_openvino_reference(model, inputs, record, budget, weight=0.5, split=1):
    """OpenVINO GenAI's default CDPruner, transcribed from its compiled graph (conditional_kernel.cpp:
    create_conditional_kernel_model) and cdpruner.cpp: per image, keep T = std::round(n * (1 - ratio)); with more
    than ``split`` tokens, two halves in token order keeping T / 2 and T - T / 2, each its own graph: v = x /
    sqrt(|x|^2 + 1e-6), t likewise (mean input embedding of the text outside the vision regions), r = mean(v t^T),
    r = (r - min) / (max - min + 1e-6), S = v v^T, kernel = S * (1 - w) + ((r_i * S) * r_j) * w; greedy DPP."""
    embeds = R.capture_lm_inputs(model, inputs)["embeds"]
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    framing = {model.config.image_token_id, getattr(model.config, "vision_start_token_id", -1),
               getattr(model.config, "vision_end_token_id", -1)}
    eps, w = 1e-6, torch.tensor(weight, dtype=torch.float32)
    kept = []
    for b, row in enumerate(record.layout.rows):
        visual = {int(p) for span in row.spans for p in span.positions}
        text = [i for i in range(ids.shape[1]) if real[b, i] and i not in visual and int(ids[b, i]) not in framing]
        t = embeds[b, text].float().mean(0, keepdim=True)
        t = t / torch.sqrt((t * t).sum(-1, keepdim=True) + eps)
        expected = []
        for span in row.spans:
            cand = (~span.newline).nonzero().flatten()
            x = embeds[b, span.positions[cand]].float()
            n = len(cand)
            if "keep" in budget:
                T = min(budget["keep"], n)
            else:
                T = int(Decimal(n * (1 - budget["ratio"])).quantize(Decimal(1), rounding=ROUND_HALF_UP))
            parts = [(0, n, T)] if not (split and n > split) else [(0, n // 2, T // 2), (n // 2, n, T - T // 2)]
            picks = []
            for start, stop, k in parts:
                v = x[start:stop] / torch.sqrt((x[start:stop] * x[start:stop]).sum(-1, keepdim=True) + eps)
                r = (v @ t.T).mean(-1)
                r = (r - r.min()) / (r.max() - r.min() + eps)
                S = v @ v.T
                kernel = S * (1 - w) + ((r[:, None] * S) * r[None, :]) * w
                picks += [start + p for p in dpp_official(kernel, k)]
            expected += [span.offset + cand[sorted(picks)], span.offset + span.newline.nonzero().flatten()]
        kept.append(torch.cat(expected).sort().values.tolist())
    return kept


@pytest.mark.parametrize("family,options", [
    ("qwen2_vl", {}), ("qwen3_vl", {}), ("llava_onevision", {}),
    ("qwen2_5_vl", {"relevance_weight": 0.8, "split_threshold": 0}),
    ("llava_onevision", {"relevance_weight": 1.0, "split_threshold": 30}),
])
@pytest.mark.parametrize("batch,variant,budget", [(1, "single", {"keep": 12}), (2, "multi", {"ratio": 0.5})])
def test_cdpruner_openvino_kernel_matches_openvino_default(family, options, batch, variant, budget):
    """kernel="openvino": OpenVINO GenAI's default graph (weight 0.5, split threshold 1 unless given), on the
    language model's embeddings of the instruction, against a transcription of its code."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, batch, variant)
    record = patched_forward(model, inputs, "cdpruner", kernel="openvino", **budget, **options)
    expected = cdpruner_openvino_reference(model, inputs, record, budget, options.get("relevance_weight", 0.5),
                                           options.get("split_threshold", 1))
    assert [k.tolist() for k in record.kept] == expected


def test_cdpruner_kernel_defaults_and_openvino_rounding():
    paper, openvino = vtr.CDPruner(ratio=0.5), vtr.CDPruner(ratio=0.5, kernel="openvino")
    assert (paper.relevance_weight, paper.split_threshold) == (1.0, 0)
    assert (openvino.relevance_weight, openvino.split_threshold) == (0.5, 1)
    assert paper.budget(25) == 12 and openvino.budget(25) == 13  # Python round vs std::round (half away from 0)
    assert vtr.CDPruner(keep=7, kernel="openvino").budget(25) == 7
    with pytest.raises(ValueError, match=r"kernel must be one of \('paper', 'openvino'\)"):
        vtr.CDPruner(ratio=0.5, kernel="exp")
    # the paper kernel with 0 < w < 1 is OpenVINO's fallback path: exp(a r) quality, a = w / (2 (1 - w))
    from vtr.methods.cdpruner import blended_kernel, conditional_kernel
    S, r = torch.eye(3) + 0.1, torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(conditional_kernel(S, r, 0.5), torch.exp(0.5 * r)[:, None] * S * torch.exp(0.5 * r))
    assert torch.allclose(blended_kernel(S, r, 0.5), 0.5 * S + 0.5 * r[:, None] * S * r[None, :])


def test_cdpruner_clip_relevance_needs_a_clip_tower():
    model, _ = tm.build("qwen2_vl")
    with pytest.raises(ValueError, match=r"relevance='clip' needs a CLIP vision tower .* use relevance='embeddings'"):
        vtr.patch(model, "cdpruner", ratio=0.5, relevance="clip")
    with pytest.raises(ValueError, match=r"relevance must be one of \('auto', 'clip', 'embeddings'\)"):
        vtr.patch(model, "cdpruner", ratio=0.5, relevance="text")


def qwen_block_attention_inputs(model, inputs):
    """Unpatched forward recording every Qwen2.5-VL vision block's attention input and call arguments."""
    seen = {}

    def hook(i):
        def record(module, args, kwargs):
            seen[i] = (module, kwargs.get("hidden_states", args[0] if args else None), kwargs)
        return record

    handles = [blk.attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, blk in enumerate(model.model.visual.blocks)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def qwen_block_eager_attention(attn, hidden, kwargs, rotate):
    """A Qwen-VL vision block's eager attention as the official ports compute it: weights ``[heads, S, S]`` (fp32
    softmax, block-diagonal mask over ``cu_seqlens``) and keys ``[heads, S, d]`` after the vision RoPE (``rotate``)."""
    S = hidden.shape[0]
    with torch.no_grad():
        q, k, _ = attn.qkv(hidden).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotate(q, k, *kwargs["position_embeddings"])
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        mask = torch.full((1, S, S), torch.finfo(q.dtype).min)
        bounds = kwargs["cu_seqlens"].tolist()
        for i in range(1, len(bounds)):
            mask[..., bounds[i - 1]:bounds[i], bounds[i - 1]:bounds[i]] = 0
        weights = (torch.matmul(q, k.transpose(1, 2)) / attn.head_dim ** 0.5 + mask).softmax(-1, dtype=torch.float32)
    return weights, k


def qwen_hiprune_scores(model, capture, grid_thw):
    """Transcription of HiPrune's Qwen2.5-VL vision forward for one block: eager attention weights with a
    block-diagonal mask over cu_seqlens, mean over heads, sum over queries, mean over each merge unit's 4
    patches, then [reverse_indices] back to merged-token order."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
    from transformers.vision_utils import get_vision_window_index
    attn, hidden, kwargs = capture
    S = hidden.shape[0]
    weights, _ = qwen_block_eager_attention(attn, hidden, kwargs, qwen.apply_rotary_pos_emb_vision)
    weights = weights.mean(0).sum(0).view(S // 4, -1).mean(-1)
    visual = model.model.visual
    window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                              visual.patch_size)
    return weights[torch.argsort(window_index)]


@pytest.mark.parametrize("batch,variant,budget,alpha,object_layer", [(1, "single", {"keep": 40}, 0.5, 0),
                                                                     (2, "multi", {"ratio": 0.75}, 1.0, 3)])
def test_hiprune_qwen25_matches_official_selection(batch, variant, budget, alpha, object_layer):
    """Qwen2.5-VL: one received-attention score per merged token (official: mean over heads, sum over the
    queries of each block's segments, mean over the merge unit), anchors on the merged grid of width grid_w / 2,
    registers from the last block; default object layer 16."""
    model, proc = tm.build("qwen2_5_vl", attn="eager")
    inputs = tm.image_inputs("qwen2_5_vl", proc, batch, variant)
    record = patched_forward(model, inputs, "hiprune", object_layer=object_layer, alpha=alpha, **budget)
    captures = qwen_block_attention_inputs(model, inputs)
    shallow = qwen_hiprune_scores(model, captures[(object_layer or 16) - 1], inputs["image_grid_thw"])
    deep = qwen_hiprune_scores(model, captures[len(captures) - 1], inputs["image_grid_thw"])
    first, anchors = 0, 0
    for b, row in enumerate(record.layout.rows):
        expected = []
        for span in row.spans:
            n, width = span.n, span.grid[2]
            T = budget["keep"] if "keep" in budget else round(n * (1 - budget["ratio"]))
            kept, n_anchors = hiprune_official(shallow[first:first + n], deep[first:first + n], torch.zeros(n),
                                               torch.arange(n), min(T, n), alpha, width, cells=n)
            anchors += n_anchors
            expected.append(span.offset + torch.tensor(kept))
            first += n
        assert record.kept[b].tolist() == torch.cat(expected).sort().values.tolist()
    assert anchors > 0


def lightcompress_qwen_signals(model, capture, grid_thw):
    """Transcription of LightCompress's Qwen2.5-VL port of VisionZip / VisPruner (``visionzip.py`` /
    ``vispruner.py``: ``Qwen2_5_VLVisionAttention_forward`` on the last block, then ``merger_hook``) for one block:
    eager attention weights with a block-diagonal mask over cu_seqlens, mean over heads, summed over the queries,
    averaged over each merge unit's 4 patches; the keys after the vision RoPE averaged over the unit, then over
    heads; both put back in merged-token order (``reverse_indices``; the identity without window attention)."""
    import sys
    attn, hidden, kwargs = capture
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    S = hidden.shape[0]
    weights, k = qwen_block_eager_attention(attn, hidden, kwargs, rotate)
    received = weights.mean(0).sum(0).view(S // 4, -1).mean(-1)
    keys = k.view(k.shape[0], S // 4, 4, -1).mean(2)
    visual = model.model.visual
    order = torch.arange(S // 4)
    if hasattr(visual, "window_size"):
        from transformers.vision_utils import get_vision_window_index
        order = torch.argsort(get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                                      visual.patch_size)[0])
    return received[order], keys[:, order].mean(0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "glm4v"])
@pytest.mark.parametrize("method,batch,variant,budget", [("vispruner", 1, "single", {"keep": 12}),
                                                         ("vispruner", 2, "multi", {"ratio": 0.75}),
                                                         ("visionzip", 1, "single", {"keep": 20}),
                                                         ("visionzip", 2, "multi", {"ratio": 0.6})])
def test_global_attention_substitute_matches_lightcompress(family, method, batch, variant, budget):
    """VisionZip and VisPruner on towers without [CLS] (VisPruner#1; LightCompress's Qwen2.5-VL ports): the
    received attention of the last block per merged token, the merged tokens (the merger's outputs) as features,
    VisionZip's keys after the vision RoPE; per image. On Qwen3-VL VisionZip merges the DeepStack features too."""
    model, proc = tm.build(family, attn="eager")
    inputs = tm.image_inputs(family, proc, batch, variant)
    record = patched_forward(model, inputs, method, **budget)
    captures = qwen_block_attention_inputs(model, inputs)
    received, keys = lightcompress_qwen_signals(model, captures[len(captures) - 1], inputs["image_grid_thw"])
    lm = R.capture_lm_inputs(model, inputs)
    levels = lm.get("deepstack") or []
    rank = (lm["visual_pos_masks"].flatten().long().cumsum(0) - 1).view_as(lm["visual_pos_masks"]) if levels else None
    first, n_merged = 0, 0
    for b, row in enumerate(record.layout.rows):
        expected, merged_rows = [], {}
        for span in row.spans:
            n = span.n
            T = min(budget["keep"] if "keep" in budget else round(n * (1 - budget["ratio"])), n)
            embeds = lm["embeds"][b, span.positions]
            if method == "vispruner":
                kept = vispruner_official(received[first:first + n], embeds, T, 0.5)
            else:
                features = torch.cat([embeds] + [level[rank[b, span.positions]] for level in levels], -1)
                kept, merged = visionzip_official(received[first:first + n], keys[first:first + n], features, T)
                merged_rows.update({span.offset + c: h for c, h in merged.items()})
            expected.append(span.offset + torch.tensor(kept))
            first += n
        assert record.kept[b].tolist() == torch.cat(expected).sort().values.tolist()
        if method == "visionzip":
            got = record.merged[b]
            assert sorted(got.kept.tolist()) == sorted(merged_rows)
            D = lm["embeds"].shape[-1]
            for i, embed, deep in zip(got.kept.tolist(), got.embeds, got.deepstack if levels else got.embeds):
                assert torch.allclose(embed, merged_rows[i][:D], atol=1e-5)
                if levels:  # Qwen3-VL: each DeepStack level merged as the main features
                    assert torch.allclose(deep, merged_rows[i][D:], atol=1e-5)
            assert (got.deepstack is not None) == bool(levels)
            n_merged += len(got.kept)
    assert method == "vispruner" or n_merged > 0


def test_global_attention_substitute_options():
    """importance: "cls" (official, [CLS] towers) or "global" (the substitute, the default without [CLS]); "cls" on
    a tower without [CLS] is refused; the other [CLS] methods stay refused on such towers, naming the reason."""
    model, _ = tm.build("qwen2_vl")
    for method in ("visionzip", "vispruner"):
        with vtr.patch(model, method, ratio=0.5) as handle:
            assert handle.method.importance == "global" and handle.method.positions == "original"
        with pytest.raises(ValueError, match=r"importance='cls' needs a vision tower with a \[CLS\] token"):
            vtr.patch(model, method, ratio=0.5, importance="cls")
        with pytest.raises(ValueError, match=r"importance must be one of \('cls', 'global'\)"):
            vtr.patch(model, method, ratio=0.5, importance="mean")
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        vtr.patch(model, "fastervlm", ratio=0.5)
    llava, proc = tm.build("llava", attn="eager")
    with vtr.patch(llava, "vispruner", ratio=0.5) as handle:
        assert handle.method.importance == "cls"
    inputs = tm.image_inputs("llava", proc, 1, "single")
    cls = patched_forward(llava, inputs, "vispruner", ratio=0.75)
    received = patched_forward(llava, inputs, "vispruner", ratio=0.75, importance="global")
    assert cls.n_kept == received.n_kept and cls.kept[0].tolist() != received.kept[0].tolist()


def test_cdpruner_dpp_fills_the_budget_when_the_kernel_rank_runs_out():
    """Four identical tokens and two others span rank 3: the greedy DPP stalls after 3 picks; the rest of a
    budget of 5 are distinct unpicked tokens of largest quality (the official loop picks duplicates via NaN)."""
    from vtr.methods.cdpruner import greedy_dpp
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0]] * 4 + [[0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    quality = torch.tensor([0.5, 0.9, 0.7, 0.8, 1.0, 0.6])
    kernel = quality[:, None] * (features @ features.T) * quality[None, :]
    picks = greedy_dpp(kernel, 5).tolist()
    assert picks[:3] == [4, 1, 5] and sorted(picks[3:]) == [2, 3]
    assert len(set(picks)) == 5
