#!/usr/bin/env bash
# Scale-out on one node of 8 GPUs (NCCL): `benchmarks/parallel_scaling.py` workers under torchrun, Nano and Super
# shapes with random bfloat16 weights (built on each GPU, then sharded), a guided text-to-video request, timed to
# the latents (the VAE decode is not in the step time). NOT YET RUN: no multi-GPU machine has been lent; the device
# tool of this project lends one GPU, where only the `one` part runs.
#
# Here, once (needs PyPI):     bash benchmarks/gpu_session.sh wheels     (diffusers' wheel, carried as .whl)
# On the 8-GPU machine:        bash benchmarks/gpu_parallel.sh one       (1 GPU: Nano, the baseline of each shape)
#                              bash benchmarks/gpu_parallel.sh nano      (8 GPUs: cfg/Ulysses/FSDP plans)
#                              bash benchmarks/gpu_parallel.sh super     (8 GPUs: Super 720p, as the peers run it)
# Each command writes $OUT/<name>.json (weights MB held per rank, memory allocated after set-up, its peak rise
# during the timed calls, s/step; the largest over the ranks) and $OUT/<name>.log; a summary line per command.
# Compare `super-720p-cfg2-u4-fsdp` with the paper estimate (`python benchmarks/parallel_estimate.py`) and with the
# peers' 121 s (vLLM-Omni) / 123.5 s (NVIDIA) for 35 steps.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-}"
out="${OUT:-gpu-logs}"
summary=()
failed=0

setup() {
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheels missing: run 'bash benchmarks/gpu_session.sh wheels' here and carry .whl"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/machine.txt"
}

# shape NAME -> the worker's size and call arguments
declare -A SHAPE=(
    [480p]="--frames 93 --height 480 --width 848"      # 24 x 15 x 26 = 9,360 generated tokens
    [720p]="--frames 189 --height 720 --width 1280"    # 48 x 23 x 40 = 44,160 generated tokens
)

# run NAME SECONDS NPROC SIZE SHAPE PLAN
run() {
    local name=$1 limit=$2 nproc=$3 size=$4 shape=$5 plan=$6
    echo "=== $name: $nproc x $size $shape $plan"
    # shellcheck disable=SC2086
    timeout "$limit" torchrun --standalone --nproc-per-node "$nproc" benchmarks/parallel_scaling.py --worker \
        --device cuda --size "$size" --plan "$plan" --steps 3 ${SHAPE[$shape]} --out "$out/$name.json" \
        > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 5 "$out/$name.log"
    [ -f "$out/$name.json" ] && cat "$out/$name.json" && echo
    summary+=("$name exit $rc$([ $rc = 124 ] && echo ' (time limit)')")
    [ $rc = 0 ] || failed=1
}

case "$part" in
    one)
        setup
        run nano-480p-1gpu 240 1 nano 480p none
        run nano-720p-1gpu 300 1 nano 720p none
        ;;
    nano)
        setup
        run nano-720p-cfg2-u4 150 8 nano 720p cfg=2,ulysses=4
        run nano-720p-cfg2-u4-fsdp 150 8 nano 720p cfg=2,ulysses=4,shard=fsdp
        run nano-720p-u8-fsdp 150 8 nano 720p ulysses=8,shard=fsdp
        run nano-720p-cfg2-fsdp 120 8 nano 720p cfg=2,shard=fsdp
        ;;
    super)
        setup
        run super-720p-cfg2-u4-fsdp 300 8 super 720p cfg=2,ulysses=4,shard=fsdp
        run super-480p-cfg2-u4-fsdp 240 8 super 480p cfg=2,ulysses=4,shard=fsdp
        ;;
    *)
        echo "usage: bash benchmarks/gpu_parallel.sh one|nano|super" >&2
        exit 2
        ;;
esac
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit $failed
