#!/usr/bin/env bash
# Makes `docker build` of a Bento work on a machine that cannot reach Docker Hub: starts a Docker engine when
# none answers, and builds the base image that BentoML's generated Dockerfile starts FROM with Debian's
# debootstrap when the engine does not have it. Where Docker Hub is reachable and the image can be pulled,
# it does nothing but the pull.
#
#   sudo deploy/base_image.sh [IMAGE]      # IMAGE defaults to python:3.11-slim (bentofile: distro debian, 3.11)
set -euo pipefail

IMAGE=${1:-python:3.11-slim}
SUITE=${DEBIAN_SUITE:-bookworm}  # Debian 12 ships Python 3.11, the bentofiles' python_version
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || { echo "base_image: no Docker engine; install one (Debian: apt-get install docker.io)" >&2; exit 1; }
    echo "base_image: starting dockerd in the background (log: /tmp/dockerd.log)" >&2
    nohup dockerd >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "base_image: dockerd did not start; see /tmp/dockerd.log" >&2; exit 1; }
fi

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base_image: $IMAGE is present" >&2
    exit 0
fi
if timeout 60 docker pull "$IMAGE" >/dev/null 2>&1; then
    echo "base_image: pulled $IMAGE" >&2
    exit 0
fi

command -v debootstrap >/dev/null || { echo "base_image: $IMAGE cannot be pulled and debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
echo "base_image: $IMAGE cannot be pulled; building it with debootstrap ($SUITE, minbase)" >&2
root=$(mktemp -d /tmp/base-image.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    "$SUITE" "$root" >&2
# Debian's Python refuses pip installs into the system interpreter (PEP 668); the official python image has
# no such marker, and BentoML's Dockerfile installs into it.
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
# Where a proxy re-signs TLS, pip and uv inside the build reach the index only with this machine's CA bundle.
install -D -m 0644 "$CA_BUNDLE" "$root/etc/ssl/certs/host-ca-bundle.crt"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca-bundle.crt' \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >&2
echo "base_image: built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)" >&2
