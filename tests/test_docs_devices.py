"""docs/devices.md's examples run: every ```python block, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "devices.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_example_in_docs_devices_runs():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 6
    namespace: dict = {"__name__": "docs_devices"}
    for n, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name} block {n + 1}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"docs/devices.md block {n + 1} failed:\n{block}") from exc
