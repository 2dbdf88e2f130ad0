"""Robust under interruption, compilation and misuse: Ctrl-C inside a patched forward, torch.compile, removing the
patch while a request is in flight, generate without a cache, a method's broken selection, bad options, copies
and saving."""
import copy
import dataclasses
import io
import logging
import pickle
import threading
import typing

import pytest
import torch
import transformers

import tiny_models as tm
import vtr
from test_invariants import hook_count
from vtr.methods import REGISTRY

METHODS = tm.matrix_methods()
FAMILIES = ("llava", "qwen2_vl")
# Interrupts and torch.compile (the slowest cases of the suite: about 13 and 20 s each) run every method on one of
# FAMILIES by default (Qwen2-VL where the method supports it), compiled with aot_eager only (dynamo's tracing of the
# hooks plus AOT autograd's functionalization; the plain "eager" backend traces the same graph); VTR_TEST_FULL=1
# runs both families and both backends. A method that supports neither (VFlowOpt: LLaVA-OneVision only) runs on
# the first family it supports. torch.compile runs the methods of tm.ENGINE_PATH_METHODS by default (CI time).
def one_family(methods):
    return [p for m in methods for p in (
        tm.method_family([m], FAMILIES) if tm.full_matrices() and tm.method_family([m], FAMILIES) else
        tm.method_family([m], [tm.family_for(m, "qwen2_vl")]))]


ONE_FAMILY = one_family(METHODS)
COMPILED = one_family([m for m in METHODS if tm.full_matrices() or m in tm.ENGINE_PATH_METHODS])


def greedy(model, inputs, steps=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False)


def interrupt_at(model, layer: int):
    def hook(module, args, kwargs):
        raise KeyboardInterrupt
    return model.model.language_model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("call", ["generate", "forward"])
@pytest.mark.parametrize("method,family", ONE_FAMILY)
def test_interrupt_leaves_the_patch_working(method, family, call):
    """A KeyboardInterrupt (torch skips always-call hooks for it) inside a prefill, in generate or in a plain
    forward: the next requests are pruned exactly as before, and removal still restores the model."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2)
    greedy(model, inputs, 1)  # transformers installs its lazy hooks first
    hooks = hook_count(model)
    with vtr.patch(model, method, ratio=0.5) as handle:
        before = greedy(model, inputs)
        with torch.no_grad():
            forward_before = model(**inputs).logits
        kept = handle.last.kept
        remove = interrupt_at(model, 3)
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            model.generate(**inputs, max_new_tokens=2) if call == "generate" else model(**inputs)
        remove.remove()
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, forward_before)
        assert all(torch.equal(a, b) for a, b in zip(handle.last.kept, kept))
        assert torch.equal(greedy(model, inputs), before)
    assert hook_count(model) == hooks and "generate" not in vars(model)


def interrupted_worker(model, run, inputs, exception, release: threading.Event, ended: list):
    """A thread whose call ``run(**inputs)`` is ended by ``exception`` at decoder layer 2; the thread then stays
    alive until ``release`` (as a pool's worker does; its thread id is not reused by another thread meanwhile)."""
    def stop(module, args):
        raise exception

    def work():
        hook = model.model.language_model.layers[2].register_forward_pre_hook(stop)
        try:
            with torch.no_grad():
                run(**inputs)
        except BaseException as e:
            ended.append(type(e))
        finally:
            hook.remove()
            release.wait(60)

    before = len(ended)
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while len(ended) == before and thread.is_alive():
        thread.join(0.05)
    return thread


def removes_promptly(handle) -> bool:
    remover = threading.Thread(target=handle.remove, daemon=True)
    remover.start()
    remover.join(30)
    return not remover.is_alive() and not handle.active


@pytest.mark.parametrize("call", ["forward", "base_forward"])
@pytest.mark.parametrize("method,family", ONE_FAMILY)
def test_remove_after_another_threads_forward_ended_by_system_exit(method, family, call):
    """A plain forward (the model's, or the base model's) in another thread ended by SystemExit: torch runs no
    always-call hook for it, yet remove() returns at once and restores the model."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 1)
    with torch.no_grad():
        expected = model(**inputs).logits
    hooks = hook_count(model)
    handle = vtr.patch(model, method, ratio=0.5)
    release, ended = threading.Event(), []
    worker = interrupted_worker(model, model if call == "forward" else model.model, inputs, SystemExit, release,
                                ended)
    try:
        assert ended == [SystemExit]
        assert removes_promptly(handle) and hook_count(model) == hooks
    finally:
        release.set()
        worker.join(10)
    assert {"forward", "generate"}.isdisjoint(vars(model)) and "forward" not in vars(model.model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_remove_after_keyboard_interrupts_in_other_threads():
    """KeyboardInterrupt in other threads' forward and generate: remove() does not wait for either."""
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 1)
    handle = vtr.patch(model, "divprune", ratio=0.5)
    release, ended = threading.Event(), []
    runs = [(model, KeyboardInterrupt), (model.generate, KeyboardInterrupt)]
    workers = []
    try:
        for i, (run, exception) in enumerate(runs):
            workers.append(interrupted_worker(model, run, inputs, exception, release, ended))
            assert len(ended) == i + 1
        assert ended == [KeyboardInterrupt, KeyboardInterrupt]
        assert removes_promptly(handle)
    finally:
        release.set()
        for worker in workers:
            worker.join(10)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"] if tm.full_matrices() else ["aot_eager"])
@pytest.mark.parametrize("method,family", COMPILED)
def test_compiled_model_prunes_like_eager(method, family, backend):
    """torch.compile traces the hooks: same kept tokens and same logits as eager (DART's pivot order is computed
    without iterating a set, which compiled code iterates in insertion order)."""
    torch._logging.set_logs(dynamo=logging.ERROR)
    torch._dynamo.reset()
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2)
    with vtr.patch(model, method, ratio=0.5) as handle, torch.no_grad():
        eager = model(**inputs).logits
        kept = handle.last.kept
        compiled = torch.compile(model, backend=backend)(**inputs).logits
        assert all(torch.equal(a, b) for a, b in zip(handle.last.kept, kept))
    assert (compiled - eager).abs().max() <= 1e-5


class RemoveOnSecondToken(transformers.generation.BaseStreamer):
    def __init__(self, handle):
        self.handle, self.seen, self.error = handle, 0, None

    def put(self, value):
        self.seen += 1
        if self.seen == 3:  # the prompt, then the first generated token, then this one
            try:
                self.handle.remove()
            except RuntimeError as e:
                self.error = e

    def end(self):
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_from_a_streamer_callback_is_refused_and_the_request_finishes(family):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 1)
    handle = vtr.patch(model, "fastv", ratio=0.75)
    expected = greedy(model, inputs, 5)
    streamer = RemoveOnSecondToken(handle)
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=5, do_sample=False, streamer=streamer)
    assert isinstance(streamer.error, RuntimeError) and "streamer callback" in str(streamer.error)
    assert torch.equal(got, expected) and handle.active
    handle.remove()
    assert not handle.active


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_from_another_thread_waits_for_the_request(family):
    """remove() called while another thread's generate is running returns only after it, which finishes pruned."""
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 2)
    greedy(model, inputs, 1)
    hooks = hook_count(model)
    unpatched = greedy(model, inputs, 6)
    handle = vtr.patch(model, "dart", ratio=0.75)
    expected = greedy(model, inputs, 6)
    started, release = threading.Event(), threading.Event()
    result = {}

    def slow_step(module, args, kwargs):
        started.set()
        release.wait(10)

    slow = model.model.language_model.layers[0].register_forward_pre_hook(slow_step, with_kwargs=True)

    def work():
        result["tokens"] = greedy(model, inputs, 6)

    worker = threading.Thread(target=work)
    worker.start()
    assert started.wait(10)
    remover = threading.Thread(target=handle.remove)
    remover.start()
    remover.join(0.5)
    assert remover.is_alive()  # waiting for the request in flight
    slow.remove()
    release.set()
    worker.join(20)
    remover.join(20)
    assert not remover.is_alive() and torch.equal(result["tokens"], expected)
    assert hook_count(model) == hooks and not handle.active
    assert torch.equal(greedy(model, inputs, 6), unpatched)


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_generate_without_cache_reselects_at_every_step(method):
    """Documented behaviour of use_cache=False (FastV's official no-cache mode): every step is a fresh prefill of
    the growing sequence and selects again, scored by its own last token."""
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 2)
    with vtr.patch(model, method, ratio=0.75) as handle, torch.no_grad():
        uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        last = handle.last
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        kept_per_step = []
        for _ in range(3):  # the same, by hand: a patched full forward per step
            logits = model(**dict(inputs, input_ids=ids, attention_mask=mask), use_cache=False).logits[:, -1]
            kept_per_step.append(handle.last.kept)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
    assert torch.equal(uncached, ids)
    assert all(torch.equal(a, b) for a, b in zip(last.kept, kept_per_step[-1]))
    assert last.index.shape[1] < ids.shape[1] - 1  # the last step's prefill was pruned too


# --------------------------------------------------------------------------------------------- contracts
class Broken(vtr.Method):
    name = "broken"
    kind = "size"

    def select(self, ctx, row, span, budget):
        return {"size": torch.arange(budget + 1), "empty": torch.zeros(0, dtype=torch.long),
                "float": torch.arange(budget).float(), "bool": torch.ones(budget, dtype=torch.bool),
                "list": list(range(budget)), "duplicate": torch.zeros(budget, dtype=torch.long),
                "range": torch.arange(len(span) - budget + 1, len(span) + 1)}[self.kind]


@pytest.mark.parametrize("kind,match", [
    ("size", r"broken: select\(\) returned 17 indices for a budget of 16"),
    ("empty", r"broken: select\(\) returned 0 indices for a budget of 16"),
    ("float", r"broken: select\(\) must return an integer tensor of token indices, got torch.float32"),
    ("bool", r"broken: select\(\) must return an integer tensor of token indices, got torch.bool"),
    ("list", r"broken: select\(\) must return an integer tensor of token indices, got list"),
    ("duplicate", r"broken selected invalid token indices"),
    ("range", r"broken selected invalid token indices"),
])
def test_the_engine_rejects_a_broken_selection(kind, match):
    model, proc = tm.build("llava")
    method = type("Broken", (Broken,), {"kind": kind})(ratio=0.75)
    with vtr.patch(model, method), torch.no_grad():
        with pytest.raises(RuntimeError, match=match):
            model(**tm.image_inputs("llava", proc, 1))


class NoneKept(vtr.Method):
    name = "none_kept"

    def budget_for(self, ctx, row, group):
        return 0

    def select(self, ctx, row, span, budget):  # pragma: no cover - never reached
        return torch.zeros(0, dtype=torch.long)


def test_the_engine_refuses_a_budget_of_no_token():
    """The min-1 rule as a contract: a budget_for() of 0 for an image with candidates is refused, naming the
    method (the selection check itself accepts an empty selection without failing)."""
    model, proc = tm.build("llava")
    with vtr.patch(model, NoneKept(ratio=0.75)), torch.no_grad():
        with pytest.raises(RuntimeError, match=r"none_kept: budget_for\(\) kept no token of an image \(or tile\) of "
                                               r"64 candidates; every image keeps at least one \(the min-1 rule\)"):
            model(**tm.image_inputs("llava", proc, 1))


class BrokenMerge(vtr.Method):
    name = "broken_merge"
    kind = "outside"

    def select(self, ctx, row, span, budget):
        keep = torch.arange(budget)
        embeds = torch.zeros(1, ctx.hidden.shape[-1])
        slots = {"outside": torch.tensor([budget]), "shape": torch.tensor([0]), "sources": torch.tensor([0])}
        if self.kind == "shape":
            embeds = embeds[:, :3]
        sources = [] if self.kind == "sources" else [torch.tensor([0, budget])]
        deepstack = {"deepstack": torch.zeros(1, 2 * embeds.shape[-1]),
                     "deepstack-shape": torch.zeros(1, 5)}.get(self.kind)
        return vtr.Merge(keep=keep, slots=slots.get(self.kind, torch.tensor([0])), embeds=embeds, sources=sources,
                         deepstack=deepstack)


class BrokenLayerMerge(BrokenMerge):
    stage = vtr.Stage.LAYER
    layer: int = 2


@pytest.mark.parametrize("kind,match", [
    ("outside", r"broken_merge: merged slots \[16\] must be kept tokens"),
    ("shape", r"broken_merge: a merge of 1 tokens needs \[1, 64\] embeddings and as many source lists, got \(1, 3\)"),
    ("sources", r"broken_merge: a merge of 1 tokens needs .* and 0"),
    # merges replace hidden states at layer stages too (HoliTom, FrameFusion): checked the same way there
    ("layer-outside", r"broken_merge: merged slots \[16\] must be kept tokens"),
    ("layer-shape", r"broken_merge: a merge of 1 tokens needs \[1, 64\] embeddings and as many source lists, "
                    r"got \(1, 3\)"),
])
def test_the_engine_rejects_a_broken_merge(kind, match):
    model, proc = tm.build("llava")
    base = BrokenLayerMerge if kind.startswith("layer-") else BrokenMerge
    method = type("Broken", (base,), {"kind": kind.removeprefix("layer-")})(ratio=0.75)
    with vtr.patch(model, method), torch.no_grad():
        with pytest.raises(RuntimeError, match=match):
            model(**tm.image_inputs("llava", proc, 1))


@pytest.mark.parametrize("family,kind,match", [
    ("llava", "deepstack", r"broken_merge: merged DeepStack features apply before the language model of a model "
                           r"with DeepStack inputs \(Qwen3-VL\) only"),
    ("qwen3_vl", "deepstack-shape", r"broken_merge: a merge of 1 tokens needs \[1, 128\] DeepStack features \(2 "
                                    r"levels\), got \(1, 5\)"),
])
def test_the_engine_rejects_broken_merged_deepstack_features(family, kind, match):
    """Merged DeepStack features (VisionZip on Qwen3-VL): one row of every level per merged token, before the
    language model of a model that has them; anything else is refused, naming the method."""
    model, proc = tm.build(family)
    method = type("Broken", (BrokenMerge,), {"kind": kind})(ratio=0.75)
    with vtr.patch(model, method), torch.no_grad():
        with pytest.raises(RuntimeError, match=match):
            model(**tm.image_inputs(family, proc, 1))


class BrokenAdd(vtr.Method):
    name = "broken_add"
    kind = "shape"
    stage = vtr.Stage.LAYER
    layer: int = 2

    def select(self, ctx, row, span, budget):
        D = ctx.hidden.shape[-1]
        added, anchors = torch.zeros(1, D), torch.tensor([0])
        if self.kind == "shape":
            added = added[:, :3]
        if self.kind == "anchor":
            anchors = torch.tensor([len(span)])
        return vtr.Merge(keep=torch.arange(budget), added=added, added_sources=[torch.tensor([0])],
                         added_anchors=anchors)


class BrokenPreLLMAdd(BrokenAdd):
    stage = vtr.Stage.PRE_LLM


@pytest.mark.parametrize("kind,match", [
    ("shape", r"broken_add: 1 added tokens need \[1, 64\] states, 1 source lists and 1 anchor indices in \[0, 64\)"),
    ("anchor", r"broken_add: 1 added tokens need .* anchor indices in \[0, 64\)"),
    ("pre_llm", r"broken_add: added tokens are only supported inside the language model"),
])
def test_the_engine_rejects_broken_added_tokens(kind, match):
    model, proc = tm.build("llava")
    base = BrokenPreLLMAdd if kind == "pre_llm" else BrokenAdd
    method = type("Broken", (base,), {"kind": kind})(ratio=0.75)
    with vtr.patch(model, method), torch.no_grad():
        with pytest.raises(RuntimeError, match=match):
            model(**tm.image_inputs("llava", proc, 1))


@pytest.mark.parametrize("method,options,match", [
    ("dart", dict(ratio=True), r"dart: ratio must be a number, got True"),
    ("dart", dict(ratio=False), r"dart: ratio must be a number, got False"),
    ("fastv", dict(keep=True), r"fastv: keep must be a number, got True"),
    ("fastv", dict(keep=2.5), r"fastv: keep must be an integer >= 1"),
    ("fastv", dict(ratio=0.5, layer="2"), r"fastv: layer must be of type int, got '2'"),
    ("fastv", dict(ratio=0.5, layer=2.0), r"fastv: layer must be of type int, got 2.0"),
    ("dart", dict(ratio=0.5, layer=True), r"dart: layer must be of type int, got True"),
    ("dart", dict(ratio=0.5, pivot_image_tokens=0), r"dart: pivot_image_tokens must be in \[1, inf\], got 0"),
    ("dart", dict(ratio=0.5, pivot_text_tokens=-1), r"dart: pivot_text_tokens must be in \[0, inf\], got -1"),
    ("random", dict(ratio=0.5, seed=-3), r"random: seed must be in \[0, 4294967295\], got -3"),
    ("random", dict(ratio=0.5, seed=1.5), r"random: seed must be of type int, got 1.5"),
    ("random", dict(ratio=0.5, seed="7"), r"random: seed must be of type int, got '7'"),
    ("divprune", dict(ratio="0.5"), r"divprune: ratio must be in \[0, 1\)"),
    ("divprune", dict(ratio=0.5, slice_earlier="yes"), r"divprune: slice_earlier must be of type bool, got 'yes'"),
    ("fastv", dict(ratio=0.5, slice_earlier=2), r"fastv: slice_earlier must be of type bool, got 2"),
    ("sparsevlm", dict(ratio=0.5, seed=-1), r"sparsevlm: seed must be in \[0, 4294967295\], got -1"),
    ("dycoke", dict(ratio=0.5, similarity=float("inf")), r"dycoke: similarity must be a finite number, got inf"),
    ("fastvid", dict(ratio=0.5, threshold=float("-inf")), r"fastvid: threshold must be a finite number, got -inf"),
    ("fastvid", dict(ratio=0.5, ignore_threshold=float("nan")), r"fastvid: ignore_threshold must be a finite number"),
    ("vflowopt", dict(ratio=0.5, t=float("inf")), r"vflowopt: t must be a finite number, got inf"),
    ("vflowopt", dict(ratio=0.5, m=float("inf")), r"vflowopt: m must be a finite number, got inf"),
    ("hiprune", dict(ratio=0.5, alpha=float("inf")), r"hiprune: alpha must be a finite number, got inf"),
    ("divprune", dict(ratio=0.5, scope="tile"), r"divprune: scope must be one of \('image', 'crop'\), got 'tile'"),
    ("sparsevlm", dict(ratio=0.5, version="3"), r"sparsevlm: version must be one of \('1.5', '2.0'\), got '3'"),
])
def test_options_are_validated_when_patching(method, options, match):
    model, _ = tm.build("llava")
    with pytest.raises(ValueError, match=match):
        vtr.patch(model, method, **options)
    assert hook_count(model) == 0 and vtr.handle_of(model) is None


def bad_values(method_cls, option):
    """Values of the wrong kind for one option (by its type and metadata), each of which must be refused."""
    hints = typing.get_type_hints(method_cls)
    kind = next((t for t in typing.get_args(hints[option.name]) if t is not type(None)), hints[option.name])
    bad = {bool: ["yes", 2, None], int: [1.5, True, "3"], float: [float("inf"), float("nan"), True, "0.5"],
           str: [3, True]}.get(kind, [])
    if option.default is None:
        bad = [v for v in bad if v is not None]
    if kind in (int, float):
        low, high = option.metadata.get("min"), option.metadata.get("max")
        bad += ([low - 1] if low is not None else []) + ([high + 1] if high is not None else [])
    if "choices" in option.metadata:
        bad.append("no-such-choice")
    return bad


@pytest.mark.parametrize("method", sorted(vtr.methods()))
def test_every_option_of_every_method_refuses_values_of_the_wrong_kind(method):
    """One rule per option type (Method._check_options): each option of each method, the common ones included,
    refuses a value of the wrong type, a non-finite float, a number out of its range and a string outside its
    choices, naming the option."""
    cls = REGISTRY[method]
    for option in dataclasses.fields(cls):
        if option.name in ("ratio", "keep") or option.name == "siglip_head":  # the budget; a module
            continue
        for value in bad_values(cls, option):
            with pytest.raises(ValueError, match=rf"{method}: {option.name} must be"):
                cls(ratio=0.5, **{option.name: value})


@pytest.mark.parametrize("method,match", [
    (None, r"method must be a registered name .* or a configured Method instance, got None"),
    (vtr.DART, r"got the class DART: configure an instance, e.g. vtr.DART\(ratio=0.5\), or pass the name 'dart'"),
    (3, r"method must be a registered name .* got 3"),
])
def test_method_must_be_a_name_or_an_instance(method, match):
    model, _ = tm.build("llava")
    with pytest.raises(TypeError, match=match):
        vtr.patch(model, method, ratio=0.5)
    assert hook_count(model) == 0


# ------------------------------------------------------------------------------------------------- copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("family", FAMILIES)
def test_copying_a_patched_model_says_to_unpatch_first(family, how):
    model, _ = tm.build(family)
    copy_it = {"deepcopy": copy.deepcopy, "pickle": pickle.dumps, "torch.save": lambda m: torch.save(m, io.BytesIO())}
    with vtr.patch(model, "dart", ratio=0.5):
        with pytest.raises(TypeError, match=r"a patched model cannot be copied or pickled.*handle.remove\(\)"):
            copy_it[how](model)
    clone = copy.deepcopy(model)  # unpatched: copies as usual
    assert vtr.handle_of(clone) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_saves_the_unchanged_model(family, tmp_path):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 1)
    with torch.no_grad():
        expected = model(**inputs).logits
    with vtr.patch(model, "divprune", ratio=0.75):
        model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert vtr.handle_of(loaded) is None and hook_count(loaded) == 0
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
