from setuptools import find_packages, setup

setup(
    name="vtr",
    version="0.1.0",
    description="Training-free visual-token reduction for Hugging Face vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vtr", "vtr.*"]),
    package_data={"vtr": ["bench/configs/*.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "transformers>=5.17,<5.24", "packaging"],
    extras_require={
        # The CPU build of torch on the development machines; put it in the same install command as the rest.
        "cpu": ["torch==2.13.0"],
        "test": ["pytest>=8", "pillow", "av", "matplotlib", "tqdm"],
        "triton": ["triton>=3.6"],
        "video": ["torchvision", "av"],
        "flash": ["flash-attn>=2.6"],
        "bench": ["matplotlib", "tqdm", "pillow"],
        "eval": ["lmms-eval"],
    },
    entry_points={
        "console_scripts": ["vtr-bench=vtr.bench.speed:main"],
        "lmms_eval.models": ["vtr=vtr.integrations.lmms_eval_manifest:manifests"],
    },
)
