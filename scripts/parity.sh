#!/usr/bin/env bash
# Set up a virtual environment with torch/torchvision and print the parity table (offline:
# calibrated random weights). Extra arguments go to mbv3-parity.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[torch]'
exec .venv/bin/mbv3-parity "$@"
