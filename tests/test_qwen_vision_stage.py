"""The ``vision`` stage inside the Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision transformers, with FlowCut's Qwen rule.

* the later blocks really run on the kept rows (their inputs and ``cu_seqlens``, hooked), whole 2x2 merge units;
* exactness: the unpatched blocks run by hand on the kept rows (per-segment ``cu_seqlens``, Qwen2.5-VL windows, the
  kept rows' rotary; Qwen3-VL DeepStack features of the kept units), then the unpatched language model, against the
  patched run: prefill and greedy decoding, eager and SDPA, a batch of 2 with images of different sizes, under both
  position policies (``tests/reference.py``: ``QwenTowerReference``);
* FlowCut's picks against a slow loop re-derived from the notes (shared/research/methods_image.md section 9.4);
* ratio 0 is the identity; the ``span_prefix`` positions; videos are refused.

The tiny towers' random weights give a near-uniform global-query attention, whose entropy makes FlowCut's adaptive
count 0 until the last block: ``sharpen`` scales the query and key projections, and Qwen2-VL / Qwen3-VL get 6 blocks
(``deepen``) so that blocks 1 and 3 prune too and later blocks run on fewer rows.
"""
import copy
import math
import sys

import pytest
import torch

import reference as R
import tiny_models as tm
import vtr
from test_exactness import check_against_reference
from vtr import compat

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def deepen(model, depth: int = 6, seed: int = 0):
    """Blocks appended (perturbed copies of the first two) up to ``depth``."""
    visual = model.model.visual
    generator = torch.Generator().manual_seed(seed)
    while len(visual.blocks) < depth:
        block = copy.deepcopy(visual.blocks[len(visual.blocks) % 2])
        for p in block.parameters():
            p.data += 0.02 * torch.randn(p.shape, generator=generator)
        visual.blocks.append(block)
    model.config.vision_config.depth = depth
    return model


def sharpen(model, query: float = 200.0, key: float = 5.0):
    for block in compat.vision_layers(model):
        D = block.attn.qkv.weight.shape[1]
        block.attn.qkv.weight.data[:D] *= query
        block.attn.qkv.bias.data[:D] *= query
        block.attn.qkv.weight.data[D:2 * D] *= key
    return model


def build(family, attn="eager"):
    model, proc = tm.build(family, attn=attn)
    if len(model.model.visual.blocks) < 6:
        deepen(model)
    return sharpen(model), proc


def run_with_hooks(model, inputs, hooks):
    """One forward without gradients, then the hooks removed (also when it raises)."""
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()


def patched(model, inputs, **options):
    with vtr.patch(model, "flowcut", **options) as handle, torch.no_grad():
        logits = model(**inputs).logits
    return handle.last, handle.method, logits


@pytest.mark.parametrize("family", QWEN)
def test_later_blocks_run_on_the_kept_merge_units(family):
    model, proc = build(family)
    inputs = tm.image_inputs(family, proc, 2, "multi")
    seen = {}

    def hook(i):
        def record(module, args, kwargs):
            seen[i] = (args[0].shape[0], kwargs["cu_seqlens"].clone(), kwargs["position_embeddings"][0].shape[0])
        return record

    blocks = compat.vision_layers(model)
    with vtr.patch(model, "flowcut", ratio=0.75) as handle:  # hooked after vtr's own pre-hooks
        hooks = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
        hooks += [m.register_forward_pre_hook(lambda m, args, j=j: seen.__setitem__(("merger", j), args[0].shape[0]))
                  for j, m in enumerate(compat.qwen_mergers(model))]
        run_with_hooks(model, inputs, hooks)
    record, method = handle.last, handle.method
    history = record.vision_tokens
    pruning = sorted(history)
    assert len(pruning) >= 2 and pruning[-1] == len(blocks) - 1, pruning  # pruned mid-tower and at the last block
    S = int(inputs["image_grid_thw"].prod(-1).sum())
    assert seen[0][0] == S
    windows = compat.qwen_window_blocks(model)
    for i in range(1, len(blocks)):
        before = [k for k in pruning if k < i]
        rows = history[before[-1]][0] if before else torch.arange(S)
        n, cu, rotary = seen[i]
        assert n == rotary == len(rows) and int(cu[-1]) == len(rows)
        if before:
            assert n < S
            units = rows.view(-1, 4)  # whole merge units: 4 consecutive original rows
            assert bool((units[:, 0] % 4 == 0).all()) and bool((units - units[:, :1] == torch.arange(4)).all())
            grid = inputs["image_grid_thw"]
            bounds = compat.qwen_window_seqlens(model, grid) if i in windows else compat.qwen_cu_seqlens(grid)
            expected = [0] + [int(((rows >= a) & (rows < b)).sum()) for a, b in zip(bounds[:-1], bounds[1:])]
            expected = torch.tensor(expected).cumsum(0).unique_consecutive()
            assert torch.equal(cu.long(), expected), (i, cu, expected)
    # the patch merger (and Qwen3-VL's DeepStack mergers, which read earlier blocks) run on the kept rows only
    final = history[pruning[-1]][0]
    assert seen["merger", 0] == len(final) < S
    for j, layer in enumerate(getattr(model.model.visual, "deepstack_visual_indexes", None) or []):
        before = [k for k in pruning if k < layer + 1]
        assert seen["merger", j + 1] == (len(history[before[-1]][0]) if before else S)
    # every image ends with 2 T merge units (T its budget), T kept from decoder layer 2 on
    vision, llm = record.stages
    assert (vision.stage, llm.stage, llm.layer) == ("vision", "layer", 2)
    for b, row in enumerate(record.layout.rows):
        for span in row.spans:
            T = method.budget(span.n)
            inside = lambda kept: kept[(kept >= span.offset) & (kept < span.offset + span.n)]  # noqa: E731
            assert len(inside(vision.kept[b])) == min(span.n, 2 * T)
            assert len(inside(llm.kept[b])) == T


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("attn,mode,positions", [("eager", "forward", None), ("eager", "generate", None),
                                                 ("sdpa", "forward", None), ("sdpa", "generate", None),
                                                 ("eager", "forward", "original"), ("eager", "generate", "original")])
def test_matches_the_reference_with_pruning_inside_the_tower(family, attn, mode, positions):
    """Batch 2, row 0 with two images of different sizes, row 1 with one: the unpatched blocks on the kept rows;
    prefill logits, or 6 greedy steps; the default span_prefix positions and the kept tokens' own."""
    model, proc = build(family, attn)
    inputs = tm.image_inputs(family, proc, 2, "multi")
    options = {"positions": positions} if positions else {}
    with vtr.patch(model, "flowcut", ratio=0.75, **options) as handle, torch.no_grad():
        model(**inputs)
    assert len(handle.last.vision_tokens) >= 2  # later blocks ran on fewer rows
    check_against_reference(model, inputs, "flowcut", mode, **options)


@pytest.mark.parametrize("family", QWEN)
def test_vision_stage_alone_matches_the_reference(family):
    """llm_layer=0: the tower keeps T merge units per image, the language model gets them (pre-LLM layout)."""
    model, proc = build(family)
    inputs = tm.image_inputs(family, proc, 2, "single")
    check_against_reference(model, inputs, "flowcut", "generate", llm_layer=0)


def slow_flowcut_qwen(model, inputs, targets: list) -> dict:
    """Notes 9.4 (Qwen ViT stage), per image, whole merge units (vtr's documented difference): after block ``i``
    of the ``L`` blocks, for each image with more than its ``target`` patches: queries, keys (rotated) and values of
    the block's attention input, a global query (mean of the image's queries per head), ``a = mean_h softmax(q_g k /
    sqrt(d))``, ``S = a * ||mean_h v||_1``, summed per unit, ``C = S`` or ``(C + S) / 2``; at even ``rpl = L - i - 1``
    keep ``ceil(max(n - P, target) / 4)`` units by ``C`` (``P = round((n - target) / sqrt(rpl) * (1 - (H / log n)^2))``,
    ``H = -sum a log(a + 1e-7)``; ``rpl = 0``: the target). Blocks run by hand on the kept rows. Returns {block: [1, S']
    kept original rows} for the blocks that pruned."""
    visual = model.model.visual
    calls = {}

    def capture(i):
        def hook(module, args, kwargs):
            calls.setdefault(i, (args[0], dict(kwargs)))
        return hook

    run_with_hooks(model, inputs, [b.register_forward_pre_hook(capture(i), with_kwargs=True)
                                   for i, b in enumerate(visual.blocks)])
    grid = inputs["image_grid_thw"]
    sizes = grid.prod(-1).tolist()
    images = [list(range(sum(sizes[:k]), sum(sizes[:k + 1]))) for k in range(len(sizes))]
    hidden, _ = calls[0]
    L = len(visual.blocks)
    cumulative = [None] * len(images)
    history = {}
    rotate = sys.modules[type(visual.blocks[0].attn).__module__].apply_rotary_pos_emb_vision
    with torch.no_grad():
        for i, block in enumerate(visual.blocks):
            kw = calls[i][1]
            rows = [r for image in images for r in image]
            cu = R.kept_boundaries(kw["cu_seqlens"].tolist(), rows)
            cos, sin = (t[rows] for t in kw["position_embeddings"])
            x = block.norm1(hidden)
            attn = block.attn
            H = attn.num_heads
            qkv = attn.qkv(x).view(len(rows), 3, H, -1)
            q, k = rotate(qkv[:, 0], qkv[:, 1], cos, sin)
            v = qkv[:, 2]
            hidden = block(hidden, cu_seqlens=torch.tensor(cu, dtype=torch.int32), position_embeddings=(cos, sin))
            pruned, start, new_hidden = False, 0, []
            rpl = L - i - 1
            for m, (image, target) in enumerate(zip(images, targets)):
                n = len(image)
                local = list(range(start, start + n))
                start += n
                if n <= target:
                    new_hidden.append(hidden[local])
                    continue
                qi, ki, vi = q[local].float(), k[local].float(), v[local].float()
                d = qi.shape[-1]
                a = torch.stack([torch.softmax(qi[:, h].mean(0) @ ki[:, h].T / math.sqrt(d), -1)
                                 for h in range(H)]).mean(0)
                score = a * vi.mean(1).abs().sum(-1)
                unit_score = torch.stack([score[4 * u:4 * u + 4].sum() for u in range(n // 4)])
                cumulative[m] = unit_score if cumulative[m] is None else 0.5 * cumulative[m] + 0.5 * unit_score
                if rpl % 2:
                    new_hidden.append(hidden[local])
                    continue
                if rpl:
                    entropy = -sum(float(p) * math.log(float(p) + 1e-7) for p in a)
                    prune = round((n - target) / math.sqrt(rpl) * (1 - (entropy / math.log(n)) ** 2))
                else:
                    prune = n
                keep = math.ceil(max(n - prune, target) / 4)
                top = sorted(torch.topk(cumulative[m], keep).indices.tolist())
                cumulative[m] = cumulative[m][top]
                members = [4 * u + j for u in top for j in range(4)]
                images[m] = [image[j] for j in members]
                new_hidden.append(hidden[[local[j] for j in members]])
                pruned = pruned or keep < n // 4
            hidden = torch.cat(new_hidden)
            if pruned:
                history[i] = torch.tensor([[r for image in images for r in image]])
    return history


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("budget", [{"ratio": 0.75}, {"keep": 5}, {"ratio": 0.6, "llm_layer": 0}])
def test_flowcut_matches_the_slow_loop(family, budget):
    model, proc = build(family)
    inputs = tm.image_inputs(family, proc, 2, "multi", rows=[0])
    record, method, _ = patched(model, inputs, **budget)
    targets = [4 * method.vision_target(span.n, 1) for span in record.layout.rows[0].spans]
    expected = slow_flowcut_qwen(model, inputs, targets)
    got = record.vision_tokens
    assert len(expected) >= 2
    assert sorted(got) == sorted(expected)
    for layer in expected:
        assert torch.equal(got[layer].cpu(), expected[layer]), layer


@pytest.mark.parametrize("family", QWEN)
def test_ratio_zero_is_the_identity(family):
    model, proc = build(family)
    inputs = tm.image_inputs(family, proc, 2, "multi")
    with torch.no_grad():
        expected = model(**inputs).logits
    record, _, logits = patched(model, inputs, ratio=0.0)
    assert torch.equal(logits, expected)
    assert record.n_kept == record.n_visual


@pytest.mark.parametrize("family", QWEN)
def test_span_prefix_gives_the_kept_tokens_the_first_positions_of_the_span(family):
    """The default on Qwen-VL: the language model's input positions of an image's kept tokens are the first K of its
    original span (text keeps its own); ``positions="original"``: the kept tokens' own (t, h, w) positions."""
    model, proc = build(family)
    inputs = tm.image_inputs(family, proc, 1)
    lm_inputs = R.capture_lm_inputs(model, inputs)
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("positions", kwargs["position_ids"])

    for positions in ("span_prefix", "original"):
        seen.clear()
        options = {} if positions == "span_prefix" else {"positions": positions}
        with vtr.patch(model, "flowcut", ratio=0.75, **options) as handle:  # hooked after vtr's pre-hook
            handle_lm = R.lm_of(model).register_forward_pre_hook(hook, with_kwargs=True)
            try:
                with torch.no_grad():
                    model(**inputs)
            finally:
                handle_lm.remove()
        record, method = handle.last, handle.method
        assert method.positions == positions
        index = record.stages[0].index[0]
        span = record.layout.rows[0].spans[0].positions
        kept = torch.isin(index, span)
        got = seen["positions"][..., 0, :]
        original = lm_inputs["positions"][..., 0, :]
        if positions == "span_prefix":
            assert torch.equal(got[..., kept], original[..., span[:int(kept.sum())]])
        else:
            assert torch.equal(got[..., kept], original[..., index[kept]])
        assert torch.equal(got[..., ~kept], original[..., index[~kept]])  # text: its own positions
        assert not torch.equal(original[..., span[:int(kept.sum())]], original[..., index[kept]])


def test_span_prefix_is_refused_inside_the_language_model():
    model, _ = tm.build("qwen2_vl")
    with pytest.raises(ValueError, match="fastv: positions='span_prefix' is defined for stages before the language "
                                         "model"):
        vtr.patch(model, "fastv", ratio=0.5, positions="span_prefix")
    assert vtr.handle_of(model) is None


@pytest.mark.video
def test_videos_are_refused():
    model, proc = tm.build("qwen2_vl")
    with vtr.patch(model, "flowcut", ratio=0.5), torch.no_grad():
        with pytest.raises(ValueError, match="flowcut prunes images inside the vision tower; this prompt holds a "
                                             "video"):
            model(**tm.video_inputs("qwen2_vl", proc, 1))


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("budget", [{"keep": 5}, {"ratio": 0.8}])
def test_layer_one_stage_matches_the_slow_loop(family, budget):
    """Notes 9.4, the Qwen variant: at decoder layer 1 the last prompt token's query (per head, after M-RoPE) over
    the image's keys and its value over the image's values, ``softmax(. / sqrt(d))`` in fp32, each mean over heads,
    scored ``(a + s) * ||mean_h v_j||_1`` WITHOUT the normalisation of the LLaVA code (``compute_score_llm``); the top
    T go on from layer 2. Layer 1's attention inputs are taken from the patched run (their equality with the
    reference's is the exactness tests' business)."""
    model, proc = build(family)
    inputs = tm.image_inputs(family, proc, 1)
    attn = R.lm_of(model).layers[1].self_attn
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("x", (kwargs.get("hidden_states", args[0] if args else None), kwargs["position_embeddings"]))

    with vtr.patch(model, "flowcut", **budget) as handle:
        h = attn.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            h.remove()
    record, method = handle.last, handle.method
    x, (cos, sin) = seen["x"]
    L, d = x.shape[1], attn.head_dim
    with torch.no_grad():
        q, k = attn.q_proj(x).view(1, L, -1, d), attn.k_proj(x).view(1, L, -1, d)
        if hasattr(attn, "q_norm"):  # Qwen3-VL normalises each head's query and key before M-RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(x).view(1, L, -1, d).transpose(1, 2)[0]
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    q, k = q[0].float(), k[0].float()
    v = v.float()
    H, group = q.shape[0], q.shape[0] // k.shape[0]
    span = record.layout.rows[0].spans[0]
    order = record.stages[0].index[0].tolist()
    image = [j for j, p in enumerate(order) if p in set(span.positions.tolist())]
    rel = torch.stack([torch.softmax(q[h, -1] @ k[h // group, image].T / math.sqrt(d), -1) for h in range(H)]).mean(0)
    sem = torch.stack([torch.softmax(v[h // group, -1] @ v[h // group, image].T / math.sqrt(d), -1)
                       for h in range(H)]).mean(0)
    vnorm = torch.stack([v[h // group, image] for h in range(H)]).mean(0).abs().sum(-1)
    score = (rel + sem) * vnorm
    target = method.budget(span.n)
    assert len(image) > target
    where = {int(p): i for i, p in enumerate(span.positions)}
    expected = sorted(where[order[image[j]]] for j in torch.topk(score, target).indices.tolist())
    assert record.stages[1].layer == 2 and record.stages[1].kept[0].tolist() == expected


@pytest.mark.parametrize("family,method", [("qwen2_5_vl", "divprune"), ("llava", "divprune"),
                                           ("llava_next", "flowcut")])
def test_span_prefix_for_other_stages_before_the_language_model(family, method):
    """The policy is the engine's: any pre-LLM (or vision) stage may use it, on 1-D RoPE models too."""
    model, proc = tm.build(family)
    check_against_reference(model, tm.image_inputs(family, proc, 2, "multi"), method, "generate",
                            positions="span_prefix")
