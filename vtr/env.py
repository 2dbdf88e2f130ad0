"""Environment report for bug reports: what is installed, whether each part imports and works, and which
attention backends and kernels vtr can use here.

    python -m vtr.env            # paste the output into the bug report
    python -m vtr.env --json     # the same as JSON

Every check runs something small: torchvision's nms operator, a Triton kernel (in the interpreter without a GPU),
a FlashAttention call on the GPU, a PyAV round trip and a decord read of the same clip. A failure is reported with
its error, never raised. Takes a few seconds (importing torch and transformers, and Triton in a subprocess).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from . import __version__

# vtr rebuilds masks for these backends (vtr.compat.ATTENTION_BACKENDS); kept here so that --help imports no torch.
ATTENTION_BACKENDS = ("eager", "sdpa", "flash_attention_2")

_TRITON_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)
device = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.arange(8.0, device=device); out = torch.empty_like(x)
add[(1,)](x, x, out, 8, BLOCK=8)
assert torch.equal(out, 2 * x), out
"""


@dataclass
class Check:
    """One line of the report. ok: True (imports and works), False (broken, or a required part missing), None
    (optional and not installed, or it imports but the working check needs hardware this machine lacks)."""

    name: str
    version: str | None
    ok: bool | None
    detail: str


def _import(name: str):
    return importlib.import_module(name)


def _version(module, distribution: str | None = None) -> str:
    if hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return importlib.metadata.version(distribution or module.__name__)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _missing(name: str, hint: str) -> Check:
    return Check(name, None, None, f"not installed ({hint})")


def check_torch() -> Check:
    try:
        torch = _import("torch")
    except ImportError as error:
        return Check("torch", None, False, f"import fails: {_error(error)}")
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    if torch.cuda.is_available():
        devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        cuda = f"CUDA available: {devices}"
    else:
        cuda = "CUDA not available"
    try:
        torch.ones(2, 2) @ torch.ones(2, 2)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return Check("torch", _version(torch), False, f"matmul fails: {_error(error)}")
    return Check("torch", _version(torch), True, f"{build}; {cuda}; {torch.get_num_threads()} CPU threads")


def check_transformers() -> Check:
    try:
        transformers = _import("transformers")
    except ImportError as error:
        return Check("transformers", None, False, f"import fails: {_error(error)}")
    from packaging.version import Version
    version = Version(transformers.__version__)
    supported = Version("5.17.0") <= version <= Version("5.23.99")
    try:
        # Model classes load lazily; a broken torchvision surfaces here as "Could not import module ...".
        transformers.LlavaForConditionalGeneration
        transformers.Qwen2VLForConditionalGeneration
    except Exception as error:  # noqa: BLE001
        hint = " (a torchvision that does not load beside this torch breaks them: see its line)" \
            if importlib.util.find_spec("torchvision") else ""
        return Check("transformers", str(version), False, f"model classes fail to import: {_error(error)}{hint}")
    range_note = "within vtr's tested range 5.17-5.23" if supported else "OUTSIDE vtr's tested range 5.17-5.23"
    return Check("transformers", str(version), supported, f"model classes import; {range_note}")


def check_torchvision() -> Check:
    try:
        torchvision = _import("torchvision")
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "torchvision":
            return _missing("torchvision", "transformers' video processors are unavailable, so AutoProcessor of "
                                           "real Qwen-VL checkpoints fails; see the README's install lines")
        return Check("torchvision", None, False, f"import fails: {_error(error)}")
    except Exception as error:  # noqa: BLE001 - e.g. RuntimeError: operator torchvision::nms does not exist
        return Check("torchvision", None, False, f"import fails: {_error(error)} (it does not match the "
                                                 "installed torch; see the README's install lines)")
    try:
        torch = _import("torch")
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
        kept = torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5)
        assert kept.tolist() == [0], kept
    except Exception as error:  # noqa: BLE001
        return Check("torchvision", _version(torchvision), False, f"nms operator fails: {_error(error)}")
    return Check("torchvision", _version(torchvision), True, "nms operator runs")


def check_triton(cuda: bool) -> Check:
    try:
        triton = _import("triton")
    except ImportError:
        return _missing("triton", "vtr uses its PyTorch kernels")
    except Exception as error:  # noqa: BLE001
        return Check("triton", None, False, f"import fails: {_error(error)}")
    env = dict(os.environ)
    if not cuda:
        env["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated, hence the fresh process
    where = "on the GPU" if cuda else "in the interpreter (TRITON_INTERPRET=1; no GPU)"
    try:
        probe = subprocess.run([sys.executable, "-c", _TRITON_PROBE], env=env, capture_output=True, text=True,
                               timeout=120)
    except subprocess.TimeoutExpired:
        return Check("triton", _version(triton), False, f"a test kernel did not finish {where} within 120 s")
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return Check("triton", _version(triton), False, f"a test kernel fails {where}: {last}")
    use = "vtr's fused kernels run on CUDA tensors" if cuda else "vtr uses its PyTorch kernels on CPU tensors"
    return Check("triton", _version(triton), True, f"a test kernel runs {where}; {use}")


def check_flash_attn(cuda: bool) -> Check:
    try:
        flash_attn = _import("flash_attn")
    except ImportError:
        return _missing("flash-attn", "attn_implementation='flash_attention_2' is unavailable")
    except Exception as error:  # noqa: BLE001
        return Check("flash-attn", None, False, f"import fails: {_error(error)}")
    if not cuda:
        return Check("flash-attn", _version(flash_attn), None, "imports; running it needs a CUDA GPU (not checked)")
    try:
        torch = _import("torch")
        q = torch.randn(1, 4, 2, 64, device="cuda", dtype=torch.float16)
        flash_attn.flash_attn_func(q, q, q, causal=True)
    except Exception as error:  # noqa: BLE001
        return Check("flash-attn", _version(flash_attn), False, f"a test call fails: {_error(error)}")
    return Check("flash-attn", _version(flash_attn), True, "a test call runs on the GPU")


def _write_clip(path: str) -> None:
    import av
    import numpy as np
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 60 * i, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def check_av(clip: str) -> Check:
    try:
        av = _import("av")
    except ImportError:
        return _missing("av", "PyAV video decoding is unavailable")
    try:
        _write_clip(clip)
        with av.open(clip) as container:
            frames = sum(1 for _ in container.decode(video=0))
        assert frames == 4, frames
    except Exception as error:  # noqa: BLE001
        return Check("av", _version(av), False, f"encode/decode fails: {_error(error)}")
    return Check("av", _version(av), True, "encodes and decodes a 4-frame clip")


def check_decord(clip: str | None) -> Check:
    try:
        decord = _import("decord")
    except ImportError:
        return _missing("decord", "load_video(backend='decord') and lmms-eval's Qwen/LLaVA wrappers need it")
    except Exception as error:  # noqa: BLE001
        return Check("decord", None, False, f"import fails: {_error(error)}")
    if clip is None:
        return Check("decord", _version(decord), None, "imports; reading a clip needs av to write one (not checked)")
    try:
        frames = len(decord.VideoReader(clip))
        assert frames == 4, frames
    except Exception as error:  # noqa: BLE001
        return Check("decord", _version(decord), False, f"reading a clip fails: {_error(error)}")
    return Check("decord", _version(decord), True, "reads a 4-frame clip")


def check_optional(name: str, module: str) -> Check:
    try:
        return Check(name, _version(_import(module), name), True, "imports")
    except ImportError:
        return Check(name, None, None, "not installed (optional)")
    except Exception as error:  # noqa: BLE001
        return Check(name, None, False, f"import fails: {_error(error)}")


def attention_backends(checks: dict[str, Check], cuda: bool) -> dict[str, str]:
    """vtr's attention backends and whether each is usable here, with the reason when not."""
    usable = {"eager": "usable", "sdpa": "usable"}
    if not checks["torch"].ok:
        return {name: "no (torch does not work)" for name in ATTENTION_BACKENDS}
    if checks["transformers"].ok is False and "model classes" in checks["transformers"].detail:
        return {name: "no (transformers' model classes do not import)" for name in ATTENTION_BACKENDS}
    flash = checks["flash-attn"]
    if not cuda:
        usable["flash_attention_2"] = "no (needs a CUDA GPU)"
    elif flash.ok:
        usable["flash_attention_2"] = "usable"
    else:
        usable["flash_attention_2"] = f"no (flash-attn: {flash.detail})"
    return usable


def report() -> dict:
    """Every check, as ``{"checks": [Check as dict...], "attention": {backend: status}, "environment": {...}}``."""
    checks = {"torch": check_torch()}
    cuda = False
    if checks["torch"].ok:
        cuda = bool(_import("torch").cuda.is_available())
    checks["transformers"] = check_transformers()  # before torchvision: a broken one fails transformers' imports
    checks["torchvision"] = check_torchvision()
    checks["triton"] = check_triton(cuda)
    checks["flash-attn"] = check_flash_attn(cuda)
    with tempfile.TemporaryDirectory() as tmp:
        clip = os.path.join(tmp, "clip.mp4")
        checks["av"] = check_av(clip)
        checks["decord"] = check_decord(clip if checks["av"].ok else None)
    for name, module in (("pillow", "PIL"), ("numpy", "numpy"), ("lmms-eval", "lmms_eval")):
        checks[name] = check_optional(name, module)
    environment = {"python": f"{platform.python_version()} ({platform.python_implementation()})",
                   "platform": platform.platform(), "vtr": f"{__version__} ({os.path.dirname(__file__)})"}
    environment.update({k: os.environ[k] for k in ("VTR_KERNELS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
                        if k in os.environ})
    return {"environment": environment, "checks": [asdict(c) for c in checks.values()],
            "attention": attention_backends(checks, cuda)}


def format_report(data: dict) -> str:
    lines = ["vtr environment report (paste it into bug reports)"]
    lines += [f"{key:<14} {value}" for key, value in data["environment"].items()]
    mark = {True: "ok", False: "FAIL", None: "--"}
    for check in data["checks"]:
        lines.append(f"{check['name']:<14} {check['version'] or '-':<16} {mark[check['ok']]:<5} {check['detail']}")
    lines.append("attention      " + "; ".join(f"{k}: {v}" for k, v in data["attention"].items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vtr.env", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text (default: text)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    data = report()
    print(json.dumps(data, indent=1) if args.json else format_report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
