#!/usr/bin/env bash
# Set up a checkout from nothing: the Python environment and the Kafka broker's jars.
#
#   bash infra/setup.sh
#
# The virtual environment lives outside the checkout, in $HSTU_RT_CACHE (default
# ~/.cache/hstu-rt), keyed by the hash of requirements.lock, so every clone with the same lock
# reuses it and a changed lock builds a new one. `.venv` in the checkout points at it. The Kafka
# jars are resolved by Maven into ~/.m2 (see infra/kafka/pom.xml).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${HSTU_RT_CACHE:-$HOME/.cache/hstu-rt}
uv_version=0.13.9

python=$(command -v python3.11 || true)
if [ -z "$python" ]; then
  python=$(command -v python3 || true)
  if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "error: Python 3.11 is required (python3.11 not found; python3 is ${python:-missing})" >&2
    exit 1
  fi
fi
for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required (apt-get install openjdk-17-jre-headless maven)" >&2; exit 1; }
done

lock_hash=$(sha256sum "$root/requirements.lock" | cut -c1-16)
venv=$cache/venv-$lock_hash
if [ ! -f "$venv/.complete" ]; then
  echo "setup: building $venv from requirements.lock (first time for this lock: several minutes)" >&2
  mkdir -p "$cache"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "uv==$uv_version"
  "$venv/bin/uv" pip install --python "$venv/bin/python" -r "$root/requirements.lock"
  touch "$venv/.complete"
fi
ln -sfn "$venv" "$root/.venv"
"$root/.venv/bin/python" -m infra.kafka fetch >&2
echo "setup: ready (.venv -> $venv)" >&2
