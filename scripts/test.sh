#!/usr/bin/env bash
# Prepare the machine (idempotent, quick when already done) and run the test suite.
# Arguments go to pytest, e.g.  bash scripts/test.sh -m interop -x
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO_ROOT/scripts/setup.sh"
cd "$REPO_ROOT"
exec .venv/bin/python -m pytest -q "$@"
