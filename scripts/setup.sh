#!/usr/bin/env bash
# Idempotent set-up: a .venv with torch + this package (editable) and its dev/web extras.
# Sourced by speedrun.sh and scripts/test.sh, so a fresh machine needs nothing else.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    # the CPU build; machines of this project carry it on local disk
    python -m pip install -q "torch==2.13.0" || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
if ! python -c "import nanochat, megacontext, pytest, fastapi" 2>/dev/null || [ pyproject.toml -nt .venv/.installed ]; then
  python -m pip install -q -e ".[dev,web]"
  touch .venv/.installed
fi
