"""PruneVid: the section 6.2 hand cases (refine_clusters, static mask, cluster merge, stage-2 quotas), stage 1 against
a slow loop-based re-derivation written from shared/research/methods_video.md section 2.3 on structured synthetic
videos, the stage-2 signal (pre-RoPE, non-causal, max over heads and text queries) recomputed by hand on a model,
the engine's cutting of the earlier KV caches (PruneVid and a FastV variant) against the reference, and model-level
behaviour (batch vs alone with different frame counts, an image and a video in one prompt, determinism, options).
Exactness of every stage against the reference is also in the shared matrices (test_exactness.py)."""
import math

import pytest
import reference as R
import tiny_models as tm
import torch
from test_exactness import check_against_reference
from test_video_methods import QWEN, _with_text, brute_dpc, image_and_video_inputs, structured_video

import vtr
from vtr.methods import FastV, PruneVid, Stage, StageSpec, video
from vtr.methods.clustering import cluster_merge


# ---------------------------------------------------------------------------------------------- primitives
@pytest.mark.parametrize("labels,expected", [
    # section 6.2: both "0" runs tie at length 2 and stay; the singleton cluster "1" takes the left run on the tie
    ([0, 0, 1, 0, 0, 2, 2, 2], [0, 0, 0, 0, 0, 2, 2, 2]),
    # section 6.2: the length-1 "0" run at t=0 has no left neighbour: the right run "1"
    ([0, 1, 1, 1, 0, 0, 2, 2], [1, 1, 1, 1, 0, 0, 2, 2]),
    # longest runs tied: all kept
    ([0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]),
    # one frame, a singleton cluster, no neighbour at all: label 0
    ([3], [0]),
    # two freed neighbours form one stretch: the longer side (right, 3 > 0)
    ([0, 1, 2, 2, 2], [2, 2, 2, 2, 2]),
    # a stretch of freed frames of three clusters between runs of 3 and 3: the left on the tie
    ([0, 0, 0, 1, 0, 0, 2, 3, 3, 3], [0, 0, 0, 0, 0, 0, 0, 3, 3, 3]),
    # the longer right neighbour wins
    ([0, 0, 1, 2, 0, 3, 3, 3], [0, 0, 3, 3, 3, 3, 3, 3]),
    # a stretch repaired earlier counts with its new label: frame 0 joins "1", then frame 3 sees a left run of 3
    # (not 2) against the right run of 3 and takes the left on the tie
    ([6, 1, 1, 7, 4, 4, 4], [1, 1, 1, 1, 4, 4, 4]),
    # both longest runs of "1" kept; the singleton "7" at the end takes its only neighbour
    ([1, 1, 0, 5, 5, 0, 0, 0, 1, 1, 7], [1, 1, 1, 5, 5, 0, 0, 0, 1, 1, 1]),
])
def test_refine_clusters_hand_cases(labels, expected):
    assert video.refine_clusters(labels) == expected


def test_window_similarity_and_static_mask():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    frames = torch.stack([torch.stack([a, a, a]), torch.stack([a, b, -a])])  # [W=2, N=3, D=2]
    assert torch.allclose(video.window_similarity(frames), torch.tensor([1.0, 0.0, -1.0]))
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 5, 3, generator=g)
    cos = torch.nn.functional.cosine_similarity
    brute = [sum(float(cos(X[w, n], X[v, n], dim=0)) for w in range(4) for v in range(4) if w != v) / 12
             for n in range(5)]
    assert torch.allclose(video.window_similarity(X), torch.tensor(brute), atol=1e-6)
    single = video.window_similarity(X[:1])
    assert bool(single.isnan().all()) and not bool((single > 0.8).any())  # W = 1: every location dynamic


def test_cluster_merge_means_in_centre_order():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 4, generator=g)
    centres, means, members = cluster_merge(x, 7, 7, torch.Generator().manual_seed(5))
    noise = torch.rand(15, generator=torch.Generator().manual_seed(5))
    score = brute_dpc(x.double(), 7, noise.double() * 1e-6)
    order = sorted(range(15), key=lambda i: -score[i])[:7]
    assert centres.tolist() == order  # descending score, not spatial order
    dist = torch.cdist(x.double(), x.double()[order])
    assign = dist.argmin(1)
    assign[order] = torch.arange(7)
    for c in range(7):
        assert members[c].tolist() == (assign == c).nonzero().flatten().tolist()
        assert torch.allclose(means[c], x[assign == c].mean(0), atol=1e-6)
    # the method merges only sets of more than 14 tokens, into floor(n * cluster_ratio) clusters
    method = PruneVid(ratio=0.6)
    values, groups = method._clusters(x[:14], None)
    assert torch.equal(values, x[:14]) and [g.tolist() for g in groups] == [[i] for i in range(14)]
    values, groups = method._clusters(x, torch.Generator().manual_seed(5))
    assert len(values) == 7 and all(int(g[0]) == c for g, c in zip(groups, order))  # centre first


def test_stage2_quotas_hand_case():
    # window 0: 5 static (keep floor(5 * .4) = 2), frames 0 and 1 with 3 dynamic each (keep 1 each);
    # window 1: 2 static (keep 0), 1 frame of 5 dynamic (keep 2)
    roles = [(0, -1)] * 5 + [(0, 0)] * 3 + [(0, 1)] * 3 + [(1, -1)] * 2 + [(1, 0)] * 5
    scores = torch.tensor([.1, .9, .3, .8, .2, .5, .7, .6, .05, .01, .02, .99, .98, .3, .4, .1, .2, .5])
    kept = PruneVid.quota_select(scores, roles, 0.4)
    assert kept.tolist() == [1, 3, 6, 8, 14, 17]  # the high static scores of window 1 lose: quota 0
    # a video whose quotas are all 0 keeps its best token
    assert PruneVid.quota_select(torch.tensor([.2, .7]), [(0, -1), (0, 0)], 0.4).tolist() == [1]


# ------------------------------------------------------------------------------- stage 1: slow re-derivation
def slow_prunevid_stage1(E, seg=0.25, tau=0.8, cluster_ratio=0.5, seed=0):
    """Section 2.3 stage 1, one line per pseudocode line, with the DPC noise drawn in the method's order from one
    generator. Returns the emitted tokens ``[(embedding, roles)]`` in the official order, and the windows."""
    g = torch.Generator().manual_seed(seed)
    F, N, _ = E.shape

    def dpc_assign(X, m):
        k = min(7, len(X))
        score = brute_dpc(X.double(), k, torch.rand(len(X), generator=g).double() * 1e-6)
        centres = sorted(range(len(X)), key=lambda i: -score[i])[:m]
        dist = [[math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(X[i], X[c])) / X.shape[1])
                 for c in centres] for i in range(len(X))]
        labels = [min(range(m), key=lambda j: dist[i][j]) for i in range(len(X))]
        for j, c in enumerate(centres):
            labels[c] = j
        return labels

    def merge(Y):
        if len(Y) <= 14:
            return [Y[i] for i in range(len(Y))]
        m = math.floor(len(Y) * cluster_ratio)
        labels = dpc_assign(Y, m)
        return [torch.stack([Y[i] for i in range(len(Y)) if labels[i] == j]).mean(0) for j in range(m)]

    if F == 1:
        labels = [0]
    else:
        labels = dpc_assign(torch.stack([E[t].mean(0) for t in range(F)]), max(1, math.floor(F * seg)))
    labels = video.refine_clusters(labels)
    windows, start = [], 0
    for t in range(1, F + 1):
        if t == F or labels[t] != labels[start]:
            windows.append((start, t))
            start = t
    out = []
    for j, (s, e) in enumerate(windows):
        W = e - s
        static = []
        for n in range(N):
            if W == 1:
                static.append(False)
                continue
            total = sum(float(torch.nn.functional.cosine_similarity(E[w, n], E[v, n], dim=0))
                        for w in range(s, e) for v in range(s, e) if w != v)
            static.append(total / (W * (W - 1)) > tau)
        locs = [n for n in range(N) if static[n]]
        if locs:
            S = torch.stack([torch.stack([E[w, n] for w in range(s, e)]).mean(0) for n in locs])
            out += [(v, (j, -1)) for v in merge(S)]
        dyn = [n for n in range(N) if not static[n]]
        for w in range(W):
            if dyn:
                out += [(v, (j, w)) for v in merge(torch.stack([E[s + w, n] for n in dyn]))]
    return out, windows


def emitted(method, E):
    """The method's stage 1 on ``E`` ``[F, N, D]`` in the official order: [(embedding, role)]."""
    F, N, _ = E.shape
    flat = E.reshape(F * N, -1)
    keep, slots, merged, _, roles = method.merge(flat, torch.arange(F * N).view(F, N), True)
    replaced = {int(s): merged[i] for i, s in enumerate(slots.tolist())}
    pairs = sorted(zip(keep.tolist(), roles))
    return [(replaced.get(k, flat[k]), role) for k, role in pairs]


@pytest.mark.parametrize("F,N,seed,tau", [(10, 16, 0, 0.8), (10, 16, 1, 0.5), (8, 20, 2, 0.8), (16, 30, 3, 0.3),
                                          (1, 18, 4, 0.8), (3, 16, 5, 0.8)])
def test_stage1_matches_the_slow_rederivation(F, N, seed, tau):
    E = structured_video(F, N, 8, seed=seed) if F <= 10 else \
        torch.cat([structured_video(10, N, 8, seed=seed), structured_video(6, N, 8, seed=seed + 9)])
    method = PruneVid(ratio=0.6, tau=tau, seed=seed)
    want, windows = slow_prunevid_stage1(E, tau=tau, seed=seed)
    got = emitted(method, E)
    assert [r for _, r in got] == [r for _, r in want]
    assert all(torch.allclose(a, b, atol=1e-5) for (a, _), (b, _) in zip(got, want))
    if F == 10 and seed == 0:  # the scene cuts make windows and the static region merges
        assert len(windows) > 1 and any(r[1] == -1 for _, r in got)


def test_stage1_original_order_puts_each_token_at_its_centre():
    E = structured_video(10, 16, 8)
    method = PruneVid(ratio=0.6)
    _, _, _, _, roles_o = method.merge(E.reshape(160, -1), torch.arange(160).view(10, 16), True)
    keep, slots, _, sources, roles = method.merge(E.reshape(160, -1), torch.arange(160).view(10, 16), False)
    assert sorted(roles) == sorted(roles_o) and len(keep.unique()) == len(keep)
    windows = method.windows(E.mean(1), torch.Generator().manual_seed(0))
    for k, role in zip(keep.tolist(), roles):
        start = windows[role[0]][0]
        assert k // 16 == (start if role[1] < 0 else start + role[1])  # static: the window's first frame
    for s, src in zip(slots.tolist(), sources):
        assert int(s) % 16 in (src % 16).tolist()  # the slot of one of its members' locations (the centre's)


# ------------------------------------------------------------------------------------- stage 2 on a model
@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_stage2_uses_pre_rope_non_causal_attention_of_the_text_after_the_video(family):
    model, proc = tm.build(family)
    frames = 6 if family in QWEN else 4
    inputs = tm.video_inputs(family, proc, videos=[tm.random_video(frames, *((64, 48) if family in QWEN
                                                                              else (32, 32)), seed=2)])
    seen = {}
    attn = vtr.compat.decoder_layers(vtr.compat.text_model(model))[1].self_attn

    def capture(module, args, kwargs):
        seen.setdefault("h", kwargs.get("hidden_states", args[0] if args else None))

    hook = attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with vtr.patch(model, "prunevid", ratio=0.5, layer=1) as handle, torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    record = handle.last
    first, second = record.stages
    index = first.index[0]  # the stage-1 sequence: original positions of its slots
    (span,) = record.layout.rows[0].spans
    h = seen["h"][0]
    q = attn.q_proj(h).view(len(index), -1, attn.head_dim).transpose(0, 1)
    k = attn.k_proj(h).view(len(index), -1, attn.head_dim).transpose(0, 1)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    probs = (q @ k.transpose(1, 2) * attn.scaling).softmax(-1)  # no RoPE, no causal mask: [H, L, L]
    visual = torch.isin(index, span.positions)
    after = (~visual) & (torch.arange(len(index)) > int(visual.nonzero().max()))
    scores = probs.amax(0)[after].amax(0)
    # the stage-1 roles, from the method on the captured input embeddings
    lm_inputs = R.capture_lm_inputs(model, inputs)
    candidates = (~span.newline).nonzero().flatten()
    table = video.frame_table(span, candidates, "prunevid")
    _, _, _, _, roles = handle.method.merge(lm_inputs["embeds"][0, span.positions[candidates]], table,
                                            handle.method.positions != "original")
    keep = handle.method.merge(lm_inputs["embeds"][0, span.positions[candidates]], table,
                               handle.method.positions != "original")[0]
    slots = torch.tensor([int((index == span.positions[candidates[i]]).nonzero()) for i in keep.tolist()])
    order = slots.argsort()
    chosen = PruneVid.quota_select(scores[slots[order]], [roles[i] for i in order.tolist()], 0.5)
    want = sorted(span.offset + int(candidates[keep[order[c]]]) for c in chosen.tolist())
    got = sorted(set(second.kept[0].tolist()) - set((span.offset + span.newline.nonzero().flatten()).tolist()))
    assert got == want


# ----------------------------------------------------------------------------- earlier KV caches cut (engine)
def _generate(model, inputs, method, steps=5):
    with vtr.patch(model, method) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return handle, torch.stack(out.logits, 1), out.sequences[:, -steps:]


class _SlicingFastV(FastV):
    """FastV whose stage also cuts the caches of the layers before it (the engine capability, any layer method)."""

    def stages(self):
        return [StageSpec(Stage.LAYER, self.layer, slice_earlier=True)]


@pytest.mark.parametrize("family,batch", [("llava", 2), ("qwen2_vl", 1), ("llava_onevision", 2)])
def test_cut_earlier_caches_decode_on_the_kept_tokens_in_every_layer(family, batch):
    """Decoding after a stage that cuts the earlier caches equals the reference whose layers < K hold the prefill's
    keys and values of the kept tokens only; and differs from keeping the full caches (so the test can fail)."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, batch) if family == "llava" else tm.video_inputs(family, proc, batch)
    for method in (_SlicingFastV(ratio=0.75, layer=2), PruneVid(ratio=0.75, layer=1)):
        handle, logits, tokens = _generate(model, inputs, method)
        record = handle.last
        lm_inputs = R.with_merges(R.capture_lm_inputs(model, inputs, generate=True), record)
        specs = handle.method.stages()
        stages = [(s.layer, s.index, s.added) for s in record.stages]
        policies = [s.positions for s in specs]
        _, cut, _ = R.stages_reference(model, lm_inputs, stages, handle.method.positions, 5, tokens=tokens,
                                       policies=policies, slice_earlier=[True] * len(specs))
        _, full, _ = R.stages_reference(model, lm_inputs, stages, handle.method.positions, 5, tokens=tokens,
                                        policies=policies, slice_earlier=[False] * len(specs))
        assert (logits - cut).abs().max() <= 1e-5
        assert (logits[:, 1:] - full[:, 1:]).abs().max() > 1e-4  # the first token comes from the prefill
        assert (logits[:, 0] - full[:, 0]).abs().max() <= 1e-5


def test_cut_earlier_caches_continue_with_a_later_turn():
    """A later turn on the cut cache (several tokens at once) sees the kept tokens in every layer too."""
    model, proc = tm.build("qwen2_vl")
    inputs = tm.video_inputs("qwen2_vl", proc, 1)
    then = torch.tensor([[5, 6, 7]])
    with vtr.patch(model, "prunevid", ratio=0.75, layer=1) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        assert cache.layers[0].keys.shape[2] == cache.layers[3].keys.shape[2]  # every layer holds the kept tokens
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, 3, dtype=torch.long)], 1)
        more = model(input_ids=then, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    record = handle.last
    lm_inputs = R.with_merges(R.capture_lm_inputs(model, inputs), record)
    specs = handle.method.stages()
    _, _, chunk = R.stages_reference(model, lm_inputs, [(s.layer, s.index, s.added) for s in record.stages],
                                     handle.method.positions, 0, then=then,
                                     policies=[s.positions for s in specs], slice_earlier=[True, True])
    assert (more - chunk).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------- model level
@pytest.mark.parametrize("family", QWEN + ("llava_onevision",))
def test_video_rows_equal_the_video_alone(family):
    import test_requests as TR
    model, proc = tm.build(family)
    frames = [6, 2] if family in QWEN else [4, 4]
    size = (64, 48) if family in QWEN else (32, 32)
    videos = [tm.random_video(f, *size, seed=b) for b, f in enumerate(frames)]
    with vtr.patch(model, "prunevid", ratio=0.5, layer=1):
        alones = [_with_text(family, proc, tm._prompt(family, 1, long=bool(b), video=True), videos[b])
                  for b in range(2)]
        TR.assert_rows_equal_alone(model, tm.video_inputs(family, proc, videos=videos), alones, "generate")


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_image_and_video_in_one_prompt(family, mode):
    model, proc = tm.build(family)
    inputs = image_and_video_inputs(family, proc)
    check_against_reference(model, inputs, "prunevid", mode)
    with vtr.patch(model, "prunevid", ratio=0.75) as handle, torch.no_grad():
        model(**inputs)
    image, vid = handle.last.layout.rows[0].spans
    for stage in handle.last.stages:
        kept = stage.kept[0]
        assert ((kept >= image.offset) & (kept < image.offset + image.n)).sum() >= 1
        assert ((kept >= vid.offset) & (kept < vid.offset + vid.n)).sum() >= 1


def test_repeats_exactly_and_reports_retention():
    model, proc = tm.build("qwen2_5_vl")
    inputs = tm.video_inputs("qwen2_5_vl", proc, 2)
    runs = []
    for _ in range(2):
        with vtr.patch(model, "prunevid", ratio=0.6) as handle, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        runs.append((handle.last, torch.stack(out.logits, 1)))
    (a, la), (b, lb) = runs
    assert all(torch.equal(x, y) for s, t in zip(a.stages, b.stages) for x, y in zip(s.kept, t.kept))
    assert torch.equal(la, lb)
    assert a.nominal_retention == pytest.approx(0.4)
    first, second = a.stages
    assert all(len(x) < len(y) for x, y in zip(second.kept, first.kept))
    assert a.n_kept == [len(k) for k in second.kept]


def test_ratio_zero_is_the_unpatched_model_and_options_are_checked():
    model, proc = tm.build("qwen2_vl")
    inputs = tm.video_inputs("qwen2_vl", proc, 1)
    with torch.no_grad():
        plain = model(**inputs).logits
        with vtr.patch(model, "prunevid", ratio=0.0):
            assert torch.equal(model(**inputs).logits, plain)
    with torch.no_grad(), vtr.patch(model, "prunevid", keep=10_000):  # keep >= n: nothing runs
        assert torch.equal(model(**inputs).logits, plain)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\]"):
        vtr.patch(model, "prunevid", ratio=0.5, layer=3)
    with pytest.raises(ValueError, match="tau must be of type float"):
        PruneVid(ratio=0.5, tau="high")
    with pytest.raises(ValueError, match="cluster_ratio must be in"):
        PruneVid(ratio=0.5, cluster_ratio=2.0)
    assert PruneVid(ratio=0.6).for_depth(32).stages()[1].layer == 11  # official: attention of layer 10
    assert PruneVid(ratio=0.6).for_depth(4).stages()[1].layer == 2  # 10/32 of 4 layers: layer 1
