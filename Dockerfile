# DMP patch server. Build: docker build -t dmp-server:0.1.0 .   Run: docker run -p 8000:8000 dmp-server:0.1.0
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/dmp

# Dependencies first, in their own layer, so a code change does not reinstall torch.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

RUN useradd --system --uid 10001 --user-group --home-dir /tmp dmp

# The code, then the demo bases and patches (the embedded default serves models/ and patches/).
COPY app ./app
RUN pip install --no-deps .
COPY models ./models
# Without Redis, PUT /patches writes here: the service user must own it.
COPY --chown=10001:10001 patches ./patches

USER 10001:10001

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health/live', timeout=2)"]
# Run from /srv/dmp so `app` (with its app/web/static files) is imported from this tree.
CMD ["python", "-m", "app", "serve", "--host", "0.0.0.0", "--port", "8000"]
