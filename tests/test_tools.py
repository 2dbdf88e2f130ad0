"""The command-line tools explain themselves and fail early: --help without importing torch, every option with
its default, result files named after the model, and a model that would not fit refused before it is built."""
import subprocess
import sys
from pathlib import Path

import pytest

from vtr import env
from vtr.bench import canary, cli, evaluate, methods, models, overlay, scaling, speed

TOOLS = {"vtr.bench.speed": speed.build_parser, "vtr.bench.evaluate": evaluate.build_parser,
         "vtr.bench.overlay": overlay.build_parser, "vtr.bench.canary": canary.build_parser,
         "vtr.bench.scaling": scaling.build_parser, "vtr.bench.methods": methods.build_parser,
         "vtr.env": env.build_parser}


def imported_modules(*args) -> set[str]:
    """Top-level and dotted names of every module a fresh interpreter imports for ``python -m ...``."""
    run = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    names = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    return names


@pytest.mark.parametrize("module", [*TOOLS, "vtr.bench"])
def test_help_imports_neither_torch_nor_transformers(module):
    names = imported_modules("-m", module, "--help")
    assert "argparse" in names  # the probe sees the tool's own imports
    assert not {"torch", "transformers"} & names


def test_console_script_help_imports_no_torch():
    script = Path(sys.executable).parent / "vtr-bench"
    if not script.exists():
        pytest.skip("vtr-bench is not installed in this interpreter's bin directory")
    names = imported_modules(str(script), "--help")
    assert "vtr.bench.speed" in names and "torch" not in names


@pytest.mark.parametrize("module", TOOLS)
def test_every_option_has_help_with_its_default(module):
    parser = TOOLS[module]()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{module} {action.option_strings} has no help text"
        assert "default" in action.help or action.required, f"{module} {action.option_strings}: no default stated"


@pytest.mark.parametrize("name,slug", [
    ("llava-1.5-7b", "llava-1.5-7b"), ("qwen2.5-vl-7b", "qwen2.5-vl-7b"),
    ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-7B-Instruct"), ("/data/ckpt/llava-v1.6/", "llava-v1.6"),
    ("configs/my.model-1.5.json", "my.model-1.5"), ("tiny-qwen2_vl", "tiny-qwen2_vl"),
])
def test_result_files_keep_the_model_name(name, slug):
    assert cli.model_slug(name) == slug
    assert speed.result_stem(name).startswith(f"speed-{slug}-2")


def test_benchmark_writes_files_named_after_the_model_and_explains_its_table(tmp_path, capsys):
    speed.run(["--model", "tiny-llava", "--methods", "uniform", "--ratios", "0.5", "--repeats", "1", "--warmup", "0",
               "--decode-tokens", "0", "--out", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and all(p.startswith("speed-tiny-llava-") for p in written)
    assert {Path(p).suffix for p in written} == {".json", ".png"}
    captured = capsys.readouterr()
    assert speed.TABLE_LEGEND in captured.out
    assert "tiny-llava (random weights, 4 of 4 layers, float32" in captured.out
    assert "building tiny-llava: random weights" in captured.err  # said before the bar starts
    assert captured.err.index("building") < captured.err.index("measuring")


@pytest.fixture
def small_machine(monkeypatch):
    """24 GB available, and any attempt to build a model fails the test."""
    monkeypatch.setattr(models, "available_memory", lambda device: 24 * 10**9)

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built")
    monkeypatch.setattr(models, "random_model", no_build)
    monkeypatch.setattr(models.transformers.AutoModelForImageTextToText, "from_pretrained", no_build)


def test_full_depth_7b_in_fp32_is_refused_with_the_estimate(small_machine):
    with pytest.raises(models.NotEnoughMemory) as refused:
        models.plan("llava-1.5-7b", device="cpu")
    message = str(refused.value)
    assert "32 of 32 decoder layers in float32" in message
    assert "7.06 B parameters = 28.3 GB of weights" in message and "24.0 GB is available" in message


def test_the_benchmark_refuses_before_building(small_machine, capsys):
    with pytest.raises(SystemExit) as exit_:
        speed.run(["--model", "llava-1.5-7b", "--layers", "32", "--device", "cpu", "--quiet"])
    assert exit_.value.code == 2
    assert "needs about 32.5 GB" in capsys.readouterr().err


def test_the_default_depth_fits_and_is_described(small_machine):
    plan = models.plan("llava-1.5-7b", layers=3, vision_layers=2, device="cpu")
    assert plan.needed < plan.available
    assert "3 of 32 decoder layers, 2 of 24 vision layers" in plan.describe()


def test_a_checkpoint_is_estimated_from_its_config(small_machine, tmp_path, monkeypatch, capsys):
    import tiny_models as tm
    model, processor = tm.build("llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    monkeypatch.setattr(models, "available_memory", lambda device: 10**5)
    tm.random_image(32, 32).save(tmp_path / "cat.png")  # the image exists: what is refused is the model's size
    with pytest.raises(SystemExit) as exit_:
        overlay.main(["--model", str(tmp_path), "--image", str(tmp_path / "cat.png"), "--device", "cpu"])
    assert exit_.value.code == 2
    assert "Nothing was built" in capsys.readouterr().err


@pytest.mark.parametrize("tool", [overlay, evaluate])
@pytest.mark.parametrize("model", ["llava-1.5-7b", "some/config.json"])
def test_tools_that_need_a_processor_refuse_bare_configs(tool, model, capsys):
    args = ["--model", model, "--image" if tool is overlay else "--data", "unused"]
    with pytest.raises(SystemExit) as exit_:
        tool.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "no processor" in err and "tiny-qwen2_vl" in err
    assert "shipped configs are refused" in tool.build_parser().format_help()


def test_qwen3_vl_config_has_the_official_parameter_count():
    """Qwen3-VL-8B-Instruct's checkpoint holds 8,767,123,696 parameters; the shipped config must build that."""
    import torch
    parameters, size = models.weight_bytes(models.load_config("qwen3-vl-8b"), torch.bfloat16)
    assert parameters == 8_767_123_696 and size >= 2 * parameters


def test_every_tiny_name_builds_with_its_processor():
    for family in ("llava", "qwen3_vl"):
        model, processor = models.load(f"{cli.TINY_PREFIX}{family}", device="cpu")
        assert processor is not None and type(model).__name__.lower().startswith(family.split("_")[0])


@pytest.mark.parametrize("name", ["llava-1.5-7b", "qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b",
                                  "llava-onevision-7b", "qwen3-vl-30b-a3b", "internvl3.5-8b", "gemma-3-4b",
                                  "qwen3.5-9b", "qwen3.5-35b-a3b", "glm-4.1v-9b"])
def test_the_full_depth_preset_keeps_depth_and_head_size(name):
    """--preset full-depth: every decoder and vision layer, a quarter of the widths, the real head sizes (so rotary
    sections still add up) and a projector that outputs the narrowed width; the model builds and runs a forward."""
    import torch
    full = models.load_config(name)
    shape = speed.PRESETS["full-depth"]
    assert shape["layers"] is None and shape["vision_layers"] is None  # the tower keeps its real depth
    narrow = models.load_config(name, width_divisor=shape["width_divisor"],
                                vision_width_divisor=shape["vision_width_divisor"])
    text, narrow_text = full.get_text_config(), narrow.get_text_config()
    assert narrow_text.num_hidden_layers == text.num_hidden_layers
    vision, narrow_vision = full.vision_config, narrow.vision_config
    heads = "num_attention_heads" if hasattr(vision, "num_attention_heads") else "num_heads"
    width = "embed_dim" if hasattr(vision, "embed_dim") else "hidden_size"
    assert getattr(narrow_vision, heads) * 4 == getattr(vision, heads)
    assert getattr(narrow_vision, width) * 4 == getattr(vision, width)
    assert getattr(narrow_vision, width) // getattr(narrow_vision, heads) == \
        getattr(vision, width) // getattr(vision, heads)
    assert models._depths(narrow)[1] == models._depths(full)[1]
    assert narrow_text.hidden_size * 4 == text.hidden_size
    if getattr(text, "intermediate_size", None) is not None:  # Qwen3.5-MoE: experts only
        assert narrow_text.intermediate_size * 4 == text.intermediate_size
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert (getattr(narrow_text, "head_dim", None) or
            narrow_text.hidden_size // narrow_text.num_attention_heads) == head
    # a forward at full depth is the benchmark's job, not a test's: 2 layers of each at the narrowed widths
    narrow = models.load_config(name, layers=2, vision_layers=2, width_divisor=4, vision_width_divisor=4)
    model = models.random_model(narrow, torch.float32, torch.device("cpu"), "sdpa")
    inputs = models.synthetic_inputs(model, prompt_tokens=8, image_size=56 if "qwen" in name or "glm" in name else
                                     448 if "internvl" in name else None)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == narrow_text.vocab_size and torch.isfinite(logits).all()


def test_full_depth_preset_is_planned_and_described(small_machine):
    plan = models.plan("llava-1.5-7b", vision_layers=2, device="cpu", width_divisor=4)
    assert plan.layers == plan.total_layers == 32 and plan.needed < plan.available
    assert "32 of 32 decoder layers, language model at 1/4 of its width" in plan.describe()
    with pytest.raises(ValueError, match="does not divide the language model's hidden_size"):
        models.load_config("llava-1.5-7b", width_divisor=3)
    with pytest.raises(ValueError, match="random weights only"):
        models.plan("some/checkpoint", width_divisor=4, check_memory=False)


def test_preset_is_refused_for_tiny_models(capsys):
    with pytest.raises(SystemExit):
        speed.run(["--model", "tiny-llava", "--preset", "full-depth", "--quiet"])
    assert "--preset shapes shipped configs" in capsys.readouterr().err


def test_method_names_and_options_read_without_torch_equal_the_registry():
    import dataclasses

    from vtr.methods import REGISTRY
    known = cli.method_options()
    assert set(known) == set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert known[name] == {f.name for f in dataclasses.fields(cls)}, name
    from vtr import testing
    assert cli.TINY_FAMILIES == testing.FAMILIES


@pytest.mark.parametrize("args,message", [
    (["vtr.bench.speed", "--model", "tiny-qwen2vl"], "unknown tiny model 'tiny-qwen2vl'"),
    (["vtr.bench.speed", "--methods", "dart,fastvv"], "Did you mean 'fastv'"),
    (["vtr.bench.speed", "--set", "layr=2"], "--set layr: no option of that name"),
    (["vtr.bench.speed", "--model", "tiny-qwen2_vl", "--image", "missing.jpg"], "--image missing.jpg: no such file"),
    (["vtr.bench.overlay", "--model", "tiny-qwen2_vl", "--image", "missing.jpg"], "no such file"),
    (["vtr.bench.overlay", "--model", "tiny-llava", "--image", "missing.jpg", "--method", "dartt"],
     "unknown method 'dartt'"),
    (["vtr.bench.evaluate", "--model", "tiny-qwen2_vl", "--data", "missing.jsonl"], "--data missing.jsonl"),
    (["vtr.bench.scaling", "--methods", "divprunee"], "unknown method 'divprunee'"),
    (["vtr.bench.canary", "--methods", "visionzipp"], "unknown method 'visionzipp'"),
])
def test_names_and_files_are_refused_before_torch_is_imported(args, message, tmp_path):
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", *args], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
    names = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in names and not {"torch", "transformers"} & names


def test_evaluate_refuses_a_record_whose_image_is_missing(tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text('{"image": "cat.png", "question": "what is it?"}\n')
    run = subprocess.run([sys.executable, "-m", "vtr.bench.evaluate", "--model", "tiny-qwen2_vl", "--data", str(data)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "missing file" in run.stderr and "cat.png" in run.stderr


def test_benchmark_without_matplotlib_says_it_skipped_the_png(tmp_path, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    speed.run(["--model", "tiny-llava", "--methods", "random", "--ratios", "0.5", "--repeats", "1", "--warmup", "0",
               "--decode-tokens", "0", "--out", str(tmp_path), "--tag", "t", "--quiet"])
    assert not (tmp_path / "t.png").exists() and (tmp_path / "t.json").exists()
    assert "skipped the PNG: matplotlib is not installed" in capsys.readouterr().err
