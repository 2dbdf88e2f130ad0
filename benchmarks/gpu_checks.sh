#!/usr/bin/env bash
# GPU checks and measurements for a machine with one CUDA GPU (the workplace's device tool runs this):
# GPU tests (FlashAttention-2 when flash-attn is installed), the kernel benchmark and the speed grid on the
# shipped 7B configs with random weights. Writes results/ (commit the JSON and PNG files).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
mkdir -p "$OUT"
python -m pytest -q tests/test_gpu.py tests/test_kernels.py 2>&1 | tee "$OUT/gpu-tests.log"
python benchmarks/kernels.py --device cuda --out "$OUT/kernels-gpu.json" | tee "$OUT/kernels-gpu.txt"
for model in llava-1.5-7b qwen2-vl-7b; do
  python benchmarks/speed.py --model "$model" --methods divprune,fastv,dart,random \
      --ratios 0.667,0.778,0.889 --repeats 10 --out "$OUT" --tag "speed-$model-gpu" | tee "$OUT/speed-$model-gpu.txt"
done
