"""The merging baselines toolkits and benchmarks ship (PruMerge / PruMerge+, ToMe, MustDrop): each selection and
merge against a loop transcription of the official code run on the unpatched tiny model's own tensors, keep
counts, batch == alone. Exactness against the reference is in the shared matrix (test_exactness.py)."""
import math

import numpy as np
import pytest
import torch

import tiny_models as tm
import vtr
from vtr.methods.tome import merge_count


def peaked_last_layer(model, scale=8.0):
    """Random tiny CLIP weights give a near-uniform [CLS] attention without outliers; sharpen the last layer's
    queries so that the attention has a few (PruMerge's IQR rule then has something to find)."""
    layer = model.model.vision_tower.vision_model.encoder.layers[-1] \
        if hasattr(model.model.vision_tower, "vision_model") else model.model.vision_tower.encoder.layers[-1]
    with torch.no_grad():
        layer.self_attn.q_proj.weight *= scale
    return model


def clip_signals(model, pixels):
    """The unpatched tower as the official PruMerge code reads it: the last layer's q_proj / k_proj outputs (forward
    hooks, as ``hook_q`` / ``hook_k``) and ``hidden_states[-2]`` (patches)."""
    tower = model.model.vision_tower
    encoder = getattr(tower, "vision_model", tower).encoder
    seen = {}
    hooks = [encoder.layers[-1].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.update(q=o)),
             encoder.layers[-1].self_attn.k_proj.register_forward_hook(lambda m, a, o: seen.update(k=o))]
    try:
        with torch.no_grad():
            out = tower(pixels, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return seen["q"], seen["k"], out.hidden_states[-2][:, 1:]


def prumerge_official(q, k, features, plus=True):
    """``token_prune_merge_advanced(_plus)`` for one image (batch 1), transcribed with its loops: returns
    ({patch index: merged feature}, extra token feature)."""
    N, C = features.shape
    attn = torch.softmax((q[None] @ k[None].transpose(-2, -1)) * C ** -0.5, dim=-1)
    cls_attn = attn[:, 0, 1:]
    values = cls_attn.float().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    ratio = len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)
    _, idx = torch.topk(cls_attn, int(N * ratio), dim=1, largest=True)
    if plus:
        step_length = int(1 / ratio)
        sequence = torch.arange(0, N - 1, int(step_length / 3))
        filtered = torch.tensor([x for x in sequence if x not in idx.flatten()], dtype=torch.long)
        idx = torch.cat((idx, filtered.unsqueeze(0)), dim=1)
    keys = k[1:]
    kept = idx[0].tolist()
    complement = sorted(set(range(N)) - set(kept))
    key_norm = torch.nn.functional.normalize(keys, p=2, dim=-1)
    merged = {}
    for i, token in enumerate(kept):
        others = kept[:i] + kept[i + 1:] + complement
        sims = key_norm[token][None] @ key_norm[others].T
        cluster = torch.topk(sims, k=min(32, len(others)), dim=1, largest=True).indices[0]
        members = torch.tensor(others)[cluster]
        merged[token] = features[token] + (features[members] * cls_attn[0, members][:, None]).sum(0)
    extra = (features[complement] * cls_attn[0, complement][:, None]).sum(0)
    return merged, extra


@pytest.mark.parametrize("plus", [True, False])
@pytest.mark.parametrize("batch,variant", [(1, "single"), (2, "multi")])
def test_prumerge_matches_the_official_loops(plus, batch, variant):
    model, proc = tm.build("llava", attn="eager")
    peaked_last_layer(model)
    inputs = tm.image_inputs("llava", proc, batch, variant)
    with vtr.patch(model, "prumerge", ratio=0.5, plus=plus) as handle, torch.no_grad():
        model(**inputs)
    record = handle.last
    q, k, features = clip_signals(model, inputs["pixel_values"])
    image = 0
    for b, row in enumerate(record.layout.rows):
        got = {int(i): e for i, e in zip(record.merged[b].kept, record.merged[b].embeds)}
        for span in row.spans:
            merged, extra = prumerge_official(q[image], k[image], features[image], plus)
            image += 1
            kept = sorted(merged)
            rest = sorted(set(range(span.n)) - set(kept))
            slots = [span.offset + p for p in kept] + [span.offset + rest[-1]]
            mine = record.kept[b][(record.kept[b] >= span.offset) & (record.kept[b] < span.offset + span.n)]
            assert mine.tolist() == sorted(slots)
            project = model.model.multi_modal_projector
            for p in kept:
                assert torch.allclose(got[span.offset + p], project(merged[p]), atol=1e-5)
            assert torch.allclose(got[span.offset + rest[-1]], project(extra), atol=1e-5)
            assert len(kept) > (2 if plus else 0)  # outliers found (and samples for PruMerge+)


def test_prumerge_budget_caps_the_adaptive_count():
    """The budget caps the kept patches (those of highest attention stay) beside the extra token; a budget above
    the adaptive count leaves it as the official code gives it."""
    model, proc = tm.build("llava")
    peaked_last_layer(model)
    inputs = tm.image_inputs("llava", proc, 1)
    counts = {}
    for budget in ({"keep": 2}, {"keep": 3}, {"keep": 63}, {"keep": 64}):
        with vtr.patch(model, "prumerge", **budget) as handle, torch.no_grad():
            model(**inputs)
        counts[budget["keep"]] = handle.last.n_kept[0]
    assert counts[2] == 2 and counts[3] == 3 and counts[63] <= 63  # capped (the adaptive count itself: above)
    assert counts[64] == 64  # a budget of every token: the unpatched model


# ------------------------------------------------------------------------------------------------------------ ToMe
def tome_official(layers, x, feature, target, proportional=True):
    """facebookresearch/ToMe's ToMeBlock / ToMeAttention / bipartite_soft_matching / merge_wavg transcribed for one
    crop (batch 1, class token) over the CLIP layers 0..feature, the tokens in ToMe's own order. ``r`` per layer:
    vtr's schedule for the budget (``merge_count``). Returns (the feature layer's output ``[t, D]`` in ToMe's order, the
    original token index of each row)."""
    names, size = list(range(x.shape[1])), None
    for i, layer in enumerate(layers[:feature + 1]):
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        B, N, C = h.shape
        q, k, v = (p(h).view(B, N, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if proportional and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + attn.out_proj(out)
        metric = k.mean(1)
        r = merge_count(N - 1, target, feature - i + 1)  # vtr's schedule for the budget (not ToMe's own)
        if r > 0:
            metric = metric / metric.norm(dim=-1, keepdim=True)
            a, b = metric[..., ::2, :], metric[..., 1::2, :]
            scores = a @ b.transpose(-1, -2)
            scores[..., 0, :] = -float("inf")
            node_max, node_idx = scores.max(dim=-1)
            edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
            unm_idx, src_idx = edge_idx[..., r:, :].sort(dim=1)[0], edge_idx[..., :r, :]
            dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

            def merge(t, mode):
                src, dst = t[..., ::2, :], t[..., 1::2, :]
                n, t1, c = src.shape
                unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
                src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
                return torch.cat([unm, dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)], dim=1)

            size = torch.ones_like(x[..., 0, None]) if size is None else size
            x = merge(x * size, "sum")
            size = merge(size, "sum")
            x = x / size
            a_names, b_names = names[::2], names[1::2]
            names = [a_names[j] for j in unm_idx[0, :, 0].tolist()] + b_names
        x = x + layer.mlp(layer.layer_norm2(x))
    return x[0], names


def language_model_inputs(model):
    """Registers a hook that records the inputs_embeds the language model receives (pruned when registered after
    vtr's)."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].detach().clone()), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("proportional", [True, False])
@pytest.mark.parametrize("batch,variant,budget", [(1, "single", {"keep": 20}), (2, "multi", {"ratio": 0.75})])
def test_tome_matches_the_official_merging(proportional, batch, variant, budget):
    """The kept tokens and the language model's inputs for them equal the official ToMe run on each crop by the
    unpatched CLIP layers in ToMe's own order (then the projector)."""
    model, proc = tm.build("llava", attn="eager")
    inputs = tm.image_inputs("llava", proc, batch, variant)
    with vtr.patch(model, "tome", proportional=proportional, **budget) as handle, torch.no_grad():
        seen, hook = language_model_inputs(model)  # after vtr's own hook: the pruned inputs
        try:
            model(**inputs)
        finally:
            hook.remove()
    record, embeds = handle.last, seen[0]
    vm = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    feature = len(vm.encoder.layers) - 2  # vision_feature_layer -2
    with torch.no_grad():
        embedded = vm.pre_layrnorm(vm.embeddings(inputs["pixel_values"]))
    image = 0
    for b, row in enumerate(record.layout.rows):
        slot_of = {int(p): j for j, p in enumerate(record.index[b].tolist()) if p >= 0}
        for span in row.spans:
            target = budget.get("keep") or round(span.n * (1 - budget["ratio"]))
            with torch.no_grad():
                features, names = tome_official(vm.encoder.layers, embedded[image:image + 1], feature, target,
                                                proportional)
                projected = model.model.multi_modal_projector(features)
            image += 1
            kept = record.kept[b][(record.kept[b] >= span.offset) & (record.kept[b] < span.offset + span.n)]
            assert sorted(n - 1 for n in names if n) == (kept - span.offset).tolist()
            for row_, name in zip(projected, names):
                if name:
                    position = int(row.visual_positions[span.offset + name - 1])
                    assert torch.allclose(embeds[b, slot_of[position]], row_, atol=1e-5)
    assert record.merged is not None and all(len(s) > 1 for m in record.merged for s in m.sources)


def test_tome_schedule():
    """A constant r where it divides (LightCompress's r=16 on LLaVA-1.5's 23 merging layers is keep=208), the
    remainder early, and more when halving would not reach the target later."""
    def schedule(patches, target, layers):
        out = []
        for k in range(layers, 0, -1):
            out.append(merge_count(patches, target, k))
            patches -= out[-1]
        return out, patches
    assert schedule(576, 208, 23) == ([16] * 23, 208)
    assert schedule(64, 16, 9) == ([6, 6, 6, 5, 5, 5, 5, 5, 5], 16)
    r, left = schedule(64, 1, 9)
    assert left == 1 and all(x <= (p // 2) for x, p in zip(r, [64 - sum(r[:i]) for i in range(9)]))
    assert merge_count(64, 1, 5) is None  # 64 -> 32 -> 16 -> 8 -> 4 -> 2: out of reach in 5 layers


def test_tome_refuses_a_budget_it_cannot_reach():
    model, proc = tm.build("llava")
    model.config.vision_feature_layer = 3  # 4 merging layers: 64 patches halve to 4 at best
    inputs = tm.image_inputs("llava", proc, 1)
    with vtr.patch(model, "tome", keep=2), pytest.raises(ValueError, match="tome cannot reach 2 patches"):
        with torch.no_grad():
            model(**inputs)


# -------------------------------------------------------------------------------------------------------- MustDrop
def conditional_pooling_official(feat, threshold, window, fix_r=0):
    """``local_merge.conditional_pooling`` (with LightCompress's ``fix_r``) and ``merge_wavg`` for one crop (batch
    1): returns (the merged sequence ``[1, 1 + t, D]`` in the official order [CLS, merged windows' last tokens, the
    rest sorted], the original token index of each row)."""
    x_cls, x = feat[:, :1], feat[:, 1:]
    B, N, D = x.shape
    side = int(N ** 0.5)
    grid = x.view(B, side, side, D).permute(0, 3, 1, 2)
    g = side // window
    tiles = grid.view(B, D, g, window, g, window).permute(0, 2, 4, 1, 3, 5).reshape(B, g, g, D, window * window)
    sims = torch.nn.functional.cosine_similarity(tiles.unsqueeze(-1), tiles.unsqueeze(-2), dim=3)
    sims = sims * (1 - torch.eye(window * window))
    similarity = (sims.sum(-1).sum(-1) / (window * window * (window * window - 1))).reshape(B, -1)
    r = int(torch.ge(similarity, threshold).sum(dim=1).min()) if not fix_r else fix_r
    _, chosen = similarity.topk(r, dim=-1)
    index = torch.arange(N).view(side, side).unfold(0, window, window).unfold(1, window, window).reshape(-1, window ** 2)
    gathered = index[chosen[0]]
    remaining = sorted(set(range(N)) - set(gathered.flatten().tolist()))
    dst = gathered[:, -1].tolist()
    merged = torch.stack([x[0, gathered[j]].sum(0) / window ** 2 for j in range(r)]) if r else x[0, :0]
    out = torch.cat([x_cls[0], merged, x[0, remaining]])[None]
    return out, [0] + [t + 1 for t in dst] + [t + 1 for t in remaining]


def mustdrop_tower_official(model, pixels, window, fix_r, key_share=0.08):
    """``CLIPVisionModelAcc.custom_forward`` on one crop: layer 0, the window merge, the later layers (eager),
    the key set from the last layer's [CLS] attention; returns (feature layer output rows, their original token
    indices, the key set as original token indices)."""
    vm = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    layers = vm.encoder.layers
    feature = len(layers) - 2
    with torch.no_grad():
        hidden = vm.pre_layrnorm(vm.embeddings(pixels))
        names = list(range(hidden.shape[1]))
        for i, layer in enumerate(layers):
            if i == len(layers) - 1:  # output_attentions at the last layer
                h = layer.layer_norm1(hidden)
                attn = layer.self_attn
                B, N, C = h.shape
                q, k = (p(h).view(B, N, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj))
                probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
                cls = probs[:, :, 0, 1:].mean(1)
                top = torch.topk(cls, math.ceil(key_share * (N - 1)), dim=1).indices[0]
                keys = [names[1:][t] for t in top.tolist()]
            hidden = layer(hidden, None)
            if i == 0:
                hidden, order = conditional_pooling_official(hidden, 0.8, window, fix_r)
                names = order
            if i == feature:
                features = hidden[0]
    return features, names, keys


@pytest.mark.parametrize("batch,variant", [(1, "single"), (2, "multi")])
def test_mustdrop_tower_matches_the_official_merge_and_key_set(batch, variant):
    """Window merge after CLIP layer 0 (LightCompress's count for the budget: (N + 1 - T) // (w^2 - 1) windows),
    the later layers on the merged sequence, the key set from the last layer's [CLS] attention: the kept patches
    and the language model's inputs equal the official tower's; with thresholds that drop every candidate, the
    first prefill stage keeps exactly the key set."""
    model, proc = tm.build("llava", attn="eager")
    inputs = tm.image_inputs("llava", proc, batch, variant)
    options = dict(ratio=0.75, window=2, global_thr=2.0, individual_thr=1.5)
    with vtr.patch(model, "mustdrop", **options) as handle, torch.no_grad():
        seen, hook = language_model_inputs(model)
        try:
            model(**inputs)
        finally:
            hook.remove()
    record, embeds = handle.last, seen[0]
    vision, first = record.stages[0], record.stages[1]
    image = 0
    for b, row in enumerate(record.layout.rows):
        slot_of = {int(p): j for j, p in enumerate(vision.index[b].tolist()) if p >= 0}
        for span in row.spans:
            fix_r = (span.n + 1 - round(span.n * 0.25)) // 3
            features, names, keys = mustdrop_tower_official(model, inputs["pixel_values"][image:image + 1], 2, fix_r)
            image += 1
            mine = vision.kept[b][(vision.kept[b] >= span.offset) & (vision.kept[b] < span.offset + span.n)]
            assert sorted(n - 1 for n in names if n) == (mine - span.offset).tolist()
            with torch.no_grad():
                projected = model.model.multi_modal_projector(features)
            for feature, name in zip(projected, names):
                if name:
                    position = int(row.visual_positions[span.offset + name - 1])
                    assert torch.allclose(embeds[b, slot_of[position]], feature, atol=1e-5)
            key = first.kept[b][(first.kept[b] >= span.offset) & (first.kept[b] < span.offset + span.n)]
            assert (key - span.offset).tolist() == sorted(t - 1 for t in keys)


def dual_attention_filter_official(attn, v_token_start, img_seq, global_thr, individual_thr):
    """``LlamaDynamicvitModel.dual_attention_filter``: ``attn`` ``[1, H, L, L]`` eager probabilities."""
    attn = attn[0]
    text_seq = attn.shape[1] - img_seq - v_token_start
    attn = attn.narrow(1, v_token_start + img_seq, text_seq).narrow(2, v_token_start, img_seq).mean(dim=0)
    attn_sum = attn.sum(dim=0)
    candidate = (attn_sum < attn_sum.sum(dim=0) * global_thr) & (attn.max(dim=0)[0] < individual_thr)
    return torch.arange(img_seq)[~candidate]


def test_mustdrop_prefill_filter_matches_the_official_rule():
    """The first prefill stage: layer K-1's eager attention from the text after the image to its tokens (the
    unpatched decoder fed the tower's output), the official dual-attention filter, the key set added back."""
    import reference as R
    model, proc = tm.build("llava", attn="eager")
    inputs = tm.image_inputs("llava", proc, 1)
    options = dict(ratio=0.5, window=2, global_thr=0.0324, individual_thr=0.0297, key_share=0.05)
    with vtr.patch(model, "mustdrop", **options) as handle, torch.no_grad():
        model(**inputs)
    record = handle.last
    vision, first = record.stages[0], record.stages[1]
    lm = R.capture_lm_inputs(model, inputs, vision_tokens=record.vision_tokens,
                             merging=(record.vision_merges, handle.method))
    index = vision.index[0]
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=lm["embeds"][:, index], output_attentions=True)
    (span,) = record.layout.rows[0].spans
    visual = [j for j, p in enumerate(index.tolist()) if p in set(span.positions.tolist())]
    start, count = visual[0], len(visual)
    assert visual == list(range(start, start + count))
    K = int(handle.method.layers.split(",")[0])
    kept = dual_attention_filter_official(out.attentions[K - 1].float(), start, count, 0.0324, 0.0297)
    key = mustdrop_tower_official(model, inputs["pixel_values"], 2, (65 - 32) // 3, key_share=0.05)[2]
    kept_ids = vision.kept[0][kept]
    expected = sorted(set(kept_ids.tolist()) | {t - 1 for t in key})
    assert first.kept[0].tolist() == expected
    assert len(expected) < len(vision.kept[0])  # the filter dropped some


@pytest.mark.parametrize("mode", ["forward", "generate"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch,variant", [(1, "single"), (2, "single"), (2, "multi")])
def test_mustdrop_all_stages_equal_the_reference(mode, attn, batch, variant):
    """With the filter on (thresholds set inside the tiny model's near-uniform attention shares over the 16
    tokens a 0.75 ratio leaves per image, about 1 / 16):
    the merged tower, both prefill stages and the decoding on the cut KV caches (layers K_1 - 1 on) equal the
    unpatched model fed the kept tokens (layers before K_1 - 1 keep the tower's whole output in their caches)."""
    from test_exactness import check_against_reference
    model, proc = tm.build("llava", attn=attn)
    inputs = tm.image_inputs("llava", proc, batch, variant)
    options = dict(window=2, global_thr=0.0625, individual_thr=0.06)
    check_against_reference(model, inputs, "mustdrop", mode, **options)
    with vtr.patch(model, "mustdrop", ratio=0.75, **options) as handle, torch.no_grad():
        model(**inputs)
    vision, *prefill = handle.last.stages
    assert sum(map(len, prefill[-1].kept)) < sum(map(len, vision.kept))  # the prefill stages dropped tokens
