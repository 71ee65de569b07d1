# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t kiln-operator:0.1.0 .   (kopf, no torch: small)
#   docker build --target runtime  -t kiln-runtime:0.1.0 .    (torch + a C++ compiler for AOTInductor)
# BASE is any Debian-family image with python3 and its venv module: python:3.11-slim from a
# registry, or one made from Debian's packages where no registry is reachable (.ci/images does).
# Built and run for real by `bash .ci/images` (podman, no Docker engine).
ARG BASE=python:3.11-slim

FROM ${BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/kiln/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN useradd --uid 65532 --user-group --no-create-home --home-dir /nonexistent kiln \
 && python3 -m venv /opt/kiln
WORKDIR /src
COPY pyproject.toml README.md .ci/constraints.txt ./
COPY common common
COPY operator operator
COPY runtime runtime
COPY devcluster devcluster

FROM base AS operator
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
RUN pip install -c constraints.txt ".[operator]" && rm -rf /src
USER 65532:65532
WORKDIR /
ENTRYPOINT ["kiln-operator"]

FROM base AS runtime
# AOTInductor compiles C++ at compile time, and kiln-compile validates by loading the result.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
# The torch wheel pins CUDA: pick both (e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu130).
# PIP_FIND_LINKS may name a folder of wheels mounted into the build, and PIP_NO_INDEX=1 builds
# from it alone (.ci/images does: no index is trusted from inside the build here).
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://pypi.org/simple
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}" \
 && pip install -c constraints.txt ".[runtime]" && rm -rf /src
# Where torch writes for a uid with no passwd entry and a read-only root: the operator sets
# these per container (USER for getpass, caches under the /tmp emptyDir); the image agrees.
ENV USER=kiln TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor TRITON_CACHE_DIR=/tmp/triton
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["kiln-serve"]
