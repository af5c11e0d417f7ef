#!/usr/bin/env bash
# Installs everything the project needs on a fresh machine: system packages (as root), then .venv/.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(redis-server xvfb xdotool openssl iproute2 buildah mmdebstrap prometheus)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
# TorchServe (rrp serve) is a Java program: it needs a Java 11+ runtime; Debian 12 ships 17.
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: please install as root: apt-get install ${missing[*]}" >&2
  fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/setup.sh -nt "$STAMP" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev]"
  touch "$STAMP"
fi
# checkov (tests/test_helm_checkov.py) lives in its own environment: its install is large and pins many packages.
if [ ! -x .venv-checkov/bin/checkov ]; then
  "$PY" -m venv .venv-checkov
  .venv-checkov/bin/pip install -q "checkov==3.3.30"
fi
echo "setup: ready (.venv/bin/rrp)"
