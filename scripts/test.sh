#!/usr/bin/env bash
# Prepare the machine (idempotent, quick when already done) and run the test suite.
# Arguments go to pytest, e.g.  bash scripts/test.sh -m interop -x
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO_ROOT/scripts/setup.sh"
cd "$REPO_ROOT"
# Compile every built-in device's kernels once, before any test: on a fresh machine numba's
# cache is empty, and a kernel compiled inside a test competes with that test's deadlines
# (cold on 2 cores: net about 2 min, blk 40 s, rng 1 s). Later processes load them from the
# cache. The bound is generous: past it, the tests compile what they need.
for device in "net --source loopback" "blk --null 1M" "rng"; do
    # shellcheck disable=SC2086
    timeout 900 .venv/bin/pyvhost $device --compile-only --log-level INFO ||
        echo "test.sh: pyvhost $device --compile-only failed; its tests will compile" >&2
done
exec .venv/bin/python -m pytest -q "$@"
