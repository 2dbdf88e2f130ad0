"""The documentation site's claims that the code decides: the generated support matrix is what ``vtr.patch``
accepts, every method option and every report field is documented, and the Quickstart's code runs as written
(``mkdocs build --strict`` itself runs in CI with the docs extra)."""
import dataclasses
import importlib.metadata
import sys
from pathlib import Path

import pytest
import tiny_models as tm
import torch
import transformers

import vtr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
import generate  # noqa: E402


def python_blocks(path: Path) -> list[str]:
    blocks, inside = [], None
    for line in path.read_text().splitlines():
        if inside is None and line.strip() == "```python":
            inside = []
        elif inside is not None and line.strip() == "```":
            blocks.append("\n".join(inside))
            inside = None
        elif inside is not None:
            inside.append(line)
    return blocks


def test_every_generated_page_builds():
    pages = generate.pages()
    assert set(pages) == {"methods/index.md", *(f"methods/{name}.md" for name in vtr.methods())}
    for name, cls in generate.registry().items():
        page = pages[f"methods/{name}.md"]
        assert f"`{name}`" in page and "## Where it prunes" in page and cls.__doc__.split("\n")[0].strip() in page
        assert all(f"| `{f.name}`" in page for f in dataclasses.fields(cls))
    assert "github.com/" in pages["methods/dart.md"]


def test_every_method_option_has_a_meaning():
    for name, cls in generate.registry().items():
        for row in generate.options(cls):
            assert len(row["meaning"]) > 20, f"{name}.{row['name']} has no attribute docstring"


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_support_matrix_is_what_patch_accepts(family):
    """Each cell of the generated matrix against ``vtr.patch`` on the tiny model of that class: "-" is refused
    with a ValueError naming the model, every other cell patches (with the layer options a hybrid or
    sliding-window model needs, ``tm.OPTIONS``)."""
    model, _ = tm.build(family)
    cls_name = type(model).__name__
    assert generate.MODELS[cls_name][1] == family
    row = generate.support_matrix()[cls_name]
    assert set(row) == set(vtr.methods())
    for method, cell in row.items():
        if cell == "-":
            with pytest.raises(ValueError, match=cls_name):
                vtr.patch(model, method, ratio=0.5)
        else:
            vtr.patch(model, method, ratio=0.5, **tm.options(method, family)).remove()
            assert (cell == "images") == (cls_name in generate.video_model_classes()
                                          and "video" not in generate.registry()[method].visual_kinds)
    assert vtr.handle_of(model) is None


def test_support_matrix_covers_every_supported_model_class():
    from vtr.patches import supported_model_classes
    assert list(generate.support_matrix()) == supported_model_classes() and set(generate.MODELS) == set(
        supported_model_classes())


def test_every_report_field_is_documented_per_row_or_whole_batch():
    """Each dataclass field of the report's classes is in its docstring's Attributes section, and each public
    property has a docstring; PrefillRecord's and StageRecord's entries say whether they are per row."""
    from vtr import layout, report
    for cls in (report.PrefillRecord, report.StageRecord, report.MergedTokens, report.AddedToken,
                layout.TokenLayout, layout.RowLayout, layout.VisualSpan):
        attributes = cls.__doc__.split("Attributes:", 1)[1]
        for f in dataclasses.fields(cls):
            assert f"\n        {f.name} (" in attributes, f"{cls.__name__}.{f.name} is not documented"
        for name, value in vars(cls).items():
            if isinstance(value, property) and not name.startswith("_"):
                assert value.__doc__, f"{cls.__name__}.{name} has no docstring"
    for cls in (report.PrefillRecord, report.StageRecord):
        entries = [e for e in cls.__doc__.split("Attributes:", 1)[1].split("\n        ") if "(" in e][1:]
        lists = [e for e in entries if "list[" in e.split(":", 1)[0]]
        assert lists and all("per row" in e or "in order" in e or "one entry per" in e for e in lists), lists


def test_version_is_the_installed_distribution_version():
    assert vtr.__version__ == importlib.metadata.version("vtr")


def test_quickstart_tiny_model_runs_as_written(capsys):
    block = next(b for b in python_blocks(ROOT / "docs" / "quickstart.md") if "tiny_model(" in b)
    namespace = {}
    exec(compile(block, "quickstart.md", "exec"), namespace)
    assert namespace["handle"].last.n_kept == [4] and namespace["handle"].last.n_visual == [64]
    assert "[64] [4]" in capsys.readouterr().out and vtr.handle_of(namespace["model"]) is None


def test_quickstart_streaming_runs_as_written_and_a_batch_streams():
    blocks = python_blocks(ROOT / "docs" / "quickstart.md")
    tiny = next(b for b in blocks if "tiny_model(" in b)
    stream = next(b for b in blocks if "BaseStreamer" in b)
    namespace = {}
    exec(compile(tiny + "\n" + stream, "quickstart.md", "exec"), namespace)
    steps = namespace["streamer"].steps
    assert len(steps) == 1 + 4 and len(steps[0][0]) == namespace["inputs"]["input_ids"].shape[1]

    # a batch of two prompts: TextStreamer refuses it, a BaseStreamer gets every row, the run is pruned
    model, processor = tm.build("qwen2_vl")
    processor.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt, prompt], images=[tm.random_image(64, 64), tm.random_image(48, 64, seed=1)],
                       return_tensors="pt", padding=True)
    with vtr.patch(model, "divprune", ratio=0.5) as handle:
        with pytest.raises(ValueError, match="only supports batch size 1"):
            model.generate(**inputs, max_new_tokens=2, streamer=transformers.TextStreamer(processor.tokenizer))
        streamer = namespace["Collect"]()
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, streamer=streamer)
        assert handle.last.n_kept == [32, 24]
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, plain)
    streamed = torch.tensor([step if isinstance(step[0], int) else [t[0] for t in step] for step in streamer.steps[1:]])
    assert torch.equal(streamed.T, out[:, inputs["input_ids"].shape[1]:])


@pytest.mark.video
def test_quickstart_real_checkpoint_runs_with_a_saved_model(tmp_path, monkeypatch, capsys):
    """The real-checkpoint example as written, with a tiny Qwen2.5-VL saved to disk in place of the hub id (its
    processor needs torchvision's video processors: the cpu-video install)."""
    pytest.importorskip("torchvision")
    block = next(b for b in python_blocks(ROOT / "docs" / "quickstart.md") if "from_pretrained(name" in b)
    from vtr.testing import tiny_model
    model, processor = tiny_model("qwen2_5_vl")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    tm.random_image(64, 64).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    source = block.replace('"Qwen/Qwen2.5-VL-7B-Instruct"', repr(str(tmp_path / "ckpt")))
    assert source != block
    exec(compile(source, "quickstart.md", "exec"), namespace)
    record = namespace["handle"].last
    assert record.n_kept[0] < record.n_visual[0] and not namespace["handle"].active
