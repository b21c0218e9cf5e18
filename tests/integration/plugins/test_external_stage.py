"""The external stage protocol: the committed stubs (``mcp_extproc/stage/v1``) match the ``.proto``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def test_committed_stubs_match_the_proto() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "protos/generate.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
