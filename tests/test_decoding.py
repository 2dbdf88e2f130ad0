"""Decoding paths beyond greedy generate: a hand-written forward loop, sampling, beam search, several sequences per
prompt, labels, concurrent and interleaved requests."""
import threading

import pytest
import torch
import transformers

import reference as R
import tiny_models as tm
import vtr

METHODS = tm.matrix_methods()
STEPS = 5


def manual_loop(model, inputs, steps, with_mask):
    """What users write without generate: no position ids; the attention mask only if ``with_mask``."""
    logits = []
    with torch.no_grad():
        out = model(**inputs)
        mask = inputs["attention_mask"]
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            extra = {}
            if with_mask:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                extra["attention_mask"] = mask
            out = model(input_ids=token, past_key_values=out.past_key_values, **extra)
    return torch.stack(logits, 1)


@pytest.mark.parametrize("method,family,batch", [
    pytest.param(m, f, b, id=f"{m}-{f}-{b}") for m in METHODS
    for f, b in [("llava", 1), ("llava", 2), ("qwen2_vl", 1), ("qwen2_5_vl", 1)] if tm.supports(m, f)])
def test_manual_forward_loop(method, family, batch):
    """Decode positions stay right without generate (Qwen: rope_deltas; pre-LLM pruning: the short layer-0 cache).
    Qwen is run without a mask: transformers 5.23 itself fails a Qwen decode step given a mask and no positions."""
    model, proc = tm.build(family)
    inputs = tm.visual_inputs(method, family, proc, batch)
    with vtr.patch(model, method, ratio=0.75) as handle:
        got = manual_loop(model, inputs, STEPS, with_mask=batch > 1)
        record = handle.last
    lm_inputs = R.capture_lm_inputs(model, inputs)
    _, expected, _ = R.reference_for(model, handle.method, lm_inputs, record.index, STEPS, record=record)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_sampling_matches_the_reference(method):
    family = tm.family_for(method, "llava")
    model, proc = tm.build(family)
    inputs = tm.visual_inputs(method, family, proc, 2)
    with vtr.patch(model, method, ratio=0.75) as handle:
        torch.manual_seed(7)
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=True, top_k=20, return_dict_in_generate=True,
                             output_logits=True)
        record = handle.last
    tokens = out.sequences[:, -STEPS:]
    lm_inputs = R.capture_lm_inputs(model, inputs, generate=True)
    _, expected, _ = R.reference_for(model, handle.method, lm_inputs, record.index, STEPS, tokens=tokens,
                                     record=record)
    assert (torch.stack(out.logits, 1) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["divprune", "random"])
def test_beam_search_matches_the_unpatched_model_on_kept_tokens(method, family):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2)
    with vtr.patch(model, method, ratio=0.75) as handle:
        got = model.generate(**inputs, max_new_tokens=STEPS, num_beams=3, do_sample=False)[:, -STEPS:]
        index = handle.last.index[::3]  # generate repeats each row once per beam
    lm = R.capture_lm_inputs(model, inputs, generate=True)
    expected = model.generate(inputs_embeds=R.gather_seq(lm["embeds"], index, 0.0),
                              attention_mask=R.gather_seq(lm["mask"], index, 0),
                              position_ids=R.pruned_positions(lm["positions"], lm["mask"], index,
                                                              handle.method.positions),
                              max_new_tokens=STEPS, num_beams=3, do_sample=False)
    assert torch.equal(got, expected)


class ForceTokens(transformers.LogitsProcessor):
    """Greedy decoding forced to the given tokens ``[B, steps]`` (generate's raw logits stay the model's)."""

    def __init__(self, tokens):
        self.tokens, self.step = tokens, 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(scores)), self.tokens[:, self.step]] = 0
        self.step += 1
        return forced


def forced_logits(model, inputs, tokens):
    """``[B, steps, V]`` the logits the patched model gives each row of ``inputs`` fed ``tokens`` ``[B, steps]``."""
    out = model.generate(**inputs, max_new_tokens=tokens.shape[1], do_sample=False, return_dict_in_generate=True,
                         output_logits=True, logits_processor=[ForceTokens(tokens)])
    assert torch.equal(out.sequences[:, -tokens.shape[1]:], tokens)
    return torch.stack(out.logits, 1)


def same_selection(record, alone, rows: slice) -> bool:
    """Whether a prefill kept the same tokens in the same slots as rows ``rows`` of an equally padded one."""
    kept = alone.kept[rows]
    if len(record.kept) != len(kept) or not all(torch.equal(a, b) for a, b in zip(record.kept, kept)):
        return False
    return (record.index is None and alone.index is None) or torch.equal(record.index, alone.index[rows])


def unpatched_beams_equal_the_prompts(model, proc, family, inputs, several) -> bool:
    """Whether transformers' own beam search scores each returned sequence as its prompt run alone does."""
    with torch.no_grad():
        beams = model.generate(**inputs, num_beams=2, do_sample=False, length_penalty=0.0, output_scores=True,
                               **several)
        tokens = beams.sequences[:, -several["max_new_tokens"]:]
        logits = forced_logits(model, tm.image_inputs(family, proc, 2, rows=[0, 0, 1, 1]), tokens)
    logprobs = logits.log_softmax(-1).gather(-1, tokens[:, :, None]).sum((1, 2))
    return torch.allclose(beams.sequences_scores, logprobs, atol=1e-4)


@pytest.mark.parametrize("method,family", tm.method_family(METHODS, tm.FAMILIES))
def test_beams_and_several_sequences_per_prompt(method, family):
    """Beam search returning several sequences, and sampling several sequences per prompt: generate encodes each
    prompt's images once and then repeats its rows. Every row selects what its prompt selects in a batch that
    holds each prompt once per sequence (each encoded on its own), and each returned sequence's score (beams) and
    logits (samples) equal that batch's, forced to the same tokens."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2)
    copies = tm.image_inputs(family, proc, 2, rows=[0, 0, 1, 1] * 2)  # what the repeated rows of both runs stand for
    steps, several = 2, dict(num_return_sequences=2, return_dict_in_generate=True, max_new_tokens=2)
    if family == "internvl" and not unpatched_beams_equal_the_prompts(model, proc, family, inputs, several):
        pytest.skip("this transformers' own beam search on InternVL (unpatched) scores other sequences than its "
                    "prompts run alone (measured: 5.17 does, by 0.039; 5.23 does not)")
    with vtr.patch(model, method, ratio=0.5, **tm.options(method, family)) as handle, torch.no_grad():
        beams = model.generate(**inputs, num_beams=2, do_sample=False, length_penalty=0.0, output_scores=True,
                               **several)
        beam_record = handle.last
        torch.manual_seed(7)
        sampled = model.generate(**inputs, do_sample=True, top_k=20, output_logits=True, **several)
        sample_record = handle.last
        tokens = torch.cat([beams.sequences[:, -steps:], sampled.sequences[:, -steps:]])
        logits = forced_logits(model, copies, tokens)
        assert same_selection(beam_record, handle.last, slice(0, 4))
        assert same_selection(sample_record, handle.last, slice(4, 8))
    logprobs = logits[:4].log_softmax(-1).gather(-1, tokens[:4, :, None]).sum((1, 2))
    assert torch.allclose(beams.sequences_scores, logprobs, atol=1e-4)
    assert (torch.stack(sampled.logits, 1) - logits[4:]).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_beam_search_batched_equals_row_by_row(method):
    model, proc = tm.build("qwen2_vl")
    inputs = tm.image_inputs("qwen2_vl", proc, 2)
    with vtr.patch(model, method, ratio=0.75):
        batched = model.generate(**inputs, max_new_tokens=STEPS, num_beams=3, do_sample=False)[:, -STEPS:]
        for b, image in enumerate([tm.random_image(*tm.IMAGE_SIZES[b], seed=b) for b in range(2)]):
            text = [tm._prompt("qwen2_vl", 1, long=bool(b))]
            alone = proc(text=text, images=[image], return_tensors="pt")
            row = model.generate(**alone, max_new_tokens=STEPS, num_beams=3, do_sample=False)[:, -STEPS:]
            assert torch.equal(row[0], batched[b])


@pytest.mark.parametrize("method,family", tm.method_family(METHODS, tm.FAMILIES))
def test_loss_over_text_tokens(method, family):
    """Labels are pruned with the sequence: the loss equals the reference logits' loss on the kept labels."""
    model, proc = tm.build(family)
    inputs = tm.visual_inputs(method, family, proc, 2)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == model.config.image_token_id, -100)
    labels = labels.masked_fill(labels == getattr(model.config, "video_token_id", -1), -100)
    # The first real token of a left-padded row would be "predicted" from a padding slot: never a target.
    first = inputs["attention_mask"].argmax(1)
    labels[torch.arange(len(first)), first] = -100
    with vtr.patch(model, method, ratio=0.75, **tm.options(method, family)) as handle:
        with torch.no_grad():
            loss = model(**inputs, labels=labels).loss
        index = handle.last.index
    if index is None and handle.method.decode_stage() is not None:  # DyCoke: an image is one frame, kept whole
        with torch.no_grad():
            assert torch.equal(loss, model(**inputs, labels=labels).loss)
        return
    lm_inputs = R.capture_lm_inputs(model, inputs)
    ref_logits, _, _ = R.reference_for(model, handle.method, lm_inputs, index, 0, record=handle.last)
    kept_labels = R.gather_seq(labels, index, -100)
    expected = model.loss_function(logits=ref_logits, labels=kept_labels, vocab_size=ref_logits.shape[-1])
    assert torch.allclose(loss, expected, atol=1e-6)
    with torch.no_grad():
        unpatched = model(**inputs, labels=labels).loss
    assert not torch.allclose(loss, unpatched)


@pytest.mark.parametrize("method", ["dart", "divprune"])
def test_concurrent_generate_equals_sequential(method):
    model, proc = tm.build("qwen2_vl")
    first = tm.image_inputs("qwen2_vl", proc, 2)
    second = tm.image_inputs("qwen2_vl", proc, 1, "single")
    second["pixel_values"] = second["pixel_values"].flip(0)  # a different image
    with vtr.patch(model, method, ratio=0.75) as handle:
        kwargs = dict(max_new_tokens=STEPS, do_sample=False)
        expected = [model.generate(**first, **kwargs), model.generate(**second, **kwargs)]
        results, errors = [None, None], []
        barrier = threading.Barrier(2)

        def work(i, inputs):
            try:
                barrier.wait()
                for _ in range(3):
                    results[i] = model.generate(**inputs, **kwargs)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i, x)) for i, x in enumerate((first, second))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors
        assert handle.last is not None
    assert torch.equal(results[0], expected[0]) and torch.equal(results[1], expected[1])


@pytest.mark.parametrize("method", ["fastv", "divprune"])
def test_interleaved_requests_keep_their_own_state(method):
    model, proc = tm.build("llava")
    a, b = tm.image_inputs("llava", proc, 1), tm.image_inputs("llava", proc, 2)
    with vtr.patch(model, method, ratio=0.75):
        alone = manual_loop(model, a, 3, with_mask=True)
        with torch.no_grad():
            out_a = model(**a)
            out_b = model(**b)  # a second request prefills between a's steps
            mask = torch.cat([a["attention_mask"], a["attention_mask"].new_ones(1, 1)], 1)
            step = model(input_ids=out_a.logits[:, -1:].argmax(-1), past_key_values=out_a.past_key_values,
                         attention_mask=mask)
        assert torch.allclose(step.logits[:, -1], alone[:, 1], atol=1e-6)
        assert out_b.logits.shape[0] == 2


@pytest.mark.parametrize("method", ["divprune", "dart"])
def test_generate_without_cache_reprunes_every_step(method):
    """use_cache=False: every step is a fresh prefill of the growing sequence, pruned again; for a selection that
    does not depend on the newest token (DivPrune) the tokens equal the cached run's."""
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 2)
    with vtr.patch(model, method, ratio=0.75) as handle:
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        assert handle.last.n_kept == [16, 16] if method == "divprune" else [20, 20]
    if method == "divprune":
        assert torch.equal(cached, uncached)
    assert uncached.shape == cached.shape


def test_hidden_states_and_attentions_follow_the_pruned_sequence():
    model, proc = tm.build("llava", attn="eager")
    inputs = tm.image_inputs("llava", proc, 1)
    with vtr.patch(model, "fastv", ratio=0.75) as handle, torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    full, pruned = inputs["input_ids"].shape[1], handle.last.index.shape[1]
    assert [h.shape[1] for h in out.hidden_states] == [full, full, full, pruned, pruned]
    assert [a.shape[-1] for a in out.attentions] == [full, full, pruned, pruned]
