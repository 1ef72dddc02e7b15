#!/usr/bin/env bash
# What bench/http_bench.py and bench/http_server_choice.py need beyond the dev venv: Debian's
# h2load (the HTTP load generator both sides share) and MLServer in a venv of its own
# (.tools/mlserver-venv: it pins its own FastAPI/uvicorn/pydantic stack, nothing the service
# needs). Idempotent; quick when both are there.
set -euo pipefail
cd "$(dirname "$0")/.."
MLSERVER="mlserver==1.7.1"
if ! command -v h2load >/dev/null; then
  echo "install-bench-tools: h2load (Debian nghttp2-client)"
  apt-get update -qq </dev/null >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nghttp2-client \
    </dev/null >/dev/null
fi
venv=.tools/mlserver-venv
if [ ! -f "$venv/.installed-$MLSERVER" ]; then
  echo "install-bench-tools: $MLSERVER (PyPI, own venv in $venv)"
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$MLSERVER" </dev/null
  "$venv/bin/mlserver" --help >/dev/null
  touch "$venv/.installed-$MLSERVER"
fi
