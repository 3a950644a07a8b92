#!/usr/bin/env bash
# Issue 15's GPU rows in one command (about 10 minutes on one H100/H200):
#   bash bench/gpu_check.sh [OUT_DIR]
# Train-step MFU (imagenet256, bf16) and decode images/s (batch 32/64, T = 8/12, plain and ReCAP K=2),
# each with attention=auto (cuDNN on a GPU) beside attention=xla, written as JSON rows to OUT_DIR.
# Needs a CUDA jaxlib: pip install -e . 'jax[cuda12]==0.10.2'.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/gpu}"
mkdir -p "$out"
python -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', f'no GPU: {d}'; print(d.device_kind)"
for attention in auto xla; do
  python bench/train_step.py --config=imagenet256 --batch=64 --steps=10 --dtype=bfloat16 \
    --tokenizer_config=debug --config.transformer.attention=$attention \
    --out="$out/train_step-imagenet256-$attention.json" --note="gpu_check attention=$attention"
  python bench/decode.py --config=imagenet256 --batch=32,64 --steps=8,12 --methods=plain,recap \
    --recap_cheap_per_full=2 --repeats=3 --matmul_n=8192 --config.transformer.dtype=bfloat16 \
    --config.transformer.attention=$attention \
    --out="$out/decode-imagenet256-$attention.json" --note="gpu_check attention=$attention"
done
echo "rows in $out"
