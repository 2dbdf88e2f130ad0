"""The ``vision`` stage (pruning inside the vision tower) and FlowCut, its first method.

* the tower's later layers really run on fewer tokens (their inputs, hooked);
* FlowCut's choices against a slow loop re-derived from the notes (shared/research/methods_image.md section 9), run
  layer by layer through the unpatched CLIP layers with eager attention;
* images of one tower call that keep different counts (padding with a key mask) against the reference;
* ratio 0 is the identity on LLaVA-NeXT too (its anyres newlines included); models the stage lacks are refused.

Exactness against the reference (the unpatched tower run on the kept patches crop by crop from each pruning layer
on, then the unpatched language model fed the result; prefill and decode, eager and SDPA, batched) is in
test_exactness.py, batch-vs-alone in test_requests.py: both matrices include FlowCut. The Qwen-VL towers:
test_qwen_vision_stage.py."""
import math

import pytest
import torch

import reference as R
import tiny_models as tm
import vtr
from test_exactness import check_against_reference
from vtr import compat


def sharpen(model, scale: float = 40.0):
    """Scale the tower's query weights so that its attention is far from uniform (random tiny weights give
    near-uniform [CLS] attention, whose entropy makes FlowCut's adaptive count 0 until the last pruning layer)."""
    for layer in compat.vision_layers(model):
        layer.self_attn.q_proj.weight.data *= scale
    return model


def slow_flowcut(model, pixels: torch.Tensor, targets: list, crops: list) -> dict:
    """Notes 9.2, batch of one prompt: after each CLIP layer idx < F with more than target + 1 tokens, score the
    patches with the eager attention's [CLS] row, softmax(v_cls . v_j) and ||mean_h v_j||_1, accumulate
    C = (C + S) / 2, and at rpl = F - idx - 1 even keep the top max(n - P, target + 1) - 1 by C, P the largest over
    the image's crops of round((N - target) / sqrt(rpl) * (1 - (H / log N)^2)), rpl = 0: P = n. Returns
    {layer: [C, W] kept original token indices} for the layers that pruned."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    F = compat.vision_feature_layer(model)
    hidden = vm.pre_layrnorm(vm.embeddings(pixels))
    names = [list(range(hidden.shape[1])) for _ in range(hidden.shape[0])]
    states = [h[None] for h in hidden]
    cumulative = [None] * len(states)
    history = {}
    for idx, layer in enumerate(vm.encoder.layers[:F]):
        pruned = False
        for image, target in zip(crops, targets):
            members = list(range(image[0], image[1]))
            scores, prune = {}, 0
            for c in members:
                x = layer.layer_norm1(states[c])
                _, weights = layer.self_attn(hidden_states=x)  # eager: [1, H, n, n]
                attn = layer.self_attn
                n = x.shape[1]
                v = attn.v_proj(x).view(n, attn.num_heads, attn.head_dim).transpose(0, 1)  # [H, n, d]
                states[c] = layer(states[c], None)
                if n <= target + 1:
                    continue
                a = weights[0, :, 0, :].mean(0)[1:]
                sem = torch.stack([torch.softmax(v[h, 0] @ v[h].T, -1) for h in range(v.shape[0])]).mean(0)[1:]
                vnorm = v.mean(0)[1:].abs().sum(-1)
                score = (a / a.sum() + sem / sem.sum()) * vnorm
                cumulative[c] = score if cumulative[c] is None else 0.5 * cumulative[c] + 0.5 * score
                scores[c] = a
            rpl = F - idx - 1
            if not scores or rpl % 2:
                continue
            for c, a in scores.items():
                N = len(a)
                p = a / a.sum()
                entropy = -sum(float(x) * math.log(float(x)) for x in p)
                count = (N - target) / math.sqrt(rpl) * (1 - (entropy / math.log(N)) ** 2) if rpl else None
                prune = max(prune, round(count)) if rpl else states[c].shape[1]
            for c in scores:
                n = states[c].shape[1]
                keep = max(n - prune, target + 1) - 1
                top = sorted(torch.topk(cumulative[c], keep).indices.tolist())
                cumulative[c] = cumulative[c][top]
                states[c] = torch.cat([states[c][:, :1], states[c][:, [1 + t for t in top]]], 1)
                names[c] = [names[c][0]] + [names[c][1 + t] for t in top]
                pruned = pruned or keep < n - 1
        if pruned:
            width = max(len(n) for n in names)
            history[idx] = torch.tensor([n + [-1] * (width - len(n)) for n in names])
    return history


def tower_pixels(model, inputs) -> torch.Tensor:
    """The tower's input of an unpatched forward (LLaVA-NeXT: every image's crops)."""
    seen = {}
    hook = model.model.vision_tower.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(pixels=kwargs.get("pixel_values", args[0] if args else None)),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["pixels"]


def patched(model, inputs, **budget):
    with vtr.patch(model, "flowcut", **budget) as handle:
        with torch.no_grad():
            logits = model(**inputs).logits
    return handle.last, handle.method, logits


@pytest.mark.parametrize("family,variant", [("llava", "single"), ("llava", "multi"), ("llava_next", "single"),
                                            ("llava_next", "multi")])
@pytest.mark.parametrize("budget", [{"ratio": 0.75}, {"ratio": 0.5}, {"keep": 6}])
def test_flowcut_matches_the_slow_loop(family, variant, budget):
    model, proc = tm.build(family, attn="eager")
    sharpen(model)
    inputs = tm.image_inputs(family, proc, 2, variant, rows=[0])
    record, method, _ = patched(model, inputs, **budget)
    spans = record.layout.rows[0].spans
    sizes = inputs.get("image_sizes")
    crops, first, targets = [], 0, []
    for k, span in enumerate(spans):
        size = sizes[k].tolist() if sizes is not None else None
        n_crops = model_family(model).crops_per_image(model, size)
        crops.append((first, first + n_crops))
        first += n_crops
        targets.append(method.vision_target(span.n, n_crops))
    with torch.no_grad():
        expected = slow_flowcut(model, tower_pixels(model, inputs), targets, crops)
    got = record.vision_tokens
    assert sorted(got) == sorted(expected)
    patches = tower_pixels(model, inputs).shape[-1] // 8
    if any(t < patches ** 2 for t in targets):
        assert expected, "the vision stage should have pruned"
    if family == "llava":  # sharpened attention: the adaptive count prunes before the last pruning layer too
        assert len(expected) >= 2
    for layer in expected:
        assert torch.equal(got[layer].cpu(), expected[layer]), layer


def model_family(model):
    from vtr.patches import family_of
    return family_of(model)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_later_vision_layers_run_on_fewer_tokens(family):
    """Hook every CLIP layer's input: from the layer after the last pruning layer on, each crop holds its target
    + [CLS]; the projector's input holds the target patches of each crop ([CLS] dropped by the feature selection)."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 1)
    layers = compat.vision_layers(model)
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].shape[1]))
             for i, layer in enumerate(layers)]
    first = next(compat.projector(model).children())  # inside the projector: what it really computes on
    hooks.append(first.register_forward_pre_hook(lambda m, args: seen.__setitem__("projector",
                                                                                   tuple(args[0].shape[:2]))))
    try:
        record, method, _ = patched(model, inputs, ratio=0.75)
    finally:
        for hook in hooks:
            hook.remove()
    F = compat.vision_feature_layer(model)
    n = inputs["pixel_values"].shape[-1] // 8
    span = record.layout.rows[0].spans[0]
    target = method.vision_target(span.n, 1 if family == "llava" else 3)
    assert seen[0] == n * n + 1
    assert all(seen[i] == target + 1 for i in range(F, len(layers)))
    assert seen["projector"] == (record.vision_tokens[F - 1].shape[0], target)
    assert max(record.vision_tokens) == F - 1
    assert (record.vision_tokens[F - 1] >= 0).sum(1).tolist() == [target + 1] * record.vision_tokens[F - 1].shape[0]


def test_images_keeping_different_counts_share_the_tower():
    """Two images of one call whose adaptive counts differ: the shorter crop is right-padded with a key mask, and the
    result equals the unpatched tower run on each image's kept patches alone (then the unpatched LM)."""
    model, proc = tm.build("llava", attn="sdpa")
    sharpen(model)
    inputs = tm.image_inputs("llava", proc, 2, "multi")
    with vtr.patch(model, "flowcut", ratio=0.5) as handle:
        with torch.no_grad():
            model(**inputs)
    lengths = {layer: (t >= 0).sum(1).tolist() for layer, t in handle.last.vision_tokens.items()}
    assert any(len(set(n)) > 1 for n in lengths.values()), lengths
    for mode in ("forward", "generate"):
        check_against_reference(model, inputs, "flowcut", mode)


def test_ratio_zero_keeps_the_anyres_newlines():
    model, proc = tm.build("llava_next")
    inputs = tm.image_inputs("llava_next", proc, 2, "multi")
    with torch.no_grad():
        expected = model(**inputs).logits
    record, _, logits = patched(model, inputs, ratio=0.0)
    assert torch.equal(logits, expected)
    assert record.n_kept == record.n_visual


def test_llava_next_drops_the_tile_newlines_and_prunes_again_at_layer_2():
    """The official anyres code stitches the kept tile tokens without newlines; then decoder layer 1's scores keep
    the image's target from layer 2 on."""
    model, proc = tm.build("llava_next")
    inputs = tm.image_inputs("llava_next", proc, 1)
    record, method, _ = patched(model, inputs, keep=8)
    span = record.layout.rows[0].spans[0]
    vision, llm = record.stages
    assert (vision.stage, llm.stage, llm.layer) == ("vision", "layer", 2)
    kept = vision.kept[0]
    assert not bool(span.newline[kept].any())
    assert len(llm.kept[0]) == 8 and bool(torch.isin(llm.kept[0], kept).all())
    assert method.llm_layer == 2
    # llm_layer=0: the vision stage alone, with floor(target / 2) patches per crop
    record, _, _ = patched(model, inputs, keep=8, llm_layer=0)
    assert len(record.stages) == 1 and record.stages[0].stage == "vision"


@pytest.mark.parametrize("family", ["llava_onevision"])
def test_flowcut_refuses_towers_it_lacks(family):
    model, _ = tm.build(family)
    with pytest.raises(ValueError, match="flowcut does not support .*CLIP towers with a \\[CLS\\] token.*Qwen2/2.5/3-VL "
                                         "and Qwen3.5 vision transformers; other towers \\(SigLIP, InternViT, "
                                         "GLM-4.1V's\\) have no official rule"):
        vtr.patch(model, "flowcut", ratio=0.5)
    assert vtr.api.handle_of(model) is None


def test_vision_step_contract_is_checked():
    """A vision-stage method whose choice breaks the contract gets an error naming it."""
    class Bad(vtr.FlowCut):
        def vision_step(self, ctx, image):
            return torch.zeros(image.n_crops, image.n_patches - 1, dtype=torch.long)  # duplicates

    model, proc = tm.build("llava")
    with pytest.raises(RuntimeError, match="flowcut: vision_step\\(\\) returned invalid patch indices"):
        with vtr.patch(model, Bad(ratio=0.5)):
            with torch.no_grad():
                model(**tm.image_inputs("llava", proc, 1))


def test_speed_bound_of_a_vision_stage_method():
    """The benchmark's ideal of FlowCut runs each decoder layer on its stage's length (the vision stage's tokens
    from layer 0, LLaVA-NeXT's layer stage from 2), and its row takes the method's own (pruned) vision time."""
    import types

    from vtr.bench import grid
    from vtr.bench.ideal import LayeredIdeal
    model, proc = tm.build("llava_next")
    inputs = tm.image_inputs("llava_next", proc, 1)
    lm_inputs = R.capture_lm_inputs(model, inputs)
    with vtr.patch(model, "flowcut", ratio=0.75) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        stages = [(s.layer, s.index) for s in handle.last.stages]
    with LayeredIdeal(model, lm_inputs, stages=stages) as ideal:
        ideal.prefill()
    assert [layer.keys.shape[-2] for layer in ideal.cache.layers] == \
        [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert out.past_key_values.layers[0].keys.shape[-2] < lm_inputs["embeds"].shape[1]

    def sample(vision, llm):
        return grid.Sample(ttft=vision + llm, vision=vision, llm=llm, selection=0.0, decode_step=0.1,
                           peak_memory=0, kv_cache=0, layer_lengths=[4] * 4, batch=1, n_visual=[8], n_kept=[2],
                           stages=[])
    configs = [grid.Config("dense"), grid.Config("method", "flowcut", {"ratio": 0.75}),
               grid.Config("ideal", "flowcut", {"ratio": 0.75}), grid.Config("method", "divprune", {"ratio": 0.75}),
               grid.Config("ideal", "divprune", {"ratio": 0.75})]
    samples = {"dense": [sample(3.0, 5.0)], "flowcut[ratio=0.75]": [sample(1.0, 2.0)],
               "flowcut[ratio=0.75] ideal": [sample(0.0, 1.5)], "divprune[ratio=0.75]": [sample(3.0, 2.0)],
               "divprune[ratio=0.75] ideal": [sample(0.0, 1.5)]}
    model_stub = types.SimpleNamespace(config=model.config)
    rows = {r["config"]: r for r in grid.summarise(configs, samples, model_stub)}
    assert rows["flowcut[ratio=0.75] ideal"]["vision_s"] == 1.0 and rows["flowcut[ratio=0.75] ideal"]["ttft_s"] == 2.5
    assert rows["divprune[ratio=0.75] ideal"]["vision_s"] == 3.0 and rows["divprune[ratio=0.75] ideal"]["ttft_s"] == 4.5


@pytest.mark.parametrize("budget", [{"keep": 8}, {"ratio": 0.9}])
def test_llava_next_layer_stage_matches_the_slow_loop(budget):
    """Notes 9.4: at decoder layer 1, the last prompt token's query (per head, after RoPE) over the image's keys,
    softmax(q k / sqrt(d)) in fp32, and its value over the image's values, softmax(v_q v / sqrt(d)), each mean over
    heads; score (rel / sum + sem / sum) * ||mean_h v_j||_1; the top target go on from layer 2. Run on the tokens
    the vision stage kept (compact positions), through the unpatched layers with eager attention."""
    import sys
    model, proc = tm.build("llava_next", attn="eager")
    inputs = tm.image_inputs("llava_next", proc, 1)
    record, method, _ = patched(model, inputs, **budget)
    span = record.layout.rows[0].spans[0]
    lm_inputs = R.capture_lm_inputs(model, inputs, vision_tokens=record.vision_tokens)
    order = record.stages[0].index[0].tolist()
    lm = R.lm_of(model)
    hidden = lm_inputs["embeds"][0, order][None]
    positions = torch.arange(len(order))[None]
    L = len(order)
    mask = R.additive_mask(torch.ones(1, L, dtype=torch.bool), L, hidden.dtype)
    with torch.no_grad():
        cos, sin = lm.rotary_emb(hidden, positions)
        hidden = lm.layers[0](hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None)
        block = lm.layers[1]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        H, d = model.config.text_config.num_attention_heads, attn.head_dim
        q = attn.q_proj(x).view(1, L, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, L, -1, d).transpose(1, 2)
        v = attn.v_proj(x).view(1, L, -1, d).transpose(1, 2)[0]
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
        q, k = q[0], k[0]
    group = H // k.shape[0]
    image = [j for j, p in enumerate(order) if p in set(span.positions.tolist())]
    rel = torch.stack([torch.softmax((q[h, -1] @ k[h // group, image].T) / math.sqrt(d), -1, dtype=torch.float32)
                       for h in range(H)]).mean(0)
    sem = torch.stack([torch.softmax((v[h // group, -1] @ v[h // group, image].T) / math.sqrt(d), -1,
                                     dtype=torch.float32) for h in range(H)]).mean(0)
    vnorm = torch.stack([v[h // group, image] for h in range(H)]).mean(0).abs().sum(-1)
    score = (rel / rel.sum() + sem / sem.sum()) * vnorm
    target = method.budget(span.n)
    top = torch.topk(score, target).indices.tolist()
    where = {int(p): i for i, p in enumerate(span.positions)}
    expected = sorted(where[order[image[j]]] for j in top)
    assert record.stages[1].kept[0].tolist() == expected
    assert len(record.stages[0].kept[0]) > target


def test_flowcut_refuses_a_tower_without_a_layer_below_the_feature_layer():
    model, _ = tm.build("llava")
    model.config.vision_feature_layer = 1  # the projector reads layer 0's output
    with pytest.raises(ValueError, match="flowcut: this vision tower has no layer below its feature layer 0"):
        vtr.patch(model, "flowcut", ratio=0.5)
    assert vtr.api.handle_of(model) is None
