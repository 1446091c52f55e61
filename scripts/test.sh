#!/usr/bin/env bash
# The test command: set up (if needed), then run the default test suite: the tests that time
# nothing two at a time (pytest-xdist, one process per core, a file to a process: the files'
# module-wide fixtures are built once), then those marked `alone`
# (heartbeats, timeouts, measured speeds, network namespaces) one at a time on a quiet
# machine. Arguments go to one plain pytest run instead (`scripts/test.sh -m slow`,
# `scripts/test.sh tests/test_cli.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
status=0
.venv/bin/python -m pytest -q -n 2 --dist loadfile -m "not arm and not slow and not alone" || status=$?
.venv/bin/python -m pytest -q -m "not arm and not slow and alone" || status=$?
exit $status
