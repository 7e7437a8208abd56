"""The package type-checks: mypy, configured in pyproject.toml ([tool.mypy]), finds no error.

This is how CI runs the type checker (scripts/test.sh runs pytest over tests/); mypy is a
test dependency that scripts/setup.sh installs into .venv."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_no_errors() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
