# Flywheel in one container: the web app, one training worker and the SQLite database under /data.
#
#   docker build -t flywheel .
#   docker run -p 8000:8000 -v flywheel-data:/data flywheel
#
# The first start trains the small demo model (a few minutes on a laptop's CPU) before the server answers; the data
# volume keeps the database, the models and the generated secret key, so later starts skip it.
#
# On an NVIDIA GPU (the host needs the NVIDIA container toolkit; run with `--gpus all -e FLYWHEEL_DEVICE=cuda`):
#   docker build -t flywheel:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .

# Any Debian or Ubuntu image with Python >= 3.11, or one where apt installs it (Ubuntu 24.04: 3.12).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch and the dependencies, then the app -------------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# CUDA base images come without Python; the python images have it already.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the chosen index (CPU by default): the dependency list below never pulls a second build of it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The dependencies alone, from pyproject.toml, so that editing the code does not reinstall them.
WORKDIR /app
COPY pyproject.toml README.md ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The app runs from /app (templates, static files and migrations live beside the packages), installed in place.
COPY alembic.ini ./
COPY app ./app
COPY ml ./ml
COPY migrations ./migrations
COPY templates ./templates
COPY static ./static
RUN pip install --no-deps -e . && python3 -m compileall -q app ml migrations

# ---- runtime: the same base, the environment and the app, a user without privileges --------------------------------
FROM ${BASE_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 flywheel \
    && useradd --system --uid 10001 --gid flywheel --home-dir /data --no-create-home --shell /usr/sbin/nologin flywheel \
    && mkdir -p /data && chown flywheel:flywheel /data

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app

# FLYWHEEL_HOST: listen on every interface of the container (`-p` decides what the host exposes). The secret key is
# generated into /data on the first start (or pass FLYWHEEL_SECRET_KEY); the database is SQLite under /data unless
# FLYWHEEL_DATABASE_URL names another.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLYWHEEL_DATA_DIR=/data \
    FLYWHEEL_HOST=0.0.0.0 \
    FLYWHEEL_PORT=8000

WORKDIR /app
# Numeric, so that a runtime can check it is not root without reading /etc/passwd (Kubernetes runAsNonRoot).
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000

# /healthz answers once the server is up, within seconds: a first start trains the demo model in the worker meanwhile.
HEALTHCHECK --interval=30s --timeout=5s --start-period=1m --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FLYWHEEL_PORT', '8000'), timeout=4)"]

# `flywheel serve` migrates the database, queues the demo model's training on a first start, starts a worker, serves.
CMD ["flywheel", "serve"]
