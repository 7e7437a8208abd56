"""Fuzz and robustness harnesses (see docs/robustness.md). Each module runs as a script:

    .venv/bin/python -m fuzz.ring_fuzz --help
    .venv/bin/python -m fuzz.codec_fuzz --help
    .venv/bin/python -m fuzz.frontend_fuzz --help
    .venv/bin/python -m fuzz.churn --help
    .venv/bin/python -m fuzz.disconnect --help

and exposes a `run(...)` the CI tests (tests/test_robust_*.py) call with small counts.
"""
