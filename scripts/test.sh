#!/usr/bin/env bash
# The test command: set up (if needed), then run the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
