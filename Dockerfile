# syntax=docker/dockerfile:1
#
# ecserve gRPC server image (needs BuildKit, the default since Docker 23). CPU by default:
#   docker build -t ecserve .
# CUDA: torch's CUDA wheels bundle their own CUDA libraries, so the base only needs python3 >= 3.10
# (installed below with apt when missing; Debian/Ubuntu bases only) and a host driver:
#   docker build -t ecserve:cu124 \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#   docker run --gpus all -p 50051:50051 ecserve:cu124
#
# Stopping: SIGTERM drains (health NOT_SERVING, in-flight streams get --grace-period seconds, 30 by
# default). The runtime's stop timeout must exceed it or streams are cut by SIGKILL: docker stop
# -t 35, compose stop_grace_period: 35s, Kubernetes terminationGracePeriodSeconds: 35.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
# torch comes from this index first, so the build gets the CPU or CUDA variant asked for; the
# default spec takes the index's newest (it must satisfy pyproject's torch>=2.5, or `pip install .`
# replaces it with PyPI's). Pin with e.g. --build-arg TORCH_SPEC=torch==2.6.0.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch
# Builds without PyTorch's index or with an intercepting proxy (deploy/build-image.sh): a wheel
# directory mounted for the build, and the host's CA bundle for pip. Build arguments, so they
# reach the build's RUN steps and never the image.
ARG PIP_FIND_LINKS=
ARG PIP_CERT=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    DEBIAN_FRONTEND=noninteractive

# Python bases (the default) skip apt; bare distro bases such as nvidia/cuda get python3 + venv.
# Package versions follow whichever distro BASE_IMAGE is, so they cannot be pinned here.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Before the source is copied, so source edits reuse this (large) layer. TORCH_SPEC is the pin
# (any one fixed version would exclude some index), hence DL3013 is ignored.
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /src
COPY . .
# The default (trained) model ships inside the package, readable by every user.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install .


FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# The venv's python links to the base interpreter, so the runtime needs the same python3. A C++
# compiler and Python's headers: ecserve's CPU ops are built for the host's CPU (-march=native)
# on first use, and inductor compiles the decode step to C++ at start (docs/deployment.md).
# $packages is a list, split on purpose (SC2086).
# hadolint ignore=DL3008,SC2086
RUN packages=""; \
    command -v python3 >/dev/null || packages="python3 python3-dev"; \
    command -v g++ >/dev/null || packages="$packages g++"; \
    if command -v python3 >/dev/null && ! python3 -c 'import os, sysconfig; \
            raise SystemExit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'; then \
        packages="$packages python3-dev"; \
    fi; \
    if [ -n "$packages" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends $packages \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin ecserve \
    && mkdir -p /var/cache/ecserve \
    && chown 10001:10001 /var/cache/ecserve

COPY --from=builder /opt/venv /opt/venv

# Serve another model by mounting its directory and setting ECSERVE_MODEL, or with --model.
# The CPU ops' build and inductor's compiled decode step are cached in /var/cache/ecserve: a
# volume (anonymous unless one is mounted, so a read-only root still writes there), and a
# restart of the same container, or one given the same volume, starts warm.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/var/cache/ecserve/torch_extensions \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/ecserve/inductor
VOLUME /var/cache/ecserve

LABEL org.opencontainers.image.title="ecserve" \
      org.opencontainers.image.description="gRPC and OpenAI-compatible inference server for expert-choice MoE models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.ecserve.stop-timeout="longer than --grace-period (30s), e.g. docker stop -t 35"

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/ecserve

# 50051: gRPC (generation + grpc.health.v1). 8000: the OpenAI-compatible HTTP API (--http-port;
# its /health for HTTP balancers). 9400: Prometheus metrics (--metrics-port).
EXPOSE 50051 8000 9400

# Probes the in-container port; a container run with another --port needs its own --health-cmd.
# `ecserve health` does not import torch (about 0.2 s); the timeout leaves room on a loaded
# machine, the start period covers loading the model, building the CPU ops and compiling the
# decode step on a cold cache (about 2 minutes on 2 cores; warm: seconds).
HEALTHCHECK --interval=15s --timeout=10s --start-period=240s --retries=3 \
    CMD ["ecserve", "health", "--address", "127.0.0.1:50051", "--timeout", "5"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["ecserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--grace-period", "30"]
