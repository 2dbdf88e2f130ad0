"""The documentation pages that the code defines: one page per registered method (from its dataclass: options with
their type, default, range and docstring; where it prunes, resolved by the method itself; its class docstring with
the keep-count rule, the official code and the deviation list), the methods overview and the support matrix of
models x methods (from each method's ``model_classes`` and ``visual_kinds``).

``docs/hooks.py`` adds these pages to the site at build time (``mkdocs build``); ``tests/test_docs.py`` checks the
matrix against what ``vtr.patch`` accepts. Nothing here imports MkDocs.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap

# Reference shapes for "where it prunes": a model of each family at its released depth (decoder layers), and the
# vision tower's depth and feature layer (CLIP ViT-L/14-336 reads layer 22 of 24; Qwen2-VL's 32 blocks, the last).
REFERENCE = {
    "llava": ("LLaVA-1.5-7B", 32, (24, 22)),
    "llava_next": ("LLaVA-NeXT-7B", 32, (24, 22)),
    "llava_onevision": ("LLaVA-OneVision-7B", 28, (26, 25)),
    "qwen2_vl": ("Qwen2-VL-7B", 28, (32, 31)),
    "qwen3_vl": ("Qwen3-VL-8B", 36, (27, 26)),
}
# Model class -> (name in the docs, vtr.testing's tiny family that builds it).
MODELS = {
    "LlavaForConditionalGeneration": ("LLaVA-1.5", "llava"),
    "LlavaNextForConditionalGeneration": ("LLaVA-NeXT", "llava_next"),
    "LlavaOnevisionForConditionalGeneration": ("LLaVA-OneVision", "llava_onevision"),
    "Qwen2VLForConditionalGeneration": ("Qwen2-VL", "qwen2_vl"),
    "Qwen2_5_VLForConditionalGeneration": ("Qwen2.5-VL", "qwen2_5_vl"),
    "Qwen3VLForConditionalGeneration": ("Qwen3-VL", "qwen3_vl"),
    "Qwen3VLMoeForConditionalGeneration": ("Qwen3-VL-MoE", "qwen3_vl_moe"),
    "InternVLForConditionalGeneration": ("InternVL 3 / 3.5", "internvl"),
    "Gemma3ForConditionalGeneration": ("Gemma 3", "gemma3"),
    "Qwen3_5ForConditionalGeneration": ("Qwen3.5", "qwen3_5"),
    "Qwen3_5MoeForConditionalGeneration": ("Qwen3.5-MoE", "qwen3_5_moe"),
    "Glm4vForConditionalGeneration": ("GLM-4.1V", "glm4v"),
    "Glm4vMoeForConditionalGeneration": ("GLM-4.5V", "glm4v_moe"),
}
# Methods whose stage needs what a decoder layer type of the model cannot give (``vtr.patch`` refuses them there,
# naming the layer): a KV cache cut to the kept tokens in the layers before the stage (a sliding window of keys or a
# recurrent state cannot be), or attention weights / per-token cache entries of a linear-attention layer.
LAYER_REFUSED = {
    ("prunevid", "Gemma3ForConditionalGeneration"): "cuts the earlier layers' caches (sliding windows)",
    ("prunevid", "Qwen3_5ForConditionalGeneration"): "cuts the earlier layers' caches (recurrent states)",
    ("prunevid", "Qwen3_5MoeForConditionalGeneration"): "cuts the earlier layers' caches (recurrent states)",
    ("dycoke", "Qwen3_5ForConditionalGeneration"): "hides cache entries a recurrent layer does not have",
    ("dycoke", "Qwen3_5MoeForConditionalGeneration"): "hides cache entries a recurrent layer does not have",
    ("framefusion", "Qwen3_5ForConditionalGeneration"): "needs the attention of a linear-attention layer",
    ("framefusion", "Qwen3_5MoeForConditionalGeneration"): "needs the attention of a linear-attention layer",
}
REFERENCE_RATIO = 0.778
STAGE_TEXT = {"pre_llm": "before the language model (between the projector and decoder layer 0)",
              "vision": "inside the vision tower", "layer": "inside the language model"}
NEEDS_TEXT = {"attention_inputs": "the inputs of decoder layer K-1's self-attention (attention rows, keys)",
              "layer_inputs": "the stage layer's own input norm and projections",
              "vision": "the vision tower's attention and hidden states",
              "clip_text": "a CLIP text tower and the language model's tokenizer (loaded at patch time)"}


def registry() -> dict:
    from vtr.methods import REGISTRY
    return dict(sorted(REGISTRY.items()))


def model_classes() -> list[str]:
    from vtr.patches import supported_model_classes
    return supported_model_classes()


def video_model_classes() -> set[str]:
    from vtr.testing import VIDEO_FAMILIES
    return {cls for cls, (_, family) in MODELS.items() if family in VIDEO_FAMILIES}


def cell(method_cls, model_class: str) -> str:
    """``"✓"`` (images and videos the model takes), ``"images"`` (the method prunes images only, the model also
    takes videos), ``"videos"`` (the method prunes videos only and leaves images whole) or ``"-"`` (``vtr.patch``
    refuses the model)."""
    if not method_cls(ratio=0.5).supports(model_class) or (method_cls.name, model_class) in LAYER_REFUSED:
        return "-"
    if model_class in video_model_classes() and "video" not in method_cls.visual_kinds:
        return "images"
    if "image" not in method_cls.visual_kinds:
        return "videos"
    return "✓"


def support_matrix() -> dict[str, dict[str, str]]:
    """{model class: {method: cell}} for every supported model class and registered method."""
    return {model: {name: cell(cls, model) for name, cls in registry().items()} for model in model_classes()}


def support_matrix_md() -> str:
    methods = list(registry())
    head = "| model | inputs | " + " | ".join(f"[`{m}`](methods/{m}.md)" for m in methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]
    videos = video_model_classes()
    for model, cells in support_matrix().items():
        label = f"{MODELS[model][0]} (`{model}`)"
        inputs = "images, videos" if model in videos else "images"
        lines.append(f"| {label} | {inputs} | " + " | ".join(cells[m] for m in methods) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- options
def _attribute_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string right after a field) of ``cls`` and its bases, read from the source."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def options(cls) -> list[dict]:
    """Every option of a method class: name, type, default, range and meaning (its attribute docstring), the
    method's own options first, then the ones every method has."""
    from vtr.methods import Method
    docs = _attribute_docs(cls)
    base = {f.name for f in dataclasses.fields(Method)}
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        low, high = f.metadata.get("min"), f.metadata.get("max")
        bounds = "-" if low is None and high is None else f">= {low}" if high is None else \
            f"<= {high}" if low is None else f"[{low}, {high}]"
        if f.name == "ratio":
            bounds = "[0, 1)"
        elif f.name == "keep":
            bounds = ">= 1"
        elif f.name == cls.layer_option and f.name in ("layer", "inner_layer", "llm_layer") and low is None:
            bounds = "[1, decoder layers - 1], checked at patch time"
        rows.append({"name": f.name, "type": str(f.type), "default": repr(default), "range": bounds,
                     "meaning": docs.get(f.name, ""), "common": f.name in base})
    return sorted(rows, key=lambda r: r["common"])


def _options_md(cls) -> str:
    lines = ["| option | type | default | range | meaning |", "|---|---|---|---|---|"]
    for row in options(cls):
        meaning = row["meaning"].replace("|", "\\|")
        name = f"`{row['name']}`" + (" (every method)" if row["common"] else "")
        lines.append(f"| {name} | `{row['type']}` | `{row['default']}` | {row['range']} | {meaning} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- where it prunes
def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, k in enumerate(layers):
        if start is None:
            start = k
        if i + 1 == len(layers) or layers[i + 1] != k + 1:
            out.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(out)


def where(cls) -> list[str]:
    """One line per reference model the method supports: its stages as the method resolves them there."""
    from vtr.patches import FAMILIES
    lines = []
    for family in FAMILIES:
        if family.name not in REFERENCE or not any(cls(ratio=0.5).supports(c) for c in family.model_classes):
            continue
        label, depth, (vision_depth, feature) = REFERENCE[family.name]
        method = cls(ratio=REFERENCE_RATIO).for_model(family).for_depth(depth)
        parts = []
        specs = method.stages()
        pre = [s for s in specs if s.stage.value != "layer"]
        for spec in pre:
            text = STAGE_TEXT[spec.stage.value]
            if spec.stage.value == "vision":
                layers = _ranges(list(method.vision_stage_layers(vision_depth, feature)))
                where_ = "inside vision layers {}, between attention and MLP," if cls.vision_merge_point == "attention" \
                    else "after vision layers {}"
                text += f" (its step runs {where_.format(layers)} of {vision_depth}, 0-based)"
            parts.append(text)
        layer = [s for s in specs if s.stage.value == "layer"]
        post = [s.layer for s in layer if s.post_attention]
        plain = [s.layer for s in layer if not s.post_attention]
        if plain:
            starts = {s.slice_from for s in layer if s.slice_earlier}
            cut = "" if not starts else " (also cutting the earlier layers' KV caches)" if starts == {0} else \
                f" (also cutting the KV caches of layers {min(starts)} on to the kept tokens)"
            parts.append(f"before decoder layer{'s' if len(plain) > 1 else ''} {_ranges(plain)}{cut}")
        if post:
            parts.append(f"inside decoder layers {_ranges([k - 1 for k in post])}, after their attention")
        decode = method.decode_stage()
        if decode is not None:
            parts.append(f"at every decoding step: layers >= {decode.layer} attend to a chosen subset of the "
                         f"visual cache")
        lines.append(f"{label} ({depth} decoder layers): {'; '.join(parts)}; positions `{method.positions}`")
    return lines


def official_code(cls) -> str:
    doc = " ".join((cls.__doc__ or "").split())
    match = re.search(r"Official code:\s*``([\w.-]+/[\w.-]+)``", doc) or \
        re.search(r"github\.com/([\w.-]+/[\w-]+)", doc) or re.search(r"``([A-Za-z0-9-]+/[A-Za-z0-9_.-]+)``", doc)
    if match and not match.group(1).endswith(".py"):
        return f"[`{match.group(1)}`](https://github.com/{match.group(1)})"
    return "none (a baseline)"


def docstring_md(cls) -> str:
    """The class docstring as Markdown: a blank line before each list, so that bullets render as a list."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    out = []
    for line in lines:
        bullet = re.match(r"\s*[*-] ", line)
        if bullet and out and out[-1].strip() and not re.match(r"\s*[*-] |\s{3,}\S", out[-1]):
            out.append("")
        out.append(line.lstrip() if bullet else line)
    return "\n".join(out).replace("<", "&lt;") + "\n"


def method_page(name: str) -> str:
    cls = registry()[name]
    supported = [f"{label}" + (f" ({c})" if c in ("images", "videos") else "")
                 for model, (label, _) in MODELS.items() if (c := cell(cls, model)) != "-"]
    kinds = " and ".join({"image": "images", "video": "videos"}[k] for k in cls.visual_kinds)
    needs = ", ".join(NEEDS_TEXT.get(n, n) for n in sorted(cls(ratio=0.5).needs)) or "the visual tokens' embeddings"
    facts = [
        ("name", f"`{name}`: `vtr.patch(model, \"{name}\", ratio=...)` or `vtr.{cls.__name__}(ratio=...)(model)`"),
        ("summary", cls.summary),
        ("official code", official_code(cls)),
        ("prunes", kinds),
        ("supported models", ", ".join(supported)),
        ("reads", needs),
        ("whole prompt in one prefill", "yes (reads the prompt's text; chunked prefill is refused)"
         if cls.needs_whole_prompt else "no"),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in facts) + "\n"
    where_lines = "\n".join(f"- {line}" for line in where(cls))
    return (f"# {cls.__name__} (`{name}`)\n\n"
            f"<!-- generated from vtr/methods by docs/generate.py: edit the method's docstrings, not this page -->\n\n"
            f"{table}\n"
            f"## Where it prunes\n\nResolved by the method for `ratio={REFERENCE_RATIO}` on each supported model "
            f"family at its released depth:\n\n{where_lines}\n\n"
            f"## Options\n\nKeyword arguments of `vtr.patch` and fields of `vtr.{cls.__name__}`; out-of-range values "
            f"and unknown options raise at patch time.\n\n{_options_md(cls)}\n"
            f"## Description, keep count and deviations\n\nThe class docstring of `vtr.{cls.__name__}`:\n\n"
            f"{docstring_md(cls)}")


def methods_index() -> str:
    lines = ["# Methods", "",
             "<!-- generated from vtr/methods by docs/generate.py -->", "",
             "Every registered method (`vtr.methods()`), with where it prunes by default and the models it supports. "
             "Each page is generated from the method's dataclass and docstrings. "
             "[Choosing a method](../choosing.md) compares them.", "",
             "| method | class | stage | prunes | models | summary |", "|---|---|---|---|---|---|"]
    for name, cls in registry().items():
        models = [MODELS[m][0] for m in model_classes() if cell(cls, m) != "-"]
        models_text = "all" if len(models) == len(MODELS) else ", ".join(models)
        kinds = ", ".join({"image": "images", "video": "videos"}[k] for k in cls.visual_kinds)
        stages = sorted({s.stage.value for s in cls(ratio=0.5).for_depth(32).stages()}, key=list(STAGE_TEXT).index)
        stage = " + ".join(stages) + (" + kv_cache" if cls(ratio=0.5).for_depth(32).decode_stage() else "")
        lines.append(f"| [`{name}`]({name}.md) | `vtr.{cls.__name__}` | {stage} | {kinds} | {models_text} | "
                     f"{cls.summary} |")
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """Every generated page: {path under docs/: Markdown}."""
    out = {"methods/index.md": methods_index()}
    out.update({f"methods/{name}.md": method_page(name) for name in registry()})
    return out


def vllm_cell(method_cls, model_class: str) -> str:
    """What the vLLM plugin serves of one method on one model class: ``"refused"`` (no serving engine can run the
    method as configured by default: ``vtr.serving.servable_reason``), ``"-"`` (``vtr.patch`` refuses the model
    too), or the inputs it prunes (``"images"``, ``"images, videos"``), with the option the method needs there
    (``vtr.serving.serving_options``: the one that turns off its stage inside the language model, or VidCom2's
    ``variant="vllm"``, whose count follows from the grid; on a 1-D-RoPE model,
    ``positions="compact"`` where its default keeps gaps, which vLLM's consecutive numbering cannot give)."""
    from vtr.methods import Method
    from vtr.patches import FAMILIES
    from vtr.serving import COUNT_REASONS, servable_reason, served_kinds, serving_options
    name, options = method_cls.name, {}
    if servable_reason(method_cls(ratio=0.5)) is not None:
        options = serving_options(name)
        if not options or servable_reason(method_cls(ratio=0.5, **options)) is not None:
            return "refused"
    method = method_cls(ratio=0.5, **options)
    if not method.supports(model_class):
        return "-"
    family = next(f for f in FAMILIES if model_class in f.model_classes)
    if not family.mrope and method.for_model(family).positions != "compact":
        options["positions"] = "compact"
    kinds = [k for k in served_kinds(method) if k == "image" or model_class in video_model_classes()]
    # a video's keep count sized from its grid within a limit (marked ¹, explained on the page)
    limited = type(method).budget_for is not Method.budget_for and name in COUNT_REASONS
    text = ", ".join(k + "s" + ("¹" if k == "video" and limited else "") for k in kinds)
    if options:
        text += " (" + ", ".join(f"`{k}={v!r}`".replace("'", '"') for k, v in options.items()) + ")"
    return text


def vllm_matrix() -> dict[str, dict[str, str]]:
    """{model class: {method: cell}} in vLLM: the plugin's architectures (``vtr.integrations.vllm.PRUNED``) x
    every registered method (``vllm_cell``)."""
    from vtr.integrations.vllm import PRUNED
    return {model: {name: vllm_cell(cls, model) for name, cls in registry().items()} for model in PRUNED}


def vllm_matrix_md() -> str:
    """The matrix, one row per group of methods served alike, served methods first."""
    matrix = vllm_matrix()
    models = list(matrix)
    rows: dict[tuple, list[str]] = {}
    for name in registry():
        rows.setdefault(tuple(matrix[m][name] for m in models), []).append(name)
    lines = ["| method | " + " | ".join(MODELS[m][0] for m in models) + " |", "|---|" + "---|" * len(models)]
    for cells, names in sorted(rows.items(), key=lambda item: all(c == "refused" for c in item[0])):
        label = ", ".join(f"[`{n}`](methods/{n}.md)" for n in names)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def support_short_md() -> str:
    """The README's short support table: per model class, its inputs and which methods ``vtr.patch`` refuses or
    runs on images only (from ``support_matrix``)."""
    videos = video_model_classes()
    lines = ["| model | inputs | methods |", "|---|---|---|"]
    for model, cells in support_matrix().items():
        refused = [m for m, c in cells.items() if c == "-"]
        images = [m for m, c in cells.items() if c == "images"]
        videos_only = [m for m, c in cells.items() if c == "videos"]
        text = f"all {len(cells)}" if not refused else f"all but {', '.join(refused)}"
        notes = ([f"{', '.join(images)}: images only"] if images else []) + \
            ([f"{', '.join(videos_only)}: videos only"] if videos_only else [])
        if notes:
            text += f" ({'; '.join(notes)})"
        label = MODELS[model][0]
        lines.append(f"| {label} | {'images, videos' if model in videos else 'images'} | {text} |")
    return "\n".join(lines) + "\n"
