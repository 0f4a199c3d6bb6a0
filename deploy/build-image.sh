#!/usr/bin/env bash
# Build the ecserve image where no container registry is reachable: a Debian root filesystem
# made by mmdebstrap from Debian's package archive becomes the base image (podman import), and
# podman builds the Dockerfile on it without pulling anything.
#
#   deploy/build-image.sh [TAG]            (default TAG: localhost/ecserve:cpu)
#
# Environment:
#   BASE_TAG     the base image's tag (localhost/ecserve-base:bookworm-cxx); made once, then
#                reused (python3 with its headers and g++: the runtime compiles C++)
#   SUITE        the Debian suite of the base (bookworm: python 3.11)
#   APT_SOURCES  the apt sources the base is built from (default: this host's, so a mirror or
#                proxy that works here works there)
#   WHEEL_DIR    a directory with the torch wheel, when PyTorch's index is out of reach
#   TORCH_SPEC   the torch to install (torch, or e.g. torch==2.13.0 to take WHEEL_DIR's)
#   CA_BUNDLE    a CA bundle pip should trust during the build only (an intercepting proxy)
#
# Needs podman (with runc where crun fails on hybrid cgroups) and mmdebstrap; run as root or
# with a rootless podman set up. The image is built in Docker format so HEALTHCHECK survives.
set -euo pipefail

tag=${1:-localhost/ecserve:cpu}
base=${BASE_TAG:-localhost/ecserve-base:bookworm-cxx}
suite=${SUITE:-bookworm}
root=$(cd "$(dirname "$0")/.." && pwd)
podman=(podman)
if command -v runc >/dev/null; then podman+=(--runtime runc); fi

if ! "${podman[@]}" image exists "$base"; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    sources=${APT_SOURCES:-}
    if [[ -z $sources ]]; then
        for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
            if [[ -s $f ]]; then sources=$f; break; fi
        done
    fi
    echo "base: mmdebstrap $suite from ${sources:-the default Debian mirror}" >&2
    mmdebstrap --variant=minbase --include=python3,python3-venv,python3-dev,g++,ca-certificates \
        "$suite" "$tmp/base.tar" ${sources:+"$sources"}
    "${podman[@]}" import --change 'CMD ["/bin/bash"]' "$tmp/base.tar" "$base"
fi

args=(--pull=never --format docker --tag "$tag" --build-arg "BASE_IMAGE=$base")
if [[ -n ${WHEEL_DIR:-} ]]; then
    args+=(--volume "$WHEEL_DIR:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels
           --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
fi
if [[ -n ${TORCH_SPEC:-} ]]; then args+=(--build-arg "TORCH_SPEC=$TORCH_SPEC"); fi
if [[ -n ${CA_BUNDLE:-} ]]; then
    args+=(--volume "$CA_BUNDLE:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt)
fi
"${podman[@]}" build "${args[@]}" "$root"
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$tag")
echo "built $tag: $((size / 1000000)) MB" >&2
