"""Drop-in use through transformers' own front ends on a patched model: ``pipeline("image-text-to-text")`` with a
prompt or with chat messages, and ``TextIteratorStreamer``. Each must emit the tokens of vtr's reference (the
unpatched model fed exactly the kept tokens), not merely run."""
import threading

import pytest
import torch
import transformers

import reference as R
import tiny_models as tm
import vtr

STEPS = 5
QUESTION = "what is in this image ?"


def _messages(image=None):
    part = {"type": "image", "image": image} if image is not None else {"type": "image"}
    return [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]


def _reference_tokens(model, handle, inputs, record) -> torch.Tensor:
    lm_inputs = R.capture_lm_inputs(model, inputs, generate=True)
    _, steps, _ = R.reference_for(model, handle.method, lm_inputs, record.index, STEPS, record=record)
    return steps.argmax(-1)


def _pipe_text(pipe, **kwargs) -> str:
    # A fresh generate_kwargs dict per call: the pipeline mutates the one it is given.
    out = pipe(**kwargs, max_new_tokens=STEPS, generate_kwargs={"do_sample": False}, return_full_text=False)
    # The pipeline decodes prompt and answer together and cuts the prompt's text: the separating space remains.
    return out[0]["generated_text"].lstrip()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["dart", "divprune"])
def test_pipeline_chat_messages_and_streamer_emit_the_reference(method, family):
    model, proc = tm.build(family)
    image = tm.random_image(64, 64)
    prompt = proc.apply_chat_template(_messages(), add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[image], return_tensors="pt")
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=proc)
    with vtr.patch(model, method, ratio=0.5) as handle:
        generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)[:, -STEPS:]
        record = handle.last
        handle._engine.last = None
        texts = {"pipeline": _pipe_text(pipe, images=image, text=prompt)}
        assert handle.last.n_kept == record.n_kept  # the pipeline's generate was pruned, not merely equal
        texts["chat messages"] = _pipe_text(pipe, text=_messages(image))

        streamer = transformers.TextIteratorStreamer(proc.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=model.generate, kwargs=dict(inputs, max_new_tokens=STEPS, do_sample=False,
                                                                      streamer=streamer))
        worker.start()
        texts["streamer"] = "".join(streamer)
        worker.join()

        # the pipeline hands a streamer in generate_kwargs to generate
        streamer = transformers.TextIteratorStreamer(proc.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=lambda: pipe(text=_messages(image), max_new_tokens=STEPS,
                                                      generate_kwargs={"do_sample": False, "streamer": streamer},
                                                      return_full_text=False))
        worker.start()
        texts["pipeline streamer"] = "".join(streamer)
        worker.join()
    assert record.n_kept[0] < record.n_visual[0] == 64
    expected = _reference_tokens(model, handle, inputs, record)  # unpatched now: the reference's own model
    assert torch.equal(generated, expected)
    text = proc.tokenizer.decode(expected[0], skip_special_tokens=True)
    assert texts == dict.fromkeys(texts, text)
    assert not handle.active


def test_pipeline_after_remove_is_the_dense_model():
    model, proc = tm.build("qwen2_vl")
    image = tm.random_image(64, 64)
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=proc)
    dense = _pipe_text(pipe, text=_messages(image))
    with vtr.patch(model, "divprune", ratio=0.9):
        pruned = _pipe_text(pipe, text=_messages(image))
    assert _pipe_text(pipe, text=_messages(image)) == dense
    assert pruned != dense  # (a deterministic fact of these weights: the pruned run does change the answer)
