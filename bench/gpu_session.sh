#!/usr/bin/env bash
# Everything that needs a GPU, in stages sized to a 15-minute GPU budget (machine start included, at
# most 10 minutes per command): each stage is one call of at most 6 minutes, every step under
# `timeout`, ordered by value.
#
#   bash bench/gpu_session.sh 1     # install, the -m gpu correctness tests, the NVFP4 GEMM bench (trimmed shapes)
#   bash bench/gpu_session.sh 2     # the SSD, state-update, MoE and decode-attention benches (trimmed shapes)
#   bash bench/gpu_session.sh 3     # the end-to-end Super model (one prefill length, contexts 1K and 512K),
#                                   # then MTP generation on the shipped model (batch 1 and 8, eager and compiled)
#   bash bench/gpu_session.sh all   # 1, 2 and 3 in one call (about 17 minutes)
#
# Results land in bench/results/<device>/ and each step's log in bench/results/logs/; after every step
# both are copied into $NEMOTRON_RESULTS_DIR when it is set, so a call cut off still returns what it
# measured. A failing step does not stop the next one; the exit status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOGS=bench/results/logs
mkdir -p "$LOGS"
status=0

collect() {
    if [ -n "${NEMOTRON_RESULTS_DIR:-}" ]; then
        mkdir -p "$NEMOTRON_RESULTS_DIR"
        cp -r bench/results/. "$NEMOTRON_RESULTS_DIR"/ 2>/dev/null || true
    fi
}

# step NAME SECONDS COMMAND...: run under timeout, log to $LOGS/NAME.log, then collect
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOGS/$name.log"
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
    collect
    return 0
}

stage1() {
    # the torch_dynamo_backends entry point; no build isolation: the GPU machine may have no network
    step install 90 python -m pip install --no-deps --no-build-isolation -q -e .
    step gpu_info 15 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
    step pytest_gpu 150 python -m pytest -m gpu -q -p no:cacheprovider --benchmark-disable --maxfail=10
    step bench_gemm 100 python -m bench nvfp4_linear --shapes trimmed
}

stage2() {
    step bench_ssm 150 python -m bench ssd_scan selective_state_update --shapes trimmed
    step bench_moe 150 python -m bench moe_experts --shapes trimmed
    step bench_attention 60 python -m bench decode_attention --shapes trimmed
}

stage3() {
    step bench_model 330 python -m bench.model --preset super-120b-a12b --recipe nvfp4 --impls kernels \
        --backends eager,nemotron --regional --prefill 1024 --contexts 1024,524288 --steps 10 --kv-fp8
    step bench_mtp 120 python -m bench.model --mtp 0,1,3 --batch 1,8 --backends eager,nemotron --reps 3
}

case "${1:-}" in
    1) stage1 ;;
    2) stage2 ;;
    3) stage3 ;;
    all) stage1; stage2; stage3 ;;
    *) echo "usage: bash bench/gpu_session.sh 1|2|3|all" >&2; exit 2 ;;
esac
exit "$status"
