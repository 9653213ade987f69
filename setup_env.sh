#!/usr/bin/env bash
# Creates .venv in the checkout and installs openmoe_jax with its pinned dependencies (idempotent).
# Quiet unless something fails: pip's output goes to .venv/install.log and is shown on failure.
set -euo pipefail
cd "$(dirname "$0")"
STAMP=.venv/.installed-$(cat requirements.txt requirements-test.txt setup.py | sha256sum | cut -c1-16)
if [[ ! -f "$STAMP" ]]; then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  LOG=.venv/install.log
  echo "Installing openmoe_jax and its pinned dependencies into .venv (first run only, a few minutes)..." >&2
  if ! { .venv/bin/pip install -q -U pip &&
         .venv/bin/pip install -q -r requirements-test.txt &&
         .venv/bin/pip install -q --no-deps -e . ; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "setup_env.sh: error: the install failed (full log above and in $LOG)" >&2
    exit 1
  fi
  rm -f .venv/.installed-*
  touch "$STAMP"
  echo "Installed into .venv." >&2
fi
