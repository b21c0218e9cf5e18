"""What importing the server loads (memory a user pays for), checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_server_loads_neither_the_sdk_models_nor_unused_engines() -> None:
    # Resident memory a user pays for nothing: mcp_types' models (about 8 MB), the Rego
    # engines (about 25 MB) while no policy uses them, PyJWT (about 9 MB) until a token
    # is checked. Checked in a fresh interpreter.
    code = (
        "import sys, extproc.commands.run, extproc.core.registry, plugins.session, plugins.policy, plugins.lib.rego; "
        "print(sorted(m for m in ('mcp_types', 'regopy', 'opa_client', 'aiohttp', 'jwt') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
