#!/usr/bin/env bash
# Every GPU check and the GPU benchmark in one go (at most 10 minutes: stage timeouts 90 + 120 + 240 + 140 s;
# session 1's three stages took about 3 minutes on an H200); JSON + logs under $OUT, written as each stage ends.
#   OUT=/tmp/gpu scripts/gpu_checks.sh              (SERVICE=1: also stage 5, the HTTP service under load)
# On the lent device machine diffusers is missing: wheels in .whl5/ (see bench/README.md) are installed first.
set -uo pipefail
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "FAIL: scripts/gpu_checks.sh needs a CUDA GPU (torch.cuda.is_available() is False)" | tee "$OUT/gpu_checks.log"
    exit 2
fi
if ! $PY -c "import diffusers" 2>/dev/null && ls .whl5/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl5/*.whl \
        || { echo "FAIL: could not install .whl5 wheels" | tee "$OUT/gpu_checks.log"; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
status=0
{ nvidia-smi; $PY -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)"; } \
    > "$OUT/env.txt" 2>&1
echo "== 1/4 GPU-marked tests of the fused kernel and the graphs (the CPU ones run in CI)"
timeout 90 $PY -m pytest tests/model/test_kernels.py tests/engine/test_graphs.py -m gpu -q -rs -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest.log" || status=1
echo "== 2/4 real shapes: Triton vs torch vs fp64, graphs vs eager, bf16 vs fp32, install without recapture, fusion gain"
timeout 120 $PY -m scripts.gpu_checks --json "$OUT/checks.json" 2>&1 | tee "$OUT/checks.log" || status=1
echo "== 3/4 benchmark vs diffusers: demo shape + DiT-XL/2"
timeout 240 $PY -m bench.engine --device cuda --json-out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" || status=1
echo "== 4/4 torch.compile'd step (DMP_CUDA_COMPILE) vs the hand-fused one, XL/2 at 128 rows (compiling takes a while)"
timeout 140 $PY -m scripts.gpu_checks --compile --json "$OUT/compile.json" 2>&1 | tee "$OUT/compile.log" || status=1
if [ "${SERVICE:-0}" = 1 ]; then  # not in the 10-minute budget above: run it on its own lease
    echo "== 5/5 the service on the GPU: determinism among batch-mates, hot swap, load (bench/service_gpu.sh)"
    bash bench/service_gpu.sh "$OUT/service" 2>&1 | tee "$OUT/service.log" || status=1
fi
echo "gpu_checks exit status $status"
exit $status
