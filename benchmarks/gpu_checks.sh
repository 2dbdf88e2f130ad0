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
# Selection time and peak extra memory per method from 576 to 32768 visual tokens (7B widths), and a video grid.
python -m vtr.bench.scaling --device cuda --max-seconds 120 --prefill-sizes "" --out "$OUT/scaling-gpu" \
    | tee "$OUT/scaling-gpu.txt"
python benchmarks/speed.py --model qwen2-vl-7b --video 16x256 --methods divprune,fastv,dart --ratios 0.889 \
    --repeats 10 --out "$OUT" --tag "speed-qwen2-vl-7b-video-gpu" | tee "$OUT/speed-qwen2-vl-7b-video-gpu.txt"
