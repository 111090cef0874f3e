#!/usr/bin/env bash
# Runs the worker-protocol conformance test (test_worker_protocol.py) in a venv under
# ${CARGO_TARGET_DIR:-target}/protocol-venv, made (or refreshed when requirements.txt
# changes) from PyPI. Without WORKER_URL it tests the Rust worker at
# ${CARGO_TARGET_DIR:-target}/debug/worker, which must be built first
# (cargo build -p worker). Extra arguments go to pytest.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
venv="$target/protocol-venv"

if [[ ! -x "$venv/bin/python" ]] || ! cmp -s "$here/requirements.txt" "$venv/requirements.txt"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$venv/requirements.txt"
fi

export CARGO_TARGET_DIR="$target"
exec "$venv/bin/python" -m pytest -p no:cacheprovider -v "$here/test_worker_protocol.py" "$@"
