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

TOOLS=(prometheus)
for tool in "${TOOLS[@]}"; do
  "install_$tool"
done
