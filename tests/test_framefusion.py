"""FrameFusion: the cost model, chains and run merges against the hand cases of shared/research/methods_video.md
section 6 (FrameFusion), the control flow of the cascade, and the method on a model against a slow, loop-based
re-derivation that runs the unpatched decoder layers by hand (merging before layer 0 and after each layer's
attention, pruning with that layer's eager attention). Exactness against the reference (post-attention stages,
merged states) is in the shared matrices and below on videos that merge."""
import math

import pytest
import torch
from transformers import DynamicCache

import reference as R
import tiny_models as tm
import vtr
from test_exactness import check_against_reference
from vtr.methods import FrameFusion
from vtr.methods.framefusion import merge_decision, required_sparsity
from vtr.methods.video import chain_similarity, merge_runs

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


# ------------------------------------------------------------------------------------------------- hand cases
def test_cost_model_literals():
    assert required_sparsity([], 0.3, 28) == pytest.approx(0.7)  # 1 - 8.4 / 28
    assert required_sparsity([0.5], 0.3, 28) == pytest.approx(1 - 7.9 / 13.5)  # q = .5, spent .5 -> 0.41481
    assert required_sparsity([0.5], 0.3, 28) == pytest.approx(0.41481, abs=1e-5)
    assert required_sparsity([0.5, 0.2], 0.3, 28) == pytest.approx(1 - (8.4 - 0.5 - 0.4) / (26 * 0.4))
    assert required_sparsity([], 0.3, 4) == pytest.approx(0.7)  # the depth is a parameter
    assert required_sparsity([0.0], 0.3, 4) == pytest.approx(1 - 0.2 / 3)
    assert required_sparsity([0.0, 0.0], 0.3, 4) == 1.0  # L * C = 1.2 < spent 2: official raises, here u = 1
    assert required_sparsity([0.9], 0.9, 28) == 0.0  # the remaining budget exceeds the tokens: no sparsity
    assert required_sparsity([], 1.0, 28) == 0.0  # ratio 0: nothing to remove


def test_chains_first_elements_and_no_cross_chain_pairs():
    """P = 4 locations over 3 frames (sequence order: frame-major); each location's chain compares with its own
    previous frame only; first elements -2."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(12, 5, generator=g)
    chain = torch.arange(12) % 4
    sims, prev = chain_similarity(h, chain)
    for t in range(12):
        if t < 4:
            assert sims[t] == -2 and prev[t] == -1
        else:
            assert prev[t] == t - 4
            assert sims[t] == pytest.approx(float(torch.cosine_similarity(h[t], h[t - 4], 0)), abs=1e-6)
    sims, prev = chain_similarity(h, None)  # an image: every token its own chain
    assert bool((sims == -2).all()) and bool((prev == -1).all())
    # with a token gone, the chain skips it: location 1's frame-2 token follows its frame-0 token
    alive = torch.tensor([t for t in range(12) if t != 5])
    sims, prev = chain_similarity(h[alive], chain[alive])
    j = int((alive == 9).nonzero())
    assert int(alive[prev[j]]) == 1


def test_run_merge_literal():
    """One chain [a, b, c, d, e] with b, c, e merged: a' = (a + b + c) / 3, d' = (d + e) / 2, b, c, e removed."""
    h = torch.tensor([[1.0, 0], [2, 1], [4, 2], [8, 3], [16, 4]])
    prev = torch.tensor([-1, 0, 1, 2, 3])
    members = torch.tensor([False, True, True, False, True])
    kept, anchors, states, sources = merge_runs(h, prev, members)
    assert kept.tolist() == [0, 3] and anchors.tolist() == [0, 3]
    assert torch.allclose(states, torch.tensor([[7 / 3, 1.0], [12, 3.5]]))
    assert [s.tolist() for s in sources] == [[0, 1, 2], [3, 4]]


def test_control_flow_of_one_call():
    sims = torch.tensor([-2.0, -2.0, 0.9, 0.2, 0.8, 0.95, 0.1, 0.6])
    # (i) ratio 2/8 < u = 0.7 and >= the lower bound: recorded, merging goes on
    spars = []
    members, merging, done = merge_decision(sims, 0.7, 0.85, 0.1, spars)
    assert members.tolist() == [False, False, True, False, False, True, False, False]
    assert spars == [0.25] and merging and not done
    # below the lower bound (1/8 < 0.2): recorded, merging stops (the pruning step follows at the next call)
    spars = []
    members, merging, done = merge_decision(sims, 0.7, 0.92, 0.2, spars)
    assert int(members.sum()) == 1 and spars == [0.125] and not merging and not done
    # (ii) ratio 5/8 >= u = 0.4: the top floor(0.4 * 8) = 3 merge, no pruning
    spars = []
    members, merging, done = merge_decision(sims, 0.4, 0.5, 0.1, spars)
    assert members.nonzero().flatten().tolist() == [2, 4, 5] and spars == [] and not merging and done


# ------------------------------------------------------------------------------------------- slow re-derivation
def slow_framefusion(model, lm_inputs, span, cost, threshold, lower_bound, n_layers=None, queries=None):
    """FrameFusion on one prompt (batch 1, no padding), written from the notes with loops: the unpatched decoder
    layers run by hand; a call before layer 0 and after every layer's attention + residual (but the last), before
    its MLP. The pruning step ranks by the causal attention of the last ``queries`` tokens, mean over heads and
    queries (official ``framefusion/utils.py: scaled_dot_product_attention(num=...)``: 4 in the Qwen2-VL adapter,
    1 in the Qwen2 / LLaVA-Video one; None: by the model). Returns (last-token logits, final original positions
    alive, per call the visual count after it)."""
    if queries is None:
        queries = 4 if model.config.model_type in QWEN else 1
    lm = R.lm_of(model)
    layers = lm.layers
    L_tot = n_layers or len(layers)
    hidden = lm_inputs["embeds"][0].clone()
    positions = R._rope_rows(lm_inputs["positions"])
    alive = list(range(hidden.shape[0]))
    where = {int(p): j for j, p in enumerate(span.positions.tolist()) if not bool(span.newline[j])}
    info = {p: (int(span.frame[j]), (int(span.row[j]), int(span.col[j]))) for p, j in where.items()}
    state = {"spars": [], "merging": True, "done": False}
    counts = []

    def u_now():
        q, spent = 1.0, 0.0
        for s in state["spars"]:
            q = q * (1 - s)
            spent = spent + q
        left = L_tot * cost - spent
        if left <= 0:
            return 1.0
        frac = left / ((L_tot - len(state["spars"])) * q)
        return 0.0 if frac > 1 else 1 - frac

    def call(h, attn_last):
        nonlocal alive
        vis = [j for j, p in enumerate(alive) if p in info]
        V = len(vis)
        if state["done"]:
            counts.append(V)
            return h
        u = u_now()
        if not state["merging"]:
            state["done"] = True
            k = max(1, round(V * (1 - u)))
            if k < V:
                top = sorted(vis, key=lambda j: -float(attn_last[j]))[:k]
                drop = set(vis) - set(top)
                keep = [j for j in range(len(alive)) if j not in drop]
                h, alive = h[keep], [alive[j] for j in keep]
            counts.append(min(k, V))
            return h
        chains = {}
        for j in vis:
            chains.setdefault(info[alive[j]][1], []).append(j)
        sim, prev = {}, {}
        for chain in chains.values():
            chain.sort(key=lambda j: info[alive[j]][0])
            sim[chain[0]] = -2.0
            for a, b in zip(chain, chain[1:]):
                sim[b] = float(torch.cosine_similarity(h[a].float(), h[b].float(), 0))
                prev[b] = a
        members = {j for j in vis if sim[j] >= threshold}
        ratio = len(members) / V
        if ratio < u:
            state["spars"].append(ratio)
            if ratio < lower_bound:
                state["merging"] = False
        else:
            members = set(sorted(vis, key=lambda j: -sim[j])[:math.floor(u * V + 1e-9)])
            state["merging"], state["done"] = False, True
        h = h.clone()
        for chain in chains.values():
            anchor, run = None, []
            for j in chain + [None]:
                if j is not None and j in members:
                    run.append(j)
                    continue
                if run:
                    h[anchor] = (h[anchor] + sum(h[r] for r in run)) / (len(run) + 1)
                    run = []
                anchor = j
        keep = [j for j in range(len(alive)) if j not in members]
        h, alive = h[keep], [alive[j] for j in keep]
        counts.append(V - len(members))
        return h

    stack, masks = lm_inputs.get("deepstack"), lm_inputs.get("visual_pos_masks")
    if stack:
        masks = masks[0]
        rank = masks.long().cumsum(0) - 1
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        hidden = call(hidden, None)
        for i, block in enumerate(layers):
            n = hidden.shape[0]
            pos = positions[..., alive] if positions.dim() == 2 else positions[:, :, alive]
            cos, sin = lm.rotary_emb(hidden[None], pos)
            attended, weights = block.self_attn(hidden_states=block.input_layernorm(hidden[None]),
                                                attention_mask=R.additive_mask(torch.ones(1, n), n, hidden.dtype),
                                                position_embeddings=(cos, sin), past_key_values=cache,
                                                use_cache=True)
            hidden = hidden + attended[0]
            if i < len(layers) - 1:
                hidden = call(hidden, weights[0, :, -queries:].float().mean((0, 1)))
            hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
            if stack and i < len(stack):  # Qwen3-VL's DeepStack: each present visual token its own feature
                hidden = hidden.clone()
                for j, p in enumerate(alive):
                    if bool(masks[p]):
                        hidden[j] += stack[i][rank[p]]
        logits = model.lm_head(lm.norm(hidden))[-1]
    return logits, alive, counts


def repeating_video(family, frames, static, seed=0):
    """A video whose left ``static`` columns of pixels repeat from frame to frame (Qwen: from slice to slice), the
    rest random: static tokens are identical across frames at the input."""
    qwen = family in QWEN
    size = (64, 48) if qwen else (32, 32)
    video = tm.random_video(frames, *size, seed=seed)
    step = 2 if qwen else 1
    for f in range(step, frames):
        video[f, :, :static] = video[f - step, :, :static]
    return video


CASES = [  # family, frames, static pixel columns, ratio, similarity, ratio_lower_bound; visual counts per call
    ("qwen2_vl", 8, 24, 0.5, 0.9, 0.1),  # 192 -> 120 merged at the input, merging stops, pruned to 72
    ("qwen2_vl", 8, 0, 0.4, 0.2, 0.1),  # 162, 147: a cascade of two merges, then pruned to 76
    ("qwen2_vl", 8, 0, 0.4, 0.2, 0.05),  # 162, 147, 128, 84: merges to the last call, above the budget (68%)
    ("qwen2_vl", 8, 24, 0.5, 0.1, 0.05),  # ratio >= u at the input: the top floor(u * V) merge, no pruning
    ("qwen2_5_vl", 8, 32, 0.6, 0.5, 0.05),
    ("qwen3_vl", 6, 24, 0.5, 0.9, 0.1),
    ("llava_onevision", 6, 16, 0.5, 0.9, 0.1),
    ("llava_onevision", 6, 0, 0.5, 0.5, 0.05),
]


@pytest.mark.parametrize("family,frames,static,ratio,similarity,lower", CASES)
def test_on_a_model_equals_the_slow_rederivation(family, frames, static, ratio, similarity, lower):
    model, proc = tm.build(family, attn="eager")
    inputs = tm.video_inputs(family, proc, videos=[repeating_video(family, frames, static)])
    options = {"similarity_lower_bound": similarity, "ratio_lower_bound": lower}
    with vtr.patch(model, "framefusion", ratio=ratio, **options) as handle, torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    record = handle.last
    (span,) = record.layout.rows[0].spans
    lm_inputs = R.capture_lm_inputs(model, inputs)
    slow_logits, alive, counts = slow_framefusion(model, lm_inputs, span, 1 - ratio, similarity, lower)
    assert record.merged is not None, "nothing merged"
    visual = {int(p): span.offset + j for j, p in enumerate(span.positions.tolist())}
    assert record.kept[0].tolist() == sorted(visual[p] for p in alive if p in visual)  # OneVision: + newline
    assert [s.n_present[0] - int(span.newline.sum()) for s in record.stages] == counts
    assert torch.allclose(logits, slow_logits, atol=1e-5)
    check_against_reference(model, inputs, "framefusion", "generate", ratio=ratio, **options)
    check_against_reference(model, inputs, "framefusion", "forward", ratio=ratio, **options)


@pytest.mark.parametrize("ratio,similarity,lowest", [(0.5, 0.3, "67.71% \\(ratio <= 0.3229\\)"),
                                                     (0.5, 0.2, "58.33% \\(ratio <= 0.4167\\)")])
def test_merges_that_spend_the_budget_are_refused(ratio, similarity, lowest):
    """Merges that commit more of the video's tokens to the layers before the pruning step than the budget allows
    (the official code fails an assertion there): a ValueError naming the lowest reachable cost, as soon as the
    merge that spends it is made (layers 0 to 2 on 90%, resp. 78%, of the video's tokens on average)."""
    model, proc = tm.build("qwen2_vl", attn="eager")
    inputs = tm.video_inputs("qwen2_vl", proc, videos=[repeating_video("qwen2_vl", 8, 0)])
    with vtr.patch(model, "framefusion", ratio=ratio, similarity_lower_bound=similarity, ratio_lower_bound=0.05), \
            torch.no_grad(), pytest.raises(ValueError, match=rf"framefusion: ratio=0.5 .* lowest it reaches is {lowest}"):
        model(**inputs)


def test_official_28_layers_and_the_depth_default():
    model, proc = tm.build("qwen2_vl", attn="eager")
    inputs = tm.video_inputs("qwen2_vl", proc, videos=[repeating_video("qwen2_vl", 8, 24)])
    for layers in (None, 28):
        with vtr.patch(model, "framefusion", ratio=0.5, similarity_lower_bound=0.9, cost_layers=layers) as handle, \
                torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        (span,) = handle.last.layout.rows[0].spans
        slow_logits, _, counts = slow_framefusion(model, R.capture_lm_inputs(model, inputs), span, 0.5, 0.9, 0.1,
                                                  n_layers=layers)
        assert [s.n_present[0] for s in handle.last.stages] == counts
        assert torch.allclose(logits, slow_logits, atol=1e-5)
        if layers is None:
            default = counts
    assert default != counts  # 28 layers leave a 4-layer model another budget


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_prunes_by_the_last_four_queries(family):
    """The official Qwen2-VL adapter ranks the pruning step by the attention of the last 4 queries (``num=4``):
    the default on Qwen-VL; ``last_queries=1`` is the Qwen2 / LLaVA-Video adapter's rule. The two keep other
    tokens here, and each equals the slow re-derivation with its query count."""
    model, proc = tm.build(family, attn="eager")
    inputs = tm.video_inputs(family, proc, videos=[repeating_video(family, 8 if family == "qwen2_vl" else 6, 24)])
    kept = {}
    for queries in (None, 1, 4):
        with vtr.patch(model, "framefusion", ratio=0.5, similarity_lower_bound=0.9, last_queries=queries) as handle, \
                torch.no_grad():
            logits = model(**inputs).logits[0, -1]
            assert handle.method.last_queries == (queries or 4)
        (span,) = handle.last.layout.rows[0].spans
        slow_logits, alive, _ = slow_framefusion(model, R.capture_lm_inputs(model, inputs), span, 0.5, 0.9, 0.1,
                                                 queries=queries or 4)
        visual = {int(p): span.offset + j for j, p in enumerate(span.positions.tolist())}
        assert handle.last.kept[0].tolist() == sorted(visual[p] for p in alive if p in visual)
        assert torch.allclose(logits, slow_logits, atol=1e-5)
        kept[queries] = handle.last.kept[0].tolist()
    assert kept[None] == kept[4] != kept[1]


def test_onevision_prunes_by_the_last_query():
    model, _ = tm.build("llava_onevision")
    with vtr.patch(model, "framefusion", ratio=0.5) as handle:
        assert handle.method.last_queries == 1
    with pytest.raises(ValueError, match="last_queries"):
        FrameFusion(ratio=0.5, last_queries=0)


# ------------------------------------------------------------------------------------------------ model level
def test_defaults_budget_and_retention_report():
    model, proc = tm.build("qwen2_vl")
    with vtr.patch(model, "framefusion", ratio=0.7) as handle:
        assert handle.method.similarity_lower_bound == 0.5 and handle.method.ratio_lower_bound == 0.1
        assert handle.method.cost_layers is None
    model, proc = tm.build("llava_onevision")
    inputs = tm.video_inputs("llava_onevision", proc, 1)
    with vtr.patch(model, "framefusion", ratio=0.5) as handle, torch.no_grad():
        assert handle.method.similarity_lower_bound == 0.6
        model(**inputs)
    record = handle.last
    assert record.nominal_retention == 0.5
    # random frames merge nothing at the input; the pruning step before layer 1 keeps round(16 * (1 - u)), u from
    # one merge step of sparsity 0 on 4 layers: 1 - (2 - 1) / 3
    assert record.input_retention == [1.0]
    assert record.n_kept == [round(16 / 3) + 1]  # + the newline, never pruned
    assert record.layer_retention[0] == pytest.approx((17 + 3 * 6) / 4 / 17)
    (span,) = record.layout.rows[0].spans
    assert int(span.newline.nonzero()) + span.offset in record.kept[0].tolist()


@pytest.mark.parametrize("family", QWEN + ("llava_onevision",))
def test_video_rows_equal_the_video_alone(family):
    """Batch 2 (Qwen: 8 and 4 frames) equals each video alone: each row's cascade is its own."""
    import test_requests as TR
    model, proc = tm.build(family)
    frames = [8, 4] if family in QWEN else [6, 6]
    videos = [repeating_video(family, f, 24, seed=b) for b, f in enumerate(frames)]
    options = {"ratio": 0.5, "similarity_lower_bound": 0.9}
    with vtr.patch(model, "framefusion", **options) as handle:
        kept, outputs = TR.run(model, tm.video_inputs(family, proc, videos=videos), "forward")
        assert handle.last.merged is not None
        for b in range(2):
            text = tm._prompt(family, 1, long=bool(b), video=True)
            alone = (tm._onevision_video_by_hand if family == "llava_onevision" else
                     lambda p, t, v: tm._qwen_video_by_hand(family, p, t, v))(proc, [text], [videos[b]])
            kept_alone, outputs_alone = TR.run(model, alone, "forward")
            assert torch.equal(kept[b], kept_alone[0])
            TR.assert_close(outputs[b], outputs_alone[0])


@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_image_and_video_in_one_prompt(mode):
    from test_video_methods import image_and_video_inputs
    model, proc = tm.build("qwen2_vl")
    inputs = image_and_video_inputs("qwen2_vl", proc, frames=8)
    check_against_reference(model, inputs, "framefusion", mode)
    with vtr.patch(model, "framefusion", ratio=0.5) as handle, torch.no_grad():
        model(**inputs)
    image, vid = handle.last.layout.rows[0].spans
    kept = handle.last.kept[0]
    def count(ids, span):
        return int(((ids >= span.offset) & (ids < span.offset + span.n)).sum())

    # each its own cascade. The image: no chains, sparsity 0 at the input, pruned after layer 0 to round(n / 3)
    assert count(kept, image) == round(image.n / 3)
    # the video: its input merges (ratio r below the lower bound here), then round(V * (1 - u([r])))
    after_merge = count(handle.last.stages[0].kept[0], vid)
    r = 1 - after_merge / vid.n
    assert r < 0.1
    assert count(kept, vid) == round(after_merge * (1 - required_sparsity([r], 0.5, 4)))


def test_repeats_exactly_and_state_is_per_request():
    model, proc = tm.build("qwen2_5_vl")
    inputs = tm.video_inputs("qwen2_5_vl", proc, videos=[repeating_video("qwen2_5_vl", 8, 24)])
    runs = []
    with vtr.patch(model, "framefusion", ratio=0.5, similarity_lower_bound=0.9) as handle:
        for _ in range(2):  # the same patch twice: the second request starts a fresh cascade
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
            runs.append((handle.last, torch.stack(out.logits, 1)))
    (a, la), (b, lb) = runs
    assert a.merged is not None
    assert [s.n_present for s in a.stages] == [s.n_present for s in b.stages]
    assert all(torch.equal(x, y) for x, y in zip(a.kept, b.kept)) and torch.equal(la, lb)


def test_ratio_zero_is_the_unpatched_model():
    model, proc = tm.build("qwen2_vl")
    inputs = tm.video_inputs("qwen2_vl", proc, 2)
    with torch.no_grad():
        expected = model(**inputs).logits
    with vtr.patch(model, "framefusion", ratio=0.0) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    assert handle.last.index is None


def test_option_errors():
    with pytest.raises(ValueError, match="ratio must be in"):
        FrameFusion(ratio=1.0)
    with pytest.raises(ValueError, match="similarity_lower_bound must be in"):
        FrameFusion(ratio=0.5, similarity_lower_bound=2.0)
    with pytest.raises(ValueError, match="ratio_lower_bound must be in"):
        FrameFusion(ratio=0.5, ratio_lower_bound=-0.1)
    with pytest.raises(ValueError, match="cost_layers must be in"):
        FrameFusion(ratio=0.5, cost_layers=0)
    with pytest.raises(ValueError, match="resolved at patch time"):
        FrameFusion(ratio=0.5).stages()


def test_each_anyres_tile_is_its_own_cascade():
    """scope="crop": every LLaVA-NeXT tile is a one-frame input with its own state: sparsity 0 at the input, then
    pruned after layer 0 to round(n_tile * (1 - u([0])))."""
    model, proc = tm.build("llava_next")
    inputs = tm.image_inputs("llava_next", proc, 1)
    with vtr.patch(model, "framefusion", ratio=0.5, scope="crop") as handle, torch.no_grad():
        model(**inputs)
    (span,) = handle.last.layout.rows[0].spans
    kept = handle.last.kept[0]
    crops = span.crop.unique().tolist()
    assert len(crops) > 1
    for crop in crops:
        tile = ((span.crop == crop) & ~span.newline).nonzero().flatten()
        assert int(torch.isin(kept, tile).sum()) == max(1, round(len(tile) * (1 - required_sparsity([0.0], 0.5, 4))))


def test_hidden_states_and_attentions_follow_the_post_attention_stage():
    """Pruned inside layer 0 after its attention: layer 0 attends over the whole prompt, its output (what layer 1
    receives, and what output_hidden_states reports) is the pruned sequence."""
    model, proc = tm.build("llava", attn="eager")
    inputs = tm.image_inputs("llava", proc, 1)
    seen = {}

    def grab(module, args, kwargs):
        seen["layer1"] = (args[0] if args else kwargs["hidden_states"]).clone()

    with vtr.patch(model, "framefusion", ratio=0.5) as handle, torch.no_grad():
        hook = R.lm_of(model).layers[1].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
        finally:
            hook.remove()
    full, pruned = inputs["input_ids"].shape[1], handle.last.index.shape[1]
    assert [s.layer for s in handle.last.stages if s.n_present != handle.last.n_visual] == [1, 2, 3]
    assert [h.shape[1] for h in out.hidden_states] == [full, pruned, pruned, pruned, pruned]
    assert [a.shape[-1] for a in out.attentions] == [full, pruned, pruned, pruned]
    assert torch.equal(out.hidden_states[1], seen["layer1"])
