"""Real lmms-eval runs, offline: a local generation task (lmms-eval's stock POPE task pointed at a local parquet
file) and a local multiple-choice task, on tiny LLaVA-1.5, Qwen2-VL, Qwen2.5-VL and Qwen3-VL models saved to disk,
for the stock model, vtr's wrapper at ratio 0 (identical outputs) and vtr's wrapper at ratio 0.5 (kept counts
logged). Skipped where lmms-eval is not installed (`.ci/run` installs it in the video venv: ``[cpu-video,eval]``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")
evaluator = pytest.importorskip("lmms_eval.evaluator")
pytest.importorskip("torchvision")

import tiny_models as tm  # noqa: E402

pytestmark = pytest.mark.lmms_eval

TASKS = Path(__file__).with_name("lmms_tasks")
# family: (stock lmms-eval model, vtr model, extra model args the stock wrapper needs on CPU)
MODELS = {
    "llava": ("llava_hf", "vtr_llava_hf", "device_map=cpu"),
    "qwen2_vl": ("qwen2_vl", "vtr_qwen2_vl", "device_map=cpu,max_pixels=4096,min_pixels=256"),
    "qwen2_5_vl": ("qwen2_5_vl", "vtr_qwen2_5_vl", "device_map=cpu,max_pixels=4096,min_pixels=256"),
    "qwen3_vl": ("qwen3_vl", "vtr_qwen3_vl", "device_map=cpu,max_pixels=4096,min_pixels=256"),
}
SIZES = [(64, 64), (48, 80), (64, 48), (40, 64)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The task folder (the repository's multiple-choice task plus a POPE task that includes lmms-eval's own YAML)
    with both data files written as parquet."""
    import datasets
    folder = tmp_path_factory.mktemp("lmms_tasks")
    shutil.copy(TASKS / "vtr_mc.yaml", folder)
    shutil.copy(TASKS / "mc_utils.py", folder)
    (folder / "data").mkdir()
    stock_pope = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    (folder / "vtr_pope.yaml").write_text(
        f"include: {stock_pope}\ntask: vtr_pope\ndataset_path: parquet\n"
        "dataset_kwargs:\n  data_files:\n    test: data/pope.parquet\n"
        "generation_kwargs:\n  max_new_tokens: 4\n  temperature: 0\n  do_sample: false\n  num_beams: 1\n")
    images = [tm.random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image()})
    datasets.Dataset.from_dict({"question_id": [str(i) for i in range(len(images))],
                                "question": ["is there a cat in the image ?"] * len(images),
                                "answer": ["yes", "no"] * (len(images) // 2), "image": images},
                               features=features).to_parquet(folder / "data" / "pope.parquet")
    features = datasets.Features({"question": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.Value("string"), "image": datasets.Image()})
    datasets.Dataset.from_dict({"question": ["what is in this image ?"] * len(images),
                                "choices": [["cat", "dog", "red", "blue"]] * len(images),
                                "answer": ["ABCD"[i] for i in range(len(images))], "image": images},
                               features=features).to_parquet(folder / "data" / "mc.parquet")
    return folder


@pytest.fixture(scope="module")
def task_manager(tasks):
    from lmms_eval.tasks import TaskManager
    return TaskManager(include_path=str(tasks))


def saved(family: str, folder: Path) -> str:
    model, processor = tm.build(family)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def responses(model: str, model_args: str, task_manager) -> dict:
    """{task: [each document's response, in document order]} from one in-process lmms-eval evaluation."""
    out = evaluator.simple_evaluate(model=model, model_args=model_args, tasks=["vtr_pope", "vtr_mc"], batch_size=1,
                                    device="cpu", task_manager=task_manager, log_samples=True, bootstrap_iters=0)
    return {task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in out["samples"].items()}


@pytest.mark.parametrize("family", list(MODELS))
def test_lmms_eval_stock_and_vtr(family, tmp_path, task_manager, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    stock, wrapper, extra = MODELS[family]
    args = f"pretrained={saved(family, tmp_path / family)},{extra}"
    dense = responses(stock, args, task_manager)
    assert set(dense) == {"vtr_pope", "vtr_mc"} and all(len(r) == len(SIZES) for r in dense.values())
    assert responses(wrapper, f"{args},vtr_method=dart,vtr_ratio=0", task_manager) == dense

    log = tmp_path / "kept.jsonl"
    pruned = responses(wrapper, f"{args},vtr_method=divprune,vtr_ratio=0.5,vtr_log={log}", task_manager)
    assert all(len(r) == len(SIZES) for r in pruned.values())
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(entries) == 2 * len(SIZES)  # one prefill per document of each task
    for entry in entries:
        assert entry["n_kept"] == max(1, round(entry["n_visual"] * 0.5)) < entry["n_visual"]


def test_registry_resolves_chat_and_simple_classes():
    from lmms_eval.models import MODEL_REGISTRY_V2 as registry  # the built-in models and the plugins
    for wrapper, chat in [("vtr_llava_hf", "VtrLlavaHfChat"), ("vtr_qwen2_5_vl", "VtrQwen2_5_VLChat"),
                          ("vtr_qwen3_vl", "VtrQwen3VLChat"), ("vtr_qwen2_vl", "VtrQwen2VL")]:
        assert registry.resolve(wrapper).class_path == f"vtr.integrations.lmms_eval.{chat}"
        cls = registry.get_model_class(wrapper)
        stock = registry.get_model_class(wrapper[4:])
        assert issubclass(cls, stock) and cls.is_simple == stock.is_simple
    assert registry.resolve("vtr_qwen3_vl", force_simple=True).class_path == "vtr.integrations.lmms_eval.VtrQwen3VL"
    assert registry.resolve("vtr_llava_onevision").class_path.endswith("VtrLlavaHfChat")


def documented_commands() -> list[str]:
    """The shell lines of docs/evaluation.md's block marked ``<!-- run by tests/test_lmms_eval.py -->``."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "evaluation.md").read_text()
    block = text.split("<!-- run by tests/test_lmms_eval.py -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def run_shell(command: str, cwd: Path, timeout: int = 600):
    import os
    import subprocess
    import sys
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HOME=str(cwd / "hf"))
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def documented(tmp_path_factory):
    """A folder holding the repository's tests/ (the task), with docs/evaluation.md's commands but the last (the
    preparation) run there as written."""
    folder = tmp_path_factory.mktemp("documented")
    (folder / "tests").symlink_to(TASKS.parent)
    commands = documented_commands()
    assert " lmms-eval --model " in commands[-1] and "prepare.py" in commands[0]
    for command in commands[:-1]:
        run = run_shell(command, folder)
        assert run.returncode == 0, (command, run.stdout[-3000:], run.stderr[-3000:])
    return folder, commands[-1]


def test_the_documented_cpu_command_line_runs_the_local_task_offline(documented):
    """docs/evaluation.md's evaluation command, as written, with the test interpreter's bin directory first on PATH
    (the activated venv)."""
    folder, command = documented
    run = run_shell(command, folder)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert "vtr_mc" in run.stdout and "mc_accuracy" in run.stdout
    entries = [json.loads(line) for line in (folder / "kept.jsonl").read_text().splitlines()]
    assert len(entries) == 4 and all(e["n_kept"] == max(1, round(e["n_visual"] * 0.5)) for e in entries)


def test_a_failed_evaluation_exits_nonzero_under_the_lmms_eval_command(documented):
    folder, command = documented
    # lmms-eval's --device beside device=cpu in the model args, and a misspelt method
    failing = command.replace("vtr_method=divprune", "device=cpu,vtr_method=divprunee") + " --device cpu"
    run = run_shell(failing, folder)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "vtr: the evaluation failed while patching the model with vtr" in run.stderr
    assert "Did you mean 'divprune'" in run.stderr and "multiple values" not in run.stderr
