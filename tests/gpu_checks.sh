#!/usr/bin/env bash
# GPU checks of the attention kernels, one run of under ten minutes on a CUDA machine (never part of CI):
#   1. the flash-attention tests natively: the resident-rows kernel compiled by Triton against the reference
#      (every mask kind and length, float32 and bfloat16, values and gradients, block skipping);
#   2. `bench attention` forward + backward for pallas (Triton), cudnn and xla in bfloat16 at 1k-16k tokens,
#      causal and prefix-LM (cuDNN has no prefix-LM mask, so that row set has pallas and xla only).
# Needs a Python with jax[cuda], flax, optax, ml_collections and pytest; results go to $OUT (default gpu_out/).
#     bash tests/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import jax; print(jax.__version__, jax.devices())"; } \
  2>&1 | tee "$OUT/gpu.txt"

timeout 330 python -m pytest -q -p no:cacheprovider tests/test_flash_attention.py \
  -k "matches_reference or cross_attention or (padding_are_never_loaded and resident) or dispatch" 2>&1 \
  | tee "$OUT/flash_tests.log"
tests_status=${PIPESTATUS[0]}

for mask in causal prefix; do
  timeout 120 python -m vlm_jax.bench attention --lengths=1024,4096,16384 --mask=$mask --dtype=bfloat16 2>&1 \
    | tee -a "$OUT/bench_attention.jsonl"
done
exit "$tests_status"
