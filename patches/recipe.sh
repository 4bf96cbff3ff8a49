#!/usr/bin/env bash
# Reproduces every shipped file from scratch, with the exact commands, seeds and steps that made them:
#   models/mnist.safetensors            CPU (1 thread), deterministic: rerunning gives the same bytes' tensors
#   models/animals.safetensors          CPU (2 threads), 16x16 like mnist
#   models/mnist-captions.safetensors   CPU (1 thread), 16x16 like mnist, 18,265 steps
#   patches/mnist-dmp.safetensors       the official DMP recipe (gate x1, importance weight 1, no EMA), lr 3e-3 (the
#                                       study's pick on held-out loss), 1,000 steps: the study's "DMP (official)" at seed 0
#                                       (issue 30); scored by scripts/score_shipped.py (docs/results/issue30/)
#   runs/cpu/mnist-dmp-x64.safetensors  the gate x64 recipe (ours, EMA 0.995) shipped as mnist-dmp until 2026-12-05;
#                                       the compare-mnist*.json / study-mnist-shipped.* results are of that file
#   patches/animals-dmp.safetensors, patches/mnist-captions-dmp.safetensors   the official DMP recipe as mnist-dmp's
#                                       (gate x1, importance weight 1, no EMA, lr 3e-3), 3,000 and 1,000 steps (2026-12-06)
#   runs/cpu/{animals,mnist-captions}-dmp-x64.safetensors   the gate x64 recipe they were shipped with until 2026-12-06
#   patches/mnist-thick-dmp.safetensors  the trainer's default recipe on thick digits (patches/domain_table.sh)
#   (animals base made with OMP_NUM_THREADS=2: not bit-identical to a 1-thread rerun)
#   runs/flat/mnist-flat.safetensors    mnist trained on until its held-out loss is flat (not shipped; issue 11)
#   docs/results.md + docs/results/*.png
# Times and machines are in patches/README.md. Run from the repository root; all shipped files are made on CPU.
set -euo pipefail
PY=${PY:-python}
STAGE=${STAGE:-all}
MNIST_STEPS=${MNIST_STEPS:-10012}
export OMP_NUM_THREADS=1   # the CPU runs were single-threaded (the trainer's --threads default follows it); deterministic
# Every `patch` line spells out its flags: the command's defaults (its recipe, docs/trainer.md) changed in issue 26.

if [ "$STAGE" != gpu ]; then   # --- CPU
  $PY -m app.trainer pretrain --dataset mnist --domain mnist --out runs/cpu/mnist.safetensors --image-size 16 \
      --patch-size 2 --hidden-size 64 --depth 6 --num-heads 4 --steps "$MNIST_STEPS" --batch-size 64 --lr 5e-4 \
      --ema-decay 0.999 --seed 0 --eval-every 500 --checkpoint-every 500 --device cpu --quiet
  # mnist-captions: same model size as mnist; trained in two sittings that --max-seconds cut (1,800 s: 6,261 steps,
  # then resumed from its checkpoint to 4,200 s: 18,265 steps); resuming is exact, so one run of 18,265 steps is the same
  $PY -m app.trainer pretrain --dataset mnist-captions --domain mnist-captions --out runs/cpu/mnist-captions.safetensors \
      --image-size 16 --patch-size 2 --hidden-size 64 --depth 6 --num-heads 4 --steps 18265 --batch-size 64 --lr 5e-4 \
      --ema-decay 0.999 --seed 0 --eval-every 500 --checkpoint-every 500 --device cpu --quiet
  $PY -m app.trainer patch --base runs/cpu/mnist-captions.safetensors --dataset mnist-captions --domain mnist-captions \
      --out runs/cpu/mnist-captions-dmp-x64.safetensors --image-size 16 --steps 1000 --batch-size 64 --lr 1e-3 \
      --gate-lr-mult 1 --gate-scale 64 --ema-decay 0.995 --seed 0 --eval-every 250 --checkpoint-every 250 --device cpu --quiet
  # shipped since 2026-12-06 (issue 30 item 4): the official recipe, as mnist-dmp (lr 3e-3: the study's pick on mnist)
  $PY -m app.trainer patch --base runs/cpu/mnist-captions.safetensors --dataset mnist-captions --domain mnist-captions \
      --out runs/cpu/mnist-captions-dmp.safetensors --image-size 16 --steps 1000 --batch-size 64 --lr 3e-3 \
      --gate-lr-mult 1 --gate-scale 1 --w-importance 1 --ema-decay 0 --seed 0 --eval-every 250 --checkpoint-every 250 --device cpu --quiet
  # animals: same model size as mnist, 2 threads; --max-seconds 1380 stopped it at 10856 steps
  OMP_NUM_THREADS=2 $PY -m app.trainer pretrain --dataset animals --domain animals --out runs/cpu/animals.safetensors \
      --image-size 16 --patch-size 2 --hidden-size 64 --depth 6 --num-heads 4 --steps 10856 --batch-size 64 --lr 5e-4 \
      --ema-decay 0.999 --seed 0 --eval-every 500 --checkpoint-every 500 --device cpu --quiet
  $PY -m app.trainer patch --base runs/cpu/animals.safetensors --dataset animals --domain animals \
      --out runs/cpu/animals-dmp-x64.safetensors --image-size 16 --steps 3000 --batch-size 64 --lr 1e-3 \
      --gate-lr-mult 1 --gate-scale 64 --ema-decay 0.995 --seed 0 --eval-every 500 --checkpoint-every 500 --device cpu --quiet
  $PY -m app.trainer patch --base runs/cpu/animals.safetensors --dataset animals --domain animals \
      --out runs/cpu/animals-dmp.safetensors --image-size 16 --steps 3000 --batch-size 64 --lr 3e-3 \
      --gate-lr-mult 1 --gate-scale 1 --w-importance 1 --ema-decay 0 --seed 0 --eval-every 500 --checkpoint-every 500 --device cpu --quiet
  # base / +FT / +PT / +DMP: 3 seeds and the ablations for mnist, seed 0 for animals and mnist-captions
  $PY -m app.trainer table --plan patches/table_plan_cpu.json --runs runs/table_cpu --jobs 2
  # mnist again with 3,000 further steps (seed 0) and a 10x learning-rate variant: docs/long/results.md
  $PY -m app.trainer table --plan patches/table_plan_long.json --runs runs/table_long --doc docs/long/results.md

  # the gate x64 recipe (issue 11), shipped as mnist-dmp until 2026-12-05: the gate is multiplied by N = 64 tokens in
  # training, so a uniform gate adds what PT would (ours, not the paper's; the file holds 64 x prompts and is an
  # ordinary patch), prompts and gate at lr 1e-3, and the EMA (0.995) of the patch is saved. Made at commit 0844859.
  $PY -m app.trainer patch --base runs/cpu/mnist.safetensors --dataset mnist --image-size 16 \
      --out runs/cpu/mnist-dmp-x64.safetensors --steps 1000 --batch-size 64 --lr 1e-3 --gate-lr-mult 1 --gate-scale 64 \
      --ema-decay 0.995 --seed 0 --eval-every 250 --checkpoint-every 250 --device cpu --quiet
  # mnist-dmp (issue 30): no DMP recipe beat the base by the independent extractors in the pre-registered study, so
  # the shipped patch is the faithful one, exactly the study's "DMP (official: gate x1)" run at seed 0 (app/trainer/
  # study.py: gate x1, gate lr x1, importance weight 1, no EMA; lr 3e-3 picked on held-out loss). Made 2026-12-05
  $PY -m app.trainer patch --base runs/cpu/mnist.safetensors --dataset mnist --domain mnist \
      --out runs/cpu/mnist-dmp.safetensors --steps 1000 --batch-size 64 --lr 3e-3 --gate-lr-mult 1 --gate-scale 1 \
      --w-importance 1 --ema-decay 0 --seed 0 --eval-every 250 --checkpoint-every 250 --device cpu --quiet
  # the same recipe at lr 1e-4, and PT at lr 1e-4 with the same EMA (the gate's contribution at equal init)
  $PY -m app.trainer patch --base runs/cpu/mnist.safetensors --dataset mnist --image-size 16 \
      --out runs/cpu/mnist-dmp-lr1e-4.safetensors --steps 1000 --batch-size 64 --lr 1e-4 --gate-lr-mult 10 --gate-scale 64 \
      --ema-decay 0.995 --seed 0 --eval-every 250 --checkpoint-every 250 --device cpu --quiet
  $PY -m app.trainer patch --baseline pt --base runs/cpu/mnist.safetensors --dataset mnist --image-size 16 \
      --out runs/cpu/mnist-pt-lr1e-4.safetensors --steps 1000 --batch-size 64 --lr 1e-4 \
      --ema-decay 0.995 --seed 0 --eval-every 250 --checkpoint-every 250 --device cpu --quiet
  # paired comparisons (same sampling seeds, 500 samples, DDIM 50, guidance 1.5): docs/results_analysis.md
  $PY -m app.trainer compare --base runs/cpu/mnist.safetensors \
      --arm "+DMP (shipped mnist-dmp)=runs/cpu/mnist-dmp-x64.safetensors" --seeds 0 1 2 \
      --json docs/results/compare-mnist-shipped.json --markdown docs/results/compare-mnist-shipped.md
  $PY -m app.trainer compare --base runs/cpu/mnist.safetensors --arm "+PT, lr 1e-4=runs/cpu/mnist-pt-lr1e-4.safetensors" \
      --arm "+DMP gate x64, lr 1e-4=runs/cpu/mnist-dmp-lr1e-4.safetensors" \
      --arm "+DMP gate x64, lr 1e-3 (shipped)=runs/cpu/mnist-dmp-x64.safetensors" --seeds 0 \
      --json docs/results/compare-mnist-s0.json --markdown docs/results/compare-mnist-s0.md

  # issue 11, the three-training-seed studies (docs/results_analysis.md; each writes compare.json/.md in its folder):
  # the recipes of the shipped base, PT vs DMP gate x64 (seed 0 of "dmp-x64" is mnist-dmp-x64, bit for bit)
  bash patches/study.sh runs/cpu/mnist.safetensors runs/study-shipped pt dmp-x64
  cp runs/study-shipped/compare.json docs/results/study-mnist-shipped.json
  cp runs/study-shipped/compare.md docs/results/study-mnist-shipped.md
  # mnist-flat: the mnist base trained on for 17,000 steps (lr 5e-4, constant for 5,000 then annealed to 0 over
  # 12,000; made in two sittings, resumed from its step-4,000 checkpoint, which is exact), then every row of study.sh
  # on it; the curve and its change over the last 20 % of steps
  $PY -m app.trainer patch --baseline ft --base runs/cpu/mnist.safetensors --dataset mnist --domain mnist \
      --image-size 16 --out runs/flat/mnist-flat.safetensors --steps 17000 --lr-decay-steps 12000 --batch-size 64 \
      --lr 5e-4 --ema-decay 0.999 --seed 0 --eval-every 1000 --checkpoint-every 1000 --device cpu --quiet
  $PY -m app.trainer curve runs/cpu/mnist.safetensors runs/flat/mnist-flat.safetensors \
      --png docs/results/mnist-flat-curve.png --title "mnist: held-out loss, shipped base then trained on (lr annealed to 0)"
  bash patches/study.sh runs/flat/mnist-flat.safetensors runs/study-flat
  cp runs/study-flat/compare.json docs/results/study-mnist-flat.json
  cp runs/study-flat/compare.md docs/results/study-mnist-flat.md
  # the shipped animals and mnist-captions patches against their bases, and against the 200-step patches they
  # replaced (OLD_PATCHES: a folder with those files, from git history before this change); animals also at 1,000 steps
  $PY -m app.trainer patch --base runs/cpu/animals.safetensors --dataset animals --domain animals \
      --out runs/cpu/animals-dmp-1k.safetensors --image-size 16 --steps 1000 --batch-size 64 --lr 1e-3 \
      --gate-lr-mult 1 --gate-scale 64 --ema-decay 0.995 --seed 0 --eval-every 250 --checkpoint-every 250 --device cpu --quiet
  $PY -m app.trainer compare --base runs/cpu/animals.safetensors --arm "+DMP 1,000 steps=runs/cpu/animals-dmp-1k.safetensors" \
      --arm "+DMP 3,000 steps=runs/cpu/animals-dmp-x64.safetensors" \
      ${OLD_PATCHES:+--arm "+DMP 200 steps (old shipped)=$OLD_PATCHES/animals-dmp.safetensors"} --seeds 0 1 2 \
      --json docs/results/compare-animals-shipped.json --markdown docs/results/compare-animals-shipped.md
  $PY -m app.trainer compare --base runs/cpu/mnist-captions.safetensors \
      --arm "+DMP (shipped mnist-captions-dmp)=runs/cpu/mnist-captions-dmp-x64.safetensors" \
      ${OLD_PATCHES:+--arm "+DMP (old 200-step mnist-captions-dmp)=$OLD_PATCHES/mnist-captions-dmp.safetensors"} \
      --seeds 0 1 2 --json docs/results/compare-mnist-captions-shipped.json \
      --markdown docs/results/compare-mnist-captions-shipped.md
  $PY scripts/caption_check.py runs/cpu/mnist-captions.safetensors runs/cpu/mnist-captions-dmp-x64.safetensors --guidance 4
  # the files shipped since 2026-12-06 (official recipe) against their bases and the gate x64 files, by the independent
  # extractors (docs/results_analysis.md); caption following at guidance 1.5 and 4
  $PY -m app.trainer compare --base runs/cpu/mnist-captions.safetensors \
      --arm "+DMP official recipe (gate x1, lr 3e-3)=runs/cpu/mnist-captions-dmp.safetensors" \
      --arm "+DMP gate x64 (shipped until 2026-12-06)=runs/cpu/mnist-captions-dmp-x64.safetensors" --seeds 0 1 2 \
      --json docs/results/issue30/compare-mnist-captions-official.json --markdown docs/results/issue30/compare-mnist-captions-official.md
  $PY -m app.trainer compare --base runs/cpu/animals.safetensors \
      --arm "+DMP official recipe (gate x1, lr 3e-3), 3,000 steps=runs/cpu/animals-dmp.safetensors" \
      --arm "+DMP gate x64 (shipped until 2026-12-06), 3,000 steps=runs/cpu/animals-dmp-x64.safetensors" --seeds 0 1 2 \
      --json docs/results/issue30/compare-animals-official.json --markdown docs/results/issue30/compare-animals-official.md
  for g in 1.5 4; do
    $PY scripts/caption_check.py runs/cpu/mnist-captions.safetensors runs/cpu/mnist-captions-dmp.safetensors --guidance $g
  done
  # 2026-12-06, post hoc: the same shipped files by every independent extractor, the ImageNet MobileNetV2 one
  # included (the samples of the two runs above are cached, so only features are computed; held-out loss measured above)
  $PY -m app.trainer compare --base runs/cpu/mnist-captions.safetensors \
      --arm "+DMP official recipe (gate x1, lr 3e-3), shipped=runs/cpu/mnist-captions-dmp.safetensors" --seeds 0 1 2 \
      --no-heldout --json docs/results/issue30/compare-mnist-captions-mobilenet.json \
      --markdown docs/results/issue30/compare-mnist-captions-mobilenet.md
  $PY -m app.trainer compare --base runs/cpu/animals.safetensors \
      --arm "+DMP official recipe (gate x1, lr 3e-3), 3,000 steps, shipped=runs/cpu/animals-dmp.safetensors" --seeds 0 1 2 \
      --no-heldout --json docs/results/issue30/compare-animals-mobilenet.json \
      --markdown docs/results/issue30/compare-animals-mobilenet.md
  # and the pre-registered study (docs/results/study/) scored post hoc by it, two processes sharing the work
  # (resumable; a run whose samples are gone is trained and sampled again and checked against its stored FDs)
  for i in 1 2; do
    $PY -m app.trainer study --runs runs/study --add-extractor mobilenet --quiet --threads 1 &
  done
  wait
  # the paper's hard top-k (the best row on mnist-flat) on animals and mnist-captions, not shipped
  for d in animals mnist-captions; do
    $PY -m app.trainer patch --base runs/cpu/$d.safetensors --dataset $d --domain $d --image-size 16 \
        --out runs/cpu/$d-dmp-hard.safetensors --steps 1000 --batch-size 64 --lr 1e-3 --gate-lr-mult 1 --gate-scale 1 --top-k 0.25 \
        --selection hard --ema-decay 0.995 --seed 0 --eval-every 250 --checkpoint-every 250 --device cpu --quiet
    $PY -m app.trainer compare --base runs/cpu/$d.safetensors \
        --arm "+DMP hard top-16 of 64 (paper), 1,000 steps=runs/cpu/$d-dmp-hard.safetensors" --seeds 0 1 2 \
        --json docs/results/compare-$d-hard.json --markdown docs/results/compare-$d-hard.md
  done

  mkdir -p models
  cp runs/cpu/mnist.safetensors models/mnist.safetensors
  cp runs/cpu/mnist-dmp.safetensors patches/mnist-dmp.safetensors
  # the shipped mnist-dmp by the independent extractors, with its gate zeroed: docs/results/issue30/shipped-mnist-dmp.*
  $PY scripts/score_shipped.py runs/shipped docs/results/issue30/shipped-mnist-dmp.json 500
  cp runs/cpu/animals.safetensors models/animals.safetensors
  cp runs/cpu/mnist-captions.safetensors models/mnist-captions.safetensors
  for d in animals mnist-captions; do
    cp runs/cpu/$d-dmp.safetensors patches/$d-dmp.safetensors
  done
  # issue 26: patches/mnist-thick-dmp (docs/trainer.md's one command, defaults only, on `make-domain --style thick`)
  # and the domain-shift table of docs/results.md (DMP / PT / FT at 300 steps, seeds 0 1 2, thick and inverted)
  bash patches/domain_table.sh runs/domain 2
  cp runs/domain/mnist-thick-dmp.safetensors patches/mnist-thick-dmp.safetensors
fi
