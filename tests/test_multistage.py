"""Methods that prune at several decoder layers (PyramidDrop, SparseVLM): their selections against slow, loop-based
re-derivations from the notes (shared/research/methods_image.md sections 3 and 4) driven layer by layer through the
unpatched model with eager attention; the released keep counts; per-layer KV cache lengths; what handle.last says.

Exactness against the reference (the unpatched layers fed each stage's tokens, prefill and decode, eager and SDPA,
batched) is in test_exactness.py, batch-vs-alone in test_requests.py: both matrices include these methods."""
import math

import pytest
import torch
from transformers import DynamicCache

import reference as R
import tiny_models as tm
import vtr
from vtr.methods import sparsevlm as sparsevlm_module


def patched(model, inputs, method, **options):
    with vtr.patch(model, method, **options) as handle:
        with torch.no_grad():
            logits = model(**inputs).logits
    return handle.last, handle.method, logits


class SlowLoop:
    """Batch 1: the unpatched decoder layers run one by one on the language model's inputs; before a stage layer
    a callback rebuilds the sequence. Tokens are named by their original prompt position, or ("m", layer, j) for
    a token merged before ``layer``."""

    def __init__(self, model, inputs):
        self.model, self.lm = model, R.lm_of(model)
        self.seen = R.capture_lm_inputs(model, inputs)
        self.embeds = self.seen["embeds"][0]
        self.hidden = self.embeds[None]
        self.names = list(range(self.hidden.shape[1]))
        self.positions = R._rope_rows(self.seen["positions"])[..., :1, :].clone()  # [1, L] or [3, 1, L]
        self.attention = {}  # layer -> [H, L, L] eager attention probabilities of the last run of that layer

    def rotary(self, hidden, positions):
        return self.lm.rotary_emb(hidden, positions)

    def run(self, stages: dict):
        for i, block in enumerate(self.lm.layers):
            if i in stages:
                stages[i](self, i)
            L = self.hidden.shape[1]
            mask = R.additive_mask(torch.ones(1, L, dtype=torch.bool), L, self.hidden.dtype)
            handle = block.self_attn.register_forward_hook(
                lambda m, a, out, i=i: self.attention.__setitem__(i, out[1][0].float()))
            try:
                with torch.no_grad():
                    self.hidden = block(self.hidden, attention_mask=mask,
                                        position_embeddings=self.rotary(self.hidden, self.positions),
                                        position_ids=None)
            finally:
                handle.remove()
        return self

    def keep(self, order: list, new_states: dict | None = None, new_positions: dict | None = None,
             compact: bool = True):
        """Rebuild the sequence as the tokens named in ``order``; merged ones from ``new_states``."""
        where = {n: j for j, n in enumerate(self.names)}
        states = [self.hidden[0, where[n]] if n in where else new_states[n] for n in order]
        if compact:
            positions = torch.arange(len(order))[None]
            if self.positions.dim() == 3:
                positions = positions.expand(3, 1, -1)
        else:
            cols = [self.positions[..., where[n]] if n in where else new_positions[n] for n in order]
            positions = torch.stack(cols, -1)
        self.hidden, self.names, self.positions = torch.stack(states)[None], list(order), positions


def image_slots(loop, span):
    """Current slots of the image's tokens (original or merged), in sequence order."""
    own = set(span.positions.tolist())
    return [j for j, n in enumerate(loop.names) if (isinstance(n, tuple) or n in own)]


def original_ids(loop, span, names):
    index = {int(p): i for i, p in enumerate(span.positions)}
    return sorted(index[n] for n in names if not isinstance(n, tuple) and n in index)


FAMILIES = ["llava", "llava_next", "qwen2_vl"]


# ----------------------------------------------------------------------------------------------------- PyramidDrop
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [{"ratio": 17 / 32}, {"ratio": 0.7}, {"keep": 24}])
def test_pdrop_matches_the_slow_loop(family, budget):
    """Notes 4.2: before stage layer K, the NEXT layer's (K's) input norm and q/k at the current positions give the
    last token's softmax row, mean over heads; keep the top int(N lam^s) (N: the image's tokens, newlines
    included); compact positions after each stage (original on M-RoPE)."""
    model, proc = tm.build(family, attn="eager")
    inputs = tm.image_inputs(family, proc, 1)
    record, method, _ = patched(model, inputs, "pdrop", **budget)
    span = record.layout.rows[0].spans[0]
    layers = [int(k) for k in method.layers.split(",")]
    fraction = budget["keep"] / span.n if "keep" in budget else 1 - budget["ratio"]
    lam = 1.0 - 1e-12
    # solve (layers[0] + (l1-l0) lam + (l2-l1) lam^2 + (D-l2) lam^3) / D = fraction by scanning, then bisecting
    bounds = [0] + layers + [len(R.lm_of(model).layers)]
    average = lambda x: sum((bounds[s + 1] - bounds[s]) * x ** s for s in range(len(bounds) - 1)) / bounds[-1]
    low, high = 0.0, 1.0
    for _ in range(200):
        lam = (low + high) / 2
        low, high = (lam, high) if average(lam) < fraction else (low, lam)
    compact = method.positions == "compact"
    kept_per_stage = []

    def stage(loop, k):
        s = layers.index(k) + 1
        block = loop.lm.layers[k]
        normed = block.input_layernorm(loop.hidden)
        L = loop.hidden.shape[1]
        _, weights = block.self_attn(hidden_states=normed, position_embeddings=loop.rotary(normed, loop.positions),
                                     attention_mask=R.additive_mask(torch.ones(1, L, dtype=torch.bool), L,
                                                                    normed.dtype))
        row = weights[0].float().mean(0)[-1]  # the last token's row
        image = image_slots(loop, span)
        count = max(1, int(span.n * lam ** s + 1e-6))
        top = [image[j] for j in torch.topk(row[image], min(count, len(image))).indices.tolist()]
        order = [n for j, n in enumerate(loop.names) if j not in set(image) or j in set(top)]
        loop.keep(order, compact=compact)
        kept_per_stage.append(original_ids(loop, span, order))

    with torch.no_grad():
        SlowLoop(model, inputs).run({k: stage for k in layers})
    assert [s.kept[0].tolist() for s in record.stages] == kept_per_stage
    assert [s.layer for s in record.stages] == layers


def test_pdrop_official_default_schedule_on_a_32_layer_model():
    """ratio=17/32 is the official default: layers 8/16/24 and lam 0.5 -> 576/288/144/72, average 270."""
    method = vtr.PyramidDrop(ratio=17 / 32).for_depth(32)
    assert method.layers == "8,16,24"
    assert abs(method._lambda(576, 32) - 0.5) < 1e-9
    early = vtr.PyramidDrop(keep=192).for_depth(32)
    assert early.layers == "2,8,16"
    assert vtr.PyramidDrop(ratio=0.5, layers="4,9").for_depth(12).layers == "4,9"
    with pytest.raises(ValueError, match="strictly increasing"):
        vtr.PyramidDrop(ratio=0.5, layers="9,4").for_depth(12)
    with pytest.raises(ValueError, match="in \\[1, 11\\]"):
        vtr.PyramidDrop(ratio=0.5, layers="4,12").for_depth(12)


# ------------------------------------------------------------------------------------------------------- SparseVLM
def dpc_knn_loops(x, n_clusters, generator):
    """The notes' DPC-KNN with plain loops: (centres in score order, assignment)."""
    n, dim = x.shape
    x = x.double()
    dist = [[float(torch.dist(x[i], x[j])) / math.sqrt(dim) for j in range(n)] for i in range(n)]
    noise = torch.rand(n, generator=generator).double() * 1e-6
    density = []
    for i in range(n):
        nearest = sorted(dist[i])[:n_clusters]
        density.append(math.exp(-sum(d * d for d in nearest) / len(nearest)) + float(noise[i]))
    top = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(n) if density[j] > density[i]], default=top) for i in range(n)]
    score = [d * p for d, p in zip(delta, density)]
    centres = sorted(range(n), key=lambda i: -score[i])[:n_clusters]
    assignment = [min(range(len(centres)), key=lambda c: dist[i][centres[c]]) for i in range(n)]
    for c, i in enumerate(centres):
        assignment[i] = c
    return centres, assignment


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [{}, {"positions": "original"}, {"version": "2.0"}])
def test_sparsevlm_matches_the_slow_loop(family, options):
    """Notes 3.2-3.6: raters from the input embeddings; at each stage the raters' eager attention rows of the layer
    before, mean over heads then raters; top count; v1.5 recycles the top 30% pruned into DPC-KNN means placed
    after the kept image tokens; v2.0 divides by the rotary gravity, averages the 14 strongest heads, no merge."""
    if family == "qwen2_vl" and options.get("positions"):
        pytest.skip("M-RoPE models keep original positions by default")
    model, proc = tm.build(family, attn="eager")
    inputs = tm.image_inputs(family, proc, 1)
    record, method, _ = patched(model, inputs, "sparsevlm", ratio=0.75, **options)
    span = record.layout.rows[0].spans[0]
    layers = [int(k) for k in method.layers.split(",")]
    loop = SlowLoop(model, inputs)
    # raters: softmax over the text of V X^T, mean over the image, above the mean
    text = [p for p in range(int(span.positions.max()) + 1, loop.hidden.shape[1])]
    m = (loop.embeds[span.positions] @ loop.embeds[text].T).softmax(-1).mean(0)
    raters = [p for p, v in zip(text, m.tolist()) if v > float(m.mean())]
    compact = method.positions == "compact"
    v2 = method.version == "2.0"
    got = {"kept": [], "added": []}

    def stage(loop, k):
        s = layers.index(k)
        probs = loop.attention[k - 1]  # [H, L, L]
        rows = [loop.names.index(r) for r in raters]
        if v2:
            cos, sin = loop.rotary(loop.hidden, loop.positions)
            half = cos.shape[-1] // 2
            ones = torch.ones(cos.shape[-1])
            rotated = cos[0] * ones + torch.cat([-ones[half:], ones[:half]]) * sin[0]
            gravity = rotated @ rotated.T / math.sqrt(cos.shape[-1])
            probs = probs / gravity
        image = [j for j, n in enumerate(loop.names) if isinstance(n, tuple) or n in set(span.positions.tolist())]
        block = probs[:, rows][:, :, image]  # [H, r, c]
        if v2:
            block = block[torch.topk(block.sum((1, 2)), min(14, len(block))).indices]
        score = block.mean(0).mean(0)
        fraction = sparsevlm_module.stage_fractions(method.version, 0.25)[s]
        count = min(max(1, round(fraction * span.n)), len(image) - 1)
        top = sorted(torch.topk(score, count).indices.tolist())
        kept = [image[j] for j in top]
        order = [n for j, n in enumerate(loop.names) if j not in set(image) or j in set(kept)]
        new_states, new_positions, added = {}, {}, []
        if not v2:
            pruned = [j for j in range(len(image)) if j not in set(top)]
            n1 = int(0.3 * len(pruned)) + 1
            candidates = [pruned[j] for j in torch.topk(score[pruned], n1).indices.tolist()]
            features = loop.hidden[0, [image[j] for j in candidates]].float()
            C = int(n1 / 10) + 1
            centres, assignment = dpc_knn_loops(features, C, torch.Generator().manual_seed(0))
            last_kept = max(order.index(loop.names[j]) for j in kept)
            for c, centre in enumerate(centres):
                members = [i for i, a in enumerate(assignment) if a == c]
                name = ("m", k, c)
                new_states[name] = features[members].mean(0).to(loop.hidden.dtype)
                new_positions[name] = loop.positions[..., image[candidates[centre]]]
                added.append(sorted(original_ids(loop, span, [loop.names[image[candidates[i]]] for i in members])))
            order = order[:last_kept + 1] + list(new_states) + order[last_kept + 1:]
        loop.keep(order, new_states, new_positions, compact=compact)
        got["kept"].append(original_ids(loop, span, order))
        got["added"].append(added)

    with torch.no_grad():
        loop.run({k: stage for k in layers})
    assert [s.kept[0].tolist() for s in record.stages] == got["kept"]
    if v2:
        assert all(s.added is None for s in record.stages)
    else:  # the tokens added at each stage, with the image tokens merged into them (only direct members here)
        for s, added in zip(record.stages, got["added"]):
            new = [t for t in s.added[0] if t.layer == s.layer]
            assert len(new) == len(added) > 0
            for token, members in zip(new, added):
                assert set(members) <= set(token.sources.tolist())


def test_sparsevlm_released_counts():
    """score.py's per-stage counts for the nominal 192 / 128 / 96 / 64 budgets of a 576-token image."""
    for version, table in sparsevlm_module.COUNTS.items():
        for budget, counts in table.items():
            fractions = sparsevlm_module.stage_fractions(version, budget / 576)
            assert [round(f * 576) for f in fractions] == list(counts)
    # in between: monotone, towards keeping everything
    a = sparsevlm_module.stage_fractions("1.5", 0.5)
    b = sparsevlm_module.stage_fractions("1.5", 0.8)
    assert all(x < y <= 1 for x, y in zip(a, b))


def test_sparsevlm_keeps_the_released_counts_on_a_576_token_image():
    """End to end on a Qwen2-VL image of 24 x 24 merged tokens: 576 -> 300 -> 200 -> 110 kept at the three
    stages for the nominal 192 (ratio 2/3), plus the recycled tokens: int(0.3 * pruned) + 1 candidates, one
    cluster per ten."""
    import transformers as T
    model, proc = tm.build("qwen2_vl")
    proc.image_processor = T.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                   min_pixels=192 ** 2, max_pixels=192 ** 2)
    image = tm.random_image(192, 192, seed=0)
    inputs = proc(text=[tm._prompt("qwen2_vl", 1, long=False)], images=[image], return_tensors="pt")
    record, _, _ = patched(model, inputs, "sparsevlm", ratio=1 - 192 / 576)
    assert record.n_visual == [576]
    present = 576
    for stage, count in zip(record.stages, (300, 200, 110)):
        new = [t for t in stage.added[0] if t.layer == stage.layer]
        assert stage.n_visual == [present]
        assert stage.n_present[0] - len(new) == count  # selected, before this stage's recycling
        n1 = int(0.3 * (present - count)) + 1
        assert len(new) == int(n1 / 10) + 1
        present = stage.n_present[0]
    assert record.stages[0].n_present == [300 + 9]  # the notes' example: 276 pruned -> 83 -> 9 clusters


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("budget", [{"ratio": 0.5}, {"ratio": 0.75}, {"keep": 16}, {"keep": 20}])
def test_sparsevlm_stage_counts_follow_the_rule(family, budget):
    """Each stage keeps min(max(1, round(f_s * N)), present - 1) of an image's present tokens (recycled ones
    included), f_s the stage's fraction of the layer-averaged budget, then adds int(n1 / 10) + 1 recycled
    tokens, n1 = int(0.3 * pruned) + 1."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2)
    record, _, _ = patched(model, inputs, "sparsevlm", **budget)
    for b, row in enumerate(record.layout.rows):
        n = row.spans[0].n
        fraction = budget["keep"] / n if "keep" in budget else 1 - budget["ratio"]
        for s, stage in enumerate(record.stages):
            present = stage.n_visual[b]
            count = min(max(1, round(sparsevlm_module.stage_fractions("1.5", fraction)[s] * n)), present - 1)
            new = [t for t in stage.added[b] if t.layer == stage.layer]
            assert stage.n_present[b] - len(new) == count
            assert len(new) == int((int(0.3 * (present - count)) + 1) / 10) + 1


# ------------------------------------------------------------------------------------------------- both methods
@pytest.mark.parametrize("method", ["pdrop", "sparsevlm"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_each_layer_caches_its_stage_length(method, family):
    """After prefill, layer i's KV cache holds the tokens of the stage it runs in."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2, "multi")
    cache = DynamicCache(config=R.lm_of(model).config)
    with vtr.patch(model, method, ratio=0.5) as handle:
        with torch.no_grad():
            model(**inputs, past_key_values=cache, use_cache=True)
    record = handle.last
    expected = [inputs["input_ids"].shape[1]] * record.n_layers
    for stage in record.stages:
        expected[stage.layer:] = [stage.length] * (record.n_layers - stage.layer)
    assert [layer.keys.shape[-2] for layer in cache.layers] == expected
    assert len(set(expected)) == 4  # three stages, each shorter


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm"])
def test_handle_reports_stages_and_the_layer_average(method):
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 2, "multi")
    record, handle_method, _ = patched(model, inputs, method, ratio=0.75)
    assert [s.layer for s in record.stages] == [int(k) for k in handle_method.layers.split(",")]
    for b in range(2):
        counts = [record.n_visual[b]] * record.n_layers
        for s in record.stages:
            counts[s.layer:] = [len(s.kept[b]) + len(s.added[b] if s.added else [])] * (record.n_layers - s.layer)
        assert record.layer_average[b] == sum(counts) / len(counts)
        assert record.visual_per_layer()[b] == counts
        assert record.stages[0].n_visual[b] == record.n_visual[b]
        assert record.n_kept[b] == counts[-1]  # what the last layers run on, added tokens included
        for before, after in zip(record.stages, record.stages[1:]):
            assert after.n_visual[b] == before.n_present[b]
    if method == "sparsevlm":  # recycled tokens are in the index as -2 - a, after their image's kept tokens
        index = record.index[0]
        assert bool((index < -1).any())
        assert int((index < -1).sum()) == len(record.stages[-1].added[0])


def test_sparsevlm_recycling_repeats_and_depends_on_the_seed():
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 1)
    first, _, a = patched(model, inputs, "sparsevlm", ratio=0.75)
    second, _, b = patched(model, inputs, "sparsevlm", ratio=0.75)
    assert torch.equal(a, b)
    assert [[t.sources.tolist() for t in s.added[0]] for s in first.stages] == \
        [[t.sources.tolist() for t in s.added[0]] for s in second.stages]


def test_multi_stage_options_are_checked():
    model, _ = tm.build("llava")
    deep, _ = tm.build("llava", layers=6)
    with pytest.raises(ValueError, match="at most 3 stages"):
        vtr.patch(deep, "sparsevlm", ratio=0.5, layers="1,2,3,4")
    with pytest.raises(ValueError, match="strictly increasing"):
        vtr.patch(model, "sparsevlm", ratio=0.5, layers="1,1")
    shallow, _ = tm.build("llava", layers=2)
    with pytest.raises(ValueError, match="too shallow for 3 pruning stages; name fewer"):
        vtr.patch(shallow, "pdrop", ratio=0.5)
    with pytest.raises(ValueError, match="version"):
        vtr.patch(model, "sparsevlm", ratio=0.5, version="3")
    with pytest.raises(ValueError, match="scope"):
        vtr.patch(model, "sparsevlm", ratio=0.5, scope="crop")
    with pytest.raises(ValueError, match="lam"):
        vtr.patch(model, "pdrop", ratio=0.5, lam=1.5)
    assert vtr.handle_of(model) is None


# --------------------------------------------------------------------------------- layer-averaged budgets: reach
LAYER_AVERAGED = ["pdrop", "sparsevlm", "framefusion", "vflowopt"]


@pytest.mark.parametrize("method,family", [p for p in tm.method_family(LAYER_AVERAGED, tm.FAMILIES)
                                           if not tm.options(*p.values)])  # (a hybrid model's own stage layers)
def test_layer_averaged_budgets_out_of_reach_are_refused(method, family):
    """A layer-averaged budget below what the schedule reaches is refused with the lowest reachable value: a ratio
    at patch time where the schedule alone decides it (PyramidDrop, SparseVLM: the layers before the first stage
    run on every token, 1 of these 4), a keep and FrameFusion's cost (its merges decide) at the first forward,
    before any decoder layer runs, on every family the method supports. The lowest reachable budget is taken."""
    from test_invariants import hook_count
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 1)
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if method == "vflowopt":  # the schedule reaches any ratio; vit_keep / llm_keep alone can put it out of reach
        with pytest.raises(ValueError, match=r"highest it reaches is 50.00% \(ratio >= 0.5\); llm_keep='0.5,0.5'"):
            vtr.patch(model, method, ratio=0.1, llm_keep="0.5,0.5")
        with pytest.raises(ValueError, match=r"cannot reach on this 4-layer model: the lowest it reaches is "
                                             r"45.00% \(ratio <= 0.55\); vit_keep=0.9 fixes the vision stage"):
            vtr.patch(model, method, ratio=0.9, vit_keep=0.9)
        assert hook_count(model) == 0
        return
    if method != "framefusion":
        with pytest.raises(ValueError, match=rf"{method}: ratio=0.76 names a layer-averaged retention of 24.00% .* "
                                             r"cannot reach on this 4-layer model: the lowest it reaches is 25.00% "
                                             r"\(ratio <= 0.75\)"):
            vtr.patch(model, method, ratio=0.76)
        assert hook_count(model) == 0 and vtr.handle_of(model) is None
    layers_run = []
    spy = model.model.language_model.layers[0].register_forward_pre_hook(lambda m, a: layers_run.append(1))
    budgets = [{"keep": 1}] + ([{"ratio": 0.76}] if method == "framefusion" else [])
    for budget in budgets:
        with vtr.patch(model, method, **budget), torch.no_grad():
            with pytest.raises(ValueError, match=r"cannot reach on this 4-layer model: the lowest it reaches is "
                                                 r"25.00% \(ratio <= 0.75"):
                model(**inputs)
    spy.remove()
    assert not layers_run
    with vtr.patch(model, method, ratio=0.75) as handle, torch.no_grad():  # the lowest reachable: taken
        model(**inputs)
    assert handle.last.n_kept[0] < n


def test_pdrop_refuses_the_issue_budget_on_a_32_layer_model():
    """ratio=0.95 (5%) with PyramidDrop's early schedule 2,8,16 of 32: layers 0-1 alone average 6.25%."""
    model, _ = tm.build("llava", layers=32)
    with pytest.raises(ValueError, match=r"pdrop: ratio=0.95 .* the lowest it reaches is 6.25% \(ratio <= 0.9375\)"):
        vtr.patch(model, "pdrop", ratio=0.95)
    vtr.patch(model, "pdrop", ratio=0.9375).remove()
    vtr.patch(model, "pdrop", ratio=0.95, layers="1,8,16").remove()  # an earlier first stage reaches it
