"""Video methods (FastVID, DyCoke, HoliTom): the shared video primitives and each method's selection against slow,
loop-based re-derivations written from the notes (shared/research/methods_video.md sections 2 and 6) on structured
synthetic videos (scene cuts, duplicated frames, static regions), the hand-computed cases of section 6, model-level
behaviour (batches with different frame counts, an image and a video in one prompt, determinism, images as
one-frame videos). Exactness against the reference and batch-vs-alone on images are in the shared matrices
(test_exactness.py runs every method on videos too)."""
import math

import pytest
import torch

import tiny_models as tm
import vtr
from test_exactness import check_against_reference
from vtr.methods import DyCoke, FastVID, HoliTom, holitom, video
from vtr.methods.clustering import dpc_scores

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


# --------------------------------------------------------------------------------------------- synthetic videos
def structured_video(F=10, N=16, D=8, seed=0):
    """[F, N, D]: three scenes (a hard cut to an orthogonal base at frame 4 and at 7), exact duplicate frames
    (2 == 1, 8 == 7), a static region (tokens 0-5 identical across all frames of a scene) and a few moving tokens
    (large noise)."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:3] * 3  # orthogonal scene bases
    scene = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2][:F]
    E = torch.stack([bases[s] + 0.3 * torch.randn(N, D, generator=g) for s in scene])
    for f in range(1, F):  # static region
        if scene[f] == scene[f - 1]:
            E[f, :6] = E[f - 1, :6]
    E[:, 12:] += 2.0 * torch.randn(F, N - 12, D, generator=g)  # moving tokens
    if F > 2:
        E[2] = E[1]
    if F > 8:
        E[8] = E[7]
    return E


# ---------------------------------------------------------------------------------------------- primitives
def test_dyseg_hand_case():
    """Section 6.2: c=3, tau=0.9: the two lowest similarities {4, 1} and those below 0.9 {1, 4}: segments
    [0-1], [2-4], [5-9]."""
    sims = torch.tensor([.95, .80, .97, .99, .50, .96, .93, .91, .98])
    assert video.dynamic_segments(sims, 3, 0.9) == [(0, 2), (2, 5), (5, 10)]
    # the threshold adds cuts beyond the c - 1 forced ones: 0.92 also cuts after frames 7 (0.91)
    assert video.dynamic_segments(sims, 3, 0.92) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    # c - 1 forced cuts even when every similarity is above the threshold
    assert video.dynamic_segments(torch.tensor([.99, .98, .995]), 3, 0.9) == [(0, 1), (1, 2), (2, 4)]
    # fewer frames than c: one segment per frame
    assert video.dynamic_segments(torch.tensor([.99]), 8, 0.9) == [(0, 1), (1, 2)]


def brute_dpc(X, k, noise):
    n = len(X)
    dist = [[math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(X[i], X[j])) / X.shape[1]) for j in range(n)]
            for i in range(n)]
    rho = [math.exp(-sum(d * d for d in sorted(dist[i])[:k]) / min(k, n)) + float(noise[i]) for i in range(n)]
    top = max(max(r) for r in dist)
    delta = [min([dist[i][j] for j in range(n) if rho[j] > rho[i]], default=top) for i in range(n)]
    return [rho[i] * delta[i] for i in range(n)]


def test_dpc_scores_match_brute_force_with_self_in_the_neighbourhood():
    X = torch.randn(9, 5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    score = dpc_scores(X, 4, g1)
    expected = brute_dpc(X, 4, torch.rand(9, generator=g2).double() * 1e-6)
    assert torch.allclose(score, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_anchor_merge_formula():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    members = torch.tensor([[3.0, 0.0], [5.0, 0.0], [1.0, 0.0]])
    out = video.anchor_merge(t, members, torch.tensor([0, 0, 0]), beta=0.6)
    # n = 3: w = max(1/4, 0.6) = 0.6; mean = (3, 0)
    assert torch.allclose(out[0], 0.6 * t[0] + 0.4 * torch.tensor([3.0, 0.0]))
    assert torch.equal(out[1], t[1])  # no member: unchanged
    # beta below 1 / (n + 1): the plain weight
    out = video.anchor_merge(t[:1], members[:1], torch.tensor([0]), beta=0.1)
    assert torch.allclose(out[0], 0.5 * t[0] + 0.5 * members[0])


def test_frame_table_orders_by_frame_and_refuses_ragged_frames():
    class Span:
        kind = "video"
        frame = torch.tensor([0, 0, 1, 1, 2, 2])
    ids = torch.tensor([5, 0, 3, 1, 2, 4])  # shuffled candidates
    table = video.frame_table(Span, ids, "x")
    assert ids[table].tolist() == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="same number of candidate tokens in every frame"):
        video.frame_table(Span, torch.tensor([0, 1, 2, 4, 5]), "x")


# ---------------------------------------------------------------------------------- FastVID budgets (section 6)
@pytest.mark.parametrize("r,expected", [(.10, (19, 7, 12)), (.15, (29, 11, 18)), (.20, (39, 15, 24)),
                                        (.25, (49, 19, 30))])
def test_fastvid_ov_budget_arithmetic(r, expected):
    m = FastVID(ratio=1 - r, variant="ov", threshold=0.9)
    R, C, S = expected
    plan = m._budgets(math.floor(196 * r + 1e-9), 196, 0, 1, torch.zeros(0))
    assert plan == {0: (S, C)}
    # a segment of 6 frames: anchors at j = 5 and 1 (counted from the end), floor(C * 6 / 2) context each
    plan = m._budgets(R, 196, 10, 16, torch.zeros(20))
    assert plan == {10: (S, 0), 11: (S, C * 3), 12: (S, 0), 13: (S, 0), 14: (S, 0), 15: (S, C * 3)}


def test_fastvid_qwen_budgets_remainders_clamps_and_duplicates():
    m = FastVID(ratio=0.73, variant="qwen", threshold=0.84, anchor_stride=2, context_share=0.45)
    # segment of 6 frames, R = 5: 30 tokens, C = floor(13.5) = 13, S = 17; frames 1 and 3 near-duplicate the next
    sims = torch.tensor([0.5, 0.99, 0.5, 0.97, 0.5, 0.5, 0.5])
    plan = m._budgets(5, 20, 0, 6, sims)
    valid = [0, 2, 4, 5]  # frame 1 ~ 2 and frame 3 ~ 4: only the last of each run gets tokens
    assert sorted(plan) == valid
    assert [plan[f][0] for f in valid] == [5, 4, 4, 4]  # 17 over 4 valid frames, the first ones +1
    # anchors: every 2nd valid frame from the end: 5 and 2; 13 context split 7 / 6, the +1 nearest the end
    assert plan[5][1] == 7 and plan[2][1] == 6 and plan[0][1] == plan[4][1] == 0
    # one anchor (stride 4) takes all 13 context tokens, capped at N // 2
    plan = FastVID(ratio=0.73, variant="qwen", threshold=0.84, context_share=0.45)._budgets(5, 20, 0, 6, sims)
    assert plan[5] == (4, 10) and plan[0] == (5, 0)
    # clamps: context <= N // 2, salient <= N - context
    plan = FastVID(ratio=0.1, variant="qwen", threshold=0.84)._budgets(9, 10, 0, 1, torch.zeros(1))
    assert plan == {0: (6, 3)}  # C = max(1, floor(9 * .4)) = 3, S = 6
    plan = FastVID(ratio=0.1, variant="qwen", threshold=0.84, context_share=0.9)._budgets(9, 10, 0, 1,
                                                                                        torch.zeros(1))
    assert plan == {0: (1, 5)}  # C = floor(9 * .9) = 8 capped at 5; S = 9 - 8 = 1


# ------------------------------------------------------------------------------ FastVID slow re-derivation
def slow_fastvid(E, r, variant, c=8, tau=0.9, tau_ig=0.95, d=0.4, p=4, beta=0.6, k=4, seed=0, signals=None):
    """FastVID on one video ``E`` [F, N, D], one line per line of the notes' pseudocode (section 2.1), loops only.
    ``signals``: (G [F, C], A [F, N]) from the vision side (None: the embedding fallback).
    Returns (kept token ids as f * N + n, {target id: merged embedding}, {target id: sorted source ids})."""
    F, N, D = E.shape
    gen = torch.Generator().manual_seed(seed)
    G = [E[f].mean(0) for f in range(F)]
    A = [torch.softmax(torch.stack([G[f] @ E[f, n] for n in range(N)]) / math.sqrt(D), 0) for f in range(F)]
    if signals is not None:
        G = G if signals[0] is None else list(signals[0].float())
        A = list(signals[1].float())

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    sims = [cos(G[f], G[f + 1]) for f in range(F - 1)]
    forced = sorted(range(F - 1), key=lambda f: (sims[f], f))[:min(c, F) - 1]
    cuts = sorted(set(forced) | {f for f in range(F - 1) if sims[f] < tau})
    bounds = [0] + [x + 1 for x in cuts] + [F]
    segments = [(a, b) for a, b in zip(bounds, bounds[1:])]
    R = max(1, math.floor(N * r + 1e-9))
    kept, merged, sources = set(), {}, {}
    for s, e in segments:
        L = e - s
        budget = {}  # frame -> (salient, context)
        if variant == "ov":
            C = math.floor(R * d)
            S = R - C
            for j in range(L):
                budget[s + j] = (S, math.floor(C * L / math.ceil(L / p)) if (L - 1 - j) % p == 0 else 0)
        else:
            Cs = max(1, math.floor(R * L * d))
            Ss = R * L - Cs
            valid = [f for f in range(s, e) if f == e - 1 or sims[f] < tau_ig]
            V = len(valid)
            anchors = [valid[V - 1 - i] for i in range(0, V, p)]
            shares = [Cs // len(anchors) + (1 if i < Cs % len(anchors) else 0) for i in range(len(anchors))]
            for i, f in enumerate(valid):
                ctx = min(shares[anchors.index(f)] if f in anchors else 0, N // 2)
                budget[f] = (min(Ss // V + (1 if i < Ss % V else 0), N - ctx), ctx)
        salient = {f: set() for f in range(s, e)}
        for f, (S_f, _) in budget.items():
            order = sorted(range(N), key=lambda n: -float(A[f][n]))
            salient[f] = set(order[:S_f])
            kept |= {f * N + n for n in salient[f]}
        for f in sorted(budget):
            C_f = budget[f][1]
            if C_f == 0:
                continue
            U = [n for n in range(N) if n not in salient[f]]
            noise = torch.rand(len(U), generator=gen).double() * 1e-6
            score = brute_dpc(E[f, U].double(), k, noise)
            targets = [U[i] for i in sorted(range(len(U)), key=lambda i: -score[i])[:min(C_f, len(U))]]
            if variant == "qwen":
                targets = sorted(targets)
            members = {t: [] for t in targets}
            for g in range(s, e):
                for n in range(N):
                    if n in salient[g]:
                        continue
                    if g == f and n in targets:
                        if variant == "ov":
                            members[n].append((g, n))  # a target joins itself
                        continue
                    best = max(targets, key=lambda t: (cos(E[g, n], E[f, t]), -targets.index(t)))
                    members[best].append((g, n))
            for t in targets:
                kept.add(f * N + t)
                n_t = len(members[t])
                w = max(1 / (n_t + 1), beta)
                if n_t:
                    mean = sum(E[g, n] for g, n in members[t]) / n_t
                    merged[f * N + t] = w * E[f, t] + (1 - w) * mean
                else:
                    merged[f * N + t] = E[f, t].clone()
                sources[f * N + t] = sorted({f * N + t} | {g * N + n for g, n in members[t]})
    return kept, merged, sources


@pytest.mark.parametrize("variant", ["ov", "qwen"])
@pytest.mark.parametrize("r,c,seed", [(0.25, 3, 0), (0.5, 2, 1), (0.2, 8, 2), (0.4, 1, 3)])
def test_fastvid_matches_the_slow_rederivation(variant, r, c, seed):
    E = structured_video(seed=seed)
    F, N, D = E.shape
    method = FastVID(ratio=1 - r, variant=variant, segments=c, threshold=0.9 if variant == "ov" else 0.84,
                     seed=seed)
    keep, targets, embeds, sources = method.reduce(E.view(F * N, D), torch.arange(F * N).view(F, N), r)
    kept, merged, src = slow_fastvid(E, r, variant, c=c, tau=method.threshold, seed=seed)
    assert sorted(keep.tolist()) == sorted(kept)
    assert sorted(targets.tolist()) == sorted(merged)
    for t, e, s in zip(targets.tolist(), embeds, sources):
        assert torch.allclose(e, merged[t], atol=1e-5), t
        assert s.tolist() == src[t]


def test_fastvid_structured_video_segments_and_non_partition():
    """The synthetic video's cuts are found; with the OneVision rule a token can feed two anchors' targets."""
    E = structured_video(F=10, N=16, D=8, seed=0)
    G, _ = video.embedding_signals(E)
    segments = video.dynamic_segments(video.adjacent_similarity(G), 3, 0.9)
    assert (4, 7) in segments or any(a <= 4 < b and b <= 7 for a, b in segments)
    assert all(not (a < 4 < b) and not (a < 7 < b) for a, b in segments)  # never across a scene cut
    method = FastVID(ratio=0.5, variant="ov", segments=1, threshold=-1.0, anchor_stride=2)
    _, targets, _, sources = method.reduce(E[:4].reshape(64, 8), torch.arange(64).view(4, 16), 0.5)
    members = torch.cat([s for s in sources])
    assert len(members) > len(members.unique())  # not a partition: some token merged into two targets


def test_fastvid_qwen_duplicate_frames_get_no_tokens():
    E = structured_video(F=4, N=16, D=8, seed=0)
    E[1] = E[0]  # frames 0, 1 (and 2, see structured_video) are equal: only the last of the run gets tokens
    G, _ = video.embedding_signals(E)
    sims = video.adjacent_similarity(G)
    assert sims[0] > 0.95 and sims[1] > 0.95 and sims[2] < 0.95  # frame 3 differs (same scene, noise)
    method = FastVID(ratio=0.5, variant="qwen", segments=1, threshold=-1.0)
    keep, _, _, _ = method.reduce(E.reshape(64, 8), torch.arange(64).view(4, 16), 0.5)
    assert not bool((keep < 32).any())  # frames 0 and 1: nothing
    # R * L = 32: C = 12 on the one anchor (frame 3), capped at N // 2 = 8; S = 20 over frames 2 and 3, 10 each,
    # frame 3's capped at N - 8: 10 + (8 + 8) = 26
    assert ((keep >= 32) & (keep < 48)).sum() == 10 and (keep >= 48).sum() == 16


def test_fastvid_is_deterministic_with_a_seed_and_the_seed_matters():
    E = structured_video(F=6, N=16, D=8, seed=5)
    E = E + 0 * E
    flat, table = E.reshape(96, 8), torch.arange(96).view(6, 16)
    a = FastVID(ratio=0.6, variant="ov", segments=2, seed=1).reduce(flat, table, 0.4)
    b = FastVID(ratio=0.6, variant="ov", segments=2, seed=1).reduce(flat, table, 0.4)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    # exact ties in density (the duplicated static tokens) are broken by the seeded noise
    E2 = torch.zeros(2, 16, 8)
    E2[:, :8] = torch.randn(8, 8)
    E2[:, 8:] = E2[:, :8]  # every token has an exact twin: equal densities
    flat, table = E2.reshape(32, 8), torch.arange(32).view(2, 16)
    picks = {tuple(sorted(FastVID(ratio=0.5, variant="ov", segments=2, seed=s, context_share=1.0)
                          .reduce(flat, table, 0.5)[1].tolist())) for s in range(8)}
    assert len(picks) > 1


# ------------------------------------------------------------------------------------------- model level
def image_and_video_inputs(family, proc, image_size=(64, 48), frames=4):
    """One Qwen prompt holding an image and then a video (by hand: the video part as tests/tiny_models builds it)."""
    image = tm.random_image(*image_size, seed=9)
    pix = proc.image_processor(images=[image], return_tensors="pt")
    n_image = int(pix["image_grid_thw"].prod()) // proc.image_processor.merge_size ** 2
    text = (f"<|im_start|> user <|vision_start|>{'<|image_pad|>' * n_image}<|vision_end|> "
            "<|vision_start|><|video_pad|><|vision_end|> what is in this image ? <|im_end|> <|im_start|> assistant")
    enc = tm._qwen_video_by_hand(family, proc, [text], [tm.random_video(frames, 64, 48, seed=4)])
    enc["pixel_values"], enc["image_grid_thw"] = pix["pixel_values"], pix["image_grid_thw"]
    enc["mm_token_type_ids"][enc["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")] = 1
    return enc


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_fastvid_image_and_video_in_one_prompt(family, mode):
    model, proc = tm.build(family)
    inputs = image_and_video_inputs(family, proc)
    check_against_reference(model, inputs, "fastvid", mode, segments=2)
    with vtr.patch(model, "fastvid", ratio=0.75, segments=2) as handle, torch.no_grad():
        model(**inputs)
    image, vid = handle.last.layout.rows[0].spans
    kept = handle.last.kept[0]
    assert ((kept >= image.offset) & (kept < image.offset + image.n)).sum() == max(1, image.n // 4)
    F, N = vid.grid[0], vid.grid[1] * vid.grid[2]
    assert ((kept >= vid.offset) & (kept < vid.offset + vid.n)).sum() == F * (N // 4)


def _alone(family, proc, videos):
    """The two videos of a batch-2 video prompt, each in its own prompt (the second row's prompt is the long one)."""
    return [tm.video_inputs(family, proc, videos=[videos[0]]),
            _with_text(family, proc, tm._prompt(family, 1, long=True, video=True), videos[1])]


@pytest.mark.parametrize("family", QWEN + ("llava_onevision",))
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_fastvid_video_rows_equal_the_video_alone(family, mode):
    """Batch 2 (Qwen: 4 and 2 frames, i.e. 2 and 1 temporal slices; OneVision: both 4 frames, transformers stacks
    one frame count) equals each video alone: same kept tokens, same outputs."""
    import test_requests as TR
    model, proc = tm.build(family)
    frames = [6, 2] if family in QWEN else [4, 4]
    size = (64, 48) if family in QWEN else (32, 32)
    videos = [tm.random_video(f, *size, seed=b) for b, f in enumerate(frames)]
    with vtr.patch(model, "fastvid", ratio=0.5, segments=2):
        TR.assert_rows_equal_alone(model, tm.video_inputs(family, proc, videos=videos), _alone(family, proc, videos),
                                   mode)


def _with_text(family, proc, text, frames):
    if family == "llava_onevision":
        return tm._onevision_video_by_hand(proc, [text], [frames])
    return tm._qwen_video_by_hand(family, proc, [text], [frames])


@pytest.mark.parametrize("family,variant", [("qwen2_5_vl", "qwen"), ("qwen2_vl", "ov"), ("llava_onevision", "ov"),
                                            ("llava_onevision", "qwen")])
def test_fastvid_on_a_model_equals_the_slow_rederivation(family, variant):
    """A video with a duplicated frame (Qwen: slice), one segment: the kept tokens and merged embeddings equal
    the slow re-derivation on the language model's input embeddings; merges cross frames."""
    import reference as R
    model, proc = tm.build(family)
    qwen = family in QWEN
    if qwen:  # a peaked salience in the last ViT block (random tiny weights give a near-uniform one)
        with torch.no_grad():
            qkv = model.model.visual.blocks[-1].attn.qkv
            qkv.weight[:qkv.out_features // 3] *= 30
    frames = tm.random_video(12 if qwen else 6, *((64, 48) if qwen else (32, 32)), seed=3)
    if qwen:
        frames[2:4] = frames[0:2]  # slice 1 == slice 0
    else:
        frames[1] = frames[0]
    inputs = tm.video_inputs(family, proc, videos=[frames])
    options = dict(segments=1, threshold=0.0, variant=variant, anchor_stride=2)
    r = 0.5 if qwen else 0.75  # OneVision's tiny frames have 4 tokens: R = 3, one context token
    with vtr.patch(model, "fastvid", ratio=1 - r, **options) as handle, torch.no_grad():
        model(**inputs)
    (span,) = handle.last.layout.rows[0].spans
    candidates = (~span.newline).nonzero().flatten()
    F = int(span.frame[candidates].max()) + 1
    N = len(candidates) // F
    E = R.capture_lm_inputs(model, inputs)["embeds"][0, span.positions[candidates]].view(F, N, -1)
    signals = (None, qwen_salience_by_hand(model, inputs)) if qwen else None  # the last ViT block's salience
    kept, merged, sources = slow_fastvid(E.float(), r, variant, c=1, tau=0.0, p=2, signals=signals)
    if qwen:
        assert sorted(slow_fastvid(E.float(), r, variant, c=1, tau=0.0, p=2)[0]) != sorted(kept)
    got = handle.last.kept[0]
    assert sorted(candidates[torch.tensor(sorted(kept))].tolist()) == \
        sorted(set(got.tolist()) - set(span.newline.nonzero().flatten().tolist()))
    record = handle.last.merged[0]
    assert sorted(record.kept.tolist()) == sorted(candidates[torch.tensor(sorted(merged))].tolist())
    for k, e, src in zip(record.kept.tolist(), record.embeds, record.sources):
        t = int((candidates == k).nonzero())
        assert torch.allclose(e.float(), merged[t], atol=1e-5)
        assert src.tolist() == candidates[torch.tensor(sources[t])].tolist()
    assert any(len(set(span.frame[s].tolist())) > 1 for s in record.sources)  # merges across frames
    if variant == "qwen":
        assert not bool((span.frame[got] == 0).any())  # the duplicate slice got nothing (its share went elsewhere)
    check_against_reference(model, inputs, "fastvid", "generate", **options)


def siglip_head_signals_by_hand(siglip, model, pixel_values_videos):
    """FastVID's OneVision signals written out: the tower's feature-layer output of each frame, SigLIP's
    post_layernorm, the head's pooled output (G) and its probe's softmax attention over the patches from the
    multi-head attention's own projections, mean over heads, bilinear-pooled like the features (A)."""
    tower, vm = model.model.vision_tower, getattr(siglip, "vision_model", siglip)
    with torch.no_grad():
        x = vm.post_layernorm(tower(pixel_values_videos.flatten(0, 1), output_hidden_states=True).hidden_states[-1])
        G = vm.head(x)
        mha = vm.head.attention
        (wq, wk, _), (bq, bk, _) = mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)
        n, P, D = x.shape
        H = mha.num_heads
        q = (vm.head.probe[0, 0] @ wq.T + bq).view(H, D // H)
        k = (x @ wk.T + bk).view(n, P, H, D // H)
        A = torch.softmax(torch.einsum("hd,nphd->nhp", q, k) / math.sqrt(D // H), -1).mean(1)
    side = math.isqrt(P)
    A = torch.nn.functional.interpolate(A.view(n, 1, side, side), size=(-(-side // 2),) * 2, mode="bilinear")
    return G, A.flatten(1)


def test_fastvid_onevision_with_the_siglip_head_uses_the_official_signals():
    """Passing SigLIP's attention-pooling head: the kept tokens and merges equal the slow re-derivation fed the
    head's pooled output and probe attention (computed by hand from the frames), and differ from the fallback's."""
    import reference as R
    from transformers import SiglipVisionModel
    model, proc = tm.build("llava_onevision")
    torch.manual_seed(5)
    siglip = SiglipVisionModel(model.config.vision_config.__class__(**{**model.config.vision_config.to_dict(),
                                                                       "vision_use_head": True})).eval()
    frames = tm.random_video(6, 32, 32, seed=3)
    inputs = tm.video_inputs("llava_onevision", proc, videos=[frames])
    options = dict(segments=2, threshold=0.0, anchor_stride=2)
    r = 0.75
    with vtr.patch(model, "fastvid", ratio=1 - r, siglip_head=siglip, **options) as handle, torch.no_grad():
        model(**inputs)
    (span,) = handle.last.layout.rows[0].spans
    candidates = (~span.newline).nonzero().flatten()
    F = int(span.frame[candidates].max()) + 1
    E = R.capture_lm_inputs(model, inputs)["embeds"][0, span.positions[candidates]].view(F, -1, model.config
                                                                                         .text_config.hidden_size)
    signals = siglip_head_signals_by_hand(siglip, model, inputs["pixel_values_videos"])
    kept, merged, _ = slow_fastvid(E.float(), r, "ov", c=2, tau=0.0, p=2, signals=signals)
    got = sorted(set(handle.last.kept[0].tolist()) - set(span.newline.nonzero().flatten().tolist()))
    assert got == sorted(candidates[torch.tensor(sorted(kept))].tolist())
    record = handle.last.merged[0]
    for k, e in zip(record.kept.tolist(), record.embeds):
        assert torch.allclose(e.float(), merged[int((candidates == k).nonzero())], atol=1e-5)
    fallback, _, _ = slow_fastvid(E.float(), r, "ov", c=2, tau=0.0, p=2)
    assert sorted(fallback) != sorted(kept), "the head's signals decide nothing in this video"
    check_against_reference(model, inputs, "fastvid", "forward", siglip_head=siglip, **options)


def test_video_tower_signal_options_are_checked():
    from transformers import SiglipVisionModel
    model, _ = tm.build("qwen2_vl")
    with pytest.raises(ValueError, match="attention='vision' reads the SigLIP tower's attention"):
        vtr.patch(model, "holitom", ratio=0.5, attention="vision")
    with pytest.raises(ValueError, match="attention must be one of"):
        HoliTom(ratio=0.5, attention="siglip")
    with pytest.raises(ValueError, match="expected a SigLIP vision model with its attention-pooling head"):
        FastVID(ratio=0.5, siglip_head=torch.nn.Linear(2, 2))
    onevision, _ = tm.build("llava_onevision")
    with pytest.raises(ValueError, match="siglip_head gives the signals of LLaVA-OneVision's SigLIP tower"):
        vtr.patch(model, "fastvid", ratio=0.5, siglip_head=onevision.model.vision_tower)
    with pytest.raises(ValueError, match="signals='vision' needs siglip_head="):
        vtr.patch(onevision, "fastvid", ratio=0.5, signals="vision")
    qwen3, _ = tm.build("qwen3_vl")
    with pytest.raises(ValueError, match="signals='vision' needs the Qwen2/2.5-VL vision transformer's video"):
        vtr.patch(qwen3, "fastvid", ratio=0.5, signals="vision")
    # a head of another width: refused, naming the option, at the first forward (the model is left unpatched)
    wide = onevision.config.vision_config.__class__(**{**onevision.config.vision_config.to_dict(),
                                                       "vision_use_head": True, "hidden_size": 48})
    videos = tm.video_inputs("llava_onevision", tm.build("llava_onevision")[1])
    with vtr.patch(onevision, "fastvid", ratio=0.5, siglip_head=SiglipVisionModel(wide)):
        with pytest.raises(ValueError, match="siglip_head is 48 wide, this model's vision tower 32"):
            onevision(**videos)
    with pytest.raises(ValueError, match=r"signals must be one of \('auto', 'vision', 'embedding'\)"):
        FastVID(ratio=0.5, signals="siglip")
    assert vtr.handle_of(model) is None and vtr.handle_of(onevision) is None and vtr.handle_of(qwen3) is None
    # auto: the official signal where vtr can compute it, else the fallback
    for m, method, option, expected in [(model, "holitom", "attention", "embedding"),
                                        (onevision, "holitom", "attention", "vision"),
                                        (model, "fastvid", "signals", "vision"),
                                        (qwen3, "fastvid", "signals", "embedding"),
                                        (onevision, "fastvid", "signals", "embedding")]:
        with vtr.patch(m, method, ratio=0.5) as handle:
            assert getattr(handle.method, option) == expected, (method, type(m).__name__)
    head = SiglipVisionModel(onevision.config.vision_config)
    with vtr.patch(onevision, "fastvid", ratio=0.5, siglip_head=head) as handle:
        assert handle.method.signals == "vision"


def qwen_salience_by_hand(model, inputs):
    """FastVID's Qwen2.5-VL salience written out from the unpatched model: the last vision block's attention input
    (hooked), its q/k after the vision RoPE, and per temporal slice and head the softmax over merge units of the
    mean query against each unit's mean key (4 consecutive patches), mean over heads; units put back in raster
    order from the window order. Returns ``[t, N]``."""
    import sys
    from vtr import compat
    block = model.model.visual.blocks[-1]
    seen = {}

    def hook(module, args, kwargs):
        seen.update(x=kwargs.get("hidden_states", args[0] if args else None), cu=kwargs["cu_seqlens"],
                    pe=kwargs["position_embeddings"])
    handle = block.attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        handle.remove()
        attn, x = block.attn, seen["x"]
        S, H = x.shape[0], attn.num_heads
        q, k, _ = attn.qkv(x).reshape(S, 3, H, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, *seen["pe"])
    d = q.shape[-1]
    out = []
    bounds = seen["cu"].tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        heads = []
        for h in range(H):
            query = q[a:b, h].float().mean(0)
            keys = torch.stack([k[a + 4 * u:a + 4 * u + 4, h].float().mean(0) for u in range((b - a) // 4)])
            heads.append(torch.softmax(keys @ query / math.sqrt(d), 0))
        out.append(torch.stack(heads).mean(0))
    tower_order = torch.cat(out)
    raster = torch.empty_like(tower_order)
    raster[compat.qwen_unit_order(model, inputs["video_grid_thw"])] = tower_order
    return raster.view(len(out), -1)


def test_fastvid_on_images_is_the_one_frame_rule():
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 1)
    with vtr.patch(model, "fastvid", ratio=0.75) as handle, torch.no_grad():
        model(**inputs)
    assert handle.last.n_kept == [16]  # floor(64 * 0.25)
    (merged,) = handle.last.merged
    assert len(merged.kept) == math.floor(16 * 0.4)  # the context tokens, merged within the image


# ------------------------------------------------------------------------------------------------- DyCoke
def angles_video(angles):
    """[F * N, 2] unit vectors at the given angles ``[F][N]``: cos(E[i, n], E[j, n]) = cos(a_i,n - a_j,n)."""
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], -1).view(-1, 2).float()


def test_video_similarities_in_the_model_dtype_are_the_official_calls():
    """score_dtype="model": the video primitives compute in that dtype, cosines with torch's cosine_similarity as
    the official code calls it (DyCoke, HoliTom, PruneVid, FrameFusion); fp32 by default."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    bf = torch.bfloat16
    expected = torch.nn.functional.cosine_similarity(a.to(bf), b.to(bf), dim=-1)
    got = video.location_similarity(a, b, bf)
    assert got.dtype == bf and torch.equal(got, expected)
    assert video.location_similarity(a, b).dtype == torch.float32
    assert video.window_similarity(a, bf).dtype == bf and video.cosine_matrix(a[0], b[0], bf).dtype == bf
    G, A = video.embedding_signals(a, bf)
    assert G.dtype == A.dtype == bf
    sims, _ = video.chain_similarity(a[0], torch.arange(16) % 4, bf)
    assert sims.dtype == bf


def test_dycoke_ttm_hand_case():
    """Section 6.2: F = 6, N = 4, n_keep = 2: frames 0 and 4 whole; 1, 3, 5 pruned against their left neighbour,
    2 against frame 0 (original features); each keeps its 2 least similar tokens."""
    a0 = [0, 0, 0, 0]
    a1 = [.1, .5, .2, .9]  # vs a0: keep 3, 1
    a2 = [1.0, .3, .7, .05]  # vs a0: keep 0, 2
    a3 = [1.6, .35, .9, .45]  # vs a2: differences .6 .05 .2 .4: keep 0, 3
    a4 = [0, 0, 0, 0]
    a5 = [.3, .1, .8, .2]  # vs a4: keep 2, 0
    E = angles_video([a0, a1, a2, a3, a4, a5])
    kept = DyCoke.ttm(E, torch.arange(24).view(6, 4), 2)
    assert kept.tolist() == [0, 1, 2, 3, 5, 7, 8, 10, 12, 15, 16, 17, 18, 19, 20, 22]


def slow_ttm(E, n_keep):
    F, N, _ = E.shape
    keep = {f: list(range(N)) for f in range(F)}
    for i in range(0, F - 1, 2):
        sims = [float(video.cosine(E[i, n], E[i + 1, n])) for n in range(N)]
        keep[i + 1] = sorted(sorted(range(N), key=lambda n: sims[n])[:n_keep])
    i = 0
    while i < F - 4:
        sims = [float(video.cosine(E[i, n], E[i + 2, n])) for n in range(N)]
        keep[i + 2] = sorted(sorted(range(N), key=lambda n: sims[n])[:n_keep])
        i += 4
    return sorted(f * N + n for f in range(F) for n in keep[f])


@pytest.mark.parametrize("F,N,n_keep", [(32, 196, 58), (7, 9, 3), (4, 16, 5), (1, 8, 2), (10, 16, 4)])
def test_dycoke_ttm_matches_the_slow_rederivation_and_counts(F, N, n_keep):
    E = structured_video(F=F, N=N, D=8, seed=F) if F <= 10 and N == 16 else torch.randn(F, N, 8)
    kept = DyCoke.ttm(E.reshape(F * N, 8), torch.arange(F * N).view(F, N), n_keep)
    assert kept.tolist() == slow_ttm(E, n_keep)
    if F == 32:  # the notes' count: 9 whole frames (0, 4, ..., 28 and 30) + 23 pruned ones
        assert len(kept) == 3098
        whole = [f for f in range(F) if ((kept >= f * N) & (kept < (f + 1) * N)).sum() == N]
        assert whole == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    if F == 7:  # the odd last frame stays whole (official: dropped)
        assert ((kept >= 6 * N).sum()) == N


def official_frame_keep(ratio, N):
    """Transcription of the official dycole_ttm count: merging_ratio = 1 - dycoke_k; int(merging_ratio * N)."""
    merging_ratio = 1 - ratio
    return int(merging_ratio * N)


@pytest.mark.parametrize("ratio", [0.7, 0.8, 0.9, 0.5, 0.75])
@pytest.mark.parametrize("N", [10, 50, 100, 196, 169, 30])
def test_dycoke_frame_keep_is_the_official_float_arithmetic(ratio, N):
    """Frame sizes that are multiples of 10 at ratio 0.8 / 0.9 are where exact arithmetic and the official
    floating-point count differ (1 - 0.8 = 0.19999999999999996: 19 of 100, not 20)."""
    assert DyCoke(ratio=ratio).frame_keep(N, 4 * N) == official_frame_keep(ratio, N)
    assert DyCoke(ratio=0.8).frame_keep(100, 400) == 19 and DyCoke(ratio=0.9).frame_keep(100, 400) == 9


@pytest.mark.parametrize("F,N,keep", [(1, 22, 15), (1, 44, 30), (3, 50, 27), (4, 10, 40)])
def test_dycoke_frame_keep_with_keep_is_exact(F, N, keep):
    """keep: floor(keep * N / n) in integers, where (keep / n) * N in floating point lands just below."""
    assert DyCoke(keep=keep).frame_keep(N, F * N) == keep * N // (F * N)


@pytest.mark.parametrize("ratio", [0.7, 0.8, 0.9])
def test_dycoke_on_a_model_keeps_the_official_count_per_frame(ratio):
    """Qwen2-VL, 5 temporal slices of 10 x 5 = 50 tokens: slices 1, 3 (against 0, 2) and 2 (against 0) keep
    int((1 - ratio) * 50) tokens each (9 at 0.8, 4 at 0.9), the slow TTM's choice; 0 and 4 stay whole."""
    import reference as R
    model, proc = tm.build("qwen2_vl")
    inputs = tm.video_inputs("qwen2_vl", proc, videos=[tm.random_video(10, 40, 80)])
    with vtr.patch(model, "dycoke", ratio=ratio) as handle, torch.no_grad():
        model(**inputs)
    (span,) = handle.last.layout.rows[0].spans
    assert span.n == 250
    E = R.capture_lm_inputs(model, inputs)["embeds"][0, span.positions].view(5, 50, -1)
    n_keep = official_frame_keep(ratio, 50)
    assert handle.last.kept[0].tolist() == [span.offset + i for i in slow_ttm(E, n_keep)]
    assert handle.last.n_kept == [2 * 50 + 3 * n_keep]


def test_dycoke_kv_rule():
    """Section 6.2 KV simulator: the first step prunes; a stable step (cos >= 0.9) uses the full cache (official)
    or the previous subset; kept = top floor(n (1 - P)); the state is the request's."""
    m = DyCoke(ratio=0.5, kv_ratio=0.75)
    state = {}
    a = torch.tensor([.1, .5, .2, .9, .3, .05, .6, .4])
    kept = m.select_decode(state, 0, _FakeSpan, a)
    assert sorted(kept.tolist()) == [3, 6]  # floor(8 * .25) = 2
    assert m.select_decode(state, 0, _FakeSpan, a * 1.01) is None  # stable: full cache
    b = torch.tensor([.9, .1, .1, .1, .1, .1, .1, .8])
    assert sorted(m.select_decode(state, 0, _FakeSpan, b).tolist()) == [0, 7]  # changed: chosen again
    m = DyCoke(ratio=0.5, kv_ratio=0.75, stable="previous")
    state = {}
    m.select_decode(state, 0, _FakeSpan, a)
    assert sorted(m.select_decode(state, 0, _FakeSpan, a * 1.01).tolist()) == [3, 6]
    assert DyCoke(ratio=0.0).select_decode({}, 0, _FakeSpan, a) is None  # ratio 0: nothing
    ten = torch.arange(10.0)  # official int(10 * (1 - 0.8)) = int(1.9999999999999996) = 1
    assert DyCoke(ratio=0.5, kv_ratio=0.8).select_decode({}, 0, _FakeSpan, ten).tolist() == [9]


class _FakeSpan:
    offset = 0


@pytest.mark.parametrize("family", QWEN + ("llava_onevision",))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("stable", ["full", "previous"])
def test_dycoke_each_decode_step_equals_attention_restricted_to_its_subset(family, attn, stable):
    """similarity above 1: every step chooses again; each step's logits equal the unpatched layers with layers
    >= L attending to that step's recorded subset only (and differ from attending to every visual token)."""
    import reference as R
    model, proc = tm.build(family, attn=attn)
    inputs = tm.video_inputs(family, proc, 2)
    options = dict(ratio=0.5, kv_ratio=0.6, layer=2, similarity=1.5 if stable == "full" else 0.0, stable=stable)
    with vtr.patch(model, "dycoke", **options) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    record = handle.last
    assert len(record.decode_steps) == 4
    if stable == "full":
        assert all(s is not None for step in record.decode_steps for s in step)  # chosen at every step
    else:  # similarity 0: every later step is stable and keeps the first step's subset
        assert all(torch.equal(step[b], record.decode_steps[0][b]) for step in record.decode_steps
                   for b in range(2))
    lm_inputs = R.capture_lm_inputs(model, inputs, generate=True)
    _, ref, _ = R.decode_subset_reference(model, lm_inputs, record.index, handle.method.positions, 5, 2, record)
    got = torch.stack(out.logits, 1)
    assert (got - ref).abs().max() <= 1e-5
    # and the subsets matter: all visual tokens at every step give other logits
    full = type(record)(n_visual=record.n_visual, layout=record.layout, decode_steps=[[None, None]] * 4)
    _, dense, _ = R.decode_subset_reference(model, lm_inputs, record.index, handle.method.positions, 5, 2, full,
                                         tokens=out.sequences[:, -5:])
    assert (got[:, 1:] - dense[:, 1:]).abs().max() > 1e-4
    # kept per step: int(n * (1 - kv_ratio)) of the video's tokens present in the cache (official arithmetic)
    for b, row in enumerate(record.layout.rows):
        n = len(record.kept[b]) - int(row.spans[0].newline.sum())
        assert len(record.decode_steps[0][b]) == max(1, int(n * (1 - 0.6)))


def test_dycoke_state_does_not_leak_between_requests():
    """The same video twice: the second request's first step prunes again (official: compared with the previous
    request's attention, identical, so it would run on the full cache)."""
    model, proc = tm.build("qwen2_vl")
    inputs = tm.video_inputs("qwen2_vl", proc, 1)
    with vtr.patch(model, "dycoke", ratio=0.5, layer=2) as handle, torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        steps = handle.last.decode_steps
        second = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert handle.last.decode_steps[0][0] is not None
        assert all(torch.equal(a[0], b[0]) for a, b in zip(steps, handle.last.decode_steps) if a[0] is not None)
    assert torch.equal(first, second)


@pytest.mark.parametrize("family", QWEN)
def test_dycoke_video_rows_equal_the_video_alone_with_their_decode_steps(family):
    import test_requests as TR
    model, proc = tm.build(family)
    videos = [tm.random_video(f, 64, 48, seed=b) for b, f in enumerate([6, 2])]
    with vtr.patch(model, "dycoke", ratio=0.5, layer=2, similarity=1.5) as handle:
        kept, outputs = TR.run(model, tm.video_inputs(family, proc, videos=videos), "generate")
        steps = handle.last.decode_steps
        for b in range(2):
            alone = _with_text(family, proc, tm._prompt(family, 1, long=bool(b), video=True), videos[b])
            kept_alone, outputs_alone = TR.run(model, alone, "generate")
            assert torch.equal(kept[b], kept_alone[0])
            TR.assert_close(outputs[b], outputs_alone[0])
            assert all(torch.equal(s[b], a[0]) for s, a in zip(steps, handle.last.decode_steps))


def test_dycoke_refuses_a_layer_the_model_lacks_and_bad_options():
    model, _ = tm.build("qwen2_vl")
    with pytest.raises(ValueError, match="layer must be in"):
        vtr.patch(model, "dycoke", ratio=0.5, layer=4)
    with pytest.raises(ValueError, match="stable must be"):
        DyCoke(ratio=0.5, stable="sometimes")


def test_retention_is_reported():
    model, proc = tm.build("qwen2_vl")
    inputs = tm.video_inputs("qwen2_vl", proc, 1)
    with vtr.patch(model, "fastvid", ratio=0.75, segments=2) as handle, torch.no_grad():
        model(**inputs)
    record = handle.last
    assert record.nominal_retention == 0.25
    assert record.input_retention == [record.n_kept[0] / record.n_visual[0]]
    assert record.layer_retention == record.input_retention  # before the LLM: every layer sees the same


@pytest.mark.parametrize("method", ["fastvid", "dycoke", "holitom"])
def test_video_methods_repeat_exactly(method):
    """Determinism: the same request twice (a fresh patch each time, same seed) keeps and merges the same tokens
    and gives bit-identical outputs."""
    model, proc = tm.build("qwen2_5_vl")
    inputs = tm.video_inputs("qwen2_5_vl", proc, 2)
    runs = []
    for _ in range(2):
        with vtr.patch(model, method, ratio=0.5, **({"segments": 2} if method == "fastvid" else {})) as handle, \
                torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        runs.append((handle.last, torch.stack(out.logits, 1)))
    (a, la), (b, lb) = runs
    assert all(torch.equal(x, y) for x, y in zip(a.kept, b.kept)) and torch.equal(la, lb)
    if a.merged:
        assert all(torch.equal(x.embeds, y.embeds) for x, y in zip(a.merged, b.merged))


@pytest.mark.parametrize("method", ["fastvid", "dycoke"])
def test_video_methods_give_each_anyres_tile_its_own_plan(method):
    """scope="crop": every LLaVA-NeXT tile is its own one-frame input (FastVID: floor(n_tile * r) each)."""
    model, proc = tm.build("llava_next")
    inputs = tm.image_inputs("llava_next", proc, 1)
    with vtr.patch(model, method, ratio=0.75, scope="crop") as handle, torch.no_grad():
        model(**inputs)
    (span,) = handle.last.layout.rows[0].spans
    kept = handle.last.kept[0]
    for crop in span.crop.unique().tolist():
        tile = ((span.crop == crop) & ~span.newline).nonzero().flatten()
        mine = torch.isin(kept, tile).sum()
        assert mine == (max(1, len(tile) // 4) if method == "fastvid" else len(tile))


def test_generate_refuses_a_qwen_video_it_cannot_cut_into_frames():
    """Without mm_token_type_ids, generate() drops video_grid_thw after encoding and transformers numbers the
    video's tokens like text: the frames cannot be recovered, so vtr says so instead of treating the video as one
    frame (it did: DyCoke pruned nothing, FastVID kept other tokens than in forward)."""
    model, proc = tm.build("qwen2_5_vl")
    videos = [tm.random_video(4, 64, 48, seed=1)]
    inputs = tm.video_inputs("qwen2_5_vl", proc, videos=videos)
    with vtr.patch(model, "fastvid", ratio=0.5) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)  # with the processor's mm_token_type_ids
        grid, kept = handle.last.layout.rows[0].spans[0].grid, handle.last.stages[0].kept
        assert grid[0] > 1
        inputs.pop("mm_token_type_ids")
        try:  # transformers 5.17 still positions the video from its grid here; newer releases number it as text
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        except ValueError as error:
            assert "cannot tell the frames of the video in row 0" in str(error) and "mm_token_type_ids" in str(error)
        else:  # it ran: then as the same video, never as one frame
            assert handle.last.layout.rows[0].spans[0].grid == grid
            assert [k.tolist() for k in handle.last.stages[0].kept] == [k.tolist() for k in kept]


# ------------------------------------------------------------------------------------------------------ HoliTom
def brute_windows(static, max_window=1024):
    """Every segmentation of the frames into windows of at most ``max_window``: the largest saving, and the
    segmentations reaching it."""
    F = static.shape[0] + 1

    def saved(s, e):
        return int(static[s:e].all(0).sum()) * (e - s) if e > s else 0

    def splits(start):
        if start == F:
            yield []
            return
        for end in range(start, min(F, start + max_window)):
            for rest in splits(end + 1):
                yield [(start, end)] + rest
    values = [(sum(saved(s, e) for s, e in seg), seg) for seg in splits(0)]
    best = max(v for v, _ in values)
    return best, [seg for v, seg in values if v == best]


def test_holitom_static_windows_hand_cases():
    """Section 6.2: the DP optimum, ties keep the shorter window (strict '>'), the window cap."""
    T, F_ = True, False
    # frames 0-1 share location 0: one window saves 1
    assert video.static_windows(torch.tensor([[T, F_], [F_, F_]])) == ([(0, 1), (2, 2)], 1)
    # frames 0-1 share both locations (saves 2); [0-2] would also save 2 (location 0 over 2 pairs): the tie keeps
    # frame 2 alone
    assert video.static_windows(torch.tensor([[T, T], [T, F_]])) == ([(0, 1), (2, 2)], 2)
    # a tie between [0-3] (location 0 over 3 pairs: 3) and [0-1] (2) + [2-3] (1): the shorter last window
    assert video.static_windows(torch.tensor([[T, T], [T, F_], [T, F_]])) == ([(0, 1), (2, 3)], 3)
    # ... and a strictly better long window wins: [0-3] saves 3, [0-1] + [2-3] only 2
    assert video.static_windows(torch.tensor([[T, F_], [T, F_], [T, F_]])) == ([(0, 3)], 3)
    # the window cap
    everything = torch.ones(3, 1, dtype=torch.bool)
    assert video.static_windows(everything) == ([(0, 3)], 3)
    assert video.static_windows(everything, max_window=2) == ([(0, 1), (2, 3)], 2)
    assert video.static_windows(torch.zeros(0, 4, dtype=torch.bool)) == ([(0, 0)], 0)  # one frame


@pytest.mark.parametrize("seed", range(12))
def test_holitom_static_windows_match_enumeration(seed):
    g = torch.Generator().manual_seed(seed)
    F = 2 + seed % 6
    static = torch.rand(F - 1, 3, generator=g) < 0.7
    cap = [1024, 2, 3][seed % 3]
    windows, total = video.static_windows(static, cap)
    best, optimal = brute_windows(static, cap)
    assert total == best and windows in optimal
    assert all(e - s + 1 <= cap for s, e in windows)
    # among the optimal segmentations the DP's is the one that, scanning from the last frame back, always takes
    # the shortest window that still reaches the optimum
    assert windows == min(optimal, key=lambda seg: [e - s for s, e in reversed(seg)])


def test_holitom_center_merge_formula():
    centers = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    members = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 4.0]])
    assign = torch.tensor([0, 0, 1])
    out = video.center_merge(centers, members, assign, 0.6)
    assert torch.allclose(out, torch.tensor([[0.6 + 0.4 * 2.0, 0.0], [0.0, 0.6 * 2 + 0.4 * 4], [5.0, 5.0]]))
    plain = video.center_merge(centers, members, assign, None)  # NO_BETA: the mean, center included
    assert torch.allclose(plain, torch.tensor([[5 / 3, 0.0], [0.0, 3.0], [5.0, 5.0]]))


def test_holitom_inner_merge_is_sequential():
    """Section 6.2: two non-top tokens x1, x2 both nearest to t: t' = ((t + x1) / 2 + x2) / 2; similarities are
    those of the original states (x2's nearest is decided before x1 moved t)."""
    t, u = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    x1, x2 = torch.tensor([2.0, 0.2, 0.0]), torch.tensor([1.0, 0.1, 0.3])
    hidden = torch.stack([x1, t, x2, u])
    scores = torch.tensor([0.1, 0.5, 0.2, 0.4])
    merge = holitom.inner_merge(hidden, scores, 2)
    assert merge.keep.tolist() == [1, 3] and merge.slots.tolist() == [1]
    assert torch.allclose(merge.embeds[0], ((t + x1) / 2 + x2) / 2)
    assert [s.tolist() for s in merge.sources] == [[0, 1, 2]]


def slow_inner(hidden, scores, keep):
    top = sorted(sorted(range(len(scores)), key=lambda i: -float(scores[i]))[:keep])
    states = {j: hidden[j].clone() for j in top}
    for i in range(len(scores)):
        if i in states:
            continue
        j = max(top, key=lambda t: float(video.cosine(hidden[i], hidden[t])))
        states[j] = (states[j] + hidden[i]) / 2
    return top, states


@pytest.mark.parametrize("seed", range(3))
def test_holitom_inner_merge_matches_the_loop(seed):
    g = torch.Generator().manual_seed(seed)
    hidden, scores = torch.randn(15, 6, generator=g), torch.rand(15, generator=g)
    merge = holitom.inner_merge(hidden, scores, 7)
    top, states = slow_inner(hidden, scores, 7)
    assert merge.keep.tolist() == top
    replaced = dict(zip(merge.slots.tolist(), merge.embeds))
    for j in top:
        assert torch.allclose(replaced.get(j, hidden[j]), states[j], atol=1e-6)


def slow_holitom(E, r, tau, beta=0.6, seed=0, max_window=1024, A=None, context=0.0):
    """Section 2.5's outer stage, one line per pseudocode line: the window outputs in OneVision order as
    ``[(frame, location, vector)]``. ``A`` ``[F, N]``: the attention signal (None: the embedding fallback)."""
    F, N, D = E.shape
    g = torch.Generator().manual_seed(seed)
    if A is None:
        A = torch.softmax(torch.einsum("fd,fnd->fn", E.mean(1), E) / D ** 0.5, -1)
    sim = [[float(video.cosine(E[t, n], E[t + 1, n])) for n in range(N)] for t in range(F - 1)]

    def static_count(s, e):
        return sum(all(sim[t][n] > tau for t in range(s, e)) for n in range(N)) * (e - s)
    dp, choice = {-1: 0}, {}
    for i in range(F):
        dp[i], choice[i] = dp[i - 1], 1
        for w in range(2, min(i + 1, max_window) + 1):
            value = dp[i - w] + static_count(i - w + 1, i)
            if value > dp[i]:
                dp[i], choice[i] = value, w
    windows, i = [], F - 1
    while i >= 0:
        windows.insert(0, (i - choice[i] + 1, i))
        i -= choice[i]
    retain_ratio = r  # official: retain_ratio = min(retain_ratio / ((total_tokens - total_reduced) / total_tokens), 1)
    total_tokens, total_reduced = F * N, dp[F - 1]
    rr = min(retain_ratio / ((total_tokens - total_reduced) / total_tokens), 1)
    out = []
    for s, e in windows:
        omega = [n for n in range(N) if e > s and all(sim[t][n] > tau for t in range(s, e))]
        dynamic = [n for n in range(N) if n not in omega]
        m = round(len(omega) * rr)
        if m > 0:
            X = torch.stack([E[s:e + 1, n].mean(0) for n in omega])
            out.extend((s, omega[c], v) for c, v in slow_centres(X, m, beta, g))
        count = math.ceil(len(dynamic) * rr)
        dominant = round(count * (1 - context))
        for t in range(s, e + 1):
            if count == 0:
                break
            ranked = sorted(dynamic, key=lambda n: -float(A[t, n]))[:dominant]
            out.extend((t, n, E[t, n]) for n in sorted(ranked))
            if count > dominant:  # D > 0: density peaks of the rest, merged like the static centres
                rest = [n for n in dynamic if n not in ranked]
                X = torch.stack([E[t, n] for n in rest])
                out.extend((t, rest[c], v) for c, v in slow_centres(X, count - dominant, beta, g))
    return out, windows, rr


def slow_centres(X, m, beta, g):
    """Section 2.5's density merge of ``X`` [n, D]: the m best DPC scores (k = min(7, m), noise drawn as
    dpc_scores draws it) in index order, every other token to its nearest centre, ``beta * centre + (1 - beta) *
    mean(members)``. Returns [(centre index, merged vector)]."""
    noise = torch.rand(len(X), generator=g).double() * 1e-6
    score = brute_dpc(X.double(), min(7, m), noise)
    centres = sorted(sorted(range(len(X)), key=lambda i: -score[i])[:m])
    dist = torch.cdist(X.double(), X.double()) / X.shape[1] ** 0.5
    groups = {c: [] for c in centres}
    for i in range(len(X)):
        if i not in groups:
            groups[min(centres, key=lambda c: float(dist[i, c]))].append(i)
    return [(c, X[c] if not groups[c] else beta * X[c] + (1 - beta) * X[groups[c]].mean(0)) for c in centres]


def holitom_video(F=8, N=16, D=8, seed=0):
    """Scenes with static regions of different extents (so that several window shapes compete) and moving
    tokens."""
    g = torch.Generator().manual_seed(seed)
    E = structured_video(F, N, D, seed)
    E[3:6, 6:9] = E[3, 6:9] + 0.01 * torch.randn(3, 3, D, generator=g)  # a short static patch
    return E


@pytest.mark.parametrize("r,seed,context", [(0.25, 0, 0.0), (0.1, 1, 0.0), (0.5, 2, 0.0), (0.25, 3, 0.0),
                                            (0.5, 0, 0.5), (0.25, 1, 0.4), (0.5, 2, 1.0)])
def test_holitom_outer_matches_the_slow_rederivation(r, seed, context):
    E = holitom_video(seed=seed)
    method = HoliTom(ratio=1 - r, seed=seed)
    A = video.embedding_signals(E)[1]
    windows = holitom.outer_windows(E, A, r, method.tau, 0.6, 1024, torch.Generator().manual_seed(seed), context)
    slow, slow_windows, rr = slow_holitom(E, r, method.tau, seed=seed, context=context)
    if context:  # the contextual tokens are merged density peaks, not the attended tokens of D = 0
        plain = slow_holitom(E, r, method.tau, seed=seed)[0]
        assert [(f, n) for f, n, _ in slow] != [(f, n) for f, n, _ in plain]
    assert [w for w, _ in windows] == slow_windows and any(e > s for s, e in slow_windows)
    fast = [(f, n, E[f, n] if v is None else v) for _, entries in windows for f, n, v, _ in entries]
    assert [(f, n) for f, n, _ in fast] == [(f, n) for f, n, _ in slow]
    assert all(torch.allclose(a, b, atol=1e-5) for (_, _, a), (_, _, b) in zip(fast, slow))
    # the re-inflated count: about r * F * N tokens, never more than per-window rounding allows
    F, N = E.shape[:2]
    assert rr >= r and abs(len(fast) - r * F * N) <= len(slow_windows) * 2


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_holitom_contextual_share_runs_exactly_on_models(family):
    """D > 0: the contextual tokens (merged density peaks) reach the language model as recorded, under both
    position policies' models, prefill and decode against the reference."""
    model, proc = tm.build(family)
    frames = tm.random_video(6 if family == "llava_onevision" else 8, *((32, 32) if family == "llava_onevision"
                                                                       else (64, 48)), seed=2)
    inputs = tm.video_inputs(family, proc, videos=[frames])
    with vtr.patch(model, "holitom", ratio=0.5, context_share=0.5, inner_ratio=0) as handle, torch.no_grad():
        model(**inputs)
    plain = vtr.patch(model, "holitom", ratio=0.5, inner_ratio=0)
    with plain, torch.no_grad():
        model(**inputs)
    assert handle.last.kept[0].tolist() != plain.last.kept[0].tolist() or \
        len(handle.last.merged[0].kept) != len(plain.last.merged[0].kept)
    check_against_reference(model, inputs, "holitom", "generate", context_share=0.5)


@pytest.mark.parametrize("N,static,r", [(10, 4, 0.3), (5, 2, 0.6), (11, 10, 0.3), (14, 4, 0.6), (15, 10, 0.4),
                                         (35, 21, 0.1), (30, 20, 0.2)])
def test_holitom_counts_follow_the_official_float_arithmetic(N, static, r):
    """Two frames whose first ``static`` locations repeat (one window saving ``static`` tokens): the window keeps
    round(static * r') merged static tokens and ceil((N - static) * r') dynamic ones per frame, with the official
    r' = min(r / ((T - saved) / T), 1) and no tolerance; at these sizes r * T / (T - saved) (the order vtr used)
    rounds one of the counts the other way."""
    g = torch.Generator().manual_seed(N)
    first = torch.randn(N, 8, generator=g)
    E = torch.stack([first, torch.cat([first[:static], -first[static:]])])  # dynamic locations: cosine -1
    windows = holitom.outer_windows(E, torch.rand(2, N, generator=g), r, 0.8, 0.6, 1024,
                                    torch.Generator().manual_seed(0))
    (((s, e), entries),) = windows
    assert (s, e) == (0, 1)
    T, saved = 2 * N, static
    rr = min(r / ((T - saved) / T), 1)
    merged = sum(1 for _, n, state, _ in entries if state is not None)
    dynamic = [f for f, n, state, _ in entries if state is None]
    assert merged == round(static * rr)
    assert dynamic.count(0) == dynamic.count(1) == math.ceil((N - static) * rr)
    exact = r * T / (T - saved)  # the other order differs in a count here
    assert (round(static * exact), math.ceil((N - static) * exact - 1e-9)) != (merged, dynamic.count(0))


@pytest.mark.parametrize("ratio,N,static", [(0.9, 15, 10), (0.7, 10, 4), (0.7, 28, 8), (0.85, 15, 3)])
def test_holitom_ratio_is_the_official_retain_ratio_in_decimal(ratio, N, static):
    """ratio is 1 - RETAIN_RATIO in decimal: ratio=0.9 is RETAIN_RATIO=0.1, the float 0.1 (1 - 0.9 is
    0.09999999999999998), ratio=0.7 is 0.3 (not 0.30000000000000004). With the official counts
    round(static * r') and ceil(dynamic * r') (r' = RETAIN_RATIO / ((T - saved) / T)), these two-frame videos keep
    another number of tokens than 1 - ratio would."""
    assert HoliTom(ratio=0.9)._retention(100) == 0.1 and HoliTom(ratio=0.7)._retention(100) == 0.3
    assert HoliTom(ratio=0.75)._retention(100) == 0.25 and HoliTom(ratio=0.9).nominal_retention == 0.1
    assert HoliTom(keep=10)._retention(40) == 0.25
    retain_ratio = {0.9: 0.1, 0.7: 0.3, 0.85: 0.15}[ratio]  # os.environ["RETAIN_RATIO"] as the scripts set it
    T, saved = 2 * N, static
    retain = min(retain_ratio / ((T - saved) / T), 1)
    official = (round(static * retain), math.ceil((N - static) * retain))
    g = torch.Generator().manual_seed(N)
    first = torch.randn(N, 8, generator=g)
    E = torch.stack([first, torch.cat([first[:static], -first[static:]])])
    (((_, _), entries),) = holitom.outer_windows(E, torch.rand(2, N, generator=g), HoliTom(ratio=ratio)._retention(T),
                                                 0.8, 0.6, 1024, torch.Generator().manual_seed(0))
    merged = sum(1 for _, _, state, _ in entries if state is not None)
    assert (merged, sum(1 for f, _, state, _ in entries if state is None and f == 0)) == official
    r = 1 - ratio  # the float vtr used: another count
    old = min(r * T / (T - saved), 1)
    assert (round(static * old), math.ceil((N - static) * old - 1e-9)) != official


def test_holitom_tau_default_and_budgets():
    assert HoliTom(ratio=0.75).tau == 0.80 and HoliTom(ratio=0.9).tau == 0.65 and \
        HoliTom(ratio=0.9, threshold=0.7).tau == 0.7
    # r' re-inflation: F=4, N=4, everything static in one window saves 12 of 16 tokens: r' = min(.25 * 16 / 4, 1)
    E = torch.randn(1, 4, 8).expand(4, 4, 8).clone()
    windows = holitom.outer_windows(E, torch.rand(4, 4), 0.25, 0.8, 0.6, 1024)
    (((s, e), entries),) = windows
    assert (s, e) == (0, 3) and len(entries) == 4  # r' = 1: every static location is its own centre


def siglip_received_by_hand(model, pixel_values_videos):
    """HoliTom's OneVision signal written out: the input of the tower's last layer (``hidden_states[-2]``), its
    layer norm, eager softmax(q k^T * scale) per head, mean over heads and queries, then the 27x27 -> 14x14
    bilinear pooling of the features (here side -> ceil(side / 2)), per frame: ``[F, N]``."""
    tower = model.model.vision_tower
    pixels = pixel_values_videos.flatten(0, 1)
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2]
        layer = getattr(tower, "vision_model", tower).encoder.layers[-1]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        n, P, _ = x.shape
        q = attn.q_proj(x).view(n, P, attn.num_heads, -1).transpose(1, 2).float()
        k = attn.k_proj(x).view(n, P, attn.num_heads, -1).transpose(1, 2).float()
        received = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1).mean(1).mean(1)  # [frames, P]
    side = math.isqrt(P)
    pooled = torch.nn.functional.interpolate(received.view(n, 1, side, side), size=(-(-side // 2),) * 2,
                                             mode="bilinear")
    return pooled.flatten(1)


def test_holitom_on_onevision_emits_the_official_window_order():
    """On LLaVA-OneVision (compact positions) the language model receives each window's static centres, then
    each frame's dynamic tokens, exactly as the slow re-derivation on its input embeddings orders them, with
    the official signal: the SigLIP tower's last-layer received attention, pooled like the features."""
    import reference as R
    model, proc = tm.build("llava_onevision")
    frames = tm.random_video(6, 32, 32, seed=3)
    frames[1:3, 16:] = frames[0, 16:]  # the bottom half static over frames 0-2, the top half moving
    inputs = tm.video_inputs("llava_onevision", proc, videos=[frames])
    lm_inputs = R.capture_lm_inputs(model, inputs)
    r = 0.5
    with vtr.patch(model, "holitom", ratio=1 - r, inner_ratio=0) as handle, torch.no_grad():
        model(**inputs)
    record = handle.last
    (span,) = record.layout.rows[0].spans
    table = (~span.newline).nonzero().flatten()
    F = int(span.frame[table].max()) + 1
    E = lm_inputs["embeds"][0, span.positions[table]].float().view(F, -1, lm_inputs["embeds"].shape[-1])
    A = siglip_received_by_hand(model, inputs["pixel_values_videos"])
    slow, windows, _ = slow_holitom(E, r, HoliTom(ratio=1 - r).tau, A=A)
    assert any(e > s for s, e in windows), "the video has no static window"
    fallback, _, _ = slow_holitom(E, r, HoliTom(ratio=1 - r).tau)
    assert [(f, n) for f, n, _ in fallback] != [(f, n) for f, n, _ in slow], "the signal decides nothing here"
    # a window's static centres come before its first frame's dynamic tokens above them (not raster order)
    assert [(f, n) for f, n, _ in slow] != sorted((f, n) for f, n, _ in slow)
    stage = record.stages[0]
    merged = dict(zip(stage.merged[0].kept.tolist(), stage.merged[0].embeds))
    kept = stage.kept[0].tolist()
    fed = [merged.get(k, lm_inputs["embeds"][0, span.positions[k]]).float() for k in kept]
    assert len(fed) == len(slow) + 1 and kept[-1] == span.n - 1  # the trailing newline, untouched
    assert all(torch.allclose(a, v, atol=1e-5) for a, (_, _, v) in zip(fed, slow))
    assert record.stages[0].n_present == [len(slow) + 1]


def test_holitom_inner_stage_counts_and_positions():
    """The inner stage keeps round(Nv * 0.5) of the present visual tokens (OneVision: the newline counted) at
    the scaled layer; nominal, input and layer-averaged retention are reported."""
    model, proc = tm.build("llava_onevision")
    inputs = tm.video_inputs("llava_onevision", proc, 1)
    with vtr.patch(model, "holitom", ratio=0.75) as handle, torch.no_grad():
        model(**inputs)
    record = handle.last
    outer, inner = record.stages
    assert (outer.layer, inner.layer) == (0, 2)  # 18 of 28 layers on a 4-layer model
    assert inner.n_present == [round(outer.n_present[0] * 0.5)]
    n = record.n_visual[0]
    assert record.nominal_retention == 0.25
    assert record.input_retention == [outer.n_present[0] / n]
    assert record.layer_retention == [(2 * outer.n_present[0] + 2 * inner.n_present[0]) / 4 / n]
    assert handle.method.stages()[1].positions == "original"
    with vtr.patch(model, "holitom", ratio=0.75, inner_ratio=0) as handle, torch.no_grad():
        model(**inputs)
    assert len(handle.last.stages) == 1


@pytest.mark.parametrize("family", QWEN + ("llava_onevision",))
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_holitom_video_rows_equal_the_video_alone(family, mode):
    import test_requests as TR
    model, proc = tm.build(family)
    frames = [6, 2] if family in QWEN else [4, 4]
    size = (64, 48) if family in QWEN else (32, 32)
    videos = [tm.random_video(f, *size, seed=b) for b, f in enumerate(frames)]
    with vtr.patch(model, "holitom", ratio=0.5):
        TR.assert_rows_equal_alone(model, tm.video_inputs(family, proc, videos=videos), _alone(family, proc, videos),
                                   mode)


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_holitom_image_and_video_in_one_prompt(family, mode):
    model, proc = tm.build(family)
    inputs = image_and_video_inputs(family, proc)
    check_against_reference(model, inputs, "holitom", mode)
    with vtr.patch(model, "holitom", ratio=0.75, inner_ratio=0) as handle, torch.no_grad():
        model(**inputs)
    image, vid = handle.last.layout.rows[0].spans
    kept = handle.last.kept[0]
    assert ((kept >= image.offset) & (kept < image.offset + image.n)).sum() == math.ceil(image.n * 0.25)


def test_holitom_refuses_bad_options():
    model, _ = tm.build("llava_onevision")
    with pytest.raises(ValueError, match="inner_layer must be in"):
        vtr.patch(model, "holitom", ratio=0.5, inner_layer=4)
    with pytest.raises(ValueError, match="scope must be 'image'"):
        HoliTom(ratio=0.5, scope="crop")
    with pytest.raises(ValueError, match="inner_ratio must be in"):
        HoliTom(ratio=0.5, inner_ratio=1.0)
    with pytest.raises(ValueError, match="beta must be in"):
        HoliTom(ratio=0.5, beta=1.5)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_holitom_inner_stage_is_the_last_tokens_eager_attention_and_the_sequential_merge(family):
    """Inner stage on a model: the kept tokens are the top round(Nv / 2) of the last token's eager attention at
    layer K-1 (mean over heads) over the video's present tokens, newline included, and the merged states equal the
    sequential loop on the hidden states entering layer K (both read from the patched run's own outputs, which
    layers < K computed on the outer-pruned sequence)."""
    model, proc = tm.build(family, attn="eager")
    inputs = tm.video_inputs(family, proc, 1)
    with vtr.patch(model, "holitom", ratio=0.5) as handle, torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    record = handle.last
    outer, inner = record.stages
    K = inner.layer
    (span,) = record.layout.rows[0].spans
    index = outer.index[0]
    present = outer.kept[0]  # visual ids after the outer stage, ascending = sequence order
    slots = torch.tensor([index.tolist().index(int(span.positions[v])) for v in present])
    attention = out.attentions[K - 1][0].mean(0)[-1, slots]
    keep = round(len(present) * 0.5)
    top, states = slow_inner(out.hidden_states[K][0, slots].float(), attention, keep)
    assert inner.kept[0].tolist() == present[top].tolist()
    merged = dict(zip(inner.merged[0].kept.tolist(), inner.merged[0].embeds))
    assert merged, "nothing was merged"
    for j in top:
        got = merged.get(int(present[j]), out.hidden_states[K][0, slots[j]]).float()
        assert torch.allclose(got, states[j], atol=1e-5)
