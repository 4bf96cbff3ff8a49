#!/usr/bin/env bash
# The whole demo in one script for a GPU machine with time to spare: three 32x32 bases (patch 4, hidden 128,
# depth 8), the full table of patches/table_plan.json (DDPM 250 steps, 3 seeds for mnist, ablations), and the
# shipped files copied into models/ and patches/. Run from the repository root (python -m app.trainer ...).
# This session's GPU lease ended after its first 150 s (see patches/README.md), so the shipped files come from
# patches/recipe.sh instead; this script is what a longer lease should run (PRETRAIN_STEPS=20000 or more).
set -euo pipefail
PRETRAIN_STEPS=${PRETRAIN_STEPS:-12000}
PRETRAIN_SECONDS=${PRETRAIN_SECONDS:-0}   # > 0: stop pretraining early; the steps reached go in the base's metrics
PLAN=${PLAN:-patches/table_plan.json}
JOBS=${JOBS:-8}
ARCH=${ARCH:-"--hidden-size 128 --depth 8 --num-heads 4 --patch-size 4 --image-size 32"}
PY=${PY:-python}
log() { echo "[recipe $(date -u +%H:%M:%S)] $*"; }

log "pretraining the three bases in parallel ($PRETRAIN_STEPS steps, batch 256, lr 3e-4, EMA 0.999, seed 0)"
for d in mnist animals mnist-captions; do
  $PY -m app.trainer pretrain --dataset $d --domain $d --out runs/bases/$d.safetensors $ARCH \
      --steps "$PRETRAIN_STEPS" --max-seconds "$PRETRAIN_SECONDS" --batch-size 256 --lr 3e-4 --ema-decay 0.999 \
      --seed 0 --eval-every 500 --checkpoint-every 2000 --quiet &
done
wait
log "bases done"

log "comparison table: base / +FT / +PT / +DMP and ablations ($PLAN, $JOBS runs at a time)"
$PY -m app.trainer table --plan "$PLAN" --runs runs/table --jobs "$JOBS"
log "table done"

mkdir -p models
for d in mnist animals mnist-captions; do
  cp runs/bases/$d.safetensors models/$d.safetensors               # the service's DMP_MODEL_DIR default
  cp runs/table/$d/dmp-s0.safetensors patches/$d-dmp.safetensors   # the table's DMP run, seed 0
done
log "shipped files copied to models/ and patches/"
