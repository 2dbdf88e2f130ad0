"""Every row is its own request: a row's selection and outputs do not depend on its padding or its batch
companions; tiny images keep at least one token; a pruned cache can be continued with text (later turns, chunked
text); half-precision scores can follow the model dtype; a prompt may end with image tokens."""
import pytest
import torch

import reference as R
import tiny_models as tm
import vtr
from vtr import compat
from test_exactness import check_against_reference
from vtr.methods import REGISTRY

METHODS = tm.matrix_methods()
STEPS = 4
TOL = 1e-5


def run(model, inputs, mode):
    """(kept per row, per-row outputs): a forward's logits on the real slots of each row, or generate's new tokens
    and step logits."""
    handle = vtr.handle_of(model)
    with torch.no_grad():
        if mode == "forward":
            logits = model(**inputs).logits
            real = handle.last.index >= 0 if handle.last.index is not None else inputs["attention_mask"].bool()
            outputs = [logits[b][real[b]] for b in range(len(logits))]
        else:
            out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
            steps = torch.stack(out.logits, 1)
            outputs = [(out.sequences[b, -STEPS:], steps[b]) for b in range(len(steps))]
    return handle.last.kept, outputs


def assert_close(a, b):
    if isinstance(a, tuple):
        assert torch.equal(a[0], b[0])
        a, b = a[1], b[1]
    assert a.shape == b.shape and (a - b).abs().max() <= TOL


def assert_rows_equal_alone(model, batch, alones, mode):
    """Each row of ``batch`` keeps the same tokens and gives the same outputs as ``alones[row]`` run by itself."""
    kept, outputs = run(model, batch, mode)
    for b, alone in enumerate(alones):
        kept_alone, outputs_alone = run(model, alone, mode)
        assert torch.equal(kept[b], kept_alone[0])
        assert_close(outputs[b], outputs_alone[0])


def batch_cases():
    for method in METHODS:
        for family in tm.FAMILIES:
            if not tm.in_matrix(method, family):
                continue
            for mode in ("forward", "generate"):
                for attn in ("eager", "sdpa"):
                    for side in ("left", "right"):
                        # SDPA on one padding side per mode unless VTR_TEST_FULL (left: generate's only side)
                        if attn == "sdpa" and side == "right" and not tm.full_matrices():
                            continue
                        yield pytest.param(method, family, mode, attn, side, "single",
                                           id=f"{method}-{family}-{mode}-{attn}-{side}")
                yield pytest.param(method, family, mode, "sdpa", "left", "mixed",
                                   id=f"{method}-{family}-{mode}-sdpa-left-textonly-companion")


@pytest.mark.parametrize("method,family,mode,attn,side,variant", list(batch_cases()))
def test_row_equals_the_prompt_alone(method, family, mode, attn, side, variant):
    """Same kept tokens and same outputs as the row's prompt run alone, whatever the padding side (plain forward)
    and the other rows. generate() refuses a right-padded image batch before anything runs."""
    model, proc = tm.build(family, attn=attn)
    batch = tm.image_inputs(family, proc, 2, variant, padding_side=side)
    assert bool((batch["attention_mask"] == 0).any())  # some row is padded
    with vtr.patch(model, method, ratio=0.75, **tm.options(method, family)) as handle:
        if mode == "generate" and side == "right":
            with pytest.raises(ValueError, match="right-padded batch"):
                model.generate(**batch, max_new_tokens=2)
            assert handle.last is None  # refused before anything ran
            return
        kept, outputs = run(model, batch, mode)
        for b in range(2):
            kept_alone, outputs_alone = run(model, tm.image_inputs(family, proc, 2, variant, rows=[b]), mode)
            assert torch.equal(kept[b], kept_alone[0])
            assert_close(outputs[b], outputs_alone[0])


def smallest_inputs(family, proc):
    """The smallest image each tiny model accepts: Qwen-VL's 16x16 minimum (4 tokens); the LLaVA processors
    resize, so their token counts stay at the fixed grid (LLaVA-1.5) or the smallest anyres layout."""
    image = tm.random_image(8, 8, seed=3)
    return proc(text=[tm._prompt(family, 1, long=False)], images=[image], return_tensors="pt")


@pytest.mark.parametrize("budget", [{"ratio": 0.99}, {"keep": 1}])
@pytest.mark.parametrize("method,family", tm.method_family(METHODS, tm.FAMILIES))
def test_smallest_images_keep_at_least_one_token(method, family, budget):
    model, proc = tm.build(family)
    inputs = smallest_inputs(family, proc)
    if tm.out_of_reach(method, int((inputs["input_ids"] == model.config.image_token_id).sum()), **budget):
        with pytest.raises(ValueError, match="cannot reach"), torch.no_grad():  # the next test takes its lowest
            with vtr.patch(model, method, **budget, **tm.options(method, family)):
                model(**inputs)
        return
    with vtr.patch(model, method, **budget, **tm.options(method, family)) as handle:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    record = handle.last
    (span,) = record.layout.rows[0].spans
    if family.startswith("qwen"):
        assert span.n == 4
    candidates = span.n if REGISTRY[method].newline_candidates else int((~span.newline).sum())
    # DART always keeps its image pivots; DyCoke's temporal pruning keeps a one-frame input whole; EVS and VidCom2
    # leave images whole
    expected = 4 if method == "dart" else candidates if method in ("dycoke", "evs", "vidcom2") else 1  # videos only
    if method == "mustdrop":  # its windows merge 8 tokens each, as many as the grid holds
        from test_invariants import expected_kept
        expected = expected_kept(method, candidates, **budget)
    if method == "holitom":  # one token and the newlines pass its outer stage; its inner stage halves them all
        expected = max(1, round((1 + int(span.newline.sum())) * 0.5))
    if method == "vflowopt":  # one representative per merge bucket passes the pre-LLM stage; its LLM stages
        # then keep their ratio of what is left
        expected = len(record.stages[0].kept[0])
        for keep in handle.method.schedule(span.n, record.n_layers)[1]:
            expected = max(1, expected - round(expected * (1 - keep)))
    if method == "sparsevlm" and len(handle.method.stages()) < 3:  # fewer stages named (a hybrid model's
        # options): the released schedule's count at its last stage, not its final one
        from vtr.methods.sparsevlm import stage_fractions
        m = handle.method
        fraction = m.keep / span.n if m.keep is not None else 1 - m.ratio
        expected = max(1, round(stage_fractions(m.version, fraction)[len(m.stages()) - 1] * span.n))
    last = record.stages[-1]
    # SparseVLM: recycled tokens of earlier stages are candidates; those its last stage adds are extra
    present = record.n_kept[0] - sum(t.layer == last.layer for t in last.added[0]) if last.added else \
        record.n_kept[0]
    kept_candidates = present - (span.n - candidates)
    assert kept_candidates == min(expected, candidates) >= 1


QWEN = [f for f in tm.FAMILIES if f.startswith("qwen")]


def one_token_inputs(family, proc, video: bool):
    """Two prompts whose images are one and two merged tokens (8x8 and 8x16 pixels on the tiny Qwen models, with
    the processor's minimum size lowered), or whose videos have frames of one merged token (8x8 pixels)."""
    texts = [tm._prompt(family, 1, long=False, video=video), tm._prompt(family, 1, long=True, video=video)]
    if video:
        return tm._qwen_video_by_hand(family, proc, texts, [tm.random_video(4, 8, 8, seed=b) for b in range(2)])
    images = [tm.random_image(8, 8), tm.random_image(8, 16, seed=1)]
    return proc(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left",
                size={"shortest_edge": 64, "longest_edge": 64 ** 2})


@pytest.mark.parametrize("method,family", tm.method_family(METHODS, QWEN))
def test_images_and_frames_of_one_token_keep_at_least_one(method, family):
    """The min-1 rule where a budget rounds to 0: images of one and two merged tokens (and videos of one-token
    frames, for the methods that prune videos) keep at least one token each (their own, or a recycled one), with
    keep=1 and with ratio=0.75 (the lowest a layer-averaged budget reaches on these 4-layer models)."""
    model, proc = tm.build(family)
    kinds = [False] + ([True] if "video" in REGISTRY[method].visual_kinds else [])
    for video in kinds:
        inputs = one_token_inputs(family, proc, video)
        for budget in ({"keep": 1}, {"ratio": 0.75}):
            with vtr.patch(model, method, **budget, **tm.options(method, family)) as handle, torch.no_grad():
                model(**inputs)
            record = handle.last
            added = record.stages[-1].added or [[] for _ in record.kept]
            for row, kept, extra in zip(record.layout.rows, record.kept, added):
                for span in row.spans:
                    own = int(((kept >= span.offset) & (kept < span.offset + span.n)).sum())
                    # SparseVLM's later stages may prune an image's last own token in favour of its recycled
                    # tokens (added for the span), which then represent it
                    assert own + sum(token.span == span.offset for token in extra) >= 1


def test_dart_counts_the_text_it_really_has():
    """Fewer text tokens after the image than pivot_text_tokens: the official code raises (topk beyond the text);
    vtr uses every text token as a pivot, and the reported count is what is kept."""
    model, proc = tm.build("llava")
    prompt = "USER : what is this ? <image> ok"  # one text token after the image
    inputs = proc(text=[prompt], images=[tm.random_image(64, 64)], return_tensors="pt")
    with vtr.patch(model, "dart", ratio=0.5) as handle, torch.no_grad():
        model(**inputs)
    per_pivot = int(64 * 0.5 / 8)
    assert handle.last.n_kept == [4 + (4 + 1) * per_pivot]


# ---------------------------------------------------------------------------------------------- continuations
def follow_up(proc, batch):
    return proc.tokenizer(["what is red ?", "is it a big dog ?"][:batch], return_tensors="pt", padding=True,
                          padding_side="left")["input_ids"]


def continuation_cases():
    for method in METHODS:
        for family in ("llava", "llava_next", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "internvl", "gemma3",
                       "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe"):
            if not tm.in_matrix(method, family):
                continue
            policies = [None, "other"] if family == "llava" else [None]
            new = family not in tm.FAMILIES[:6] and not tm.full_matrices()  # the families added since: SDPA only
            for policy in policies:
                for attn in ("sdpa",) if new else ("eager", "sdpa"):
                    yield pytest.param(method, family, policy, attn,
                                       id=f"{method}-{family}-{policy or 'default'}-{attn}")


@pytest.mark.parametrize("method,family,policy,attn", list(continuation_cases()))
def test_text_continuation_of_a_pruned_cache(method, family, policy, attn):
    """A later turn on a pruned cache: the prompt, two decoding steps, then several new tokens in one call. Logits
    equal the unpatched model fed the kept prompt, the steps and the new tokens at the policy's positions (layers
    < K holding the full prompt for layer-stage methods). Qwen and GLM-4.1V rows (M-RoPE) are run one at a time and
    without a mask: transformers 5.23 itself fails their steps given a mask and no positions (it numbers the whole
    mask)."""
    batch = 1 if family.startswith(("qwen", "glm4v")) else 2
    model, proc = tm.build(family, attn=attn)
    inputs = tm.visual_inputs(method, family, proc, batch)
    options = tm.options(method, family)
    if policy:
        options["positions"] = "compact" if REGISTRY[method].default_positions == "original" else "original"
    then = follow_up(proc, batch)
    with vtr.patch(model, method, ratio=0.75, **options) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        mask = inputs["attention_mask"] if batch > 1 else None
        cache, tokens, steps = out.past_key_values, [], []
        logits = out.logits[:, -1]
        for chunk in [None, None, then]:  # two greedy steps, then the follow-up
            chunk = logits.argmax(-1, keepdim=True) if chunk is None else chunk
            if chunk is not then:
                tokens.append(chunk)
            extra = {}
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, chunk.shape[1])], 1)
                extra["attention_mask"] = mask
            out = model(input_ids=chunk, past_key_values=cache, **extra)
            steps.append(out.logits)
            logits = out.logits[:, -1]
        record = handle.last
    lm_inputs = R.capture_lm_inputs(model, inputs)
    _, ref_steps, ref_then = R.reference_for(model, handle.method, lm_inputs, record.index, 2, record=record,
                                             tokens=torch.cat(tokens, 1), then=then)
    assert (steps[0][:, -1] - ref_steps[:, 1]).abs().max() <= TOL  # the reference keeps logits before each step
    assert (steps[2] - ref_then).abs().max() <= TOL


@pytest.mark.parametrize("method,family", tm.method_family(METHODS, ["llava", "qwen2_vl"] + list(tm.FAMILIES[6:])))
def test_second_turn_with_generate(method, family):
    """transformers' multi-turn pattern: generate again on the first turn's cache with the whole conversation's
    input_ids (and no pixel values). generate() slices the inputs by the cache's layer-0 length, which pre-LLM
    pruning shortened; vtr passes on only the new tokens. The second turn equals the reference."""
    model, proc = tm.build(family)
    inputs = tm.visual_inputs(method, family, proc, 1)
    with vtr.patch(model, method, ratio=0.75, **tm.options(method, family)) as handle, torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        record = handle.last
        then = follow_up(proc, 1)
        conversation = torch.cat([first.sequences, then], 1)
        second = {k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_values_videos", "input_ids", "attention_mask")}
        if "mm_token_type_ids" in second:
            second["mm_token_type_ids"] = torch.cat(
                [second["mm_token_type_ids"], torch.zeros_like(conversation[:, inputs["input_ids"].shape[1]:])], 1)
        out = model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                             past_key_values=first.past_key_values, max_new_tokens=2, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, **second)
        assert handle.last is record  # no new prefill: the turn continued the pruned cache
    generated = first.sequences[:, inputs["input_ids"].shape[1]:]
    lm_inputs = R.capture_lm_inputs(model, inputs, generate=True)
    # The cache holds the prompt and the first two generated tokens; the third is fed with the follow-up.
    _, _, ref_then = R.reference_for(model, handle.method, lm_inputs, record.index, 2, record=record,
                                     tokens=generated[:, :2],
                                     then=torch.cat([generated[:, 2:], then], 1))
    assert (out.logits[0] - ref_then[:, -1]).abs().max() <= TOL


def test_resending_the_images_on_a_reused_cache_names_the_problem():
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 1)
    with vtr.patch(model, "divprune", ratio=0.75), torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        conversation = torch.cat([first.sequences, follow_up(proc, 1)], 1)
        with pytest.raises(ValueError, match="re-sends visual inputs that are already in the KV cache.*drop "
                                             "pixel_values"):
            model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                           pixel_values=inputs["pixel_values"], past_key_values=first.past_key_values,
                           max_new_tokens=2)


@pytest.mark.parametrize("method", METHODS)
def test_text_prefilled_in_chunks_after_the_image(method):
    """generate(prefill_chunk_size=...) with the whole image in the first chunk: later chunks are text
    continuations of the pruned cache; the output equals the unchunked run. Methods that select with the
    prompt's text (FastV, DART) refuse: the first chunk does not hold it. Where transformers itself does not pass
    the images with the first chunk (5.17: the unpatched model answers differently), vtr raises instead."""
    family = tm.family_for(method, "llava")
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 1)
    image_end = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero().max()) + 1
    kwargs = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        supported = torch.equal(model.generate(**inputs, **kwargs).sequences,
                                model.generate(**inputs, **kwargs, prefill_chunk_size=image_end + 2).sequences)
    with vtr.patch(model, method, ratio=0.75), torch.no_grad():
        if REGISTRY[method].needs_whole_prompt or not supported:
            match = "generate without prefill_chunk_size" if REGISTRY[method].needs_whole_prompt else "one prefill"
            with pytest.raises(ValueError, match=match):
                model.generate(**inputs, **kwargs, prefill_chunk_size=image_end + 2)
            return
        whole = model.generate(**inputs, **kwargs)
        chunked = model.generate(**inputs, **kwargs, prefill_chunk_size=image_end + 2)
    assert torch.equal(whole.sequences, chunked.sequences)
    assert (torch.stack(whole.logits) - torch.stack(chunked.logits)).abs().max() <= TOL


# ------------------------------------------------------------------------------------------ prompt endings
@pytest.mark.parametrize("mode", ["forward", "generate"])
@pytest.mark.parametrize("method,family", tm.method_family(METHODS, ["llava", "qwen2_vl"]))
def test_prompt_ending_with_image_tokens(method, family, mode):
    """The prompt's last token may be pruned (the official code does the same); decoding still continues after
    the unpruned length."""
    model, proc = tm.build(family)
    if "image" not in REGISTRY[method].visual_kinds:  # videos only (EVS, VidCom2): a prompt ending with a video
        prompt = "<|im_start|> user what is this ? <|vision_start|><|video_pad|><|vision_end|>"
        inputs = tm._qwen_video_by_hand(family, proc, [prompt], [tm.random_video(6, 64, 48)])
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):  # without the closing <|vision_end|>
            inputs[key] = inputs[key][:, :-1]
        assert inputs["input_ids"][0, -1] == model.config.video_token_id
        return check_against_reference(model, inputs, method, mode)
    vis = "<image>" if family == "llava" else "<|vision_start|><|image_pad|>"
    prompt = f"{'USER :' if family == 'llava' else '<|im_start|> user'} what is this ? {vis}"
    inputs = proc(text=[prompt], images=[tm.random_image(64, 64)], return_tensors="pt")
    assert inputs["input_ids"][0, -1] == model.config.image_token_id
    check_against_reference(model, inputs, method, mode)


# ------------------------------------------------------------------------------------------ half precision
def test_fastv_scores_in_the_model_dtype_like_eager_attention():
    """score_dtype="model" on a bf16 model: FastV keeps the top-k of eager attention probabilities as the official
    code reads them (bf16, mean over heads in bf16)."""
    model, proc = tm.build("llava", attn="eager")
    model = model.to(torch.bfloat16)
    inputs = tm.image_inputs("llava", proc, 1)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with vtr.patch(model, "fastv", ratio=0.75, score_dtype="model") as handle, torch.no_grad():
        model(**inputs)
    with torch.no_grad():
        attention = model(**inputs, output_attentions=True).attentions[1]  # layer K-1
    scores = attention.mean(1)[0, -1]  # bf16, as the official code
    span = handle.last.layout.rows[0].spans[0]
    official = torch.topk(scores[span.positions], 16).indices.sort().values
    assert handle.last.kept[0].tolist() == official.tolist()


def test_score_dtype_is_validated():
    with pytest.raises(ValueError, match=r"score_dtype must be one of \('float32', 'model'\)"):
        vtr.FastV(ratio=0.5, score_dtype="bf16")
    model, _ = tm.build("llava")
    for method in ("random", "uniform"):  # they compute no scores: "model" cannot apply
        with pytest.raises(ValueError, match=f"{method}: score_dtype='model' does not apply"):
            vtr.patch(model, method, ratio=0.5, score_dtype="model")


SCORING_OPS = {"matmul", "__matmul__", "mm", "bmm", "einsum", "softmax", "cosine_similarity", "normalize", "norm",
               "linalg_vector_norm", "vector_norm", "cdist"}  # torch function names
VIDEO_METHODS = {"fastvid", "dycoke", "holitom", "prunevid", "framefusion", "evs", "vidcom2"}


class ScoringDtypes(torch.overrides.TorchFunctionMode):
    """The floating dtypes of the inputs of every similarity / attention op (products, softmax, norms, cosine)
    run while it is active."""

    paused = 0  # inside the rotary embedding: transformers computes its frequencies in fp32 whatever the dtype

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not ScoringDtypes.paused and getattr(func, "__name__", "") in SCORING_OPS:
            self.dtypes |= {a.dtype for a in (*args, *kwargs.values())
                            if isinstance(a, torch.Tensor) and a.is_floating_point()}
        return func(*args, **kwargs)


@pytest.mark.parametrize("method", [m for m in METHODS if REGISTRY[m].computes_scores])
def test_score_dtype_model_computes_every_score_in_the_model_dtype(method, monkeypatch):
    """On a bf16 model, every product, softmax, norm and cosine that a method's selection runs (its stages, the
    signals they read, DyCoke's per-step KV choice, FlowCut's steps inside the tower) takes bf16 inputs with
    score_dtype="model" (CDPruner: its relevance; its similarities and DPP are fp32 as in the official code), and
    none does by default (fp32; DPC-KNN in fp64 either way)."""
    from vtr.engine.kv_cache import KVCacheStage
    from vtr.engine.prune import Pruning
    spy = {}

    def spied(original):
        def run(*args, **kwargs):
            with ScoringDtypes() as mode:
                try:
                    return original(*args, **kwargs)
                finally:
                    spy.setdefault("dtypes", set()).update(mode.dtypes)
        return run
    cls = REGISTRY[method]
    for owner, name in [(Pruning, "_prune"), (KVCacheStage, "_decode_subset"), (cls, "vision_step")]:
        monkeypatch.setattr(owner, name, spied(getattr(owner, name)))
    rotary = compat.rotary_embeddings

    def unscored(*args, **kwargs):  # positions, not scores (transformers 5.17's frequencies are an fp32 matmul)
        ScoringDtypes.paused += 1
        try:
            return rotary(*args, **kwargs)
        finally:
            ScoringDtypes.paused -= 1
    monkeypatch.setattr(compat, "rotary_embeddings", unscored)
    family = "qwen2_vl" if method in VIDEO_METHODS else tm.family_for(method, "llava")
    model, proc = tm.build(family)
    model = model.to(torch.bfloat16)
    if method in VIDEO_METHODS:
        inputs = tm.video_inputs(family, proc, 1)
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.bfloat16)
    else:
        inputs = tm.image_inputs(family, proc, 1)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    seen = {}
    for score_dtype in ("float32", "model"):
        spy.clear()
        with vtr.patch(model, method, ratio=0.75, score_dtype=score_dtype), torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        seen[score_dtype] = spy.get("dtypes", set())
    assert torch.bfloat16 in seen["model"]
    if method != "cdpruner":  # its token similarities and DPP are fp32 in the official code as well
        assert torch.float32 not in seen["model"]
    assert torch.bfloat16 not in seen["float32"] and torch.float32 in seen["float32"]
