#!/usr/bin/env bash
# Sets up .venv (first run only) from the project's pinned requirements and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")"
./setup_env.sh
exec .venv/bin/python -m pytest "$@"
