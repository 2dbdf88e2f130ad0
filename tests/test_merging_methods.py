"""The merging baselines toolkits and benchmarks ship (PruMerge / PruMerge+, ToMe, MustDrop): each selection and
merge against a loop transcription of the official code run on the unpatched tiny model's own tensors, keep
counts, batch == alone. Exactness against the reference is in the shared matrix (test_exactness.py)."""
import numpy as np
import pytest
import torch

import tiny_models as tm
import vtr


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
    for keep in (2, 3, 64):
        with vtr.patch(model, "prumerge", keep=keep) as handle, torch.no_grad():
            model(**inputs)
        counts[keep] = handle.last.n_kept[0]
    assert counts[2] == 2 and counts[3] == 3 and 3 < counts[64] < 64
