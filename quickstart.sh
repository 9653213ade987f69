#!/usr/bin/env bash
# Installs into .venv (first run only) and runs the quick start: openmoe-train --gin_file=quickstart.gin
set -euo pipefail
cd "$(dirname "$0")"
./setup_env.sh
exec .venv/bin/openmoe-train --gin_file=quickstart.gin "$@"
