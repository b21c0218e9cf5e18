"""Our copy of the MCP constants equals the MCP SDK's (``mcp_types``), the source of truth."""

from __future__ import annotations

import mcp_types
import mcp_types.jsonrpc
import mcp_types.version

from extproc.mcp import spec


def test_constants_match_the_sdk() -> None:
    for name in ("PARSE_ERROR", "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS", "INTERNAL_ERROR"):
        assert getattr(spec, name) == getattr(mcp_types.jsonrpc, name), name
    assert spec.HEADER_MISMATCH == mcp_types.jsonrpc.HEADER_MISMATCH
    assert tuple(mcp_types.version.HANDSHAKE_PROTOCOL_VERSIONS) == spec.HANDSHAKE_PROTOCOL_VERSIONS
    assert tuple(mcp_types.version.MODERN_PROTOCOL_VERSIONS) == spec.MODERN_PROTOCOL_VERSIONS
    assert spec.PROTOCOL_VERSION_META_KEY == mcp_types.PROTOCOL_VERSION_META_KEY
