#!/usr/bin/env bash
# One paired study on a mnist base (issue 11): further training of 1,000 steps, batch 64, EMA 0.995 of the trained
# weights, training seeds 0 1 2 for every row; then `compare` samples training run i at sampling seed i (500
# samples, DDIM 50, guidance 1.5) and pairs it with the base at that seed; ± is the SE over the 3 training runs.
#   bash patches/study.sh BASE OUT_DIR ROW...   rows: ft pt dmp dmp-x64 dmp-hard dmp-x64-hard (default: all six)
# Writes OUT_DIR/ROW-sSEED.safetensors, OUT_DIR/compare.json and OUT_DIR/compare.md (with every row minus +PT,
# paired run by run, when pt is a row: the gate's share). Finished runs are skipped.
set -euo pipefail
PY=${PY:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
base=$1 out=$2
shift 2
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(ft pt dmp dmp-x64 dmp-hard dmp-x64-hard)
declare -A args=(
  [ft]="--baseline ft --lr 1e-4"                                         # all weights, the base's own objective
  [pt]="--baseline pt --lr 1e-3"                                         # prompts only, no gate
  [dmp]="--lr 1e-3 --gate-lr-mult 1 --gate-scale 1"                      # the paper's DMP (gate x 1: adds ~PT/64)
  [dmp-x64]="--lr 1e-3 --gate-lr-mult 1 --gate-scale 64"                 # ours: uniform gate = PT at init
  [dmp-hard]="--lr 1e-3 --gate-lr-mult 1 --gate-scale 1 --top-k 0.25 --selection hard"  # the paper's top-k: weights 1
  # hard weights are 1, not 1/N, so x64 makes each kept prompt 64x PT's: kept as the measured way not to do it
  [dmp-x64-hard]="--lr 1e-3 --gate-lr-mult 1 --gate-scale 64 --top-k 0.25 --selection hard"
)
declare -A names=([ft]="+FT" [pt]="+PT" [dmp]="+DMP (gate x1, paper)" [dmp-x64]="+DMP (gate x64, ours)"
                  [dmp-hard]="+DMP (hard top-16 of 64, paper)" [dmp-x64-hard]="+DMP (gate x64, hard top-16 of 64)")
mkdir -p "$out"
for seed in 0 1 2; do
  for row in "${rows[@]}"; do
    [ -f "$out/$row-s$seed.safetensors" ] && continue
    # shellcheck disable=SC2086
    $PY -m app.trainer patch --base "$base" --dataset mnist --domain mnist --image-size 16 ${args[$row]} \
        --out "$out/$row-s$seed.safetensors" --steps 1000 --batch-size 64 --ema-decay 0.995 --seed "$seed" \
        --eval-every 250 --checkpoint-every 250 --device cpu --quiet
  done
done
arms=()
for row in "${rows[@]}"; do
  [ "$row" = pt ] && arms+=(--versus "${names[pt]}")
  arms+=(--arm "${names[$row]}=$out/$row-s0.safetensors,$out/$row-s1.safetensors,$out/$row-s2.safetensors")
done
$PY -m app.trainer compare --base "$base" "${arms[@]}" --seeds 0 1 2 --seed-per-run \
    --json "$out/compare.json" --markdown "$out/compare.md"
