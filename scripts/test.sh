#!/usr/bin/env bash
# The test command: set up (idempotent) and run the whole CPU suite (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider "$@" tests
