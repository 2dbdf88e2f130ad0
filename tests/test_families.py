"""What each family added for the current models brings of its own, beyond the shared matrices (which run every
family of ``tm.FAMILIES``): InternVL's tiles and pixel shuffle, its videos as frames, the shipped configs' sizes."""
import pytest
import torch

import tiny_models as tm
import vtr
from test_exactness import check_against_reference
from vtr import compat
from vtr.bench import models


# ---------------------------------------------------------------------------------------------------- InternVL
def test_internvl_tiles_and_thumbnail_in_the_layout():
    """A 48x80 image is cut into 1 x 2 tiles plus the thumbnail (16 tokens each): tiles are frame 1 / crops 1-2 in
    sequence order, the thumbnail (last) frame 0 / crop 0; a square 16x16 image is one tile, a plain grid."""
    model, proc = tm.build("internvl")
    inputs = proc(text=[tm._prompt("internvl", 2, long=False)], images=[tm.random_image(48, 80), tm.random_image(16, 16)],
                  return_tensors="pt")
    with vtr.patch(model, "divprune", ratio=0.5) as handle, torch.no_grad():
        model(**inputs)
    tiled, single = handle.last.layout.rows[0].spans
    assert tiled.n == 48 and tiled.grid is None
    assert tiled.crop.tolist() == [1] * 16 + [2] * 16 + [0] * 16
    assert tiled.frame.tolist() == [1] * 32 + [0] * 16
    assert tiled.row[16:32].tolist() == [r for r in range(4) for _ in range(4)]  # each tile its own 4x4 grid
    assert single.n == 16 and single.grid == (1, 4, 4) and bool((single.crop == 0).all())


def test_internvl_scope_crop_gives_each_tile_its_budget():
    model, proc = tm.build("internvl")
    inputs = proc(text=[tm._prompt("internvl", 1, long=False)], images=[tm.random_image(48, 80)], return_tensors="pt")
    with vtr.patch(model, "fastervlm", ratio=0.75, scope="crop") as handle, torch.no_grad():
        model(**inputs)
    (span,) = handle.last.layout.rows[0].spans
    kept = handle.last.kept[0]
    assert [int((span.crop[kept] == c).sum()) for c in (0, 1, 2)] == [4, 4, 4]


def test_internvl_token_units_are_the_models_pixel_shuffle():
    """``pixel_shuffle_units``: the patches whose features the model's own pixel shuffle concatenates into each
    language token, in order; checked on real tower features against ``pixel_shuffle`` itself."""
    model, _ = tm.build("internvl")
    side = compat.vision_grid_side(model)
    features = torch.randn(2, side * side, 3)
    shuffled = model.model.pixel_shuffle(features.view(2, side, side, 3), scale_factor=0.5).reshape(2, -1, 12)
    units = compat.pixel_shuffle_units(model)
    assert units.shape == (side * side // 4, 4)
    assert torch.equal(features[:, units].flatten(2), shuffled)


@pytest.mark.parametrize("method", ["visionzip", "vispruner"])
def test_internvl_merged_features_are_the_projector_input(method):
    """VisionZip's contextual tokens and VisPruner's similarities read each token's projector input: the
    concatenated features of its 2x2 patches (the exactness matrix checks the language-model side)."""
    model, proc = tm.build("internvl")
    inputs = tm.image_inputs("internvl", proc, 1)
    seen = {}
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    from vtr.signals.vision import _per_token
    tower = model.model.vision_tower(pixel_values=inputs["pixel_values"], return_dict=True)
    crops, per_tile = inputs["pixel_values"].shape[0], compat.tokens_per_tile(model)
    j = torch.arange(crops * per_tile)
    units = compat.pixel_shuffle_units(model)[j % per_tile] + 1
    rows = _per_token(tower.last_hidden_state, j // per_tile, units, reduce=None).flatten(1)
    assert torch.allclose(rows, seen["x"].reshape(-1, rows.shape[-1]), atol=1e-6)
    check_against_reference(model, inputs, method, "forward")


def internvl_video(proc, frames: int = 3, batch: int = 1):
    """A video as InternVL's processor writes it: ``FrameN: <img>...</img>`` lines, each frame one tile (the video
    processor resizes frames to one tile; here the image processor with ``crop_to_patches=False``)."""
    texts, images = [], []
    for b in range(batch):
        body = "\n".join(f"Frame{i + 1}: <IMG_CONTEXT>" for i in range(frames + b))
        texts.append(f"<|im_start|> user {body} what is in this video ? <|im_end|> <|im_start|> assistant")
        images += [tm.random_image(32, 32, seed=10 * b + i) for i in range(frames + b)]
    return proc(text=texts, images=images, return_tensors="pt", padding=True, crop_to_patches=False)


@pytest.mark.parametrize("method", ["fastvid", "dycoke", "fastervlm"])
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_internvl_video_frames_are_images(method, mode):
    """InternVL takes a video as its frames, each written as a one-tile image: every frame is an image span (its
    own budget), and the pruned run equals the unpatched model fed the kept tokens (left-padded batch of 2)."""
    model, proc = tm.build("internvl", attn="eager")
    inputs = internvl_video(proc, batch=2)
    with vtr.patch(model, "divprune", ratio=0.5) as handle, torch.no_grad():
        model(**inputs)
    assert [len(r.spans) for r in handle.last.layout.rows] == [3, 4]
    assert all(s.kind == "image" and s.n == 16 for r in handle.last.layout.rows for s in r.spans)
    check_against_reference(model, inputs, method, mode)


# ----------------------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("name,parameters,published", [
    # published exact counts: the checkpoints' (Qwen3-VL-30B-A3B, Gemma 3 4B) or, for Qwen3.5, a serving provider's
    # catalogue (the hub's safetensors totals also hold Qwen3.5's multi-token-prediction layer, which transformers
    # does not build: 9,653,104,368 for the 9B)
    ("qwen3-vl-30b-a3b", 31_070_754_032, 31_070_754_032),
    ("gemma-3-4b", 4_300_079_472, 4_300_079_472),
    ("qwen3.5-9b", 9_409_813_744, 9_409_813_744),
    ("qwen3.5-35b-a3b", 35_107_181_936, 35_107_181_936),
    # InternVL3.5-8B-HF: the model card's 8.5B (InternViT-300M + Qwen3-8B); the exact count is the config's
    ("internvl3.5-8b", 8_528_318_464, 8.5e9),
    # GLM-4.1V-9B-Thinking: no exact published count found; the config's own (a "9B" language model, GLM-4-9B-0414,
    # with a 1.3B-parameter vision tower)
    ("glm-4.1v-9b", 10_292_777_472, None),
])
def test_shipped_configs_have_the_published_size(name, parameters, published):
    """A shipped config builds the checkpoint's parameters (tied embeddings counted once)."""
    count, size = models.weight_bytes(models.load_config(name), torch.bfloat16)
    assert count == parameters and size >= 2 * count
    if isinstance(published, int):
        assert count == published
    elif published is not None:
        assert round(count / 1e8) / 10 == published / 1e9


# ------------------------------------------------------------------------------------------------------ Gemma 3
def gemma3_layer_masks(model, inputs, method=None, **options):
    """The boolean ``[B, q, kv]`` mask every decoder layer's attention received in one forward (patched with
    ``method`` when given), from an eager model (additive masks)."""
    seen = {}

    def hook(i):
        def run(module, args, kwargs):
            seen[i] = kwargs["attention_mask"][:, 0] == 0
        return run
    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.language_model.layers)]
    try:
        with torch.no_grad():
            if method is None:
                model(**inputs)
                return seen, None
            with vtr.patch(model, method, ratio=0.75, **options) as handle:
                model(**inputs)
            return seen, handle.last
    finally:
        for h in handles:
            h.remove()


def expected_gemma3_mask(blocks, valid, window):
    """(causal OR same block) AND window AND valid key, over one layer's sequence: ``[B, L, L]``."""
    L = valid.shape[1]
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    allowed = (k <= q)[None] | same
    if window is not None:
        allowed &= (k > q - window)[None]
    return allowed & valid[:, None, :]


@pytest.mark.parametrize("method", [None, "divprune", "fastv"])
def test_gemma3_masks_keep_image_blocks_bidirectional_and_every_window(method):
    """The engine capability Gemma 3 needs: on the language model's sequence of each layer (the prompt, the kept
    tokens after a pre-LLM stage, the kept tokens from a layer stage on) every image's kept tokens attend to each
    other both ways, text attends causally, and sliding-window layers see only their last ``W`` slots (W = 8 in the
    tiny model, so windows cut through the 16-token image blocks). Checked on real (valid) query rows of a
    left-padded batch of two rows, one with two images."""
    model, proc = tm.build("gemma3", attn="eager")
    inputs = tm.image_inputs("gemma3", proc, 2, "multi")
    masks, record = gemma3_layer_masks(model, inputs, method)
    lm = model.model.language_model
    token_types, valid = inputs["token_type_ids"], inputs["attention_mask"].bool()
    for i, mask in masks.items():
        index = None
        if record is not None and record.index is not None and (method == "divprune" or i >= 2):
            index = record.index  # the kept tokens: from the input (divprune) or from layer K = 2 (fastv)
        types = token_types if index is None else torch.where(index >= 0, token_types.gather(1, index.clamp(min=0)), 0)
        keys = valid if index is None else index >= 0
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask
        expected = expected_gemma3_mask(get_block_sequence_ids_for_mask(types), keys,
                                        compat.sliding_window(lm, i))
        assert mask.shape == expected.shape, i
        rows = keys[:, :, None].expand_as(mask)  # padding query rows are irrelevant
        assert torch.equal(mask[rows], expected[rows]), f"layer {i}"
    if method is not None:  # the prompt's image blocks were pruned, not their bidirectionality
        assert record.n_kept != record.n_visual


def test_gemma3_decoding_masks_are_causal_and_windowed_on_the_pruned_cache():
    """After pre-LLM pruning, a generated token (text) attends causally to the pruned cache, within the window on
    sliding layers: the pruned run's steps equal the unpatched model fed the kept tokens (the reference windows
    by its own masks over caches that keep every key)."""
    model, proc = tm.build("gemma3", attn="sdpa")
    check_against_reference(model, tm.image_inputs("gemma3", proc, 2, "single"), "divprune", "generate")


# ------------------------------------------------------------------------------------------------------ Qwen3.5
@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_qwen3_5_linear_layers_get_the_padding_of_the_sequence_they_run_on(method):
    """Qwen3.5's Gated DeltaNet layers zero padded inputs (their 2-D mask) so that padding never enters the
    recurrent state: after pruning, each row is re-padded on the left and every linear layer that runs on the kept
    tokens gets their padding, the layers before a layer stage the prompt's."""
    model, proc = tm.build("qwen3_5", attn="eager")
    inputs = tm.image_inputs("qwen3_5", proc, 2, "multi")
    seen = {}

    def hook(i):
        def run(module, args, kwargs):
            seen.setdefault(i, kwargs.get("attention_mask"))
        return run
    layers = model.model.language_model.layers
    handles = [layer.linear_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(layers) if hasattr(layer, "linear_attn")]
    try:
        with vtr.patch(model, method, ratio=0.75) as handle, torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    kept = (handle.last.index >= 0).long()
    assert seen and bool((kept == 0).any())  # rows of different lengths after pruning: some re-padding
    for i, mask in seen.items():
        pruned = method == "divprune" or i >= 2
        assert torch.equal(mask.long(), kept if pruned else inputs["attention_mask"]), f"layer {i}"


def test_qwen3_5_refuses_layer_methods_that_read_a_linear_layer():
    """FastV's default scoring layer on the real models (layer 1: linear attention) is refused with the layers it
    could use; on the tiny model layer 2 (linear) stands for it."""
    model, _ = tm.build("qwen3_5")
    with pytest.raises(ValueError, match=r"fastv scores with the attention of the layer before its stage at 3 "
                                         r"\(decoder layer 2\), which in Qwen3_5ForConditionalGeneration is a "
                                         r"linear-attention \(recurrent\) layer.*layer values whose scoring layer has "
                                         r"softmax attention: \[2\]"):
        vtr.patch(model, "fastv", ratio=0.5, layer=3)
    assert vtr.handle_of(model) is None


@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_qwen3_5_sparsevlm_one_stage_is_exact(mode):
    """SparseVLM with the one stage the tiny hybrid model allows (layer 2: its scoring layer 1 has softmax attention;
    its recycled tokens enter the linear-attention layers after it) at a ratio its schedule reaches (0.5), against the
    unpatched model fed the kept and recycled tokens (left-padded batch of two, two images in a row)."""
    model, proc = tm.build("qwen3_5", attn="eager")
    check_against_reference(model, tm.image_inputs("qwen3_5", proc, 2, "multi"), "sparsevlm", mode, ratio=0.5,
                            **tm.options("sparsevlm", "qwen3_5"))


@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_qwen3_5_dycoke_without_its_kv_stage_is_exact(mode):
    """DyCoke with ``kv_ratio=0`` (TTM alone, as vLLM serves it) has no decoding stage, so the linear-attention layer
    its KV stage would read does not refuse it: a batch of two videos equals the unpatched model fed the kept
    tokens; its default (a KV stage) is still refused."""
    model, proc = tm.build("qwen3_5", attn="eager")
    check_against_reference(model, tm.video_inputs("qwen3_5", proc, 2), "dycoke", mode, ratio=0.5, kv_ratio=0)
    with pytest.raises(ValueError, match=tm.LAYER_REFUSED["dycoke", "qwen3_5"]):
        vtr.patch(model, "dycoke", ratio=0.5)


def test_decode_stage_refusal_names_the_layers_that_work_and_how_to_turn_it_off():
    """DyCoke's decode-time stage where its default layer cannot serve it: on Gemma 3 (a sliding layer before it) the
    error lists the layer values that work, which then patch; on Qwen3.5 (linear-attention layers everywhere after)
    it says that none does; both name kv_ratio=0."""
    model, _ = tm.build("gemma3")
    with pytest.raises(ValueError, match=r"dycoke's decoding stage \(layer=3\) cannot run on Gemma3ForConditional"
                                         r"Generation: .*sliding_attention layer.*Give layer one of \[2\], or pass "
                                         r"kv_ratio=0"):
        vtr.patch(model, "dycoke", ratio=0.5)
    vtr.patch(model, "dycoke", ratio=0.5, layer=2).remove()
    model, _ = tm.build("qwen3_5")
    with pytest.raises(ValueError, match=r"\(layer=2\) cannot run on .*: it hides visual tokens from the KV caches "
                                         r"of decoder layers >= 2.*No layer value avoids that on this model, or pass "
                                         r"kv_ratio=0"):
        vtr.patch(model, "dycoke", ratio=0.5, layer=2)
    assert vtr.handle_of(model) is None

