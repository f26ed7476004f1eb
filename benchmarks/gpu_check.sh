#!/usr/bin/env bash
# One GPU session, prepared: the cuda-marked tests, then the GPU step benchmark at
# configs G and L. Everything lands in $OUT (default ./gpu-out). Run from the repository
# root with the package importable (PYTHONPATH=src or an install).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.txt"
timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -s -rfE -m cuda -p no:cacheprovider \
    tests/test_cuda.py 2>&1 | grep -v "it/s\]" > "$OUT/cuda_tests.log"
tail -5 "$OUT/cuda_tests.log"
grep MEASURED "$OUT/cuda_tests.log"
timeout "${BENCH_TIMEOUT:-150}" python benchmarks/gpu_step.py --configs G --breakdown --end-to-end \
    --json "$OUT/gpu_step_G.json" 2>&1 | tee "$OUT/gpu_step_G.log"
timeout "${BENCH_TIMEOUT:-150}" python benchmarks/gpu_step.py --configs L --breakdown \
    --json "$OUT/gpu_step_L.json" 2>&1 | tee "$OUT/gpu_step_L.log"
timeout "${BENCH_TIMEOUT:-150}" python benchmarks/harvest.py --device cuda --dtype bfloat16 \
    --no-rss --layers 8 --d-model 1536 --tokens 262144 --context 512 --batch 32 --profile \
    2> "$OUT/harvest_profile.txt" | tee "$OUT/harvest_gpu.log"
