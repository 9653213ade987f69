#!/usr/bin/env bash
# Creates .venv in the checkout and installs openmoe_jax with its pinned dependencies (idempotent).
set -euo pipefail
cd "$(dirname "$0")"
STAMP=.venv/.installed-$(cat requirements.txt requirements-test.txt setup.py | sha256sum | cut -c1-16)
if [[ ! -f "$STAMP" ]]; then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q -r requirements-test.txt
  .venv/bin/pip install -q --no-deps -e .
  rm -f .venv/.installed-*
  touch "$STAMP"
fi
