#!/usr/bin/env bash
# The AG2 example's end-to-end test (test_e2e.py): makes a virtualenv under
# ${CARGO_TARGET_DIR:-target}/ag2-venv with requirements.txt and pytest, builds the master,
# worker and llm-gateway debug binaries (a no-op when they are up to date), and runs the
# test against real processes. Needs python3 (with venv) and redis-server on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."

TARGET="${CARGO_TARGET_DIR:-target}"
VENV="$TARGET/ag2-venv"
SECONDS=0

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" \
    || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$VENV"; }
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -r examples/ag2-agent/requirements.txt pytest==9.2.0
echo "ag2 e2e: virtualenv ready after ${SECONDS}s"

# Always asked, so a stale binary (older than the worker's http agent) is never tested.
cargo build -q -p master -p worker -p llm-gateway
echo "ag2 e2e: binaries ready after ${SECONDS}s"

status=0
"$VENV/bin/pytest" -q -p no:cacheprovider examples/ag2-agent || status=$?
echo "ag2 e2e: ${SECONDS}s in all"
exit "$status"
