#!/usr/bin/env bash
# Static checks of the AWS deployment, all offline:
#   1. checkov (pinned, from PyPI, into a venv under target/) over deploy/terraform:
#      any failed check fails this script; every skip is an inline, justified
#      `#checkov:skip=` comment next to the resource it concerns;
#   2. `terraform fmt -check`, and `terraform validate` when an AWS provider is available
#      without the network (TF_PLUGIN_DIR, default /opt/tf-plugins); skipped otherwise,
#      saying so.
# The Rust tests in checks/ hold the Terraform and docker-compose.yml against the settings
# the services read; `cargo test -p checks` runs those.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION=3.3.30
VENV="${CHECKOV_VENV:-target/checkov-venv}"
TF_DIR=deploy/terraform
TF_PLUGIN_DIR="${TF_PLUGIN_DIR:-/opt/tf-plugins}"

started=$(date +%s)

if [[ "$("$VENV/bin/checkov" --version 2>/dev/null || true)" != "$CHECKOV_VERSION" ]]; then
  echo "installing checkov $CHECKOV_VERSION into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi

echo "checkov $CHECKOV_VERSION: $TF_DIR"
# checkov exits 1 when a check fails; --quiet prints only the failures.
"$VENV/bin/checkov" -d "$TF_DIR" --framework terraform --skip-download --quiet --compact

if command -v terraform >/dev/null 2>&1; then
  export TF_CLI_CONFIG_FILE=/dev/null TF_IN_AUTOMATION=1
  terraform -chdir="$TF_DIR" fmt -check -recursive
  echo "terraform fmt: ok"
  if [[ -d "$TF_PLUGIN_DIR/registry.terraform.io/hashicorp/aws" ]]; then
    # A scratch copy, so neither .terraform/ nor a lock file lands in the tree.
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    cp "$TF_DIR"/*.tf "$scratch"/
    terraform -chdir="$scratch" init -backend=false -input=false -no-color \
      -plugin-dir="$TF_PLUGIN_DIR" >/dev/null
    terraform -chdir="$scratch" validate -no-color
  else
    echo "terraform validate: skipped (no AWS provider under $TF_PLUGIN_DIR and no network)"
  fi
else
  echo "terraform fmt/validate: skipped (terraform not installed)"
fi

echo "deploy/check.sh: ok in $(($(date +%s) - started)) s"
