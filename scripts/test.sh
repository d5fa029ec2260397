#!/usr/bin/env bash
# Set up a virtual environment with the test extra (torch, torchvision) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/ruff check mbv3_jax porting train tests benchmarks
# Two workers (whole files each, in the order tests/conftest.py gives): compiling, most of the suite,
# runs on one core.
exec .venv/bin/python -m pytest -q -n "${MBV3_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
