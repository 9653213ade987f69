#!/usr/bin/env bash
# The MoE layer benchmark (issue 8 table: dense FFN vs capacity vs dropless at E=8/32/64, top-2)
# on the lent H200, for the `device` tool. The device image has jax/flax/optax but not gin-config,
# so carry its wheel (pure Python). Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl gin-config==0.5.0
# then run (device tool): command "bash benchmarks/h200_moe.sh", carry [".whl"], timeout_s 420.
# Results land in $OUT/h200_moe_{float32,bfloat16}.json; record them in benchmarks/RESULTS.md.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for dtype in bfloat16 float32; do
  timeout 180 python3 benchmarks/moe_layer.py --experts 8,32,64 --tokens 32768 --repeats 10 \
    --dtype "$dtype" --peak-n 8192 \
    --dispatch gather,einsum,dropless:ragged_dot,dropless:blocked,adaptive:ragged_dot \
    | tee "$OUT/h200_moe_$dtype.json"
done
