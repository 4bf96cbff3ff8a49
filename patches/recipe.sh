#!/usr/bin/env bash
# Reproduces every shipped file from scratch: the three demo bases (models/), their DMP patches
# (patches/*-dmp.safetensors), docs/results.md and its figures. Run from the repository root.
# The shipped files were made on one H200 in one call (see patches/README.md for the steps reached and times);
# on CPU the same commands work, only slower (scale PRETRAIN_STEPS and the plan's further_steps down to try).
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
