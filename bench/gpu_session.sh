#!/usr/bin/env bash
# Everything that needs a GPU, in one call (device time is scarce): the GPU-only tests, then every
# kernel benchmark at the Nemotron shapes, then the end-to-end model. Results land in
# bench/results/<device>/; the log shows the tables. Run from anywhere: bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python -m pytest -m gpu -q -p no:cacheprovider --benchmark-disable 2>&1 | tail -40
python -m bench nvfp4_quantize nvfp4_quantize_rht nvfp4_dequantize nvfp4_linear nvfp4_row_col_quantize nvfp4_training_linear \
    ssd_scan selective_state_update moe_experts
python -m bench.model --preset super-120b-a12b --recipe nvfp4 --impls kernels --backends eager,nemotron --regional \
    --prefill 1024,8192 --contexts 1024,32768,131072,524288 --kv-fp8
