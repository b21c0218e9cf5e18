"""Golden files (``tests/data/golden``) of the controller's renderers and of ``render k8s``.

``UPDATE_GOLDEN=1 pytest tests/unit/controller/test_golden.py tests/integration/controller/test_golden.py``
rewrites them.
"""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs; if the change is intended, rerun with UPDATE_GOLDEN=1"
