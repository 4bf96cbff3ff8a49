#!/usr/bin/env bash
# The domain-shift table of docs/results.md (issue 26) and the shipped patches/mnist-thick-dmp.safetensors.
# The shipped mnist base is moved to two domains made from its own data (thick strokes, inverted contrast) by DMP (the
# trainer's default recipe), PT and FT (their recipes: --baseline pt / ft) at equal steps (STEPS, default 300: what a
# 2-core machine shared by six people could train three seeds of in an hour), training seeds 0 1 2; then
# scripts/domain_table.py scores every run with the independent extractors against held-out target-domain images and
# held-out MNIST (SAMPLES samples per run at SAMPLE_STEPS DDIM steps, default 100 and 20: what the loaded machine could
# score in time; 500 and 50, one sample per held-out image, is the evaluation's own protocol).
#   bash patches/domain_table.sh OUT_DIR [JOBS]
# Writes OUT_DIR/data/<style>/, OUT_DIR/mnist-thick-dmp.safetensors (the documented command, default 1,000 steps) and
# OUT_DIR/<style>-<row>-s<seed>.safetensors. Finished runs are skipped; JOBS runs in parallel, seed-major.
set -euo pipefail
PY=${PY:-python}
STEPS=${STEPS:-300}
SAMPLES=${SAMPLES:-100} SAMPLE_STEPS=${SAMPLE_STEPS:-20}
out=$1 jobs=${2:-1}
base=models/mnist.safetensors
mkdir -p "$out"
for style in thick inverted; do
  [ -d "$out/data/$style" ] || $PY -m app.trainer make-domain --style "$style" --out "$out/data/$style"
done
{
  # the shipped patch: docs/trainer.md's command, with one thread so that parallel runs do not fight over cores
  echo "$out/mnist-thick-dmp.safetensors --dataset folder:$out/data/thick --threads 1"
  for seed in 0 1 2; do for style in thick inverted; do for row in dmp pt ft; do
    flags=""; [ "$row" = dmp ] || flags="--baseline $row"
    echo "$out/$style-$row-s$seed.safetensors --dataset folder:$out/data/$style $flags --seed $seed --steps $STEPS --threads 1 --eval-every 100 --checkpoint-every 100"
  done; done; done
} | while read -r f rest; do [ -f "$f" ] || echo "$f $rest"; done \
  | xargs -P "$jobs" -L 1 sh -c "$PY -m app.trainer patch --base $base --quiet --out \"\$0\" \"\$@\" && echo \"done \$0\""
$PY scripts/domain_table.py "$out" --samples "$SAMPLES" --sample-steps "$SAMPLE_STEPS" --threads 1 \
  --json "$out/table.json" --markdown "$out/table.md"
