"""What importing the server loads (memory a user pays for), checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_server_loads_neither_the_sdk_models_nor_unused_engines() -> None:
    # Resident memory a user pays for nothing: mcp_types' models (about 8 MB), the Rego
    # engines (about 25 MB) while no policy uses them, PyJWT (about 9 MB) until a token
    # is checked, OpenTelemetry's SDK and exporters while tracing is off, Envoy's config
    # protos (about 3 MB, only the renderer packs them) and ctypes (only up's Envoy child)
    # while nothing is rendered or started. Checked in a fresh interpreter.
    bootstrap = "envoy.config.bootstrap.v3.bootstrap_pb2"
    heavy = ("mcp_types", "regopy", "opa_client", "aiohttp", "jwt", "opentelemetry", bootstrap, "ctypes")
    code = (
        "import sys, extproc.commands.run, extproc.core.registry, plugins.session, plugins.policy, plugins.lib.rego, "
        "plugins.credentials, plugins.external, extproc.frontdoor.servers; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
