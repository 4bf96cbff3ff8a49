#!/usr/bin/env bash
# Device check of the service (DMP_DEVICE=cuda): generation, determinism in batches, hot swap, load numbers.
# Stage 5 of scripts/gpu_checks.sh (SERVICE=1 OUT=... scripts/gpu_checks.sh); alone: bash bench/service_gpu.sh OUTDIR
set -u
OUT=${1:-/tmp/gpu_check}; mkdir -p "$OUT"; W=/tmp/gpu_standin; PORT=8790
python3 -m bench.make_standin $W || exit 1
for RUN in ${RUNS:-bfloat16:true float32:true bfloat16:false}; do
  DTYPE=${RUN%%:*}; GRAPHS=${RUN##*:}; TAG=${DTYPE}_graphs-$GRAPHS
  DMP_DEVICE=cuda DMP_DTYPE=$DTYPE DMP_CUDA_GRAPHS=$GRAPHS DMP_MODEL_DIR=$W/models DMP_PATCH_DIR=$W/patches DMP_ADMIN_TOKEN=t \
    DMP_MAX_QUEUE=512 DMP_MAX_BATCH=64 DMP_LOG_LEVEL=warning python3 -m app serve --port $PORT > "$OUT/server_$TAG.log" 2>&1 &
  PID=$!
  for i in $(seq 120); do curl -sf localhost:$PORT/health/ready > /dev/null && break; sleep 0.5; done
  curl -s localhost:$PORT/health/ready; echo
  python3 - <<PY
import base64, httpx, concurrent.futures as cf
u = "http://127.0.0.1:$PORT"
probes = [{"class_label": 4, "steps": 20, "seed": 123, "patch": "p0"},
          {"class_label": 7, "steps": 25, "seed": 5, "patch": "p1", "sampler": "ddpm", "guidance_scale": 4.0}]
alone = [httpx.post(u + "/generate", json=p, timeout=60).json() for p in probes]
print("$TAG alone", {k: v for k, v in alone[0].items() if k != "images"})
mates = [{"class_label": i % 10, "steps": 10 + i % 7, "seed": i, "num_images": 1 + i % 3,
          **({"patch": "p%d" % (i % 2)} if i % 3 else {})} for i in range(40)]
with cf.ThreadPoolExecutor(24) as ex:
    fs = [ex.submit(httpx.post, u + "/generate", json=m, timeout=60) for m in mates[:20]]
    ps = [(i, ex.submit(httpx.post, u + "/generate", json=p, timeout=60)) for _ in range(3) for i, p in enumerate(probes)]
    fs += [ex.submit(httpx.post, u + "/generate", json=m, timeout=60) for m in mates[20:]]
    codes = [f.result().status_code for f in fs]
    same = [p.result().json()["images"] == alone[i]["images"] for i, p in ps]
print("$TAG batch-mates codes", set(codes), "probes identical in batch:", same)
m = httpx.get(u + "/metrics").text
print([l for l in m.splitlines() if l.startswith(("dmp_batch_size_sum", "dmp_batch_size_count", "dmp_device_memory", "dmp_cuda_graph"))])
PY
  python3 -m bench.loadtest --url http://127.0.0.1:$PORT --model standin --class-label 3 --patches p0,p1 \
    --steps 20 --per-client 8 --clients 1,4,16,64 | tee "$OUT/load_$TAG.md"
  kill $PID; wait $PID
done
