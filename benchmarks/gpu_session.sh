#!/usr/bin/env bash
# The GPU half of benchmarks/RESULTS.md, in parts that each fit one device call (10 minutes a command, 30 minutes
# of device time a session, machine starts included: about three parts a session). The GPU image has torch, triton
# and transformers but neither diffusers nor torchao, so their wheels travel with the working tree.
#
# Here, once (needs PyPI):           bash benchmarks/gpu_session.sh wheels
# On the device, one call per part, every part with carry [".whl"]:
#                                    bash benchmarks/gpu_session.sh tests      (GPU tests, fused kernels)
#                                    bash benchmarks/gpu_session.sh step       (t2v step, t2i, MoT layer)
#                                    bash benchmarks/gpu_session.sh e2e        (distilled t2v, Edge policy, memory)
#                                    bash benchmarks/gpu_session.sh i2v
#                                    bash benchmarks/gpu_session.sh stepcache  (step caches, Nano 480p t2v)
# Each part writes one log per command under $OUT (the device tool brings it back; ./gpu-logs elsewhere) and ends
# with a line per command: its name and exit status; the part exits nonzero if any command failed. A command over
# its time limit is stopped and the part goes on; the limits of a part add up to less than a call's 600 s.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-}"
out="${OUT:-gpu-logs}"
summary=()
failed=0

wheels() {
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl diffusers==0.42.1 torchao==0.18.0
    ls -l .whl
}

setup() {
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheels missing: run 'bash benchmarks/gpu_session.sh wheels' here and carry .whl"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)"
    } 2>&1 | tee "$out/machine.txt"
}

# run NAME SECONDS COMMAND...: one command, its log in $OUT/NAME.log
run() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    summary+=("$name exit $rc$([ $rc = 124 ] && echo ' (time limit)')")
    [ $rc = 0 ] || failed=1
}

full="--device cuda --dtype bfloat16 --size full"

case "$part" in
    wheels) wheels; exit ;;
    tests)
        setup
        run pytest 360 python3 -m pytest -o addopts= -q -rfs --maxfail=10 tests/test_gpu.py tests/kernels tests/test_optimize.py
        run fused_kernels 100 python3 benchmarks/fused_kernels.py --device cuda --dtype bfloat16
        ;;
    step)
        setup
        run t2v_step 240 python3 benchmarks/workloads.py t2v-step $full --compile --fused-kernels
        run t2i 150 python3 benchmarks/workloads.py t2i $full --compile --fused-kernels
        run mot_layer 100 python3 benchmarks/mot_layer.py --device cuda --dtype bfloat16 --size nano --compile
        ;;
    e2e)
        setup
        run t2v_distilled 250 python3 benchmarks/workloads.py t2v-distilled $full --compile --cuda-graphs --repeats 2
        run policy 90 python3 benchmarks/workloads.py policy $full --cuda-graphs
        run offload_memory 120 python3 benchmarks/offload_memory.py --device cuda --dtype bfloat16 --size full
        ;;
    i2v)
        setup
        run i2v 500 python3 benchmarks/workloads.py i2v $full --compile --fused-kernels --repeats 1
        ;;
    stepcache)
        setup
        run step_cache 560 python3 benchmarks/step_cache.py --device cuda --dtype bfloat16 --size nano --tasks t2v \
            --steps 35 --frames 93 --height 480 --width 832
        ;;
    *)
        echo "usage: bash benchmarks/gpu_session.sh wheels|tests|step|e2e|i2v|stepcache" >&2
        exit 2
        ;;
esac
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit $failed
