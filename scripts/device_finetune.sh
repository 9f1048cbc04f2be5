#!/usr/bin/env bash
# The encoder fine-tune on a lent GPU machine (the `device` tool), as one prepared run.
#
# That machine gets only the working tree (64 MiB with what is carried) and has torch, timm
# and sentence-transformers but not the ImageNet Lite weights, the MiniLM weights or faiss.
# So, here first (packed/ is git-ignored; photos at 1.1 x the largest --image-size to train):
#   python scripts/pack_training_data.py --out packed [--max-side 246 --quality 75] \
#       --weights efficientnet-lite0 [--weights efficientnet-lite2]    # photos, strokes, class texts, weights
# then, through the device tool, carry ["packed"], timeout_s 600:
#   SEEDS="0 1" bash scripts/device_finetune.sh [finetune flags for every run, e.g. --image-size 176]
# or several different runs at once, one per line of RUNS ("NAME FLAGS...", NAME a folder name):
#   RUNS=$'lite2 --encoder efficientnet-lite2 --image-size 224\nlong --steps 3600' DEADLINE=420 bash ...
# The runs train side by side (one GPU has room for several; the CPU cores that make batches are
# split between them). Each trains and selects its step (`finetune --no-choose-settings`: no faiss
# needed) and leaves $OUT/NAME/model.safetensors and $OUT/NAME/finetune.log (SEEDS gives runs
# seedN; STEPS sets --steps for all). DEADLINE (seconds from the start) stops a run still training
# then and saves it as selected so far: from its last validation, a run with --steps at that step
# that resumes and trains no further (its log says so); `kill -USR1` to this script does the same
# at once. XZ=1 leaves model.safetensors.xz instead (the device tool returns files up to 16 MiB;
# a Lite2 model holds 16.8, 14.8 as xz). Back here, where faiss and the benchmarks are, choose
# how each model searches and measure it:
#   python -m sbir_core finetune --init MODEL --steps 0 --out chosen.safetensors
#   python scripts/compare_checkpoints.py default chosen.safetensors
# With DEVICE=cpu it runs here too (slowly), which is how tests/test_packed_training.py checks the path.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT=${OUT:-runs/device}
PACKED=${PACKED:-packed}
mkdir -p "$OUT"
[ -d "$PACKED" ] || { echo "error: no $PACKED/ here: run scripts/pack_training_data.py and carry it" >&2; exit 2; }
[ -d "$PACKED/site" ] && export PYTHONPATH=$(cd "$PACKED/site" && pwd)${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
if [ -z "${RUNS:-}" ]; then
    RUNS=$(for seed in ${SEEDS:-0}; do echo "seed$seed --seed $seed"; done)
fi
mapfile -t LINES < <(grep -v '^[[:space:]]*$' <<<"$RUNS")
# Batch making is what limits a GPU step: the cores but one per run are shared out as workers.
WORKERS=${WORKERS:-$(( ($(nproc) - ${#LINES[@]}) / ${#LINES[@]} > 0 ? ($(nproc) - ${#LINES[@]}) / ${#LINES[@]} : 0 ))}
command -v nvidia-smi >/dev/null && nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available())"

train() {  # NAME FLAGS...: one run, its log beside its model
    local name=$1; shift
    python3 -m sbir_core finetune --data "$PACKED" --device "$DEVICE" --workers "$WORKERS" \
        --cache "/tmp/finetune-cache/$name" --no-choose-settings ${STEPS:+--steps "$STEPS"} \
        --out "$OUT/$name/model.safetensors" "$@" >>"$OUT/$name/finetune.log" 2>&1
}

declare -A PIDS=()
declare -A FLAGS=()
STOP=
trap 'STOP="on request"' USR1  # see below
for line in "${LINES[@]}"; do
    read -r name flags <<<"$line"
    mkdir -p "$OUT/$name"
    FLAGS[$name]="$* $flags"
    # shellcheck disable=SC2086  # the flags are words
    train "$name" "$@" $flags &
    PIDS[$name]=$!
    echo "started $name: $* $flags (workers $WORKERS)"
done

# SIGUSR1 to this script (trapped above) stops the runs now, as the deadline would: for a person
# watching, and for the test, which cannot know how fast the machine running it is.
while [ -z "$STOP" ] && jobs -r | grep -q .; do
    if [ -n "${DEADLINE:-}" ] && [ $(( SECONDS - T0 )) -ge "$DEADLINE" ]; then STOP="at the deadline"; fi
    sleep 1
done
status=0
for name in "${!PIDS[@]}"; do
    if [ -n "$STOP" ] && kill -0 "${PIDS[$name]}" 2>/dev/null; then
        pkill -TERM -P "${PIDS[$name]}" 2>/dev/null || true  # the finetune process and its workers
        wait "${PIDS[$name]}" 2>/dev/null || true
        state="$OUT/$name/model.state.pt"
        if [ -f "$state" ]; then
            step=$(python3 -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['step'])" "$state")
            echo "DEADLINE: $name stopped $STOP after $(( SECONDS - T0 ))s; saved as selected up to step $step" | tee -a "$OUT/$name/finetune.log"
            # shellcheck disable=SC2086
            train "$name" ${FLAGS[$name]} --steps "$step" || status=1
        else
            echo "DEADLINE: $name stopped $STOP after $(( SECONDS - T0 ))s, before its first validation: nothing to save" | tee -a "$OUT/$name/finetune.log"
            status=1
        fi
    elif ! wait "${PIDS[$name]}"; then
        echo "error: run $name failed (its finetune.log says why)" >&2
        status=1
    fi
    rm -f "$OUT/$name"/*.state.pt "$OUT/$name"/*.state.tmp  # the resumable state (~120 MB; .tmp: one cut off by the deadline) cannot come back
    grep -o 'val step [0-9]*: .*"score": [0-9.]*\|DEADLINE.*\|.*Error.*' "$OUT/$name/finetune.log" \
        | sed 's/{.*"score"/score/' | sed "s/^/$name: /" | cut -c1-300 || true
done
if [ -n "${XZ:-}" ]; then
    for m in "$OUT"/*/model.safetensors; do  # Python's lzma: the machine may lack the xz tool
        [ -f "$m" ] || continue  # no run saved a model
        python3 -c "import lzma, os, shutil, sys
with open(sys.argv[1], 'rb') as f, lzma.open(sys.argv[1] + '.xz', 'wb', preset=6) as g: shutil.copyfileobj(f, g)
os.remove(sys.argv[1])" "$m" &
    done
    wait
fi
ls -lR "$OUT"
exit $status
