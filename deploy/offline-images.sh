#!/usr/bin/env bash
# Stand-ins for the public base images, built from Debian packages, for a Docker engine that
# cannot reach a container registry (CI here: Docker Hub is out of reach, the Debian mirror
# is not). With normal internet access you never need this: deploy/Dockerfile and
# docker-compose.yml default to the public images.
#
#   deploy/offline-images.sh            # builds the three images below (skips existing ones)
#
# Images (the names deploy/compose-e2e.sh passes as RUNTIME_IMAGE, REDIS_IMAGE, NGINX_IMAGE):
#   ensemble-offline/debian:bookworm-slim  debootstrap's minbase: stands in for debian:bookworm-slim
#   ensemble-offline/redis:7               Debian's redis-server 7.0: stands in for redis:7.2-alpine
#   ensemble-offline/nginx:1               Debian's nginx 1.22: stands in for nginx:1.28-alpine
#
# Where outbound TLS is intercepted, the host's CA bundle is added to the base image, so
# anything built on it that fetches over HTTPS trusts what the host trusts.
# Needs root, debootstrap and a Docker engine with BuildKit; DOCKER names the client.
set -euo pipefail

MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
RELEASE=bookworm
BASE=ensemble-offline/debian:bookworm-slim
REDIS=ensemble-offline/redis:7
NGINX=ensemble-offline/nginx:1
export DOCKER_BUILDKIT=1
# The docker CLI to use (a client with BuildKit: Docker 23+, or Debian's 20.10 `/usr/bin/docker`).
docker() { command "${DOCKER:-docker}" "$@"; }

have() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have "$BASE"; then
  command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap $RELEASE from $MIRROR"
  debootstrap --variant=minbase "$RELEASE" "$root" "$MIRROR" >/dev/null
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /etc/ssl/certs/ca-certificates.crt "$root/usr/local/share/ca-certificates/host-bundle.crt"
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  # mktemp made the directory 0700; as the image's root it would lock out the services'
  # unprivileged users. An imported image has no PATH either.
  chmod 0755 "$root"
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$BASE" >/dev/null
  echo "built $BASE"
fi

build() { # name, Dockerfile text
  have "$1" && return 0
  printf '%s\n' "$2" | docker build -q -t "$1" - >/dev/null
  echo "built $1"
}

# As the official image: data in /data, `redis-server [args]` as the command, redis-cli for
# the health check.
build "$REDIS" "FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD [\"redis-server\"]"

# As the official image: configuration from /etc/nginx/conf.d/*.conf, in the foreground;
# wget for the health check (the alpine image has busybox's).
build "$NGINX" "FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends nginx-light wget \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/*
EXPOSE 8000
STOPSIGNAL SIGQUIT
CMD [\"nginx\", \"-g\", \"daemon off;\"]"
