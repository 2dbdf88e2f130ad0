"""The video methods serving engines ship (EVS: vLLM's ``--video-pruning-rate``; VidCom2: its
``--video-retention-ratio`` PR): each selection against a slow loop re-derivation of the official code on the
language model's input embeddings of a tiny model, keep counts, videos batched with other videos and with images
(images pass whole: the official code leaves them alone). Exactness against the reference is in the shared matrix
(test_exactness.py runs them on videos); EVS against vLLM's own function is in tests/vllm/test_video_pruning.py."""
import math

import pytest
import torch

import reference as R
import tiny_models as tm
import vtr
from test_exactness import check_against_reference
from test_video_methods import QWEN, _alone
from vtr.methods import EVS, VidCom2

VIDEO_FAMILIES = QWEN + ("llava_onevision",)


def video_embeddings(model, inputs, record, row=0, deepstack=False):
    """(``[F, N, D]`` the language model's input embeddings of the row's video laid out by frame, ``[F * N]`` their
    prompt positions, frame-major): what the pre-LLM video methods score. ``deepstack``: on Qwen3-VL each token's
    DeepStack features follow, level after level (what vLLM's visual output carries and EVS scores; one video in
    the batch)."""
    (span,) = [s for s in record.layout.rows[row].spans if s.kind == "video"]
    candidates = (~span.newline).nonzero().flatten()
    frames = span.frame[candidates]
    order = torch.argsort(frames * (span.n + 1) + candidates)
    candidates = candidates[order]
    F = int(frames.max()) + 1
    lm = R.capture_lm_inputs(model, inputs)
    E = lm["embeds"][row, span.positions[candidates]]
    if deepstack and lm.get("deepstack") is not None:
        E = torch.cat([E] + [level[candidates] for level in lm["deepstack"]], -1)
    return E.view(F, len(candidates) // F, -1), span.offset + candidates


def a_video(family, frames=None, seed=3, repeat=True):
    """One video with a repeated frame (Qwen: a repeated temporal slice), so that some patches do not change."""
    qwen = family in QWEN
    video = tm.random_video(frames or (8 if qwen else 6), *((64, 48) if qwen else (32, 32)), seed=seed)
    if repeat:
        if qwen:
            video[2:4] = video[0:2]
        else:
            video[1] = video[0]
    return video


# ------------------------------------------------------------------------------------------------------------ EVS
def slow_evs(E, ratio=None, keep=None):
    """vLLM's compute_retention_mask written as loops: per token 1 - cos with the same location of the previous
    frame (255 for the first frame), kept: the first max(N, int(F N (1 - q))) by descending dissimilarity, ties
    to the earlier token."""
    F, N, _ = E.shape
    scores = []
    for f in range(F):
        for n in range(N):
            if f == 0:
                d = 255.0
            else:
                d = 1 - float(torch.nn.functional.cosine_similarity(E[f, n], E[f - 1, n], dim=0))
            scores.append((-d, f * N + n))
    count = max(N, int(F * N * (1 - ratio)) if keep is None else min(keep, F * N))
    return sorted(i for _, i in sorted(scores)[:count])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("budget", [{"ratio": 0.6}, {"ratio": 0.3}, {"keep": 50}])
def test_evs_matches_the_slow_rederivation(family, budget):
    model, proc = tm.build(family)
    inputs = tm.video_inputs(family, proc, videos=[a_video(family)])
    with vtr.patch(model, "evs", **budget) as handle, torch.no_grad():
        model(**inputs)
    E, positions = video_embeddings(model, inputs, handle.last, deepstack=True)
    F, N, _ = E.shape
    expected = positions[slow_evs(E, **budget)]
    (span,) = handle.last.layout.rows[0].spans
    newline = span.offset + span.newline.nonzero().flatten()
    assert sorted(handle.last.kept[0].tolist()) == sorted(expected.tolist() + newline.tolist())
    assert set(positions[:N].tolist()) <= set(handle.last.kept[0].tolist())  # the first frame whole


def test_evs_keeps_the_first_frame_whole_at_any_rate():
    """max(N, int(F N (1 - q))): at q = 0.9 on 4 slices the first slice alone (vLLM's minimum)."""
    model, proc = tm.build("qwen2_5_vl")
    inputs = tm.video_inputs("qwen2_5_vl", proc, videos=[a_video("qwen2_5_vl", repeat=False)])
    with vtr.patch(model, "evs", ratio=0.9) as handle, torch.no_grad():
        model(**inputs)
    E, positions = video_embeddings(model, inputs, handle.last)
    assert handle.last.kept[0].tolist() == positions[:E.shape[1]].tolist()
    assert EVS(ratio=0.5).retained(48, 4) == 96 and EVS(ratio=0.99).retained(48, 4) == 48
    assert EVS(ratio=0.7).retained(10, 3) == 10 and EVS(ratio=0.3).retained(10, 3) == 21
    assert EVS(keep=5).retained(10, 3) == 10 and EVS(keep=500).retained(10, 3) == 30


@pytest.mark.parametrize("method,options", [("evs", {"ratio": 0.6}), ("vidcom2", {"ratio": 0.6})])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_video_rows_equal_the_video_alone(method, options, family, mode):
    """Batch 2 (Qwen: 6 and 2 frames, i.e. 3 and 1 temporal slices; OneVision: 4 frames each) equals each video
    alone: same kept tokens, same outputs."""
    import test_requests as TR
    model, proc = tm.build(family)
    frames = [6, 2] if family in QWEN else [4, 4]
    size = (64, 48) if family in QWEN else (32, 32)
    videos = [tm.random_video(f, *size, seed=b) for b, f in enumerate(frames)]
    with vtr.patch(model, method, **options):
        TR.assert_rows_equal_alone(model, tm.video_inputs(family, proc, videos=videos), _alone(family, proc, videos),
                                   mode)


@pytest.mark.parametrize("method", ["evs", "vidcom2"])
@pytest.mark.parametrize("family", QWEN)
def test_images_pass_whole_beside_a_pruned_video(method, family):
    """An image and a video in one prompt: the image keeps every token (the official code prunes videos only),
    the video is pruned as it is alone, and the run equals the reference."""
    from test_video_methods import image_and_video_inputs
    model, proc = tm.build(family)
    inputs = image_and_video_inputs(family, proc)
    with vtr.patch(model, method, ratio=0.6) as handle, torch.no_grad():
        model(**inputs)
    image, clip = sorted(handle.last.layout.rows[0].spans, key=lambda s: s.kind != "image")
    kept = handle.last.kept[0]
    assert ((kept >= image.offset) & (kept < image.offset + image.n)).sum() == image.n
    assert ((kept >= clip.offset) & (kept < clip.offset + clip.n)).sum() < clip.n
    check_against_reference(model, inputs, method, "generate")


@pytest.mark.parametrize("method", ["evs", "vidcom2"])
def test_video_methods_refuse_models_without_videos(method):
    model, _ = tm.build("llava")
    with pytest.raises(ValueError, match=rf"{method} does not support LlavaForConditionalGeneration: it prunes videos"):
        vtr.patch(model, method, ratio=0.5)


# -------------------------------------------------------------------------------------------------------- VidCom2
def slow_vidcom2(E, r):
    """The official vidcom2_compression (Qwen / OneVision "linear" mapping) written as loops over tokens and
    channels, in fp64: the lowest-variance half of the channels, per-token Gaussian similarities to the video and
    frame centres, frame budgets from a softmax of the negated mean video similarity, per frame the smallest sums."""
    F, N, D = E.shape
    X = E.double().reshape(F * N, D).tolist()
    variance = []
    for c in range(D):
        column = [x[c] for x in X]
        mean = sum(column) / len(column)
        variance.append(sum((v - mean) ** 2 for v in column) / len(column))
    channels = sorted(range(D), key=lambda c: variance[c])[:int(D * 0.5)]
    tokens = []
    for x in X:
        picked = [x[c] for c in channels]
        norm = math.sqrt(sum(v * v for v in picked))
        tokens.append([v / max(norm, 1e-12) for v in picked])
    k = len(channels)

    def centre(rows):
        return [sum(t[c] for t in rows) / len(rows) for c in range(k)]

    def gaussian(t, c):
        d = sum((a - b) ** 2 for a, b in zip(t, c))
        return sum(math.exp(-d / (2 * a)) for a in (0.125, 0.25, 0.5, 1.0, 2.0))

    video_centre = centre(tokens)
    kept = []
    v_scores, sums = [], []
    for f in range(F):
        frame = tokens[f * N:(f + 1) * N]
        frame_centre = centre(frame)
        v = [gaussian(t, video_centre) for t in frame]
        v_scores.append(v)
        sums.append([a + gaussian(t, frame_centre) for a, t in zip(v, frame)])
    s = [-sum(v) / N for v in v_scores]
    exps = [math.exp((x - max(s)) / 0.01) for x in s]
    probs = [e / sum(exps) for e in exps]
    mean = sum(probs) / F
    for f in range(F):
        k_f = max(1, round(min(1.0, r * (1 + probs[f] - mean)) * N))  # Python's round: half to even, as torch
        kept += [f * N + n for n in sorted(sorted(range(N), key=lambda n: sums[f][n])[:k_f])]
    return kept


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("budget", [{"ratio": 0.6}, {"ratio": 0.25}, {"keep": 12}])
def test_vidcom2_matches_the_slow_rederivation(family, budget):
    model, proc = tm.build(family)
    inputs = tm.video_inputs(family, proc, videos=[a_video(family, frames=12 if family in QWEN else 6)])
    with vtr.patch(model, "vidcom2", **budget) as handle, torch.no_grad():
        model(**inputs)
    E, positions = video_embeddings(model, inputs, handle.last)
    F, N, _ = E.shape
    r = 1 - budget["ratio"] if "ratio" in budget else budget["keep"] / (F * N)
    expected = positions[slow_vidcom2(E, r)]
    (span,) = handle.last.layout.rows[0].spans
    newline = span.offset + span.newline.nonzero().flatten()
    assert sorted(handle.last.kept[0].tolist()) == sorted(expected.tolist() + newline.tolist())
    counts = [int(((handle.last.kept[0] >= positions[f * N]) & (handle.last.kept[0] <= positions[f * N + N - 1]))
                  .sum()) for f in range(F)]
    assert len(set(counts)) > 1  # the frames got different budgets


def test_vidcom2_frame_budgets_follow_distinctiveness():
    """A frame unlike the others (a scene cut) gets the larger budget; the budgets are min(1, r (1 + p - mean p))
    of the frame size, rounded, at least 1."""
    from test_video_methods import structured_video
    E = structured_video(F=10, N=16, D=8, seed=0)
    kept = VidCom2(ratio=0.5).compress(E, 0.5)
    counts = [len(k) for k in kept]
    assert counts == [len(k) for k in (torch.tensor(x) for x in _frames(slow_vidcom2(E, 0.5), 10, 16))]
    assert max(counts) <= 16 and min(counts) >= 1 and len(set(counts)) > 1


def _frames(kept, F, N):
    return [[i - f * N for i in kept if f * N <= i < (f + 1) * N] for f in range(F)]
