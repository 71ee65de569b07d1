# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t kiln-operator:0.1.0 .   (kopf, no torch: small)
#   docker build --target runtime  -t kiln-runtime:0.1.0 .    (torch + a C++ compiler for AOTInductor)
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 65532 --user-group --no-create-home --home-dir /nonexistent kiln
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common common
COPY operator operator
COPY runtime runtime
COPY devcluster devcluster

FROM base AS operator
RUN pip install ".[operator]" && rm -rf /src
USER 65532:65532
ENTRYPOINT ["kiln-operator"]

FROM base AS runtime
# AOTInductor compiles C++ at compile time, and kiln-compile validates by loading the result.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
# The torch wheel pins CUDA: pick both (e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu130).
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://pypi.org/simple
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}" \
 && pip install ".[runtime]" && rm -rf /src
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["kiln-serve"]
