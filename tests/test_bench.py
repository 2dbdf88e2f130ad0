"""The benchmark harness end to end on tiny random models (no timing assertions), the local evaluator, the
overlay and the lmms-eval wrappers."""
import json
import sys
import types

import pytest
import torch
from PIL import Image

import tiny_models as tm
import vtr
from vtr.bench import evaluate, overlay, speed
from vtr.bench.timing import llm_prefill_flops


def tiny_config_file(tmp_path, family):
    model, _ = tm.build(family)
    path = tmp_path / f"tiny-{family}.json"
    path.write_text(json.dumps(model.config.to_dict()))
    return str(path)


@pytest.mark.parametrize("family,extra", [("llava", []), ("qwen2_vl", ["--image-size", "32"])])
def test_speed_harness_end_to_end(tmp_path, family, extra):
    config = tiny_config_file(tmp_path, family)
    threads = torch.get_num_threads()
    result = speed.run(["--model", config, "--methods", "dart,divprune", "--ratios", "0.5,0.75", "--repeats", "1",
                         "--warmup", "0", "--decode-tokens", "2", "--batch", "2", "--out", str(tmp_path),
                         "--tag", "run", "--quiet", *extra])
    saved = json.loads((tmp_path / "run.json").read_text())
    assert (tmp_path / "run.png").stat().st_size > 0
    assert saved["environment"]["torch"] == torch.__version__
    assert saved["settings"]["repeats"] == 1
    # one torch thread by default on CPU (what a shared machine disturbs least), the caller's count restored
    assert saved["settings"]["threads"] == 1 and torch.get_num_threads() == threads
    rows = {r["config"]: r for r in saved["results"]}
    assert set(rows) == {"dense"} | {f"{m}[ratio={r}]{s}" for m in ("dart", "divprune") for r in (0.5, 0.75)
                                     for s in ("", " ideal")}
    dense = rows["dense"]
    for label, row in rows.items():
        assert row["ttft_s"] > 0 and row["llm_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["kv_cache_bytes"] > 0
        # one pass: the median of the paired ratios is the ratio of the two times (an ideal's with its vision time)
        assert row["ttft_per_pass_s"] == [pytest.approx(row["ttft_s"])]
        assert row["ttft_speedup_vs_dense"] == pytest.approx(dense["ttft_s"] / row["ttft_s"])
        # the same in process CPU time, which the prefill spends (the ideal's includes its tower's)
        assert row["ttft_cpu_s"] > 0 and row["ttft_cpu_per_pass_s"] == [pytest.approx(row["ttft_cpu_s"])]
        assert row["ttft_cpu_speedup_vs_dense"] == pytest.approx(dense["ttft_cpu_s"] / row["ttft_cpu_s"])
        if row["kind"] == "ideal":
            assert row["ttft_cpu_s"] > row["vision_cpu_s"] > 0
            # plus the dense run's time outside the language model (vision, embedding, LM head)
            assert 0 < row["outside_s"] < dense["ttft_s"] and 0 < row["outside_cpu_s"] < dense["ttft_cpu_s"]
        else:  # the prefill's language model, not its decoding steps too
            assert row["llm_s"] < row["ttft_s"] and row["llm_cpu_s"] < row["ttft_cpu_s"]
        if row["kind"] == "method":
            ideal = rows[label + " ideal"]
            assert row["ttft_cpu_vs_ideal"] == pytest.approx(ideal["ttft_cpu_s"] / row["ttft_cpu_s"])
            assert sum(row["n_kept"]) < sum(row["n_visual"])
            assert row["kv_cache_bytes"] < dense["kv_cache_bytes"]
            assert row["llm_prefill_tflops"] < dense["llm_prefill_tflops"]
            assert row["ttft_vs_ideal"] is not None and row["selection_s"] > 0
            ideal = rows[label + " ideal"]
            if row["method"] == "dart":  # layer stage: the ideal runs the same layers full, the rest kept
                assert ideal["layer_lengths"] == row["layer_lengths"]
                assert ideal["kv_cache_bytes"] == row["kv_cache_bytes"]
            else:  # pre-LLM: the ideal is fed the kept tokens from layer 0
                assert ideal["layer_lengths"] == [row["layer_lengths"][-1]] * len(row["layer_lengths"])
            assert row["ttft_speedup_spread"] is None  # one repeat: no spread
    divprune = rows["divprune[ratio=0.75]"]
    assert divprune["layer_lengths"][0] < dense["layer_lengths"][0]  # pre-LLM: every layer runs pruned
    dart = rows["dart[ratio=0.75]"]
    assert dart["layer_lengths"][:2] == dense["layer_lengths"][:2]
    assert dart["layer_lengths"][2] < dart["layer_lengths"][1]
    assert result["results"] == saved["results"] or len(result["results"]) == len(saved["results"])


def test_ratios_are_medians_of_paired_passes_with_a_shrinking_interval():
    """A burst of load in one pass moves one paired ratio, not the reported one; the interval is the median's
    (it shrinks with repeats where the range of the values would grow)."""
    from vtr.bench.grid import _paired
    ratio, spread = _paired([2.0, 2.1, 1.9, 2.0, 2.05, 1.95, 2.0, 2.1, 0.5])  # the last pass: method slowed
    assert ratio == 2.0 and 0 < spread <= 0.05 + 1e-9  # the range would say +-40%
    few = _paired([1.0, 1.1, 0.9, 1.05, 0.95])[1]
    many = _paired([1.0, 1.1, 0.9, 1.05, 0.95] * 8)[1]
    assert many < few
    assert _paired([1.5]) == (1.5, None) and _paired([None]) == (None, None)


def test_steady_heap_is_entered_for_cpu_runs_and_left_after(tmp_path, monkeypatch):
    """A CPU run measures inside SteadyHeap (glibc: active; elsewhere a no-op) unless --heap default, records
    which in its settings, and leaves glibc's parameters restored (the context exited) when it ends."""
    from vtr.bench import timing
    entered = []
    real = timing.SteadyHeap

    class Spy(real):
        def __enter__(self):
            entered.append(self)
            super().__enter__()
            self.was_active = self.active
            return self

    monkeypatch.setattr(timing, "SteadyHeap", Spy)
    base = ["--model", "tiny-llava", "--methods", "random", "--ratios", "0.5", "--repeats", "1", "--warmup", "0",
            "--decode-tokens", "0", "--out", str(tmp_path), "--no-plot", "--quiet"]
    steady = speed.run(base + ["--tag", "s"])
    assert len(entered) == 1 and entered[0]._libc is None  # left: parameters restored, memory trimmed
    assert steady["settings"]["heap"] == "steady"
    assert steady["settings"]["heap_steady"] is entered[0].was_active and not entered[0].active
    default = speed.run(base + ["--tag", "d", "--heap", "default"])
    assert len(entered) == 1 and default["settings"]["heap_steady"] is False


def test_flops_estimate():
    config = types.SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
                                   vocab_size=10)
    per_token = 2 * 8 * (2 * 8 + 2 * 4) + 2 * 3 * 8 * 16
    expected = 3 * per_token + 2 * 3 * 4 * 8 + 2 * 8 * 10
    assert llm_prefill_flops(config, [3], 1) == expected
    assert llm_prefill_flops(config, [3, 3], 2) == 2 * (2 * (3 * per_token + 2 * 3 * 4 * 8) + 2 * 8 * 10)


@pytest.fixture
def saved_llava(tmp_path):
    model, proc = tm.build("llava")
    path = tmp_path / "tiny-llava"
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


def test_real_loading_path(saved_llava):
    """``from_pretrained`` of a checkpoint directory: the path users take with real weights."""
    from vtr.bench.models import load
    model, processor = load(saved_llava)
    inputs = tm.image_inputs("llava", processor, 1)
    with vtr.patch(model, "dart", ratio=0.5) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
    assert handle.last.n_kept == [4 + 8 * 4]


def test_local_evaluator(tmp_path, saved_llava):
    for i in range(3):
        tm.random_image(40 + 8 * i, 64, seed=i).save(tmp_path / f"img{i}.png")
    lines = [{"image": "img0.png", "question": "what is in this image ?", "choices": ["cat", "dog"],
              "answer": "cat"},
             {"image": "img1.png", "question": "what is in this image ?", "answer": "red"},
             {"image": "img2.png", "question": "describe ?", "choices": ["big", "small"], "answer": "B"}]
    data = tmp_path / "set.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "eval.json"
    report = evaluate.main(["--model", saved_llava, "--data", str(data), "--methods", "dart,divprune",
                            "--ratios", "0.75", "--max-new-tokens", "3", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == report["results"]
    for label in ("dart[ratio=0.75]", "divprune[ratio=0.75]"):
        summary = report["results"][label]
        assert 0 <= summary["accuracy"] <= 1 and 0 <= summary["agreement_with_dense"] <= 1
        assert summary["mean_visual_tokens"] == 64 and summary["mean_kept_tokens"] < 64
        assert len(report["answers"][label]) == 3


@pytest.mark.parametrize("prediction,record,correct", [
    ("B", {"choices": ["cat", "dog"], "answer": "dog"}, True),
    ("(A) cat", {"choices": ["cat", "dog"], "answer": "dog"}, False),
    ("It is a dog.", {"choices": ["cat", "dog"], "answer": "B"}, True),
    ("a big RED ball", {"answer": "red ball"}, True),
    ("blue", {"answer": "red"}, False),
])
def test_answer_scoring(prediction, record, correct):
    assert evaluate.is_correct(prediction, record) is correct


@pytest.mark.parametrize("family,view", [("llava", "crop"), ("qwen2_vl", "resize")])
def test_overlay_darkens_pruned_tokens(family, view):
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 1)
    with vtr.patch(model, "uniform", ratio=0.75) as handle, torch.no_grad():
        model(**inputs)
    picture = Image.new("RGB", (64, 64), (255, 255, 255))
    image = overlay.overlay(picture, handle.last, view=view, cell=4)
    frames, rows, cols = handle.last.layout.rows[0].spans[0].grid
    assert image.size == (cols * 4, rows * 4)
    pixels = torch.tensor(list(image.getdata())).view(rows, 4, cols, 4, 3)
    dark = (pixels[:, 1:3, :, 1:3].float().mean((1, 3, 4)) < 128).sum()
    assert int(dark) == handle.last.n_visual[0] - handle.last.n_kept[0]


@pytest.fixture
def stub_lmms_eval(monkeypatch, tmp_path):
    """A stand-in for lmms-eval's package layout: the registry's ModelManifest and a stock ``llava_hf`` wrapper
    that loads a checkpoint and answers requests with generate (the real one does the same with more options)."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None
        aliases: tuple = ()

    class LlavaHf:
        def __init__(self, pretrained, device="cpu", batch_size=1, **kwargs):
            assert kwargs == {}, f"Unexpected kwargs: {kwargs}"
            from vtr.bench.models import load
            self._model, self.processor = load(pretrained, device=device)

        @classmethod
        def create_from_arg_string(cls, arg_string, additional_config=None):
            # lmms-eval's base class: model args from "k=v,k=v", its own settings (device, batch size) beside them
            args = dict(item.split("=", 1) for item in arg_string.split(",") if item)
            return cls(**args, **(additional_config or {}))

        @property
        def model(self):
            return self._model

        def generate_until(self, requests):
            answers = []
            for question, image in requests:
                answers.append(evaluate.answer(self.model, self.processor, {"image": image, "question": question},
                                               max_new_tokens=2))
            return answers

        def loglikelihood(self, requests):
            return []

    modules = {"lmms_eval": types.ModuleType("lmms_eval"), "lmms_eval.models": types.ModuleType("lmms_eval.models"),
               "lmms_eval.models.registry_v2": types.ModuleType("lmms_eval.models.registry_v2"),
               "lmms_eval.models.simple": types.ModuleType("lmms_eval.models.simple"),
               "lmms_eval.models.simple.llava_hf": types.ModuleType("lmms_eval.models.simple.llava_hf")}
    modules["lmms_eval.utils"] = types.ModuleType("lmms_eval.utils")
    modules["lmms_eval.utils"].simple_parse_args_string = lambda text: dict(
        item.split("=", 1) for item in text.split(",") if item)
    modules["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    modules["lmms_eval.models.simple.llava_hf"].LlavaHf = LlavaHf
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "vtr.integrations.lmms_eval", raising=False)


def test_lmms_eval_wrapper_against_a_stub(stub_lmms_eval, saved_llava, tmp_path):
    from vtr.integrations import lmms_eval_manifest
    manifests = {m.model_id: m for m in lmms_eval_manifest.manifests()}
    assert manifests["vtr_llava_hf"].simple_class_path == "vtr.integrations.lmms_eval.VtrLlavaHf"
    assert "vtr_llava_onevision" in manifests["vtr_llava_hf"].aliases
    from vtr.integrations.lmms_eval import VtrLlavaHf
    log = tmp_path / "vtr.jsonl"
    wrapper = VtrLlavaHf(pretrained=saved_llava, vtr_method="fastv", vtr_ratio="0.75", vtr_layer="1",
                         vtr_log=str(log))
    assert wrapper.vtr_handle.method.layer == 1 and wrapper.vtr_handle.method.ratio == 0.75
    image = tmp_path / "a.png"
    tm.random_image(64, 64).save(image)
    answers = wrapper.generate_until([("what is in this image ?", str(image))] * 2)
    assert len(answers) == 2
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(entries) == 2 and all(e["n_visual"] == 64 and e["n_kept"] == 16 and e["prefill_s"] > 0
                                     for e in entries)
    with pytest.raises(NotImplementedError, match="log-likelihood tasks are not supported"):
        wrapper.loglikelihood([])
    wrapper.vtr_handle.remove()
    # lmms-eval passes its --device beside model args that may name one too: the model args win, no TypeError
    again = VtrLlavaHf.create_from_arg_string(f"pretrained={saved_llava},device=cpu,vtr_method=fastv,vtr_ratio=0.5",
                                              {"device": "cuda:7", "batch_size": 1})
    assert again.vtr_handle.method.ratio == 0.5 and next(again.model.parameters()).device.type == "cpu"
    again.vtr_handle.remove()


def test_lmms_eval_registry_finds_the_plugin():
    registry = pytest.importorskip("lmms_eval.models.registry_v2")
    reg = registry.ModelRegistryV2()
    reg.load_entrypoint_manifests()
    assert reg.resolve("vtr_qwen2_5_vl").class_path == "vtr.integrations.lmms_eval.VtrQwen2_5_VL"


@pytest.mark.parametrize("method", ["fastv", "dart"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_layered_ideal_equals_the_pruned_run(family, method):
    """The layer-stage speed bound computes what the patched model computes: same prefill logits and next step."""
    from reference import capture_lm_inputs

    from vtr.bench.ideal import LayeredIdeal
    model, proc = tm.build(family)
    inputs = tm.image_inputs(family, proc, 1)
    lm_inputs = capture_lm_inputs(model, inputs)
    with vtr.patch(model, method, ratio=0.75, layer=2) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        index = handle.last.index
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        positions = lm_inputs["positions"][..., -1:] + 1
        step = model(input_ids=token, past_key_values=out.past_key_values, position_ids=positions).logits[:, -1]
    assert index.shape[1] < lm_inputs["embeds"].shape[1]
    with LayeredIdeal(model, lm_inputs, index, 2) as ideal:
        torch.testing.assert_close(ideal.prefill(), out.logits[:, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ideal.step(token), step, atol=1e-5, rtol=1e-5)
    assert [layer.keys.shape[-2] for layer in ideal.cache.layers] == [index.shape[1] + 1 if i >= 2 else
                                                                      lm_inputs["embeds"].shape[1] + 1
                                                                      for i in range(len(ideal.cache.layers))]


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm"])
def test_multi_stage_ideal_runs_each_stage_length(method):
    """The speed bound of a multi-stage method runs each layer on its stage's length (recycled tokens included),
    and for a method without added tokens computes what the patched model computes."""
    from reference import capture_lm_inputs

    from vtr.bench.ideal import LayeredIdeal
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 1)
    lm_inputs = capture_lm_inputs(model, inputs)
    options = {"positions": "original"} if method == "pdrop" else {}
    with vtr.patch(model, method, ratio=0.5, **options) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        stages = [(s.layer, s.index) for s in handle.last.stages]
    with LayeredIdeal(model, lm_inputs, stages=stages) as ideal:
        logits = ideal.prefill()
    assert [layer.keys.shape[-2] for layer in ideal.cache.layers] == \
        [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    if method == "pdrop":
        torch.testing.assert_close(logits, out.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_scaling_run_reports_selection_and_memory_per_size(tmp_path, capsys):
    from vtr.bench import scaling
    result = scaling.main(["--model", "tiny-qwen2_vl", "--sizes", "1x16,4x16", "--methods", "divprune,dart,random",
                           "--repeats", "2", "--prefill-sizes", "1x16,4x16", "--out", str(tmp_path / "s"),
                           "--quiet"])
    rows = result["selection"]
    assert [(r["method"], r["n"]) for r in rows] == [(m, n) for n in (16, 64) for m in ("divprune", "dart", "random")]
    for r in rows:
        assert r["seconds"] > 0 and len(r["seconds_all"]) == 2 and r["spread"] is not None
        assert r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0
    assert {r["kept"] for r in rows if r["method"] == "divprune"} == {2, 7}  # round(n * 0.111)
    assert [p["n"] for p in result["prefill"]] == [16, 64] and all(p["llm_s"] > 0 for p in result["prefill"])
    assert json.loads((tmp_path / "s.json").read_text())["selection"] == json.loads(json.dumps(rows))
    out = capsys.readouterr().out
    assert "4x16 = 64" in out and "dense LLM prefill" in out


def test_scaling_skips_sizes_past_the_time_limit(tmp_path, capsys):
    from vtr.bench import scaling
    result = scaling.main(["--model", "tiny-qwen2_vl", "--sizes", "1x16,4x16", "--methods", "divprune",
                           "--repeats", "2", "--max-seconds", "0", "--prefill-sizes", "", "--out",
                           str(tmp_path / "s"), "--quiet"])
    first, second = result["selection"]
    assert (first["method"], first["n"], len(first["seconds_all"])) == ("divprune", 16, 1)  # no second pass
    assert second["n"] == 64 and second["skipped_predicted_s"] >= first["seconds"] * 16  # at least quadratic
    assert "skipped (~" in capsys.readouterr().out


def test_scaling_prediction_grows_at_least_quadratically():
    from vtr.bench.scaling import predict
    assert predict([], 100) is None
    assert predict([(100, 1.0)], 200) == 4.0
    assert predict([(100, 1.0), (200, 8.0)], 400) == pytest.approx(64.0)  # the measured cubic growth


def test_synthetic_context_runs_every_registered_method_at_video_size():
    """The selection-only stand-in provides the signals every registered method reads (a new method reading
    another one shows up here, not as a silent gap in the scaling table)."""
    from vtr.bench.synthetic import Widths, measure
    from vtr.methods.registry import REGISTRY
    widths = Widths(hidden=32, heads=4, kv_heads=2, head_dim=8, layers=28, vision_hidden=32, vision_heads=4)
    for name in sorted(REGISTRY):
        result = measure(name, 0.75, widths, 3, 400)  # a video of 1200 tokens: more than one block
        if REGISTRY[name].stage.value == "vision":  # selects inside the tower: said so, not timed
            assert result["error"].startswith("not measured: it selects inside the vision tower"), result
            continue
        assert "error" not in result, result
        assert 0 < result["kept"] < 1200, result


def test_synthetic_context_gives_holitom_its_onevision_tower_signal():
    """On LLaVA-OneVision widths HoliTom reads the SigLIP received attention of every frame (its official signal),
    which the stand-in computes per frame and pools like the features."""
    from vtr.bench.synthetic import Widths, measure, resolve
    widths = Widths(hidden=32, heads=4, kv_heads=2, head_dim=8, layers=28, vision_hidden=32, vision_heads=4,
                    family="llava_onevision", mrope=False)
    assert resolve("holitom", 0.75, widths).attention == "vision"
    result = measure("holitom", 0.75, widths, 3, 196)
    assert "error" not in result and 0 < result["kept"] < 3 * 196, result


def test_bench_video_input(tmp_path, capsys):
    from vtr.bench import models, speed
    with pytest.raises(ValueError, match="FRAMESxTOKENS"):
        models.parse_video("16")
    with pytest.raises(SystemExit):
        speed.run(["--model", "tiny-qwen2_vl", "--video", "3x5", "--out", str(tmp_path), "--quiet"])  # not square
    assert "square number" in capsys.readouterr().err
    result = speed.run(["--model", "tiny-qwen2_vl", "--video", "3x16", "--methods", "divprune", "--ratios", "0.5",
                        "--repeats", "1", "--warmup", "0", "--decode-tokens", "1", "--no-plot", "--out",
                        str(tmp_path), "--quiet"])
    method = next(r for r in result["results"] if r["kind"] == "method")
    assert method["n_visual"] == [48] and method["n_kept"] == [24]
    assert "video 3x16" in capsys.readouterr().out

@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_synthetic_video_inputs_run_pruned(family):
    from vtr.bench import models
    from vtr.testing import tiny_model
    model, _ = tiny_model(family)
    vision = model.config.vision_config
    per_frame = 4 if family.startswith("qwen") else (-(-(vision.image_size // vision.patch_size) // 2)) ** 2
    inputs = models.synthetic_inputs(model, 1, 16, video=(3, per_frame))
    with pytest.raises(ValueError, match="tokens"):
        models.synthetic_inputs(model, 1, 16, video=(3, per_frame + 1))
    with vtr.patch(model, "divprune", ratio=0.5) as handle, torch.no_grad():
        model(**inputs)
    n = 3 * per_frame + (family == "llava_onevision")  # OneVision: the video's trailing newline token
    assert handle.last.n_visual == [n] and handle.last.n_kept == [int(round(0.5 * n))]


@pytest.mark.parametrize("argv,message", [
    (["--methods", "dycoke", "--set", "kvratio=0.8"], "--set kvratio: no option of that name in dycoke"),
    (["--methods", "dycoke", "--set", "kv_ratio=abc"], "kv_ratio must be of type float"),
    (["--methods", "fastvid", "--ratios", "1.5"], "ratio must be in [0, 1)"),
])
def test_bench_refuses_bad_settings_before_building(argv, message, capsys, monkeypatch):
    from vtr.bench import models
    monkeypatch.setattr(models, "build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    with pytest.raises(SystemExit) as exit_:
        speed.run(["--model", "tiny-qwen2_vl", "--quiet", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_row_labels_show_the_options():
    from vtr.bench.grid import build_grid
    grid = build_grid(["dycoke", "divprune"], [{"ratio": 0.5}], {"kv_ratio": 0.8})
    assert [c.label for c in grid[1:3]] == ["dycoke[ratio=0.5,kv_ratio=0.8]", "dycoke[ratio=0.5,kv_ratio=0.8] ideal"]
    assert grid[3].label == "divprune[ratio=0.5]"


# MustDrop: a vision stage, then layer stages whose thresholds (inside the tiny model's attention shares over the
# 31 tokens its tower leaves at ratio 0.5) drop tokens, each cutting the caches of layers 1 on (layer 0 keeps its whole cache)
MUSTDROP = {"window": 2, "global_thr": 0.0324, "individual_thr": 0.0297, "layers": "2,3"}


@pytest.mark.parametrize("method,family,options", [
    ("holitom", "qwen2_vl", {}), ("prunevid", "qwen2_vl", {}), ("framefusion", "qwen2_vl", {}),
    ("vflowopt", "llava_onevision", {}), ("mustdrop", "llava", MUSTDROP)])
def test_ideal_of_a_pre_llm_stage_followed_by_layer_stages(method, family, options):
    """The ideal bounds each stage where it acts: the layers before the first layer stage run on the pre-LLM
    stage's kept tokens (not on the full prompt), later layers on their stage's, post-attention stages run the
    layer before's MLP on the kept tokens and cut caches are cut: every layer's KV cache has the pruned run's
    length after the prefill and after each decoding step."""
    from vtr.bench.grid import Config, Runner
    model, proc = tm.build(family)
    images = method in ("vflowopt", "mustdrop")
    inputs = tm.image_inputs(family, proc, 1) if images else tm.video_inputs(family, proc, 1)
    runner = Runner(model, inputs, decode_tokens=2)
    caches = {}
    for kind in ("method", "ideal"):  # the caches each run leaves, read from the model's forward
        hook = model.register_forward_hook(lambda m, a, k, out, kind=kind: caches.setdefault(kind, []).append(
            [layer.keys.shape[-2] for layer in out.past_key_values.layers]), with_kwargs=True)
        if kind == "method":
            dense = runner.run(Config("dense"))
            caches.clear()
        sample = runner.run(Config(kind, method, {"ratio": 0.5}, options))
        hook.remove()
        if kind == "method":
            pruned = sample
    ideal = sample
    stages = runner.stages[Config("method", method, {"ratio": 0.5}, options).label]
    assert stages["stages"][0][0] == 0 and len(stages["stages"]) > 1  # a pre-LLM stage, then layer stages
    assert ideal.layer_lengths == pruned.layer_lengths
    if method != "framefusion":  # (its pre-LLM stage merges only where frames repeat: none in random video)
        assert ideal.layer_lengths[0] < dense.layer_lengths[0]  # layer 0 runs on the pre-LLM stage's tokens
    assert caches["ideal"] == caches["method"] and len(caches["ideal"]) == 3  # prefill and two decoding steps
    assert ideal.kv_cache == pruned.kv_cache
    runner.close()


def test_ideal_decodes_through_the_models_forward():
    """The ideal's decoding steps pay what the method's pay (the model's forward: embedding, masks, LM head), not
    a hand loop over the layers."""
    from vtr.bench.ideal import LayeredIdeal
    from reference import capture_lm_inputs
    model, proc = tm.build("llava")
    inputs = tm.image_inputs("llava", proc, 1)
    lm_inputs = capture_lm_inputs(model, inputs)
    with vtr.patch(model, "dart", ratio=0.75) as handle, torch.no_grad():
        model(**inputs)
        stages = [(s.layer, s.index) for s in handle.last.stages]
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    with LayeredIdeal(model, lm_inputs, stages=stages) as ideal:
        token = ideal.prefill().argmax(-1, keepdim=True)
        ideal.step(token)
    hook.remove()
    assert len(calls) == 2
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)  # hooks removed


def test_bench_validates_every_row_on_the_model_before_measuring(tmp_path, capsys, monkeypatch):
    """An option the built model refuses (a vision layer its tower lacks) stops the run before any measurement."""
    from vtr.bench import grid
    monkeypatch.setattr(grid, "run_grid", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    with pytest.raises(SystemExit):
        speed.run(["--model", "tiny-llava", "--methods", "divprune,hiprune", "--set", "object_layer=11",
                   "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert "hiprune[ratio=0.778,object_layer=11] cannot run on this model" in err and "object_layer" in err


def test_a_stopped_run_keeps_the_passes_it_measured(tmp_path, monkeypatch):
    from vtr.bench import grid
    real, calls = grid.Runner.run, []

    def run(self, config):
        calls.append(config.label)
        if len(calls) > 2 * 3:  # warm-up pass and first timed pass of 3 rows, then the run is stopped
            raise KeyboardInterrupt
        return real(self, config)

    monkeypatch.setattr(grid.Runner, "run", run)
    with pytest.raises(KeyboardInterrupt):
        speed.run(["--model", "tiny-llava", "--methods", "divprune", "--ratios", "0.5", "--repeats", "3",
                   "--decode-tokens", "1", "--out", str(tmp_path), "--tag", "stopped", "--quiet"])
    saved = json.loads((tmp_path / "stopped.json").read_text())
    assert saved["passes_done"] == 1 and saved["complete"] is False
    assert {r["config"] for r in saved["results"]} == {"dense", "divprune[ratio=0.5]", "divprune[ratio=0.5] ideal"}
    assert all(r["repeats"] == 1 for r in saved["results"])


def test_tiny_models_say_their_timings_mean_nothing_and_the_plot_is_honest(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    drawn = []
    real_errorbar = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, yerr=None, **k: drawn.append((list(x), yerr, k["label"])) or
                        real_errorbar(self, x, y, yerr=yerr, **k))
    lines = []
    real_axhline = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y=0, **k: lines.append(y) or real_axhline(self, y, **k))
    result = speed.run(["--model", "tiny-llava", "--methods", "divprune,dart", "--ratios", "0.5,0.75",
                        "--repeats", "2", "--warmup", "0", "--decode-tokens", "1", "--clock", "cpu",
                        "--out", str(tmp_path), "--tag", "t"])
    out = capsys.readouterr()
    assert speed.TINY_NOTICE in out.out and speed.TINY_NOTICE in out.err
    assert "1 thread" in out.out and "ratios in process CPU time" in out.out
    assert all(x == [0.5, 0.75] for x, _, _ in drawn) and len(drawn) == 4  # measured points only, no ratio 0
    assert all(e is not None and len(e) == 2 for _, e, _ in drawn)
    labels = [label for _, _, label in drawn]
    assert "divprune ideal: unpatched, fed the kept tokens" in labels
    assert "dart ideal: unpatched, layers 2 on each stage's kept tokens" in labels
    assert 1.0 in lines  # y = 1: the dense model
    assert result["complete"] is True


def test_the_per_method_table_runs_every_registered_method_in_one_command(tmp_path, capsys):
    """``python -m vtr.bench.methods``: every registered method once, against its ideal, in process CPU time."""
    from vtr.bench import methods
    from vtr.methods.registry import REGISTRY
    summary = methods.main(["--tiny", "--repeats", "1", "--warmup", "0", "--decode-tokens", "0",  # its ratio: 0.5
                            "--out", str(tmp_path), "--tag", "m", "--quiet"])
    assert sorted(r["method"] for r in summary["rows"]) == sorted(REGISTRY)
    for row in summary["rows"]:
        assert row["clock"] == "cpu" and row["over_ideal"] > 0 and row["kept"] < row["visual"], row
        assert row["ratio"] == 0.5
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == json.loads(json.dumps(summary["rows"]))
    table = (tmp_path / "m.md").read_text()
    assert table.count("\n| ") == len(REGISTRY) + 1 and "say nothing about speed" in table
    assert {p.name for p in tmp_path.glob("m-*.json")} == {f"m-{g[0]}.json" for g in methods.GROUPS}
